"""Errors no retry can fix fail a Job at once; disruptions do not count (issue 12, item 11): the Job builders'
podFailurePolicy, the local Job runner's reading of it, and what the operator records for such a Job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from api_cases import expert, merged
from langmerge import artifacts
from langmerge.api import LanguageExpertSpec, MergedModelSpec
from langmerge.artifacts import BaseModelIdentity, PreemptionRecord
from langmerge.constants import (
    ANNOTATION_POD_FAILURE_POLICY,
    EXIT_FAILED,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    EXIT_USER_ERROR,
)
from langmerge.controller.attempts import record_job_end
from langmerge.controller.jobs import JobState, Owner, build_merge_job, build_training_job
from langmerge.dev.jobrunner import (
    container_exit_code,
    match_pod_failure_policy,
    pod_failure_policy,
    termination_message,
)
from langmerge.settings import Settings
from langmerge.tasks import MergeTask, MergeTaskInput, TrainTask

BASE = BaseModelIdentity(uri="s3://models/tiny", digest="b" * 16)
DISRUPTED = [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]


def _jobs() -> list[dict[str, Any]]:
    spec = LanguageExpertSpec.model_validate(expert()["spec"])
    train = TrainTask(
        fingerprint="f" * 16,
        output_uri="s3://a/x/" + "f" * 16,
        namespace="ns",
        name="de",
        spec=spec,
        base_model=BASE,
        data_digest="d" * 16,
    )
    mspec = MergedModelSpec.model_validate(merged()["spec"])
    merge = MergeTask(
        fingerprint="e" * 16,
        output_uri="s3://m/out/merges/" + "e" * 16,
        namespace="ns",
        name="mm",
        method=mspec.method,
        parameters=mspec.effective_parameters(),
        base_model=BASE,
        inputs=[
            MergeTaskInput(
                expert="de", language="de", adapter_uri="s3://a/x", adapter_digest="1" * 16, dataset=spec.dataset
            )
        ],
        output=mspec.output,
        evaluation=mspec.evaluation,
    )
    return [
        build_training_job(Owner("LanguageExpert", "ns", "de", "u1"), train, Settings()),
        build_merge_job(Owner("MergedModel", "ns", "mm", "u2"), merge, mspec.resources, Settings()),
    ]


@pytest.mark.parametrize("job", _jobs(), ids=["training", "merge"])
def test_jobs_fail_at_once_on_user_errors_and_ignore_disruptions(job: dict[str, Any]) -> None:
    policy = job["spec"]["podFailurePolicy"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert policy["rules"][0] == {
        "action": "FailJob",
        "onExitCodes": {"containerName": container["name"], "operator": "In", "values": [EXIT_USAGE, EXIT_USER_ERROR]},
    }
    assert policy["rules"][1] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    # The copy the local runner reads where the API server drops the field.
    assert json.loads(job["metadata"]["annotations"][ANNOTATION_POD_FAILURE_POLICY]) == policy
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"

    pod = "ns/p-0"
    name = container["name"]
    match = match_pod_failure_policy(policy, pod=pod, container=name, exit_code=EXIT_USER_ERROR, conditions=[])
    assert match == (
        "FailJob",
        f"Container {name} for pod {pod} failed with exit code 4 matching FailJob rule at index 0",
    )
    assert match_pod_failure_policy(policy, pod=pod, container=name, exit_code=EXIT_USAGE, conditions=[])
    for code in (EXIT_FAILED, EXIT_PREEMPTED, 137):
        assert match_pod_failure_policy(policy, pod=pod, container=name, exit_code=code, conditions=[]) is None
    assert match_pod_failure_policy(
        policy, pod=pod, container=name, exit_code=EXIT_PREEMPTED, conditions=DISRUPTED
    ) == (
        "Ignore",
        f"Pod {pod} has condition DisruptionTarget matching Ignore rule at index 1",
    )
    # Another container's exit code does not match a rule naming the trainer's.
    assert match_pod_failure_policy(policy, pod=pod, container="sidecar", exit_code=4, conditions=[]) is None


def test_policy_from_spec_or_annotation() -> None:
    policy = {"rules": [{"action": "Ignore", "onExitCodes": {"operator": "NotIn", "values": [1]}}]}
    assert pod_failure_policy({"spec": {"podFailurePolicy": policy}}) == policy
    annotated = {"metadata": {"annotations": {ANNOTATION_POD_FAILURE_POLICY: json.dumps(policy)}}, "spec": {}}
    assert pod_failure_policy(annotated) == policy
    assert pod_failure_policy({"metadata": {"annotations": {ANNOTATION_POD_FAILURE_POLICY: "{oops"}}}) is None
    assert pod_failure_policy({"spec": {}}) is None
    # NotIn: any code but 1 (exit code 0 never matches); no containerName: any container.
    assert match_pod_failure_policy(policy, pod="p", container="c", exit_code=2, conditions=[])
    assert match_pod_failure_policy(policy, pod="p", container="c", exit_code=1, conditions=[]) is None
    assert match_pod_failure_policy(policy, pod="p", container="c", exit_code=0, conditions=[]) is None
    assert container_exit_code(-9) == 137 and container_exit_code(4) == 4


def test_termination_message_or_log_tail(tmp_path: Path) -> None:
    message, log = tmp_path / "termination-log", tmp_path / "log"
    log.write_text("".join(f"line {i}\n" for i in range(200)))
    message.write_text("")
    assert termination_message(message, log, fallback_to_logs=False) == ""
    tail = termination_message(message, log, fallback_to_logs=True)
    assert tail.endswith("line 199") and len(tail.splitlines()) <= 80 and len(tail) <= 2048
    message.write_text("DataError: a.jsonl, line 3: invalid JSON\n" + "x" * 5000)
    text = termination_message(message, log, fallback_to_logs=True)
    assert text.startswith("DataError: a.jsonl, line 3") and len(text.encode()) == 4096


class _Store:
    """Our S3 seam, recording conditional puts; ``records`` are what ``get_record`` finds."""

    def __init__(self, records: dict[str, Any] | None = None) -> None:
        self.puts: list[tuple[str, Any]] = []
        self.records = records or {}

    def put_json(self, uri: str, value: Any, **kwargs: Any) -> str:
        self.puts.append((uri, value))
        return "etag"

    def get_record(self, uri: str, model: type[Any]) -> Any:
        found = self.records.get(uri)
        return None if found is None else model.model_validate(found.model_dump())


@pytest.mark.parametrize(
    ("reason", "retryable"),
    [("PodFailurePolicy", False), ("BackoffLimitExceeded", True), ("DeadlineExceeded", True)],
)
def test_operator_records_a_job_failed_by_its_policy_as_not_retryable(reason: str, retryable: bool) -> None:
    """The trainer could not write its record (S3 down, say) but its exit status failed the Job by policy."""
    job = JobState(
        name="de-train-ffff-1",
        fingerprint="f" * 16,
        attempt=1,
        active=False,
        succeeded=False,
        failed=True,
        reason=reason,
        message="Container trainer for pod ns/de-train-ffff-1-0 failed with exit code 4 matching FailJob rule at index 0",
        created=None,
        started=None,
        finished="2026-01-01T00:00:00Z",
    )
    store = _Store()
    records = record_job_end(store, "s3://a/x/" + "f" * 16, job, {}, "2026-01-01T00:00:01Z")  # type: ignore[arg-type]
    assert records[1].retryable is retryable
    assert records[1].error_class == reason and "exit code 4" in records[1].message
    assert store.puts and store.puts[0][1].retryable is retryable


PREFIX = "s3://a/x/" + "f" * 16


def _ended(reason: str, attempt: int = 1, kind: str = "TrainJob") -> JobState:
    return JobState(
        name=f"de-ffff-{attempt}",
        fingerprint="f" * 16,
        attempt=attempt,
        active=False,
        succeeded=False,
        failed=True,
        reason=reason,
        message="node 0 exited with status 3",
        created=None,
        started=None,
        finished="2026-01-01T00:00:00Z",
        kind=kind,
    )


@pytest.mark.parametrize("kind", ["TrainJob", "Job"])
def test_an_attempt_that_ended_after_its_trainer_was_preempted_is_a_disruption(kind: str) -> None:
    """The trainer's rank 0 left a preemption record for the attempt (SIGTERM, checkpoint, exit 3) and the runtime
    then failed the TrainJob (a JobSet without restarts): a disruption, not a failure that counts."""
    marker = PreemptionRecord(fingerprint="f" * 16, attempt=1, step=3)
    store = _Store({artifacts.preemption_uri(PREFIX, 1): marker})
    records = record_job_end(store, PREFIX, _ended("BackoffLimitExceeded", kind=kind), {}, "2026-01-01T00:00:01Z")  # type: ignore[arg-type]
    record = records[1]
    assert record.disruption and record.retryable and record.error_class == artifacts.DISRUPTED
    assert "step 3" in record.message and "not a failed attempt" in record.message
    assert store.puts == [(artifacts.failure_uri(PREFIX, 1), record)]


@pytest.mark.parametrize(
    ("reason", "marker_attempt"),
    [
        ("DeadlineExceeded", 1),  # SIGTERM came from the attempt's own deadline
        ("PodFailurePolicy", 1),  # the policy failed it (exit 4 on another node)
        ("BackoffLimitExceeded", None),  # no preemption record: a real failure
        ("BackoffLimitExceeded", 2),  # another attempt's record
    ],
)
def test_other_ends_are_not_disruptions(reason: str, marker_attempt: int | None) -> None:
    markers = {}
    if marker_attempt is not None:
        markers[artifacts.preemption_uri(PREFIX, 1)] = PreemptionRecord(
            fingerprint="f" * 16, attempt=marker_attempt, step=3
        )
    records = record_job_end(_Store(markers), PREFIX, _ended(reason), {}, "2026-01-01T00:00:01Z")  # type: ignore[arg-type]
    assert not records[1].disruption and records[1].error_class == reason
