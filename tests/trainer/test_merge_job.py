"""The merge Job (``langmerge-trainer merge --task``) on the real S3: two trained experts -> merged, evaluated, committed."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import make_task, put_jsonl, sample_pairs

from faults import LateView, TcpProxy
from langmerge import artifacts
from langmerge.api.merged import Evaluation, Output, Search
from langmerge.artifacts import AdapterManifest, BaseModelIdentity, FailureRecord, MergeManifest
from langmerge.dev.controlplane import Endpoints
from langmerge.store import ObjectStore, S3Config
from langmerge.tasks import MergeTask, MergeTaskInput, TrainTask
from langmerge_trainer.evaluate import peft_compat
from langmerge_trainer.merge.job import AdapterDigestMismatch, run_merge_task
from langmerge_trainer.train import run_train_task


@pytest.fixture(scope="module")
def experts(s3: ObjectStore, base_env: tuple[str, BaseModelIdentity]) -> list[tuple[TrainTask, AdapterManifest]]:
    bucket, base = base_env
    out = []
    for i, lang in enumerate(("es", "it")):
        data_uri = f"s3://{bucket}/data/{lang}"
        put_jsonl(s3, f"{data_uri}/part-0.jsonl", [p.row() for p in sample_pairs(lang, 80)])
        task = make_task(bucket=bucket, base=base, data_uri=data_uri, fingerprint=f"mj{i:014d}", language=lang)
        out.append((task, run_train_task(task, s3, device="cpu")))
    return out


def _task(
    bucket: str, base: BaseModelIdentity, experts: list[tuple[TrainTask, AdapterManifest]], fp: str, **kw: Any
) -> MergeTask:
    # maxRank 64: the tiny model's full width, so that a TIES adapter can meet the error bound
    output = Output(
        uri=f"s3://{bucket}/merged/mm", format=kw.pop("format", "peft-adapter"), **kw.pop("output", {"max_rank": 64})
    )
    return MergeTask(
        fingerprint=fp,
        output_uri=artifacts.merge_prefix(output.uri, fp),
        namespace="default",
        name="mm",
        method=kw.pop("method", "ties"),
        parameters=kw.pop(
            "parameters", {"weights": {}, "include_modules": [], "exclude_modules": [], "density": 1.0, "lambda_": 1.0}
        ),
        base_model=base,
        inputs=[
            MergeTaskInput(
                expert=t.name,
                language=t.spec.language,
                adapter_uri=m.adapter_uri,
                adapter_digest=kw.get("digest", m.adapter_digest),
                dataset=t.spec.dataset,
                expert_metrics=m.metrics,
                max_seq_length=t.spec.training.max_seq_length,
            )
            for t, m in experts
        ],
        output=output,
        evaluation=kw.pop("evaluation", Evaluation()),
        search=kw.pop("search", None),
    )


def test_merge_job_commits_an_evaluated_loadable_adapter(
    s3: ObjectStore,
    base_env: tuple[str, BaseModelIdentity],
    experts: list[tuple[TrainTask, AdapterManifest]],
    tmp_path: Path,
) -> None:
    bucket, base = base_env
    task = _task(bucket, base, experts, "mergejob00000001")
    manifest = run_merge_task(task, s3, device="cpu")
    stored = MergeManifest.model_validate(s3.get_json(artifacts.join(task.output_uri, artifacts.MANIFEST)))
    assert stored == manifest and manifest.method == "ties" and manifest.output_format == "peft-adapter"
    assert [i.language for i in manifest.inputs] == ["es", "it"]
    # The expert alone is re-evaluated on the same examples the trainer used: the same figures as its own manifest.
    for t, m in experts:
        lang = t.spec.language
        assert manifest.expert_metrics[lang].examples == m.metrics.examples
        assert manifest.expert_metrics[lang].eval_loss == pytest.approx(m.metrics.eval_loss, rel=1e-4)
        merged = manifest.evaluation[lang]
        assert merged.eval_loss is not None and math.isfinite(merged.eval_loss)
        # Merging two languages costs each a little, yet stays far better than the base alone.
        assert m.base_metrics is not None and m.base_metrics.eval_loss is not None
        assert merged.eval_loss < m.base_metrics.eval_loss
        # The base alone on the same examples (the gate's floor): the trainer's own figure for the base.
        assert manifest.base_metrics[lang].examples == m.metrics.examples
        assert manifest.base_metrics[lang].eval_loss == pytest.approx(m.base_metrics.eval_loss, rel=1e-4)
        assert s3.exists(artifacts.merge_eval_uri(manifest.model_uri.removesuffix("/model"), lang))
    assert manifest.cost.wall_seconds > 0 and manifest.versions.torch
    # The model is under this run's own prefix, and holds exactly the files the manifest names.
    assert manifest.model_uri.startswith(artifacts.join(task.output_uri, "attempts", "1-"))
    assert manifest.model_uri.endswith("/model")
    listed = {o.key.rsplit("/model/", 1)[1]: o.size for o in s3.list_objects(manifest.model_uri)}
    assert listed == {name: entry.size for name, entry in manifest.files.items()}

    # The published adapter loads with PEFT on the base model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    local = tmp_path / "adapter"
    s3.download_prefix(manifest.model_uri, local)
    base_dir = tmp_path / "base"
    s3.download_prefix(base.uri, base_dir)
    with peft_compat():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(local))
    assert sum(1 for n, _ in model.named_parameters() if "lora_A" in n) > 0

    # Same fingerprint again: a no-op that returns the committed manifest.
    before = {o.key for o in s3.list_objects(task.output_uri)}
    again = run_merge_task(task, s3, device="cpu")
    assert again == manifest and {o.key for o in s3.list_objects(task.output_uri)} == before


def test_the_gate_reads_back_the_figures_of_models_that_did_not_change(
    s3: ObjectStore, base_env: tuple[str, BaseModelIdentity], experts: list[tuple[TrainTask, AdapterManifest]]
) -> None:
    """A second merge of the same experts (another method here, as after a spec change) evaluates the merged model
    only: the base's and each expert's figures on the same examples are read back from the evaluation cache. An entry
    that cannot be parsed is evaluated again and written over."""
    bucket, base = base_env
    cache = f"s3://{bucket}/merged/cached/evaluations"
    first = run_merge_task(
        _task(bucket, base, experts, "cachedmerge00001").model_copy(update={"evaluation_cache_uri": cache}),
        s3,
        device="cpu",
    )
    assert first.evaluation_cached == []
    entries = sorted(o.key for o in s3.list_objects(cache))
    assert len(entries) == 4  # the base and the expert, on each of two languages
    second = run_merge_task(
        _task(bucket, base, experts, "cachedmerge00002", method="linear", parameters={"weights": {}}).model_copy(
            update={"evaluation_cache_uri": cache}
        ),
        s3,
        device="cpu",
    )
    assert second.evaluation_cached == ["base:es", "base:it", "expert:es", "expert:it"]
    assert second.base_metrics == first.base_metrics and second.expert_metrics == first.expert_metrics
    assert set(second.evaluation) == {"es", "it"} and second.evaluation != first.evaluation  # evaluated anew
    # a damaged entry: that model is evaluated again, to the same figures, and the entry is whole again
    damaged = entries[0]
    s3.put_bytes(f"s3://{bucket}/{damaged}", b"{not json")
    third = run_merge_task(
        _task(bucket, base, experts, "cachedmerge00003", format="full-weights").model_copy(
            update={"evaluation_cache_uri": cache}
        ),
        s3,
        device="cpu",
    )
    assert len(third.evaluation_cached) == 3
    assert third.base_metrics == first.base_metrics and third.expert_metrics == first.expert_metrics
    assert s3.get_json(f"s3://{bucket}/{damaged}")["metrics"]


def test_full_weights_output_loads_with_transformers(
    s3: ObjectStore,
    base_env: tuple[str, BaseModelIdentity],
    experts: list[tuple[TrainTask, AdapterManifest]],
    tmp_path: Path,
) -> None:
    bucket, base = base_env
    task = _task(
        bucket,
        base,
        experts,
        "mergejob00000002",
        format="full-weights",
        method="linear",
        parameters={"weights": {}, "include_modules": [], "exclude_modules": []},
    )
    manifest = run_merge_task(task, s3, device="cpu")
    from transformers import AutoModelForCausalLM

    local = tmp_path / "full"
    s3.download_prefix(manifest.model_uri, local)
    model = AutoModelForCausalLM.from_pretrained(local)
    assert model.config.model_type == "llama"
    assert all(math.isfinite(m.eval_loss or math.nan) for m in manifest.evaluation.values())


def test_changed_adapter_is_refused_with_a_failure_record(
    s3: ObjectStore, base_env: tuple[str, BaseModelIdentity], experts: list[tuple[TrainTask, AdapterManifest]]
) -> None:
    bucket, base = base_env
    task = _task(bucket, base, experts, "mergejob00000003", digest="0" * 16)
    with pytest.raises(AdapterDigestMismatch):
        run_merge_task(task, s3, device="cpu")
    # Through the CLI, as a Job runs it: the user-error exit status and a non-retryable failure record.
    proc = subprocess.run(
        [sys.executable, "-m", "langmerge_trainer", "merge", "--task", task.to_json()],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 4, proc.stderr
    record = FailureRecord.model_validate(s3.get_json(artifacts.failure_uri(task.output_uri, 1)))
    assert record.error_class == "AdapterDigestMismatch" and not record.retryable
    assert not s3.exists(artifacts.join(task.output_uri, artifacts.MANIFEST))


def test_racing_merge_runs_leave_exactly_the_committed_files(
    s3: ObjectStore,
    base_env: tuple[str, BaseModelIdentity],
    experts: list[tuple[TrainTask, AdapterManifest]],
    tmp_path: Path,
) -> None:
    """Run B checked for the commit before run A made it, merges other weights, and commits after A (issue 12,
    item 8): A's commit stands, its model files stay exactly as its manifest says, and nothing of B is left."""
    bucket, base = base_env
    linear = {"include_modules": [], "exclude_modules": []}
    first = _task(bucket, base, experts, "mergerace0000001", method="linear", parameters={**linear, "weights": {}})
    weights = {"es": 0.2, "it": 1.8}
    other = _task(bucket, base, experts, "mergerace0000001", method="linear", parameters={**linear, "weights": weights})
    inputs = [i.model_copy(update={"weight": weights[i.language]}) for i in other.inputs]
    second = other.model_copy(update={"attempt": 2, "inputs": inputs})
    committed = run_merge_task(first, s3, device="cpu")
    late = LateView(s3, artifacts.join(first.output_uri, artifacts.MANIFEST))
    assert run_merge_task(second, late, device="cpu") == committed
    assert not late.hidden, "run B must have tried to commit"

    local = tmp_path / "model"
    paths = s3.download_prefix(committed.model_uri, local)
    found = {p.relative_to(local).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    assert found == {name: entry.sha256 for name, entry in committed.files.items()}
    runs = {o.key.split("/attempts/", 1)[1].split("/", 1)[0] for o in s3.iter_objects(first.output_uri + "/attempts")}
    assert runs == {committed.model_uri.split("/attempts/", 1)[1].split("/", 1)[0]}


@pytest.mark.parametrize("output_format", ["peft-adapter", "full-weights"])
def test_evaluation_holds_one_model_at_a_time(
    s3: ObjectStore,
    base_env: tuple[str, BaseModelIdentity],
    experts: list[tuple[TrainTask, AdapterManifest]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    output_format: str,
) -> None:
    """Issue 12, item 16: the merge Job evaluates the merged model and every expert with one model in memory (the
    adapters are swapped on one base), and gets the same figures as evaluating each model on its own."""
    import gc
    import weakref

    from transformers import AutoModelForCausalLM

    from langmerge_trainer.data import load_eval_split
    from langmerge_trainer.evaluate import evaluate_examples, load_for_eval

    loaded: weakref.WeakSet[Any] = weakref.WeakSet()
    most = 0
    original = AutoModelForCausalLM.from_pretrained

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal most
        gc.collect()
        model = original(*args, **kwargs)
        loaded.add(model)
        most = max(most, len(loaded))
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting)
    bucket, base = base_env
    linear = {"weights": {}, "include_modules": [], "exclude_modules": []}
    fp = "onemodel" + ("0" * 7 + "1" if output_format == "peft-adapter" else "0" * 7 + "2")
    task = _task(bucket, base, experts, fp, format=output_format, method="linear", parameters=linear)
    manifest = run_merge_task(task, s3, device="cpu")
    assert most == 1, f"{most} models were in memory at once"
    monkeypatch.undo()

    # The same figures as one model per evaluation (the previous way).
    base_dir = tmp_path / "base"
    s3.download_prefix(base.uri, base_dir)
    merged_dir = tmp_path / "merged"
    s3.download_prefix(manifest.model_uri, merged_dir)
    full = output_format == "full-weights"
    merged_model, merged_tok = load_for_eval(
        base_dir, adapter_dir=None if full else merged_dir, model_dir=merged_dir if full else None
    )
    for t, m in experts:
        lang = t.spec.language
        examples = load_eval_split(s3, t.spec.dataset, max_examples=task.evaluation.max_examples)
        kwargs: dict[str, Any] = {"max_seq_length": t.spec.training.max_seq_length}
        merged = evaluate_examples(merged_model, merged_tok, examples, **kwargs)
        assert manifest.evaluation[lang].eval_loss == pytest.approx(merged.eval_loss, rel=1e-5)
        adapter_dir = tmp_path / "adapters" / lang
        s3.download_prefix(m.adapter_uri, adapter_dir)
        expert_model, expert_tok = load_for_eval(base_dir, adapter_dir=adapter_dir)
        alone = evaluate_examples(expert_model, expert_tok, examples, **kwargs)
        assert manifest.expert_metrics[lang].eval_loss == pytest.approx(alone.eval_loss, rel=1e-5)
        assert manifest.expert_metrics[lang].token_accuracy == alone.token_accuracy


def test_merge_job_rides_out_an_s3_outage(
    s3: ObjectStore,
    base_env: tuple[str, BaseModelIdentity],
    experts: list[tuple[TrainTask, AdapterManifest]],
    control_plane: Endpoints,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 12, item 2: S3 goes away for 3 s right when the merged model is to be uploaded (through a proxy in
    front of the real S3 server): the upload waits for it and the merge commits; no failure record."""
    from langmerge_trainer.merge import job as merge_job

    proxy = TcpProxy(int(control_plane.s3_endpoint.rsplit(":", 1)[1]))
    proxy.start()
    original = merge_job.merge_adapters

    def merge_then_outage(*args: Any, **kwargs: Any) -> Any:
        report = original(*args, **kwargs)
        proxy.outage(3.0)
        return report

    monkeypatch.setattr(merge_job, "merge_adapters", merge_then_outage)
    bucket, base = base_env
    task = _task(bucket, base, experts, "mergeoutage00001", evaluation=Evaluation(enabled=False))
    store = ObjectStore.from_config(
        S3Config(endpoint_url=f"http://127.0.0.1:{proxy.port}"),
        aws_access_key_id=control_plane.s3_access_key,
        aws_secret_access_key=control_plane.s3_secret_key,
    )
    try:
        manifest = run_merge_task(task, store, device="cpu")
    finally:
        proxy.stop()
    assert proxy.recovered.is_set()
    assert MergeManifest.model_validate(s3.get_json(artifacts.join(task.output_uri, artifacts.MANIFEST))) == manifest
    assert not list(s3.iter_objects(artifacts.join(task.output_uri, "failures")))


LINEAR: dict[str, Any] = {"weights": {}, "include_modules": [], "exclude_modules": []}


def test_the_gate_evaluates_the_published_adapter_not_the_exact_update(
    s3: ObjectStore,
    base_env: tuple[str, BaseModelIdentity],
    experts: list[tuple[TrainTask, AdapterManifest]],
    tmp_path: Path,
) -> None:
    """A lossy adapter (rank 1, allowed by maxRelativeError 1.0) is evaluated as written: its figures are the
    published files' own, not those of the exact merged update (which the full-weights merge shows)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from langmerge_trainer.data import load_eval_split
    from langmerge_trainer.evaluate import evaluate_examples, load_tokenizer

    bucket, base = base_env
    lossy = run_merge_task(
        _task(
            bucket,
            base,
            experts,
            "mergegate0000001",
            method="linear",
            parameters=LINEAR,
            output={"rank": 1, "max_relative_error": 1.0},
        ),
        s3,
        device="cpu",
    )
    exact = run_merge_task(
        _task(bucket, base, experts, "mergegate0000002", method="linear", parameters=LINEAR, format="full-weights"),
        s3,
        device="cpu",
    )
    assert max(lossy.module_errors.values()) > 0.3 and set(lossy.module_ranks.values()) == {1}
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "published"
    s3.download_prefix(base.uri, base_dir)
    s3.download_prefix(lossy.model_uri, adapter_dir)
    with peft_compat():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()
    tokenizer = load_tokenizer(base_dir)
    for t, _ in experts:
        lang = t.spec.language
        examples = load_eval_split(s3, t.spec.dataset, max_examples=Evaluation().max_examples)
        published = evaluate_examples(model, tokenizer, examples, max_seq_length=t.spec.training.max_seq_length)
        assert lossy.evaluation[lang].eval_loss == pytest.approx(published.eval_loss, rel=1e-5)
        assert exact.evaluation[lang].eval_loss is not None and published.eval_loss is not None
        assert abs(exact.evaluation[lang].eval_loss - published.eval_loss) > 1e-3  # they differ: which one is gated


def test_merge_search_beats_the_spec_on_validation_and_gates_on_other_examples(
    s3: ObjectStore,
    base_env: tuple[str, BaseModelIdentity],
    experts: list[tuple[TrainTask, AdapterManifest]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The spec's own merge is poor on purpose (three times the summed update): the search finds a better one on
    the validation half of each held-out split, merges it, and the quality gate evaluates the other half. Every
    candidate is scored on one loaded base model."""
    from transformers import AutoModelForCausalLM

    from langmerge_trainer.data import search_splits
    from langmerge_trainer.merge import search as search_module

    loads: list[str] = []
    original_load = AutoModelForCausalLM.from_pretrained
    original_search = search_module.run_search
    searched: list[tuple[int, int]] = []  # (models loaded when the search ended, candidates scored)

    def counting_load(*args: Any, **kwargs: Any) -> Any:
        loads.append(str(args[0]))
        return original_load(*args, **kwargs)

    def recording_search(*args: Any, **kwargs: Any) -> Any:
        result = original_search(*args, **kwargs)
        searched.append((len(loads), len(result.evaluated)))
        return result

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting_load)
    monkeypatch.setattr(search_module, "run_search", recording_search)
    bucket, base = base_env
    search = Search(methods=["linear", "ties"], densities=[1.0], lambdas=[0.5, 1.0], max_candidates=8)
    task = _task(
        bucket,
        base,
        experts,
        "mergesearch00001",
        method="task_arithmetic",
        parameters={**LINEAR, "lambda_": 3.0},
        format="full-weights",
        search=search,
    )
    manifest = run_merge_task(task, s3, device="cpu")
    monkeypatch.undo()
    assert len(searched) == 1
    models_loaded, candidates = searched[0]
    assert candidates > 2 and models_loaded == 1, f"{models_loaded} model loads for {candidates} candidates"
    record = manifest.search
    assert record is not None and record.default is not None
    assert record.default.method == "task_arithmetic" and record.default.parameters["lambda_"] == 3.0
    assert record.chosen.objective > record.default.objective
    assert (manifest.method, manifest.parameters) == (record.chosen.method, record.chosen.parameters)
    assert 2 < record.candidates <= 8 and record.objective == "worst" and record.metric == "evalLoss"
    assert record.top[0].objective == record.chosen.objective
    for t, _ in experts:
        lang = t.spec.language
        split = search_splits(s3, t.spec.dataset, max_gate=Evaluation().max_examples)
        validation = {e.content_hash for e in split.validation}
        gate = {e.content_hash for e in split.gate}
        assert validation and gate and not validation & gate
        assert record.validation[lang]["examples"] == len(split.validation)
        assert manifest.evaluation[lang].examples == manifest.expert_metrics[lang].examples == len(split.gate)
        assert record.expert_scores[lang] > 0


def test_a_validation_uri_never_shares_an_example_with_the_gate(
    s3: ObjectStore, base_env: tuple[str, BaseModelIdentity], experts: list[tuple[TrainTask, AdapterManifest]]
) -> None:
    from langmerge_trainer.data import load_eval_split, search_splits

    bucket, _ = base_env
    task, _ = experts[0]
    held_out = load_eval_split(s3, task.spec.dataset)
    extra = sample_pairs("es", 90)[80:]  # never trained on (the expert's data is the first 80)
    rows = [p.row() for p in extra] + [{"prompt": held_out[0].prompt, "completion": held_out[0].completion}]
    put_jsonl(s3, f"s3://{bucket}/validation/es/part-0.jsonl", rows)
    dataset = task.spec.dataset.model_copy(update={"validation_uri": f"s3://{bucket}/validation/es"})
    split = search_splits(s3, dataset)
    assert len(split.validation) == len(extra)  # the held-out example in the validation file was left out
    assert {e.content_hash for e in split.gate} == {e.content_hash for e in held_out}  # the gate as without search
    assert not {e.content_hash for e in split.validation} & {e.content_hash for e in split.gate}
