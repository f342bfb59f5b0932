"""What both reconcilers share: one pass over one object, with its status edited in memory and written once, and
the flow that converges an object on its desired fingerprint (the latest Job, its failure records, retry or back off
or give up, start the next attempt, cancel Jobs of outdated fingerprints)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import ValidationError

from langmerge import artifacts
from langmerge.admission import Refusal
from langmerge.api.common import HEALTHY, Condition, ConditionStatus, OnChange
from langmerge.api.expert import Retry
from langmerge.artifacts import FailureRecord, OwnerRecord
from langmerge.constants import API_VERSION, COMPONENT_MERGE, COMPONENT_TRAINING, LABEL_EXPERT, MERGED_KIND
from langmerge.controller import metrics
from langmerge.controller.attempts import RetryDecision, decide_retry, failure_records, record_job_end
from langmerge.controller.jobs import JobState, label_value
from langmerge.controller.runtime import Key, Runtime, object_key
from langmerge.controller.status import (
    DEGRADED,
    READY,
    get_condition,
    merge_patch_body,
    set_condition,
    truncate,
    without_condition,
)
from langmerge.kube import Forbidden, ObjectKey, Rejected
from langmerge.ownership import Claim, claim_prefix
from langmerge.store import BucketNotFound, MalformedRecord, StorageUnavailable, StoreError

#: Wait after an S3 error that is neither an outage nor a user error (e.g. access denied) before trying again.
STORAGE_RETRY_SECONDS = 15.0
#: Look again this soon after a missing S3 Secret (Secrets are not watched: the operator may not list them).
SECRET_RETRY_SECONDS = 30.0
#: A fact in S3 younger than this many resync periods is news when the status does not show it (see ``is_news``).
NEWS_RESYNCS = 3


class _Status(Protocol):
    phase: Any
    message: str | None
    observed_generation: int | None
    conditions: list[Condition]
    active_job: str | None
    attempts: int
    health: str | None

    def model_dump(self, *, mode: str, by_alias: bool) -> dict[str, Any]: ...

    def model_copy(self, *, deep: bool) -> Any: ...


StatusT = TypeVar("StatusT", bound=_Status)


def fmt_time(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def format_validation_error(err: ValidationError) -> str:
    """``spec.lora.rank: Input should be greater than or equal to 1; ...`` — one line a user can act on."""
    parts = []
    for e in err.errors():
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in e["loc"])
        parts.append(f"spec{loc}: {'missing' if e['type'] == 'missing' else e['msg']}")
    return "; ".join(parts)


def delete_jobs_of(rt: Runtime, namespace: str, owner_label: str, name: str) -> int:
    """The owner is gone: delete its Jobs (the garbage collector would too, where it runs). Returns how many.

    The owner label holds a shortened name, so a Job counts as the owner's only when its controller reference names
    it in full: another object whose name shares the first 63 characters keeps its Jobs."""
    component = COMPONENT_TRAINING if owner_label == LABEL_EXPERT else COMPONENT_MERGE
    deleted = 0
    for job in rt.jobs.owned(namespace, component, label_value(name), name=name):
        if rt.kube.delete_workload(job.kind, namespace, job.name):
            deleted += 1
    return deleted


def object_exists(rt: Runtime, record: OwnerRecord, prefix: str | None = None) -> bool:
    """Whether the object an ownership record names still exists (same kind, namespace, name and, if recorded,
    uid: a deleted and re-created object is another object) and, for a MergedModel and a ``prefix``, still names
    that prefix as its ``spec.output.uri`` (an owner that moved to another output has let the old one go)."""
    key = ObjectKey(record.namespace, record.name)
    body = rt.kube.get_merged(key) if record.kind == MERGED_KIND else rt.kube.get_expert(key)
    if body is None or (record.uid and body["metadata"].get("uid") != record.uid):
        return False
    if prefix is not None and record.kind == MERGED_KIND:
        output = ((body.get("spec") or {}).get("output") or {}).get("uri")
        return isinstance(output, str) and output.rstrip("/") == prefix.rstrip("/")
    return True


@dataclass(frozen=True)
class Stop:
    """A step of a pass ended it (the status is committed): the pass returns ``requeue``."""

    requeue: float | None


def reconcile_object(
    rt: Runtime,
    key: Key,
    read: Callable[[ObjectKey], dict[str, Any] | None],
    cleanup: Callable[[Runtime, Key], None],
    make_pass: Callable[[Runtime, Key, dict[str, Any]], ReconcilePass[Any]],
) -> float | None:
    """One pass over ``key``: read the object; gone or being deleted, ``cleanup``; else a pass of ``make_pass``.
    Returns seconds until the next pass (None: only on events)."""
    body = read(object_key(key))
    if body is None or body["metadata"].get("deletionTimestamp"):
        cleanup(rt, key)
        return None
    return make_pass(rt, key, body).run()


def latest_job(jobs: list[JobState], fingerprint: str) -> JobState | None:
    """The Job of ``fingerprint`` with the highest attempt, if any."""
    mine = sorted((j for j in jobs if j.fingerprint == fingerprint), key=lambda j: j.attempt)
    return mine[-1] if mine else None


class ReconcilePass(Generic[StatusT]):
    """One pass: ``old`` is the status as read, ``status`` the one being built; :meth:`commit` writes the difference
    (nothing when nothing changed, so a pass never triggers itself) and posts the Events gathered on the way.

    The ``Degraded`` condition is rebuilt by every pass: False unless this pass called :meth:`degrade`, so a problem
    that went away (S3 back, a record fixed) clears without anyone remembering to clear it.
    """

    kind: ClassVar[str]
    plural: ClassVar[str]
    status_model: ClassVar[type[Any]]

    def __init__(self, rt: Runtime, key: Key, body: dict[str, Any]) -> None:
        self.rt = rt
        self.key = key
        self.body = body
        meta = body["metadata"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.generation: int | None = meta.get("generation")
        self.now = rt.now()
        self.now_s = fmt_time(self.now)
        try:
            self.old: StatusT = self.status_model.model_validate(body.get("status") or {})
        except ValidationError:
            self.old = self.status_model()
        self.status: StatusT = self.old.model_copy(deep=True)
        self.settings = rt.settings
        self.events: list[tuple[str, str, str]] = []
        self.degraded: tuple[str, str] | None = None
        self.wants_slot = False

    def run(self) -> float | None:
        """The pass; returns seconds until the next one (None: only on events)."""
        raise NotImplementedError

    def condition(self, type_: str, value: bool | ConditionStatus, reason: str, message: str = "") -> None:
        self.status.conditions = set_condition(
            self.status.conditions, type_, value, reason, truncate(message), generation=self.generation, now=self.now_s
        )

    def drop_condition(self, type_: str) -> None:
        self.status.conditions = without_condition(self.status.conditions, type_)

    def degrade(self, reason: str, message: str) -> None:
        """Something is wrong that the user (or time) must fix: ``Degraded=True`` with ``reason``."""
        self.degraded = (reason, message)

    def was_degraded(self, reason: str) -> bool:
        cond = get_condition(self.old.conditions, DEGRADED)
        return cond is not None and cond.status == ConditionStatus.TRUE and cond.reason == reason

    def event(self, type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))

    def set_phase(self, phase: Any, message: str | None = None) -> None:
        self.status.phase = phase
        self.status.message = truncate(message) if message else None

    def refuse(self, refusal: Refusal, *, phase: Any, condition_type: str) -> None:
        """Something only the user (or the operator's administrator) can fix stops this object before any Job:
        status and a Warning Event (once per message) say why; what was published stays as it is."""
        if self.old.message != truncate(refusal.message):
            self.event("Warning", refusal.reason, refusal.message)
        self.status.active_job = None
        self.set_phase(phase, refusal.message)
        self.condition(condition_type, False, refusal.reason, refusal.message)
        self.condition(READY, False, refusal.reason, refusal.message)
        self.degrade(refusal.reason, refusal.message)

    def is_news(self, happened_at: str | None) -> bool:
        """For a fact in S3 (an adapter committed, a revision published) that this object's status shows nothing of:
        whether its Event (and metrics) would be news. A fact of the last few resync periods is (the pass that made it
        crashed before its status and Events got out), and so is one older than the object (a re-created object
        adopting it); an older fact that the status lost (someone removed it) is history rebuilt from S3, whose Events
        were posted when it happened."""
        when = artifacts.parse_time(happened_at)
        if when is None or self.now - when <= timedelta(seconds=NEWS_RESYNCS * self.settings.resync_seconds):
            return True
        created = artifacts.parse_time(self.body["metadata"].get("creationTimestamp"))
        return created is not None and created > when

    def owner_record(self) -> OwnerRecord:
        meta = self.body["metadata"]
        return OwnerRecord(
            api_version=API_VERSION, kind=self.kind, namespace=self.namespace, name=self.name, uid=meta["uid"]
        )

    def claim(self, prefix: str, what: str, legacy_owner: Callable[[], tuple[str, str] | None] | None = None) -> Claim:
        """Own ``prefix`` before writing, pinning or deleting anything under it (see :mod:`langmerge.ownership`)."""
        result = claim_prefix(
            self.rt.store,
            prefix,
            self.owner_record(),
            exists=lambda record: object_exists(self.rt, record, prefix),
            legacy_owner=legacy_owner,
            what=what,
            exists_at=lambda record, other: object_exists(self.rt, record, other),
        )
        if result.adopted_from is not None:
            self.event(
                "Normal",
                "PrefixAdopted",
                f"took over {what} {prefix} from {result.adopted_from.describe()}, which no longer exists or no "
                "longer names it",
            )
        return result

    def job_admission(self, component: str) -> Refusal | None:
        """What must hold in the namespace before a Job is created: the S3 Secret the Job reads exists (checked by
        name, as metadata only: its data is never read)."""
        if not self.settings.check_s3_secret:
            return None
        secret = self.settings.s3_secret_name
        try:
            exists = self.rt.kube.secret_exists(self.namespace, secret)
        except Forbidden as err:
            return Refusal(
                "SecretNotCheckable",
                f"the operator may not check that Secret {secret} exists in namespace {self.namespace} ({err}); "
                "grant it get on that Secret name (the chart does) or turn the check off (s3.credentials.checkExists)",
            )
        if exists:
            return None
        return Refusal(
            "SecretMissing",
            f"Secret {secret} not found in namespace {self.namespace}: the {component} Job reads its S3 credentials "
            f"from it (keys {self.settings.s3_secret_access_key_id_key}, "
            f"{self.settings.s3_secret_secret_access_key_key}); create it, then the Job starts",
        )

    def written_view(self) -> tuple[Any, ...]:
        """The status fields whose change by someone else (a lost or edited status) makes the object run again."""
        return (self.status.phase, self.status.observed_generation)

    def commit(self, requeue: float | None) -> float | None:
        """Post the events, write the status if it changed, return the requeue delay.

        Events first: whoever sees the new status (a user, a tool, a test) also finds the Events that explain it.
        """
        self.status.observed_generation = self.generation
        outage = self.rt.storage_outage
        if self.degraded is None and outage is not None:
            # The health probe finds S3 down: every object depends on it, whether or not this pass needed it.
            self.degrade("StorageUnavailable", outage)
        reason, message = self.degraded or ("AsExpected", "")
        self.condition(DEGRADED, self.degraded is not None, reason, message)
        self.status.health = HEALTHY if self.degraded is None else f"Degraded: {reason}"
        for type_, event_reason, event_message in self.events:
            self.rt.event({**self.body, "kind": self.kind}, type_, event_reason, event_message)
        new = self.status.model_dump(mode="json", by_alias=True)
        if new != self.old.model_dump(mode="json", by_alias=True):
            self.rt.kube.patch_status(self.plural, object_key(self.key), merge_patch_body(new))
        self.rt.memo(self.key).written = self.written_view()
        if not self.wants_slot:
            self.rt.slots.forget(self.key)
        return requeue

    # -- S3 problems -----------------------------------------------------------------------------------------------
    def guarded(self, run: Callable[[], float | None], *, failed_phase: Any, user_error_retry: float) -> float | None:
        """Run the pass; S3 problems become status instead of tracebacks.

        - S3 unavailable: ``Degraded=True StorageUnavailable`` naming the endpoint, an Event once; the object runs
          again as soon as a probe gets an answer from S3 (and at the resync interval in any case).
        - A missing bucket or a malformed record: a user error, phase ``failed_phase`` naming the bucket or the key
          and the parse error, an Event once; looked at again after ``user_error_retry`` seconds.
        - Any other S3 error (e.g. access denied): ``Degraded=True StorageError`` with S3's message.
        In every case the status keeps what the last complete pass found (a partial pass is not written). While the
        health probe finds S3 down, a pass does not ask S3 at all (each request would wait out its connect timeout and
        retries, holding the Degraded status back for that long): it shows the outage at once and waits for S3.
        """
        try:
            if self.rt.storage_outage is not None:
                raise StorageUnavailable(self.rt.store.endpoint, "the health probe gets no answer")
            return run()
        except StorageUnavailable as err:
            self.status = self.old.model_copy(deep=True)
            message = (
                f"S3 at {err.endpoint} is unavailable: {err.detail}; the operator carries on as soon as it answers"
            )
            if not self.was_degraded("StorageUnavailable"):
                self.event("Warning", "StorageUnavailable", message)
            self.status.message = truncate(message)
            self.degrade("StorageUnavailable", message)
            self.wants_slot = self.key in self.rt.slots.waiting()
            self.rt.wait_for_storage(self.key)
            return self.commit(self.settings.resync_seconds)
        except (BucketNotFound, MalformedRecord) as err:
            self.status = self.old.model_copy(deep=True)
            if isinstance(err, BucketNotFound):
                reason = "BucketNotFound"
                message = f"{err}: create the bucket or fix the URI"
            else:
                reason = "MalformedRecord"
                message = f"{err}; fix or delete the object"
            if not self.was_degraded(reason) or self.old.message != truncate(message):
                self.event("Warning", reason, message)
            self.status.active_job = None
            self.set_phase(failed_phase, message)
            self.condition(READY, False, reason, message)
            self.degrade(reason, message)
            return self.commit(user_error_retry)
        except StoreError as err:
            self.status = self.old.model_copy(deep=True)
            message = f"S3 error: {err}"
            if not self.was_degraded("StorageError"):
                self.event("Warning", "StorageError", message)
            self.status.message = truncate(message)
            self.degrade("StorageError", message)
            return self.commit(STORAGE_RETRY_SECONDS)

    # -- Jobs ------------------------------------------------------------------------------------------------------
    def launch_job(
        self, manifest: dict[str, Any], *, component: str, waiting_phase: Any, condition_type: str
    ) -> bool | float | None:
        """Create a Job under the operator-wide cap of running ``component`` Jobs.

        Returns whether it was created (False: it already existed; True counts in the launched-Jobs metric), or the seconds until the next look when the
        object has to wait: for a slot (it queues and is woken when a Job of ``component`` ends; None then, since
        no timer is needed) or because the API server refused the Job (status and an Event say why).

        Order: checks that may refuse the Job (admission) run before a slot is taken; the slot is reserved in memory
        (no lock held across a request); the reservation is given back if the create fails.
        """
        refusal = self.job_admission(component)
        if refusal is not None:
            self.refuse(refusal, phase=waiting_phase, condition_type=condition_type)
            return min(SECRET_RETRY_SECONDS, self.settings.resync_seconds)
        namespace_limit = (
            self.settings.max_training_jobs_per_namespace
            if component == COMPONENT_TRAINING
            else self.settings.max_merge_jobs_per_namespace
        )
        self.wants_slot = True
        namespace, name = self.namespace, manifest["metadata"]["name"]
        grant = self.rt.slots.acquire(self.key, component, (namespace, name), namespace_limit=namespace_limit)
        if not grant.granted:
            if grant.reason == "NamespaceQueueFull":
                message = (
                    f"waiting for a {component} slot: {grant.running} of the {grant.limit} {component} Jobs "
                    f"namespace {self.namespace} may run at once are running "
                    f"(operator setting max_{component}_jobs_per_namespace)"
                )
            else:
                message = (
                    f"waiting for a {component} slot: {grant.running} of {grant.limit} {component} Jobs are running "
                    f"(operator setting max_{component}_jobs)"
                )
            self.status.active_job = None
            self.set_phase(waiting_phase, message)
            self.condition(condition_type, False, grant.reason, message)
            self.condition(READY, False, "Queued", message)
            return None
        self.wants_slot = False
        try:
            created = self.rt.kube.create_workload(namespace, manifest)
        except Rejected as err:
            self.rt.slots.release((namespace, name))
            message = f"the API server refused the {component} {manifest.get('kind', 'Job')} {name}: {err}"
            if self.old.message != truncate(message):
                self.event("Warning", "JobRejected", message)
            self.status.active_job = None
            self.set_phase(waiting_phase, message)
            self.condition(condition_type, False, "JobRejected", message)
            self.degrade("JobRejected", message)
            return 60.0
        except BaseException:
            self.rt.slots.release((namespace, name))
            raise
        if created:
            metrics.JOBS_LAUNCHED.labels(component).inc()
        return created

    def cancel_outdated(
        self, jobs: list[JobState], fingerprint: str, on_change: OnChange, reason: str, message: str
    ) -> list[JobState]:
        """Running Jobs for other fingerprints than ``fingerprint``: deleted (a Normal Event ``reason`` each, its
        ``message`` formatted with ``job``) under ``onChange: restart`` and [] returned; otherwise returned, to finish
        first."""
        outdated = [j for j in jobs if j.active and j.fingerprint != fingerprint]
        if outdated and on_change == OnChange.RESTART:
            for job in outdated:
                if self.rt.kube.delete_workload(job.kind, self.namespace, job.name):
                    self.event("Normal", reason, message.format(job=job))
            return []
        return outdated

    # -- converging on the desired fingerprint ---------------------------------------------------------------------
    def converge(
        self, fingerprint: str, jobs: list[JobState], prefix: str, retry: Retry, start: Callable[[int], float | None]
    ) -> float | None:
        """The desired artifact (``fingerprint``, under ``prefix``) is not committed: follow its latest Job while it
        runs (:meth:`job_running`); once it ended, record how (a failure record per attempt) and decide by ``retry``:
        give up (:meth:`gave_up`), back off (:meth:`backing_off`), or ``start`` the next attempt."""
        current = latest_job(jobs, fingerprint)
        stopped: FailureRecord | None = None
        if current is not None and current.active:
            stopped = self.stop_hopeless_job(current, prefix)
            if stopped is None:
                return self.job_running(current, prefix)
        records = self.failure_records(prefix)
        if stopped is not None and current is not None:
            records[current.attempt] = stopped
        if current is not None:
            records = record_job_end(self.rt.store, prefix, current, records, self.now_s)
            after = self.job_ended(current, records[current.attempt])
            if after is not None:
                return after
        decision = decide_retry(records, limit=retry.limit, backoff_seconds=retry.backoff_seconds, now=self.now)
        self.status.attempts = decision.attempts
        if decision.give_up and decision.last is not None:
            return self.gave_up(decision.last, decision.attempts)
        if decision.wait_until is not None and decision.last is not None:
            self.backing_off(decision, decision.last)
            return (decision.wait_until - self.now).total_seconds()
        assert decision.next_attempt is not None
        return start(decision.next_attempt)

    def failure_records(self, prefix: str) -> dict[int, FailureRecord]:
        """The failure records of the attempts under ``prefix``."""
        return failure_records(self.rt.store, prefix)

    def stop_hopeless_job(self, job: JobState, prefix: str) -> FailureRecord | None:
        """A running Job that cannot succeed is stopped here, returning its failure record (default: none is)."""
        return None

    def job_ended(self, job: JobState, record: FailureRecord) -> float | None:
        """The latest Job ended with ``record``: the requeue delay if that settles the pass, else None (decide)."""
        return None

    def job_running(self, job: JobState, prefix: str) -> float | None:
        """The latest Job of the desired fingerprint runs: show it; the requeue delay."""
        raise NotImplementedError

    def gave_up(self, last: FailureRecord, attempts: int) -> float | None:
        """Every retry is spent: show the last failure; the requeue delay."""
        raise NotImplementedError

    def backing_off(self, decision: RetryDecision, last: FailureRecord) -> None:
        """An attempt failed and the next one waits until ``decision.wait_until``: show it."""
        raise NotImplementedError

    def owned_jobs(self, component: str) -> list[JobState]:
        """This object's Jobs of ``component`` (from the watch's index); Jobs of a deleted object of the same name
        (another UID) are skipped, the garbage collector removes them."""
        return self.rt.jobs.owned(
            self.namespace, component, label_value(self.name), self.body["metadata"].get("uid"), name=self.name
        )
