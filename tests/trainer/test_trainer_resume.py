"""Preemption and resumption: a run stopped at a checkpoint and restarted ends bit-identical to an uninterrupted one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import make_task, put_jsonl, sample_pairs

from langmerge.artifacts import (
    MANIFEST,
    BaseModelIdentity,
    CheckpointPointer,
    PreemptionRecord,
    checkpoints_uri,
    join,
    preemption_uri,
)
from langmerge.store import ObjectStore
from langmerge.tasks import TrainTask
from langmerge_trainer.train import Preempted, run_train_task

#: Dropout on (its RNG must be restored), packed batches split into two micro-batches, a checkpoint every 2 steps.
RESUME_TRAINING: dict[str, Any] = {
    "batching": "packed",
    "batchSize": 4,
    "gradientAccumulationSteps": 2,
    "maxSeqLength": 48,
    "epochs": 2,
    "checkpointEverySteps": 2,
    "weightDecay": 0.01,
}


def _task(bucket: str, base: BaseModelIdentity, data_uri: str, fingerprint: str, attempt: int = 1) -> TrainTask:
    return make_task(
        bucket=bucket,
        base=base,
        data_uri=data_uri,
        fingerprint=fingerprint,
        training=RESUME_TRAINING,
        lora={"dropout": 0.1},
        dataset={"skipInvalidLines": True},
        attempt=attempt,
    )


@pytest.fixture(scope="module")
def data_uri(s3: ObjectStore, base_env: tuple[str, BaseModelIdentity]) -> str:
    bucket, _base = base_env
    uri = f"s3://{bucket}/data/resume"
    rows: list[Any] = [p.row() for p in sample_pairs("es", 56)]
    rows.insert(5, "not json")
    rows.insert(20, {"messages": [{"role": "user", "content": "hola"}]})
    put_jsonl(s3, f"{uri}/a.jsonl", rows)
    return uri


def _weights(s3: ObjectStore, uri: str, folder: Path) -> bytes:
    s3.download_prefix(uri, folder)
    return (folder / "adapter_model.safetensors").read_bytes()


def test_resumed_run_is_bit_identical(
    s3: ObjectStore, base_env: tuple[str, BaseModelIdentity], data_uri: str, tmp_path: Path
) -> None:
    bucket, base = base_env
    straight = run_train_task(_task(bucket, base, data_uri, "straight00000001"), s3, device="cpu")
    assert straight.skipped_lines == 2 and straight.resumed_from_step is None
    assert straight.steps > 4

    interrupted = _task(bucket, base, data_uri, "interrupt0000001")
    with pytest.raises(Preempted) as caught:
        run_train_task(interrupted, s3, device="cpu", stop_after_steps=3)
    assert caught.value.step == 3
    assert not s3.exists(join(interrupted.output_uri, MANIFEST))
    assert not list(s3.iter_objects(join(interrupted.output_uri, "failures")))  # preemption is not a failure
    marker = s3.get_record(preemption_uri(interrupted.output_uri, 1), PreemptionRecord)
    assert marker is not None and (marker.attempt, marker.step) == (1, 3)  # tells the operator: a disruption
    ckpts = checkpoints_uri(interrupted.output_uri)
    pointer = CheckpointPointer.model_validate(s3.get_json(join(ckpts, "latest.json")))
    assert pointer.step == 3 and pointer.uri == join(ckpts, "step-3")
    # The step-2 checkpoint was superseded and removed; step-3 holds the full resumable state.
    assert sorted(o.key.rsplit("/", 2)[-2] for o in s3.iter_objects(ckpts) if "/step-" in o.key) == ["step-3"] * 5

    resumed = run_train_task(interrupted.model_copy(update={"attempt": 2}), s3, device="cpu")
    assert resumed.resumed_from_step == 3 and resumed.steps == straight.steps
    assert resumed.tokens_trained == straight.tokens_trained
    assert _weights(s3, resumed.adapter_uri, tmp_path / "resumed") == _weights(
        s3, straight.adapter_uri, tmp_path / "straight"
    )
    assert resumed.adapter_digest == straight.adapter_digest
    assert resumed.metrics == straight.metrics
    assert resumed.cost.wall_seconds > 0


def test_sigterm_checkpoints_and_stops(
    s3: ObjectStore, base_env: tuple[str, BaseModelIdentity], data_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kubernetes' preemption notice: the current step finishes, a checkpoint is saved, no failure is recorded."""
    import signal

    from langmerge_trainer.train import StepResult, TrainingLoop

    original = TrainingLoop.train_step

    def step_then_sigterm(self: TrainingLoop) -> StepResult:
        result = original(self)
        if self.step == 2:
            signal.raise_signal(signal.SIGTERM)
        return result

    monkeypatch.setattr(TrainingLoop, "train_step", step_then_sigterm)
    bucket, base = base_env
    task = _task(bucket, base, data_uri, "sigterm000000001")
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="SIGTERM"):
        run_train_task(task, s3, device="cpu")
    pointer = s3.get_json(join(checkpoints_uri(task.output_uri), "latest.json"))
    assert pointer["step"] == 2
    assert not list(s3.iter_objects(join(task.output_uri, "failures")))
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the trainer's handler is gone again
    marker = s3.get_record(preemption_uri(task.output_uri, task.attempt), PreemptionRecord)
    assert marker is not None and (marker.step, marker.reason) == (2, "SIGTERM")

    # The same attempt runs again (a restarted pod): its preemption record no longer tells how it ends.
    monkeypatch.undo()
    assert run_train_task(task, s3, device="cpu").resumed_from_step == 2
    assert not s3.exists(preemption_uri(task.output_uri, task.attempt))
