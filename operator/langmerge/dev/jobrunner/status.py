"""Status writing (pure): a Job's and a TrainJob's status as the Job controller and Kubeflow Trainer write it."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping, Sequence
from typing import Any

from langmerge.constants import ANNOTATION_SUSPEND
from langmerge.dev.jobrunner.config import MESSAGE_COMPLETE, REASON_COMPLETE


def rfc3339(epoch: float | None = None) -> str:
    """A Kubernetes timestamp (UTC, whole seconds)."""
    moment = dt.datetime.fromtimestamp(time.time() if epoch is None else epoch, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(value: str) -> float:
    """Seconds since the epoch of a Kubernetes timestamp."""
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def job_finished(job: Mapping[str, Any]) -> str | None:
    """``"Complete"`` or ``"Failed"`` if the Job has that condition set to True, else None."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return str(cond["type"])
    return None


def is_suspended(job: Mapping[str, Any]) -> bool:
    """``spec.suspend``; where the API server dropped it (before 1.21), the ``langmerge.dev/suspend`` annotation."""
    spec = job.get("spec") or {}
    if "suspend" in spec:
        return bool(spec.get("suspend"))
    return ((job.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_SUSPEND) == "true"


def wants_to_run(job: Mapping[str, Any]) -> bool:
    """Unfinished, not being deleted, not suspended and not paused (``parallelism: 0``)."""
    spec = job.get("spec") or {}
    return (
        job_finished(job) is None
        and not (job.get("metadata") or {}).get("deletionTimestamp")
        and not is_suspended(job)
        and spec.get("parallelism") != 0
    )


def unsupported_reason(job: Mapping[str, Any]) -> str | None:
    """Why the local runner cannot run this Job's shape, or None."""
    spec = job.get("spec") or {}
    pod = (spec.get("template") or {}).get("spec") or {}
    completions, parallelism = spec.get("completions"), spec.get("parallelism")
    if completions not in (None, 1) or parallelism not in (None, 1):
        return (
            "the local Job runner runs only Jobs with completions=1 and parallelism=1; "
            f"this Job has completions={completions}, parallelism={parallelism}"
        )
    if spec.get("completionMode") not in (None, "NonIndexed"):
        return f"the local Job runner does not support completionMode={spec.get('completionMode')}"
    if pod.get("initContainers"):
        return "the local Job runner does not run initContainers"
    if not pod.get("containers"):
        return "the Job's pod template has no containers"
    return None


def condition(kind: str, reason: str, message: str, now: str) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastProbeTime": now,
        "lastTransitionTime": now,
    }


def _with_condition(conditions: Sequence[Mapping[str, Any]] | None, new: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(c) for c in conditions or [] if c.get("type") != new["type"]] + [new]


def status_started(status: Mapping[str, Any], now: str) -> dict[str, Any]:
    """Status patch when an attempt starts (``startTime`` only the first time)."""
    patch: dict[str, Any] = {"active": 1}
    if not status.get("startTime"):
        patch["startTime"] = now
    return patch


def status_suspended(status: Mapping[str, Any], now: str) -> dict[str, Any]:
    """Status patch of a Job suspended while it ran (Kueue preempted it): no pod runs, nothing failed."""
    cond = {**condition("Suspended", "JobSuspended", "Job suspended", now)}
    return {"active": None, "conditions": _with_condition(status.get("conditions"), cond)}


def status_resumed(status: Mapping[str, Any], now: str) -> dict[str, Any]:
    """Status patch of a suspended Job that runs again (its ``startTime`` restarts, as on a cluster)."""
    cond = {**condition("Suspended", "JobResumed", "Job resumed", now), "status": "False"}
    return {"active": 1, "startTime": now, "conditions": _with_condition(status.get("conditions"), cond)}


def was_suspended(status: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Suspended" and c.get("status") == "True" for c in status.get("conditions") or [])


def status_retrying(failed: int) -> dict[str, Any]:
    """Status patch after a failed attempt that will be re-run."""
    return {"failed": failed, "active": 1}


def status_complete(status: Mapping[str, Any], now: str) -> dict[str, Any]:
    """Status patch of a Job whose attempt succeeded."""
    patch: dict[str, Any] = {
        "active": None,
        "succeeded": 1,
        "completionTime": now,
        "conditions": _with_condition(
            status.get("conditions"), condition("Complete", REASON_COMPLETE, MESSAGE_COMPLETE, now)
        ),
    }
    if not status.get("startTime"):
        patch["startTime"] = now
    return patch


def status_failed(
    status: Mapping[str, Any], reason: str, message: str, now: str, *, failed: int | None = None
) -> dict[str, Any]:
    """Status patch of a Job that failed for good (``failed`` is the new count of failed attempts, if it changed)."""
    patch: dict[str, Any] = {
        "active": None,
        "conditions": _with_condition(status.get("conditions"), condition("Failed", reason, message, now)),
    }
    if failed is not None:
        patch["failed"] = failed
    if not status.get("startTime"):
        patch["startTime"] = now
    return patch


#: Condition reasons of a TrainJob run locally.
REASON_TRAINJOB_COMPLETE = "JobsCompleted"
MESSAGE_TRAINJOB_COMPLETE = "TrainJob completed"
MESSAGE_TRAINJOB_SUSPENDED = "TrainJob is suspended"
MESSAGE_TRAINJOB_RESUMED = "TrainJob is resumed"


def trainjob_condition(
    status: Mapping[str, Any], kind: str, value: str, reason: str, message: str, now: str
) -> list[Any]:
    cond = {"type": kind, "status": value, "reason": reason, "message": message, "lastTransitionTime": now}
    return [dict(c) for c in status.get("conditions") or [] if c.get("type") != kind] + [cond]
