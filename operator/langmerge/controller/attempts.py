"""Failed attempts and retries, shared by both reconcilers. S3 holds one failure record per failed attempt, so the
count survives operator restarts and Jobs deleted by their TTL."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from langmerge import artifacts
from langmerge.artifacts import FailureRecord
from langmerge.controller.jobs import JobState
from langmerge.store import ObjectStore, StoreError, split_uri

#: The reason of a Job's Failed condition when a podFailurePolicy ``FailJob`` rule ended it: the trainer exited with a
#: status that says no retry can fix the error (bad data, bad spec).
REASON_POD_FAILURE_POLICY = "PodFailurePolicy"


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
    podFailurePolicy ended on an error the trainer said no retry can fix: that record is not retryable.
    """
    if job.attempt in records:
        return records
    if job.succeeded:
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
    )
    with contextlib.suppress(StoreError):
        store.put_json(artifacts.failure_uri(prefix, job.attempt), record, if_none_match=True)
    return {**records, job.attempt: record}


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
    attempts: int = 0


def decide_retry(
    records: dict[int, FailureRecord], *, limit: int, backoff_seconds: float, now: datetime
) -> RetryDecision:
    """Attempt 1 at first; after failure n, attempt n+1 once ``backoff * 2**(n-1)`` passed, up to ``limit`` retries."""
    if not records:
        return RetryDecision(next_attempt=1)
    last_attempt = max(records)
    last = records[last_attempt]
    if not last.retryable or last_attempt > limit:
        return RetryDecision(next_attempt=None, give_up=True, last=last, attempts=last_attempt)
    due = (artifacts.parse_time(last.at) or now) + timedelta(seconds=backoff_seconds * (2 ** (last_attempt - 1)))
    if due > now:
        return RetryDecision(next_attempt=None, wait_until=due, last=last, attempts=last_attempt)
    return RetryDecision(next_attempt=last_attempt + 1, last=last, attempts=last_attempt)
