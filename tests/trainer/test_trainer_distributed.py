"""Several training processes (CPU, gloo): the launcher (``langmerge-trainer distributed``, torchrun's machinery) runs
2 processes as real subprocesses.

* DDP parity: 2 processes x batch b train what 1 process x batch 2b trains (same steps, same tokens, the adapter
  equal within :data:`PARITY_ATOL`: only the order of float additions differs), and FSDP2 (``fully_shard``) the same.
* A 2-process run stopped at a checkpoint and resumed ends bit-identical to an uninterrupted 2-process run; only
  rank 0 wrote (one checkpoint series, one progress object, one commit), preemption is exit 3 with no failure record.
* SIGTERM to one rank only (rank 1: a node's preemption notice) stops every rank after the same step: exit 3, one
  checkpoint (rank 0's), rank 0's preemption record, and a resume that still ends bit-identical.
* A user error on the workers is the launcher's exit status 4 (torchrun itself would exit 1), so a Job's
  podFailurePolicy still fails the Job at once; rank 0 alone writes the failure record.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from trainer_helpers import make_task, put_jsonl, sample_pairs

from langmerge.artifacts import (
    MANIFEST,
    PROGRESS,
    AdapterManifest,
    BaseModelIdentity,
    PreemptionRecord,
    checkpoints_uri,
    failure_uri,
    join,
    preemption_uri,
)
from langmerge.store import ObjectStore
from langmerge.tasks import TrainTask
from langmerge_trainer.train import run_train_task

ROOT = Path(__file__).resolve().parents[2]
#: Largest absolute difference allowed between adapter weights trained with 1 and 2 processes (float32 sums in
#: another order, over ~12 AdamW steps at learning rate 1e-2: measured differences are ~1e-7 to 1e-6).
PARITY_ATOL = 1e-4
#: No dropout (its random masks differ per process), padded batches, 2 micro-batches per process and step.
PARITY_TRAINING: dict[str, Any] = {
    "batching": "shuffled",
    "gradientAccumulationSteps": 2,
    "maxSeqLength": 48,
    "epochs": 2,
    "checkpointEverySteps": 2,
}


def _command(task: TrainTask, tmp: Path, processes: int) -> list[str]:
    task_file = tmp / f"{task.fingerprint}-{task.attempt}.json"
    task_file.write_text(task.to_json())
    return [
        sys.executable,
        "-m",
        "langmerge_trainer",
        "distributed",
        "--standalone",
        f"--nproc-per-node={processes}",
        "train",
        "--task",
        f"@{task_file}",
    ]


def _launch(task: TrainTask, tmp: Path, *, processes: int = 2, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command(task, tmp, processes),
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _worker_of_rank(launcher: int, rank: int) -> int | None:
    """The pid of the launcher's worker process of ``rank`` (torch's launcher passes RANK in its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def _task(bucket: str, base: BaseModelIdentity, data_uri: str, fp: str, batch: int, **training: Any) -> TrainTask:
    return make_task(
        bucket=bucket,
        base=base,
        data_uri=data_uri,
        fingerprint=fp,
        training={**PARITY_TRAINING, "batchSize": batch, **training},
        lora={"dropout": 0.0},
    )


def _weights(s3: ObjectStore, manifest: AdapterManifest, folder: Path) -> dict[str, torch.Tensor]:
    s3.download_prefix(manifest.adapter_uri, folder)
    return load_file(str(folder / "adapter_model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def data_uri(s3: ObjectStore, base_env: tuple[str, BaseModelIdentity]) -> str:
    bucket, _base = base_env
    uri = f"s3://{bucket}/data/distributed"
    put_jsonl(s3, f"{uri}/a.jsonl", [p.row() for p in sample_pairs("es", 60)])
    return uri


@pytest.fixture(scope="module")
def ddp(
    s3: ObjectStore, base_env: tuple[str, BaseModelIdentity], data_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> AdapterManifest:
    """An uninterrupted 2-process DDP run with batch 4 per process."""
    bucket, base = base_env
    task = _task(bucket, base, data_uri, "ddp0000000000001", 4)
    done = _launch(task, tmp_path_factory.mktemp("ddp"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "[rank1]" in done.stderr and "[rank0]" in done.stderr
    return AdapterManifest.model_validate(s3.get_json(join(task.output_uri, MANIFEST)))


def test_two_processes_match_one_with_twice_the_batch(
    s3: ObjectStore, base_env: tuple[str, BaseModelIdentity], data_uri: str, ddp: AdapterManifest, tmp_path: Path
) -> None:
    bucket, base = base_env
    one = run_train_task(_task(bucket, base, data_uri, "single0000000001", 8), s3, device="cpu")
    two = ddp
    assert (two.steps, two.tokens_trained, two.examples_train) == (one.steps, one.tokens_trained, one.examples_train)
    assert two.cost.gpus == 0  # CPU processes hold no GPU
    diff = _max_diff(_weights(s3, one, tmp_path / "one"), _weights(s3, two, tmp_path / "ddp"))
    assert diff <= PARITY_ATOL, diff
    assert two.metrics.eval_loss == pytest.approx(one.metrics.eval_loss, abs=1e-4)
    print(f"\nDDP parity: 2 processes x batch 4 vs 1 process x batch 8: max |delta w| = {diff:.2e}")

    fsdp_task = _task(bucket, base, data_uri, "fsdp000000000001", 4, parallelism="fsdp")
    fsdp = _launch(fsdp_task, tmp_path)
    assert fsdp.returncode == 0, fsdp.stderr[-4000:]
    sharded = AdapterManifest.model_validate(s3.get_json(join(fsdp_task.output_uri, MANIFEST)))
    assert sharded.steps == one.steps
    weights = _weights(s3, sharded, tmp_path / "fsdp")
    diff_fsdp = _max_diff(_weights(s3, one, tmp_path / "one-again"), weights)
    assert diff_fsdp <= PARITY_ATOL, diff_fsdp
    print(f"FSDP2 parity: 2 processes x batch 4 vs 1 process x batch 8: max |delta w| = {diff_fsdp:.2e}")


def test_two_process_resume_and_exit_statuses(
    s3: ObjectStore, base_env: tuple[str, BaseModelIdentity], data_uri: str, ddp: AdapterManifest, tmp_path: Path
) -> None:
    bucket, base = base_env
    straight = ddp

    task = _task(bucket, base, data_uri, "ddpresume0000001", 4)
    stopped = _launch(task, tmp_path, LANGMERGE_TRAINER_STOP_AFTER_STEPS="3")
    assert stopped.returncode == 3, stopped.stderr[-4000:]
    assert not s3.exists(join(task.output_uri, MANIFEST))
    assert not list(s3.iter_objects(join(task.output_uri, "failures")))  # preemption is no failure
    ckpt = [o.key.rsplit("/", 1)[-1] for o in s3.iter_objects(checkpoints_uri(task.output_uri))]
    # One checkpoint series (rank 0's): the random state of both ranks.
    assert sorted(ckpt) == sorted(
        [
            "latest.json",
            "adapter.safetensors",
            "optimizer.pt",
            "scheduler.pt",
            "rng.pt",
            "rng-1.pt",
            "state.json",
        ]
    )
    assert s3.get_json(join(task.output_uri, PROGRESS))["step"] in (2, 3)

    resumed_run = _launch(task.model_copy(update={"attempt": 2}), tmp_path)
    assert resumed_run.returncode == 0, resumed_run.stderr[-4000:]
    resumed = AdapterManifest.model_validate(s3.get_json(join(task.output_uri, MANIFEST)))
    assert resumed.resumed_from_step == 3 and resumed.steps == straight.steps
    assert resumed.tokens_trained == straight.tokens_trained
    assert resumed.adapter_digest == straight.adapter_digest  # bit-identical (across processes too)
    assert "resumed from step 3" in resumed_run.stderr

    # A user error (no data) on every rank: exit 4 from the launcher, one non-retryable record (rank 0's).
    broken = _task(bucket, base, f"s3://{bucket}/data/nothing-here", "ddpbroken0000001", 4)
    failed = _launch(broken, tmp_path)
    assert failed.returncode == 4, failed.stderr[-4000:]
    record = s3.get_json(failure_uri(broken.output_uri, 1))
    assert record["error_class"] == "DataError" and record["retryable"] is False
    assert "reading the data failed on rank 0" in failed.stderr  # rank 1 learnt it from rank 0


def test_sigterm_to_one_rank_stops_every_rank_at_one_checkpoint(
    s3: ObjectStore, base_env: tuple[str, BaseModelIdentity], data_uri: str, ddp: AdapterManifest, tmp_path: Path
) -> None:
    """A node's preemption notice reaches one rank only: the ranks agree (a collective) to stop after the same step."""
    bucket, base = base_env
    task = _task(bucket, base, data_uri, "ddpsigterm000001", 4, progressEverySteps=1)
    with (tmp_path / "launcher.log").open("w+") as log_file:
        launcher = subprocess.Popen(
            _command(task, tmp_path, 2),
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            text=True,
        )
        try:
            # Once rank 0 reports a training step, SIGTERM goes to rank 1 alone.
            deadline = time.monotonic() + 300
            rank1 = None
            while time.monotonic() < deadline and launcher.poll() is None:
                rank1 = rank1 or _worker_of_rank(launcher.pid, 1)
                progress = s3.get_json_or_none(join(task.output_uri, PROGRESS))
                if rank1 and progress and progress.get("stage") == "training" and progress.get("step", 0) >= 1:
                    os.kill(rank1, signal.SIGTERM)
                    break
                time.sleep(0.02)
            assert rank1 is not None, "rank 1's process was not found"
            code = launcher.wait(300)
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
        log_file.seek(0)
        stderr = log_file.read()
    assert code == 3, stderr[-4000:]
    notices = [line for line in stderr.splitlines() if "SIGTERM: checkpointing after the current step" in line]
    assert len(notices) == 1 and "[rank1]" in notices[0], notices  # rank 1 alone got the signal
    assert not s3.exists(join(task.output_uri, MANIFEST))
    assert not list(s3.iter_objects(join(task.output_uri, "failures")))  # preemption is no failure
    ckpt = sorted(o.key.rsplit("/", 1)[-1] for o in s3.iter_objects(checkpoints_uri(task.output_uri)))
    assert ckpt == sorted(
        ["latest.json", "adapter.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "rng-1.pt", "state.json"]
    )
    step = int(s3.get_json(join(checkpoints_uri(task.output_uri), "latest.json"))["step"])
    assert 1 <= step < ddp.steps
    marker = s3.get_record(preemption_uri(task.output_uri, 1), PreemptionRecord)
    assert marker is not None and (marker.step, marker.reason) == (step, "SIGTERM")  # rank 0 wrote it

    resumed_run = _launch(task.model_copy(update={"attempt": 2}), tmp_path)
    assert resumed_run.returncode == 0, resumed_run.stderr[-4000:]
    resumed = AdapterManifest.model_validate(s3.get_json(join(task.output_uri, MANIFEST)))
    assert resumed.resumed_from_step == step and resumed.steps == ddp.steps
    assert resumed.adapter_digest == ddp.adapter_digest  # bit-identical to the uninterrupted 2-process run
