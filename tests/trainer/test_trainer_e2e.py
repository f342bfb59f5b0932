"""Training a tiny expert end to end against the real local S3: commit, idempotence, evaluation, failures."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import make_task, put_jsonl, sample_pairs

from langmerge.artifacts import MANIFEST, PROGRESS, AdapterManifest, BaseModelIdentity, FailureRecord, failure_uri, join
from langmerge.store import ObjectStore, file_sha256, files_digest
from langmerge.tasks import TrainTask
from langmerge_trainer.data import DataError
from langmerge_trainer.evaluate import peft_compat
from langmerge_trainer.train import run_train_task


@pytest.fixture(scope="module")
def trained(s3: ObjectStore, base_env: tuple[str, BaseModelIdentity]) -> tuple[TrainTask, AdapterManifest, float]:
    """One expert trained for the module's tests: (task, manifest, seconds)."""
    bucket, base = base_env
    data_uri = f"s3://{bucket}/data/es"
    pairs = sample_pairs("es", 96)
    put_jsonl(s3, f"{data_uri}/part-0.jsonl", [p.row() for p in pairs[:60]])
    # A chat row file beside the prompt/completion one.
    put_jsonl(
        s3,
        f"{data_uri}/more/part-1.jsonl",
        [
            {"messages": [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.completion}]}
            for p in pairs[60:]
        ],
    )
    task = make_task(bucket=bucket, base=base, data_uri=data_uri, fingerprint="e2e0000000000001")
    t0 = time.monotonic()
    manifest = run_train_task(task, s3, device="cpu")
    return task, manifest, time.monotonic() - t0


def test_manifest_records_the_run(s3: ObjectStore, trained: tuple[TrainTask, AdapterManifest, float]) -> None:
    task, manifest, _seconds = trained
    stored = AdapterManifest.model_validate(s3.get_json(join(task.output_uri, MANIFEST)))
    assert stored == manifest
    assert manifest.fingerprint == task.fingerprint and manifest.language == "es" and manifest.task == "chat"
    assert manifest.base_model == task.base_model and manifest.data_digest == task.data_digest
    assert manifest.examples_train + manifest.examples_eval == 96 and manifest.examples_eval > 0
    assert manifest.skipped_lines == 0
    assert manifest.steps > 0 and manifest.tokens_trained > 0
    assert manifest.cost.device == "cpu" and manifest.cost.gpus == 0 and manifest.cost.gpu_seconds == 0
    assert manifest.cost.wall_seconds > 0 and manifest.cost.cpu_seconds > 0
    assert manifest.versions.torch and manifest.versions.transformers and manifest.versions.peft
    assert manifest.lora["rank"] == 8 and manifest.training["seed"] == 7
    assert manifest.resumed_from_step is None and manifest.image == task.image
    progress = s3.get_json(join(task.output_uri, PROGRESS))
    assert progress["stage"] == "done" and progress["step"] == progress["total_steps"] == manifest.steps


def test_adapter_files_match_the_manifest(
    s3: ObjectStore, trained: tuple[TrainTask, AdapterManifest, float], tmp_path: Path
) -> None:
    _task, manifest, _seconds = trained
    s3.download_prefix(manifest.adapter_uri, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors"]
    files = {n: (manifest.files[n].size, manifest.files[n].sha256) for n in names}
    assert all(file_sha256(tmp_path / n) == manifest.files[n].sha256 for n in names)
    assert files_digest(files) == manifest.adapter_digest


def test_adapter_loads_with_peft_and_beats_the_base(
    s3: ObjectStore, trained: tuple[TrainTask, AdapterManifest, float], tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _task, manifest, _seconds = trained
    s3.download_prefix(manifest.adapter_uri, tmp_path)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with peft_compat():  # one known peft 0.21 / transformers 5 FutureWarning, see its docstring
        model = PeftModel.from_pretrained(base, str(tmp_path))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b)  # trained: B starts at zero
    for metrics in (manifest.metrics, manifest.base_metrics):
        assert metrics is not None and metrics.examples == manifest.examples_eval
        values = [metrics.eval_loss, metrics.perplexity, metrics.token_accuracy, metrics.exact_match]
        assert all(v is not None and math.isfinite(v) for v in values)
    assert manifest.base_metrics is not None
    assert manifest.metrics.eval_loss is not None and manifest.base_metrics.eval_loss is not None
    assert manifest.metrics.eval_loss < manifest.base_metrics.eval_loss - 0.5


def test_same_fingerprint_twice_is_a_no_op(s3: ObjectStore, trained: tuple[TrainTask, AdapterManifest, float]) -> None:
    task, manifest, first_seconds = trained
    bucket = task.output_uri.split("/")[2]

    def listing() -> list[tuple[str, str]]:
        return sorted((o.key, o.etag) for o in s3.iter_objects(f"s3://{bucket}"))

    before = listing()
    t0 = time.monotonic()
    again = run_train_task(task, s3, device="cpu")
    seconds = time.monotonic() - t0
    assert again == manifest
    assert listing() == before
    assert seconds < 1.0 and seconds < first_seconds / 3


def test_evaluate_cli_writes_metrics(s3: ObjectStore, trained: tuple[TrainTask, AdapterManifest, float]) -> None:
    from langmerge_trainer.__main__ import main

    task, manifest, _seconds = trained
    out = join(task.output_uri, "eval", "es.json")
    argv = [
        "evaluate",
        "--base-model",
        task.base_model.uri,
        "--base-digest",
        task.base_model.digest,
        "--adapter",
        manifest.adapter_uri,
        "--dataset",
        task.spec.dataset.model_dump_json(by_alias=True, exclude_none=True),
        "--output",
        out,
        "--language",
        "es",
        "--with-base",
        "--max-seq-length",
        "64",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    record: dict[str, Any] = s3.get_json(out)
    assert record["kind"] == "evaluation" and record["language"] == "es"
    # The same examples, model and length as the trainer's own evaluation: the same figures.
    assert record["metrics"]["eval_loss"] == pytest.approx(manifest.metrics.eval_loss, rel=1e-5)
    assert record["metrics"]["examples"] == manifest.examples_eval
    assert record["base_metrics"]["eval_loss"] > record["metrics"]["eval_loss"]


def test_bad_line_fails_naming_file_and_line(s3: ObjectStore, base_env: tuple[str, BaseModelIdentity]) -> None:
    bucket, base = base_env
    data_uri = f"s3://{bucket}/data/bad"
    rows: list[Any] = [p.row() for p in sample_pairs("es", 4)]
    rows.insert(2, '{"prompt": "hola", "completion": 3}')
    put_jsonl(s3, f"{data_uri}/a.jsonl", rows)
    task = make_task(bucket=bucket, base=base, data_uri=data_uri, fingerprint="bad0000000000001", attempt=2)
    with pytest.raises(DataError) as caught:
        run_train_task(task, s3, device="cpu")
    message = str(caught.value)
    assert f"{data_uri}/a.jsonl, line 3" in message and '"completion" must be a string' in message
    record = FailureRecord.model_validate(s3.get_json(failure_uri(task.output_uri, 2)))
    assert record.error_class == "DataError" and record.retryable is False and record.attempt == 2
    assert "line 3" in record.message and "Traceback" in record.traceback_tail
    assert not s3.exists(join(task.output_uri, MANIFEST))


def test_empty_data_is_a_clear_error(s3: ObjectStore, base_env: tuple[str, BaseModelIdentity]) -> None:
    bucket, base = base_env
    task = make_task(bucket=bucket, base=base, data_uri=f"s3://{bucket}/data/none", fingerprint="empty00000000001")
    with pytest.raises(DataError, match=r"no \*\.jsonl objects under s3://"):
        run_train_task(task, s3, device="cpu")
    assert s3.get_json(failure_uri(task.output_uri, 1))["retryable"] is False


def test_target_modules_that_match_nothing_fail_as_spec_error(
    s3: ObjectStore, base_env: tuple[str, BaseModelIdentity]
) -> None:
    bucket, base = base_env
    data_uri = f"s3://{bucket}/data/spec"
    put_jsonl(s3, f"{data_uri}/a.jsonl", [p.row() for p in sample_pairs("es", 40)])
    task = make_task(
        bucket=bucket, base=base, data_uri=data_uri, fingerprint="spec000000000001", lora={"targetModules": ["nope"]}
    )
    with pytest.raises(ValueError, match="targetModules"):
        run_train_task(task, s3, device="cpu")
    record = s3.get_json(failure_uri(task.output_uri, 1))
    assert record["error_class"] == "SpecError" and record["retryable"] is False
