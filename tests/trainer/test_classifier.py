"""Sequence-classification experts on the real S3: training (the Job's code), bad labels, merging with heads, and the
published models loading with AutoModelForSequenceClassification (+ PeftModel.from_pretrained for an adapter)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import new_bucket, put_jsonl, upload_model

from langmerge import artifacts
from langmerge.api.expert import LanguageExpertSpec
from langmerge.api.merged import Evaluation, Output
from langmerge.artifacts import AdapterManifest, BaseModelIdentity, FailureRecord
from langmerge.store import ObjectStore
from langmerge.tasks import MergeTask, MergeTaskInput, TrainTask
from langmerge_trainer.bench.workloads import topic_data
from langmerge_trainer.data import DataError
from langmerge_trainer.evaluate import peft_compat
from langmerge_trainer.merge.engine import AdapterInput, MergeError, merge_adapters
from langmerge_trainer.merge.job import run_merge_task
from langmerge_trainer.train import run_train_task

LABELS = ["money", "science"]
LANGUAGES = ("it", "ja")
TRAINING = {"epochs": 8, "learningRate": 2e-2, "batchSize": 8, "maxSeqLength": 48, "seed": 3}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from langmerge_trainer.sample import build_tiny_bert

    texts = [r["text"] for lang in LANGUAGES for r in topic_data(lang, LABELS).train]
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), texts)


@pytest.fixture(scope="module")
def env(s3: ObjectStore, tiny_bert: Path) -> tuple[str, BaseModelIdentity]:
    bucket = new_bucket(s3)
    base = upload_model(s3, tiny_bert, f"s3://{bucket}/models/tiny-bert")
    for lang in LANGUAGES:
        data = topic_data(lang, LABELS)
        put_jsonl(s3, f"s3://{bucket}/data/{lang}/part-0.jsonl", data.train)
        # A tiny random encoder cannot generalise on this task: the tests evaluate on the training examples, which
        # shows that the adapter and the head trained and travel with the published files.
        put_jsonl(s3, f"s3://{bucket}/test/{lang}/part-0.jsonl", data.train)
    return bucket, base


def classifier_task(bucket: str, base: BaseModelIdentity, language: str, fp: str, **spec: Any) -> TrainTask:
    doc = {
        "language": language,
        "task": "topic",
        "taskType": "sequence-classification",
        "labels": LABELS,
        "baseModel": {"uri": base.uri},
        "dataset": {"uri": f"s3://{bucket}/data/{language}", "evalUri": f"s3://{bucket}/test/{language}"},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["query", "value", "dense"]},
        "training": TRAINING,
        "resources": {"gpus": 0},
        **spec,
    }
    return TrainTask(
        fingerprint=fp,
        output_uri=f"s3://{bucket}/artifacts/experts/default/topic-{language}/{fp}",
        namespace="default",
        name=f"topic-{language}",
        spec=LanguageExpertSpec.model_validate(doc),
        base_model=base,
        data_digest="d" * 16,
        image="langmerge/trainer:test",
    )


@pytest.fixture(scope="module")
def experts(s3: ObjectStore, env: tuple[str, BaseModelIdentity]) -> list[tuple[TrainTask, AdapterManifest]]:
    bucket, base = env
    out = []
    for i, lang in enumerate(LANGUAGES):
        # The tiny random encoder collapses on ja (science for every input): these tests are about the mechanics of
        # heads, merges and loading, so that adapter is committed anyway (test_trainer_collapse covers the check).
        training = {**TRAINING, "collapseCheck": False}
        task = classifier_task(bucket, base, lang, f"cls{i:013d}", training=training)
        out.append((task, run_train_task(task, s3, device="cpu")))
    return out


def _download(s3: ObjectStore, uri: str, target: Path) -> Path:
    assert s3.download_prefix(uri, target)
    return target


def test_classifier_expert_trains_and_its_adapter_loads_with_automodel(
    s3: ObjectStore, experts: list[tuple[TrainTask, AdapterManifest]], tiny_bert: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _task, manifest = experts[0]
    assert manifest.task_type == "sequence-classification" and manifest.labels == LABELS
    # training examples per label, every label listed
    train = topic_data("it", LABELS).train
    assert manifest.label_counts == {label: sum(r["label"] == label for r in train) for label in LABELS}
    assert manifest.examples_train == sum(manifest.label_counts.values())
    m, base_m = manifest.metrics, manifest.base_metrics
    assert base_m is not None and m.accuracy is not None and m.macro_f1 is not None and m.eval_loss is not None
    assert m.examples == len(topic_data("it", LABELS).train)
    # the adapter and the head learned: far better than the untrained head
    assert m.eval_loss < base_m.eval_loss and m.accuracy > (base_m.accuracy or 0) + 0.15

    adapter = _download(s3, manifest.adapter_uri, tmp_path / "adapter")
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=len(LABELS))
    with peft_compat():
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_bert))
    test = topic_data("it", LABELS).train
    batch = tok([r["text"] for r in test], padding=True, truncation=True, max_length=48, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    accuracy = sum(LABELS[p] == r["label"] for p, r in zip(predicted, test, strict=True)) / len(test)
    # The adapter carries its head: loading it reproduces the trainer's own figure.
    assert accuracy == pytest.approx(m.accuracy)


def test_a_label_outside_the_set_fails_naming_file_and_line(
    s3: ObjectStore, env: tuple[str, BaseModelIdentity]
) -> None:
    bucket, base = env
    put_jsonl(
        s3,
        f"s3://{bucket}/bad/it/part-0.jsonl",
        [{"text": "Quanto costa?", "label": "money"}, {"text": "Che film!", "label": "movies"}],
    )
    task = classifier_task(bucket, base, "it", "cls9999999999999", dataset={"uri": f"s3://{bucket}/bad/it"})
    with pytest.raises(DataError, match=r"bad/it/part-0.jsonl, line 2: label \"movies\" is not one of"):
        run_train_task(task, s3, device="cpu")
    record = FailureRecord.model_validate(s3.get_json(artifacts.failure_uri(task.output_uri, 1)))
    assert record.error_class == "DataError" and not record.retryable and "line 2" in record.message


def _merge_task(
    bucket: str,
    base: BaseModelIdentity,
    experts: list[tuple[TrainTask, AdapterManifest]],
    fp: str,
    fmt: str,
    *,
    weights: dict[str, float] | None = None,
    label_counts: bool = False,
) -> MergeTask:
    """The task the operator builds; ``label_counts``: with each expert's counts (from its manifest) as the operator
    passes them, else as an operator that did not know them."""
    output = Output(uri=f"s3://{bucket}/merged/topic", format=fmt, rank=8)
    weights = weights or {"it": 3.0, "ja": 1.0}
    return MergeTask(
        fingerprint=fp,
        output_uri=artifacts.merge_prefix(output.uri, fp),
        namespace="default",
        name="topic",
        method="linear",
        parameters={"weights": weights, "include_modules": [], "exclude_modules": []},
        base_model=base,
        inputs=[
            MergeTaskInput(
                expert=t.name,
                language=t.spec.language,
                adapter_uri=m.adapter_uri,
                adapter_digest=m.adapter_digest,
                weight=weights[t.spec.language],
                dataset=t.spec.dataset,
                max_seq_length=48,
                task_type=t.spec.task_type,
                labels=t.spec.labels,
                label_counts=m.label_counts if label_counts else None,
            )
            for t, m in experts
        ],
        output=output,
        evaluation=Evaluation(metric="accuracy", max_regression=0.2),
    )


def test_merge_job_merges_heads_and_evaluates_accuracy(
    s3: ObjectStore,
    env: tuple[str, BaseModelIdentity],
    experts: list[tuple[TrainTask, AdapterManifest]],
    tiny_bert: Path,
    tmp_path: Path,
) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    bucket, base = env
    adapter_out = run_merge_task(_merge_task(bucket, base, experts, "mcls000000000001", "peft-adapter"), s3)
    full_out = run_merge_task(_merge_task(bucket, base, experts, "mcls000000000002", "full-weights"), s3)
    for manifest in (adapter_out, full_out):
        assert set(manifest.evaluation) == set(LANGUAGES) == set(manifest.expert_metrics)
        for lang in LANGUAGES:
            assert manifest.evaluation[lang].accuracy is not None and manifest.evaluation[lang].macro_f1 is not None
        # the experts' figures in the merge Job are the trainer's own (same examples, same head)
        by_lang = {t.spec.language: m for t, m in experts}
        for lang in LANGUAGES:
            assert manifest.expert_metrics[lang].accuracy == pytest.approx(by_lang[lang].metrics.accuracy)

    # The merged head is the weighted average of the experts' heads (weights 3:1 normalised).
    heads = [
        load_file(str(_download(s3, m.adapter_uri, tmp_path / t.spec.language) / "adapter_model.safetensors"))
        for t, m in experts
    ]
    merged_dir = _download(s3, adapter_out.model_uri, tmp_path / "merged")
    merged = load_file(str(merged_dir / "adapter_model.safetensors"))
    key = next(k for k in merged if k.endswith("classifier.weight"))
    assert torch.allclose(merged[key], 0.75 * heads[0][key] + 0.25 * heads[1][key], atol=1e-6)

    # The adapter output loads with AutoModelForSequenceClassification + PeftModel; the full output alone; both agree.
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=len(LABELS))
    with peft_compat():
        model = PeftModel.from_pretrained(model, str(merged_dir)).eval()
    full_dir = _download(s3, full_out.model_uri, tmp_path / "full")
    full = AutoModelForSequenceClassification.from_pretrained(str(full_dir)).eval()
    assert full.config.id2label == dict(enumerate(LABELS))
    ids = torch.tensor([[1, 5, 9, 14, 2], [1, 7, 3, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = full(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a, b, atol=1e-4), (a, b)


def test_merging_refuses_different_label_sets(
    s3: ObjectStore, experts: list[tuple[TrainTask, AdapterManifest]], tiny_bert: Path, tmp_path: Path
) -> None:
    inputs = [
        AdapterInput(
            language=t.spec.language,
            path=_download(s3, m.adapter_uri, tmp_path / t.spec.language),
            labels=tuple(LABELS) if i == 0 else ("science", "money"),
        )
        for i, (t, m) in enumerate(experts)
    ]
    with pytest.raises(MergeError, match="different label sets"):
        merge_adapters(tiny_bert, inputs, "ties", {"density": 1.0}, "peft-adapter", None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_expert_without_a_label_records_it_and_the_merge_job_takes_that_row_from_the_others(
    s3: ObjectStore,
    env: tuple[str, BaseModelIdentity],
    experts: list[tuple[TrainTask, AdapterManifest]],
    tmp_path: Path,
) -> None:
    """An expert whose data has no "science" example commits label_counts with science 0; the merge Job, given every
    expert's counts, builds the science row of the merged head from the experts that saw science only (weighted by
    weight x examples), and says so in its manifest."""
    import torch
    from safetensors.torch import load_file

    bucket, base = env
    money_only = topic_data("ko", ["money"]).train
    put_jsonl(s3, f"s3://{bucket}/data/ko/part-0.jsonl", money_only)
    put_jsonl(s3, f"s3://{bucket}/test/ko/part-0.jsonl", money_only)
    ko_task = classifier_task(bucket, base, "ko", "cls0000000000ko")
    ko = run_train_task(ko_task, s3, device="cpu")
    assert ko.label_counts == {"money": len(money_only), "science": 0}

    everyone = [*experts, (ko_task, ko)]
    weights = {"it": 1.0, "ja": 1.0, "ko": 2.0}
    manifest = run_merge_task(
        _merge_task(bucket, base, everyone, "mcls00000000000s", "full-weights", weights=weights, label_counts=True),
        s3,
    )
    counts = {t.spec.language: m.label_counts or {} for t, m in everyone}
    assert manifest.head_support == {
        "money": {lang: counts[lang]["money"] for lang in ("it", "ja", "ko")},
        "science": {lang: counts[lang]["science"] for lang in ("it", "ja")},
    }
    heads = {
        t.spec.language: load_file(
            str(_download(s3, m.adapter_uri, tmp_path / t.spec.language) / "adapter_model.safetensors")
        )
        for t, m in everyone
    }
    merged_dir = _download(s3, manifest.model_uri, tmp_path / "merged")
    merged = {k: v for shard in merged_dir.glob("*.safetensors") for k, v in load_file(str(shard)).items()}
    key = "classifier.weight"
    heads = {lang: {key: next(v for k, v in h.items() if k.endswith(key))} for lang, h in heads.items()}
    science = LABELS.index("science")
    support = {lang: weights[lang] * counts[lang]["science"] for lang in weights}
    expected = sum(support[lang] / sum(support.values()) * heads[lang][key][science] for lang in weights)
    assert torch.allclose(merged[key][science], expected, atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "magnitude_prune", "cat", "knots", "task_arithmetic"])
def test_every_method_merges_classifier_heads(
    s3: ObjectStore, experts: list[tuple[TrainTask, AdapterManifest]], tiny_bert: Path, tmp_path: Path, method: str
) -> None:
    from safetensors.torch import load_file

    from langmerge.merge_catalogue import METHODS

    inputs = [
        AdapterInput(
            language=t.spec.language,
            path=_download(s3, m.adapter_uri, tmp_path / t.spec.language),
            labels=tuple(LABELS),
        )
        for t, m in experts
    ]
    fmt = "peft-adapter" if METHODS[method].low_rank_exact else "full-weights"
    report = merge_adapters(tiny_bert, inputs, method, {}, fmt, None, tmp_path / "out")
    weights = {
        name: tensor
        for shard in (tmp_path / "out").glob("*.safetensors")
        for name, tensor in load_file(str(shard)).items()
    }
    heads = [k for k in weights if k.endswith("classifier.weight")]
    assert len(heads) == 1 and report.output_format == fmt


def test_a_decoder_base_trains_a_classifier_with_a_score_head(
    s3: ObjectStore, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """AutoModelForSequenceClassification over a causal LM (the tiny Llama): the head is ``score``, the class comes
    from the last token before the padding."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    bucket = new_bucket(s3)
    base = upload_model(s3, tiny_model_dir, f"s3://{bucket}/models/tiny-llama")
    rows = topic_data("it", LABELS).train
    put_jsonl(s3, f"s3://{bucket}/data/it/part-0.jsonl", rows)
    put_jsonl(s3, f"s3://{bucket}/test/it/part-0.jsonl", rows)
    task = classifier_task(
        bucket,
        base,
        "it",
        "dec0000000000001",
        lora={"rank": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]},
    )
    manifest = run_train_task(task, s3, device="cpu")
    assert manifest.metrics.accuracy is not None and manifest.base_metrics is not None
    assert manifest.metrics.eval_loss < (manifest.base_metrics.eval_loss or 0)
    adapter = _download(s3, manifest.adapter_uri, tmp_path / "adapter")
    assert any(k.endswith("score.weight") for k in load_file(str(adapter / "adapter_model.safetensors")))

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_model_dir), num_labels=len(LABELS), pad_token_id=tok.pad_token_id
    )
    with peft_compat():
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    batch = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=48, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    accuracy = sum(LABELS[p] == r["label"] for p, r in zip(predicted, rows, strict=True)) / len(rows)
    assert accuracy == pytest.approx(manifest.metrics.accuracy)
