"""The local Job runner's status patches, as the Job controller would write them, and which Jobs it runs."""

from __future__ import annotations

from typing import Any

import pytest

from langmerge.dev.jobrunner import (
    MESSAGE_COMPLETE,
    REASON_BACKOFF_LIMIT,
    REASON_COMPLETE,
    job_finished,
    parse_rfc3339,
    rfc3339,
    status_complete,
    status_failed,
    status_retrying,
    status_started,
    unsupported_reason,
    wants_to_run,
)

NOW = "2026-01-02T03:04:05Z"


def test_timestamps() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00Z"
    assert rfc3339(1767323045.9) == NOW
    assert parse_rfc3339(NOW) == 1767323045.0


def test_started_sets_start_time_once() -> None:
    assert status_started({}, NOW) == {"active": 1, "startTime": NOW}
    assert status_started({"startTime": "earlier", "failed": 1}, NOW) == {"active": 1}


def test_retrying_counts_failures_and_stays_active() -> None:
    assert status_retrying(2) == {"failed": 2, "active": 1}


def test_complete() -> None:
    patch = status_complete({"startTime": "s", "active": 1, "failed": 1}, NOW)
    assert patch == {
        "active": None,  # a merge patch's null removes the field
        "succeeded": 1,
        "completionTime": NOW,
        "conditions": [
            {
                "type": "Complete",
                "status": "True",
                "reason": REASON_COMPLETE,
                "message": MESSAGE_COMPLETE,
                "lastProbeTime": NOW,
                "lastTransitionTime": NOW,
            }
        ],
    }


def test_failed_keeps_other_conditions_and_sets_start_time_if_missing() -> None:
    other = {"type": "Suspended", "status": "False"}
    patch = status_failed({"conditions": [other]}, REASON_BACKOFF_LIMIT, "why", NOW, failed=3)
    assert patch["failed"] == 3
    assert patch["active"] is None
    assert patch["startTime"] == NOW
    assert "completionTime" not in patch  # only a successful Job has one
    assert patch["conditions"][0] == other
    assert patch["conditions"][1]["type"] == "Failed"
    assert patch["conditions"][1]["reason"] == REASON_BACKOFF_LIMIT
    assert patch["conditions"][1]["message"] == "why"
    assert "failed" not in status_failed({"startTime": "s"}, "R", "m", NOW)
    assert "startTime" not in status_failed({"startTime": "s"}, "R", "m", NOW)


def job(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "j", "namespace": "n", "uid": "u"},
        "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}, **spec},
        "status": status or {},
    }


@pytest.mark.parametrize(
    ("conditions", "finished"),
    [
        ([], None),
        ([{"type": "Complete", "status": "True"}], "Complete"),
        ([{"type": "Failed", "status": "True"}], "Failed"),
        ([{"type": "Failed", "status": "False"}], None),
        ([{"type": "Suspended", "status": "True"}], None),
    ],
)
def test_job_finished(conditions: list[dict[str, str]], finished: str | None) -> None:
    assert job_finished(job({"conditions": conditions})) == finished


def test_wants_to_run() -> None:
    assert wants_to_run(job())
    assert wants_to_run(job({"active": 1, "startTime": "s"}))  # an orphan of a stopped runner
    assert not wants_to_run(job({"conditions": [{"type": "Complete", "status": "True"}]}))
    assert not wants_to_run(job(parallelism=0))
    assert not wants_to_run(job(suspend=True))
    deleting = job()
    deleting["metadata"]["deletionTimestamp"] = NOW
    assert not wants_to_run(deleting)


def test_unsupported_shapes() -> None:
    assert unsupported_reason(job()) is None
    assert unsupported_reason(job(completions=1, parallelism=1)) is None
    reason = unsupported_reason(job(completions=3, parallelism=2))
    assert reason is not None and "completions=3, parallelism=2" in reason
    assert unsupported_reason(job(completionMode="Indexed")) is not None
    with_init = job()
    with_init["spec"]["template"]["spec"]["initContainers"] = [{"name": "i", "image": "x"}]
    assert "initContainers" in (unsupported_reason(with_init) or "")
    no_containers = job()
    no_containers["spec"]["template"]["spec"]["containers"] = []
    assert unsupported_reason(no_containers) is not None
