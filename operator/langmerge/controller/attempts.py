"""Failed attempts and retries, shared by both reconcilers. S3 holds one failure record per failed attempt, so the
count survives operator restarts and Jobs deleted by their TTL."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from langmerge import artifacts
from langmerge.artifacts import FailureRecord, PreemptionRecord
from langmerge.controller.jobs import JobState
from langmerge.store import MalformedRecord, ObjectStore, StoreError, split_uri

#: The reason of a Job's Failed condition when a podFailurePolicy ``FailJob`` rule ended it: the trainer exited with a
#: status that says no retry can fix the error (bad data, bad spec).
REASON_POD_FAILURE_POLICY = "PodFailurePolicy"
#: The reason of a Job's (and a Kubeflow TrainJob's) Failed condition when its ``activeDeadlineSeconds`` passed: its
#: pods got SIGTERM and checkpointed, but that is the attempt's time limit, not a disruption.
REASON_DEADLINE = "DeadlineExceeded"


def failure_records(store: ObjectStore, prefix: str) -> dict[int, FailureRecord]:
    """attempt -> failure record, read from ``<prefix>/failures/attempt-<n>.json``."""
    records: dict[int, FailureRecord] = {}
    bucket, _ = split_uri(prefix)
    for obj in store.iter_objects(artifacts.join(prefix, "failures")):
        name = obj.key.rsplit("/", 1)[-1]
        try:
            attempt = int(name.removeprefix("attempt-").removesuffix(".json"))
        except ValueError:
            continue
        record = store.get_record(f"s3://{bucket}/{obj.key}", FailureRecord)
        if record is not None:
            records[attempt] = record
    return records


def record_job_end(
    store: ObjectStore, prefix: str, job: JobState, records: dict[int, FailureRecord], now: str
) -> dict[int, FailureRecord]:
    """A Job for ``prefix`` ended without a commit: make sure its attempt has a failure record.

    The trainer writes its own record (with the real error) when it can; a Job killed by its deadline, evicted, or
    whose image could not start cannot, so the operator records the Job's condition instead. A Job failed by its
    podFailurePolicy ended on an error the trainer said no retry can fix: that record is not retryable. A Job or
    TrainJob that failed after its trainer stopped on SIGTERM with a checkpoint (the trainer's
    :class:`PreemptionRecord` for that attempt) was disrupted: its record is a ``disruption``, which does not count
    against ``retry.limit``. This is what keeps disruptions free for TrainJobs, whose runtime may not restart a
    disrupted node (the podFailurePolicy of a Job's own does that for Jobs).
    """
    if job.attempt in records:
        return records
    preemption = None if job.succeeded else _preemption(store, prefix, job)
    if preemption is not None:
        error = artifacts.DISRUPTED
        message = (
            f"{job.kind} {job.name} was disrupted: its trainer stopped on {preemption.reason} after the checkpoint of "
            f"step {preemption.step}, and {job.reason or 'the runtime'} ended it; the next attempt resumes from that "
            "checkpoint (not a failed attempt)"
        )
    elif job.succeeded:
        error, message = (
            "JobSucceededWithoutManifest",
            f"Job {job.name} finished but nothing was committed under {prefix}",
        )
    else:
        error = job.reason or "JobFailed"
        message = f"Job {job.name} failed: {job.reason or 'unknown reason'}"
        if job.message:
            message += f": {job.message}"
    record = FailureRecord(
        fingerprint=prefix.rstrip("/").rsplit("/", 1)[-1],
        error_class=error,
        message=message,
        retryable=job.succeeded or job.reason != REASON_POD_FAILURE_POLICY,
        attempt=job.attempt,
        at=job.finished or now,
        disruption=preemption is not None,
    )
    with contextlib.suppress(StoreError):
        store.put_json(artifacts.failure_uri(prefix, job.attempt), record, if_none_match=True)
    return {**records, job.attempt: record}


def _preemption(store: ObjectStore, prefix: str, job: JobState) -> PreemptionRecord | None:
    """The trainer's preemption record of ``job``'s attempt, unless the Job's own deadline or podFailurePolicy
    ended it (then SIGTERM was the end of the attempt, not a disruption)."""
    if job.reason in (REASON_DEADLINE, REASON_POD_FAILURE_POLICY):
        return None
    try:
        record = store.get_record(artifacts.preemption_uri(prefix, job.attempt), PreemptionRecord)
    except MalformedRecord:
        return None
    if record is None or record.attempt != job.attempt:
        return None
    return record


@dataclass(frozen=True)
class RetryDecision:
    """What to do after the failed attempts so far."""

    #: The attempt to start now (None: do not start one).
    next_attempt: int | None
    #: Give up: the last failure is not retryable or the retry limit is spent.
    give_up: bool = False
    #: Wait until this time before the next attempt.
    wait_until: datetime | None = None
    last: FailureRecord | None = None
    #: Failed attempts that count against the limit (disruptions do not).
    attempts: int = 0


def decide_retry(
    records: dict[int, FailureRecord], *, limit: int, backoff_seconds: float, now: datetime
) -> RetryDecision:
    """Attempt 1 at first; after failed attempt n (the n-th that counts), the next attempt once
    ``backoff * 2**(n-1)`` passed, up to ``limit`` retries. A disruption does not count and needs no back-off: the
    next attempt starts at once."""
    if not records:
        return RetryDecision(next_attempt=1)
    last_attempt = max(records)
    last = records[last_attempt]
    failed = sum(1 for record in records.values() if not record.disruption)
    if not last.retryable or failed > limit:
        return RetryDecision(next_attempt=None, give_up=True, last=last, attempts=failed)
    if last.disruption:
        return RetryDecision(next_attempt=last_attempt + 1, last=last, attempts=failed)
    due = (artifacts.parse_time(last.at) or now) + timedelta(seconds=backoff_seconds * (2 ** (failed - 1)))
    if due > now:
        return RetryDecision(next_attempt=None, wait_until=due, last=last, attempts=failed)
    return RetryDecision(next_attempt=last_attempt + 1, last=last, attempts=failed)
