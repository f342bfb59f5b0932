"""The trainer's command line, run as a real subprocess: exit codes 0 / 2 / 3 / 4 and the resume across processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from trainer_helpers import make_task, put_jsonl, sample_pairs

from langmerge.artifacts import MANIFEST, AdapterManifest, BaseModelIdentity, failure_uri, join
from langmerge.store import ObjectStore

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "langmerge_trainer", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_exit_codes_and_resume(s3: ObjectStore, base_env: tuple[str, BaseModelIdentity], tmp_path: Path) -> None:
    bucket, base = base_env
    data_uri = f"s3://{bucket}/data/cli"
    put_jsonl(s3, f"{data_uri}/a.jsonl", [p.row() for p in sample_pairs("es", 48)])
    task = make_task(bucket=bucket, base=base, data_uri=data_uri, fingerprint="cli0000000000001")
    task_file = tmp_path / "task.json"
    task_file.write_text(task.to_json())

    usage = _run(["train", "--task", '{"fingerprint": "x"}'])
    assert usage.returncode == 2, usage.stderr
    assert "not a valid TrainTask" in usage.stderr

    preempted = _run(["train", "--task", f"@{task_file}"], LANGMERGE_TRAINER_STOP_AFTER_STEPS="2")
    assert preempted.returncode == 3, preempted.stderr
    assert "preempted at step 2" in preempted.stderr
    assert not s3.exists(join(task.output_uri, MANIFEST))

    done = _run(["train", "--task", f"@{task_file}"])
    assert done.returncode == 0, done.stderr
    manifest = AdapterManifest.model_validate(s3.get_json(join(task.output_uri, MANIFEST)))
    assert manifest.resumed_from_step == 2
    # Timestamped log lines on stderr.
    assert any(line[:4].isdigit() and "INFO" in line for line in done.stderr.splitlines())

    # No data: an error no retry can fix. Its own exit status (the Job's podFailurePolicy fails the Job at once on
    # it), a non-retryable record, and the reason in the termination message Kubernetes shows in the pod's status.
    broken = make_task(bucket=bucket, base=base, data_uri=f"s3://{bucket}/data/missing", fingerprint="cli0000000000002")
    message = tmp_path / "termination-log"
    message.touch()
    failed = _run(["train", "--task", broken.to_json()], LANGMERGE_TERMINATION_MESSAGE_PATH=str(message))
    assert failed.returncode == 4, failed.stderr
    record = s3.get_json(failure_uri(broken.output_uri, 1))
    assert record["error_class"] == "DataError" and record["retryable"] is False
    assert message.read_text().startswith("training failed (DataError): no *.jsonl objects under")
    assert f"recorded at {failure_uri(broken.output_uri, 1)}" in message.read_text()


def test_cli_usage() -> None:
    from langmerge_trainer.__main__ import main

    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["train"]) == 2  # --task is required
    assert main(["--help"]) == 0
