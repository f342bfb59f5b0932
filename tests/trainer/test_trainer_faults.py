"""The training Job under faults (issue 12): an S3 outage mid-training costs time, not the attempt (item 2); a
failure record S3 cannot take is still reported (item 2); two runs of one fingerprint racing to commit leave exactly
the committed files (item 8); data that changed after the operator listed it is trained and recorded as read
(item 9); checkpoints go once the adapter is committed (item 12).

S3 faults are real: a loopback TCP proxy in front of the real S3 server goes away and comes back."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import listing_digest, make_task, put_jsonl, sample_pairs

from faults import LateView, TcpProxy
from langmerge.artifacts import (
    DATA_CHANGED,
    MANIFEST,
    AdapterManifest,
    BaseModelIdentity,
    FailureRecord,
    checkpoints_uri,
    failure_uri,
    join,
    sibling_prefix,
)
from langmerge.dev.controlplane import Endpoints
from langmerge.fingerprint import training_fingerprint
from langmerge.store import ObjectStore, S3Config
from langmerge.tasks import TrainTask
from langmerge_trainer.train import StepResult, TrainingLoop, run_train_task

ROOT = Path(__file__).resolve().parents[2]
#: A checkpoint every 2 steps: S3 is written to while training runs.
CHECKPOINTING: dict[str, Any] = {"checkpointEverySteps": 2}


@pytest.fixture(scope="module")
def data_uri(s3: ObjectStore, base_env: tuple[str, BaseModelIdentity]) -> str:
    bucket, _base = base_env
    uri = f"s3://{bucket}/data/faults"
    put_jsonl(s3, f"{uri}/a.jsonl", [p.row() for p in sample_pairs("es", 48)])
    return uri


@pytest.fixture
def proxy(control_plane: Endpoints) -> Iterator[TcpProxy]:
    proxy = TcpProxy(int(control_plane.s3_endpoint.rsplit(":", 1)[1]))
    proxy.start()
    yield proxy
    proxy.stop()


def _through(proxy: TcpProxy, control_plane: Endpoints) -> ObjectStore:
    return ObjectStore.from_config(
        S3Config(endpoint_url=f"http://127.0.0.1:{proxy.port}"),
        aws_access_key_id=control_plane.s3_access_key,
        aws_secret_access_key=control_plane.s3_secret_key,
    )


def _files_match(s3: ObjectStore, manifest: AdapterManifest, folder: Path) -> bool:
    """The committed files are exactly what the manifest names, byte for byte."""
    paths = s3.download_prefix(manifest.adapter_uri, folder)
    found = {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    return found == {name: entry.sha256 for name, entry in manifest.files.items()}


def test_training_rides_out_an_s3_outage_and_deletes_its_checkpoints(
    s3: ObjectStore,
    base_env: tuple[str, BaseModelIdentity],
    data_uri: str,
    proxy: TcpProxy,
    control_plane: Endpoints,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """S3 goes away for 4 s right before the first checkpoint upload: the upload waits for it and training ends
    with a commit, no failure record (the attempt is not used up), and no checkpoints left behind."""
    bucket, base = base_env
    task = make_task(
        bucket=bucket, base=base, data_uri=data_uri, fingerprint="outage0000000001", training=CHECKPOINTING
    )
    original = TrainingLoop.train_step

    def step_then_outage(self: TrainingLoop) -> StepResult:
        result = original(self)
        if self.step == 2:
            proxy.outage(4.0)
        return result

    monkeypatch.setattr(TrainingLoop, "train_step", step_then_outage)
    with caplog.at_level(logging.WARNING, logger="langmerge_trainer"):
        manifest = run_train_task(task, _through(proxy, control_plane), device="cpu")
    assert proxy.recovered.is_set()
    assert any("retrying in" in r.getMessage() and "checkpoints/step-2" in r.getMessage() for r in caplog.records)
    assert AdapterManifest.model_validate(s3.get_json(join(task.output_uri, MANIFEST))) == manifest
    assert not list(s3.iter_objects(join(task.output_uri, "failures")))
    assert _files_match(s3, manifest, tmp_path / "adapter")
    # Item 12: the checkpoints (several were written) are deleted once the adapter is committed.
    assert not list(s3.iter_objects(checkpoints_uri(task.output_uri)))


def test_checkpoints_go_once_the_adapter_is_committed_unless_kept(
    s3: ObjectStore, base_env: tuple[str, BaseModelIdentity], data_uri: str
) -> None:
    bucket, base = base_env
    task = make_task(
        bucket=bucket, base=base, data_uri=data_uri, fingerprint="dropckpt00000001", training=CHECKPOINTING
    )
    manifest = run_train_task(task, s3, device="cpu")
    assert manifest.steps > CHECKPOINTING["checkpointEverySteps"]  # checkpoints were written on the way
    assert not list(s3.iter_objects(checkpoints_uri(task.output_uri)))

    kept = make_task(
        bucket=bucket, base=base, data_uri=data_uri, fingerprint="keepckpt00000001", training=CHECKPOINTING
    )
    run_train_task(kept.model_copy(update={"keep_checkpoints": True}), s3, device="cpu")
    names = {o.key.rsplit("/", 1)[-1] for o in s3.iter_objects(checkpoints_uri(kept.output_uri))}
    assert {"latest.json", "adapter.safetensors", "optimizer.pt", "state.json"} <= names


def test_a_failure_record_s3_cannot_take_is_reported_in_the_termination_message(
    base_env: tuple[str, BaseModelIdentity], data_uri: str, proxy: TcpProxy, tmp_path: Path
) -> None:
    """S3 is down for longer than the retry budget: the attempt fails, its record cannot be written, and the Job
    says so on stderr and in the container's termination message (the operator then records the Job's condition)."""
    bucket, base = base_env
    task = make_task(bucket=bucket, base=base, data_uri=data_uri, fingerprint="norecord00000001")
    proxy.stop()
    message = tmp_path / "termination-log"
    message.touch()
    env = {
        **os.environ,
        "LANGMERGE_S3_ENDPOINT": f"http://127.0.0.1:{proxy.port}",
        "LANGMERGE_S3_RETRY_SECONDS": "2",
        "LANGMERGE_TERMINATION_MESSAGE_PATH": str(message),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "langmerge_trainer", "train", "--task", task.to_json()],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr  # S3 trouble: another attempt may succeed
    record_uri = failure_uri(task.output_uri, 1)
    text = message.read_text()
    assert text.startswith("training failed (") and "127.0.0.1" in text.splitlines()[0], text  # the S3 error
    assert f"the failure record could not be written to {record_uri}" in text
    assert "the failure record could not be written" in proc.stderr
    assert "retrying in" in proc.stderr  # it did wait for S3 first


def test_racing_runs_of_one_fingerprint_leave_exactly_the_committed_files(
    s3: ObjectStore, base_env: tuple[str, BaseModelIdentity], data_uri: str, tmp_path: Path
) -> None:
    """Run B started before run A committed, trains other weights (another seed), and commits after A: A's commit
    stands, its files stay exactly as its manifest says, and nothing of B is left."""
    bucket, base = base_env
    first = make_task(
        bucket=bucket, base=base, data_uri=data_uri, fingerprint="race000000000001", training=CHECKPOINTING
    )
    second = make_task(
        bucket=bucket,
        base=base,
        data_uri=data_uri,
        fingerprint="race000000000001",
        training={**CHECKPOINTING, "seed": 8},
        attempt=2,
    )
    committed = run_train_task(first, s3, device="cpu")
    late = LateView(s3, join(first.output_uri, MANIFEST))
    assert run_train_task(second, late, device="cpu") == committed  # B trained, uploaded, lost the commit
    assert not late.hidden, "run B must have tried to commit"

    assert AdapterManifest.model_validate(s3.get_json(join(first.output_uri, MANIFEST))) == committed
    assert _files_match(s3, committed, tmp_path / "adapter")
    runs = {
        o.key.split("/attempts/", 1)[1].split("/", 1)[0] for o in s3.iter_objects(join(first.output_uri, "attempts"))
    }
    assert runs == {committed.adapter_uri.split("/attempts/", 1)[1].split("/", 1)[0]}
    assert runs.pop().startswith("1-")  # attempt 1's run
    assert not list(s3.iter_objects(checkpoints_uri(first.output_uri)))


def test_data_changed_after_the_listing_is_trained_as_read_under_its_own_fingerprint(
    s3: ObjectStore, base_env: tuple[str, BaseModelIdentity]
) -> None:
    """Item 9: the data changes between the operator's listing and the Job's reading. The Job trains on what it
    read, commits it under the fingerprint of that data (so a manifest never describes data it was not trained on)
    and leaves a DataChanged record for its attempt, which makes the operator list the data again."""
    bucket, base = base_env
    uri = f"s3://{bucket}/data/moving"
    pairs = sample_pairs("es", 52)
    put_jsonl(s3, f"{uri}/a.jsonl", [p.row() for p in pairs[:40]])
    draft = make_task(bucket=bucket, base=base, data_uri=uri, fingerprint="x" * 16)
    listed = draft.data_digest
    asked = _operator_fingerprint(draft, listed)  # what the operator computed from its listing
    task = draft.model_copy(update={"fingerprint": asked, "output_uri": sibling_prefix(draft.output_uri, asked)})
    put_jsonl(s3, f"{uri}/b.jsonl", [p.row() for p in pairs[40:]])  # the data changes before the Job reads it
    read = listing_digest(uri)

    manifest = run_train_task(task, s3, device="cpu")
    assert manifest.data_digest == read != listed
    assert manifest.fingerprint == _operator_fingerprint(task, read) and manifest.requested_fingerprint == asked
    assert manifest.examples_train + manifest.examples_eval == 52  # both files: what it read
    assert s3.exists(join(sibling_prefix(task.output_uri, manifest.fingerprint), MANIFEST))
    assert manifest.adapter_uri.startswith(sibling_prefix(task.output_uri, manifest.fingerprint) + "/attempts/1-")
    assert not s3.exists(join(task.output_uri, MANIFEST))
    record = FailureRecord.model_validate(s3.get_json(failure_uri(task.output_uri, 1)))
    assert record.error_class == DATA_CHANGED and record.retryable
    assert f"digest {listed} when listed, {read} when read" in record.message and manifest.fingerprint in record.message
    # Another attempt at the same task finds the adapter of the data it reads committed: nothing is trained again.
    assert run_train_task(task.model_copy(update={"attempt": 2}), s3, device="cpu") == manifest
    assert s3.get_json(failure_uri(task.output_uri, 2))["error_class"] == DATA_CHANGED

    # A task whose fingerprint this trainer cannot reproduce (another operator version): trained on what it read,
    # under the task's fingerprint, the manifest recording both digests.
    foreign = make_task(bucket=bucket, base=base, data_uri=uri, fingerprint="foreign000000001", data_digest=listed)
    kept = run_train_task(foreign, s3, device="cpu")
    assert (kept.fingerprint, kept.data_digest, kept.listed_data_digest) == ("foreign000000001", read, listed)


def _operator_fingerprint(task: TrainTask, data_digest: str) -> str:
    return training_fingerprint(
        task.spec,
        base_model_digest=task.base_model.digest,
        data_digest=data_digest,
        eval_data_digest=None,
        image=task.image or "",
    )
