"""What both reconcilers share: one pass over one object, with its status edited in memory and written once."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import ValidationError

from langmerge.admission import Refusal
from langmerge.api.common import Condition
from langmerge.artifacts import OwnerRecord
from langmerge.constants import API_VERSION, COMPONENT_TRAINING, MERGED_KIND
from langmerge.controller.jobs import JobState, job_state, label_value, selector
from langmerge.controller.runtime import Key, Runtime, object_key
from langmerge.controller.status import DEGRADED, READY, merge_patch_body, set_condition, truncate
from langmerge.kube import Forbidden, ObjectKey, Rejected
from langmerge.ownership import Claim, claim_prefix

#: Look again this soon after a missing S3 Secret (Secrets are not watched: the operator may not list them).
SECRET_RETRY_SECONDS = 30.0


class _Status(Protocol):
    phase: Any
    message: str | None
    observed_generation: int | None
    conditions: list[Condition]
    active_job: str | None

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
        parts.append(f"spec{loc}: {e['msg']}")
    return "; ".join(parts)


def count_active_jobs(rt: Runtime, component: str, namespace: str | None = None) -> int:
    """Running Jobs of ``component`` (training or merge) in ``namespace``, else in all the watched namespaces."""
    namespaces = (namespace,) if namespace else (rt.settings.namespaces or (None,))
    return sum(
        1
        for ns in namespaces
        for job in rt.kube.list_jobs(selector(**{"langmerge.dev/component": component}), ns)
        if job_state(job).active
    )


def delete_jobs_of(rt: Runtime, namespace: str, owner_label: str, name: str) -> int:
    """The owner is gone: delete its Jobs (the garbage collector would too, where it runs). Returns how many.

    The owner label holds a shortened name, so a Job counts as the owner's only when its controller reference names
    it in full: another object whose name shares the first 63 characters keeps its Jobs."""
    deleted = 0
    for job in rt.kube.list_jobs(selector(**{owner_label: label_value(name)}), namespace):
        refs = job.metadata.owner_references or []
        if refs and not any(r.name == name for r in refs if r.controller):
            continue
        if rt.kube.delete_job(namespace, job.metadata.name):
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


class ReconcilePass(Generic[StatusT]):
    """One pass: ``old`` is the status as read, ``status`` the one being built; :meth:`commit` writes the difference
    (nothing when nothing changed, so a pass never triggers itself) and posts the Events gathered on the way."""

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

    def condition(self, type_: str, value: bool, reason: str, message: str = "") -> None:
        self.status.conditions = set_condition(
            self.status.conditions, type_, value, reason, truncate(message), generation=self.generation, now=self.now_s
        )

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
        self.condition(DEGRADED, True, refusal.reason, refusal.message)

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

    def commit(self, requeue: float | None) -> float | None:
        """Write the status if it changed, post the events, return the requeue delay."""
        self.status.observed_generation = self.generation
        new = self.status.model_dump(mode="json", by_alias=True)
        if new != self.old.model_dump(mode="json", by_alias=True):
            self.rt.kube.patch_status(self.plural, object_key(self.key), merge_patch_body(new))
        for type_, reason, message in self.events:
            self.rt.event({**self.body, "kind": self.kind}, type_, reason, message)
        return requeue

    def launch_job(
        self, manifest: dict[str, Any], *, component: str, limit: int, waiting_phase: Any, condition_type: str
    ) -> bool | float:
        """Create a Job under the operator-wide cap of running ``component`` Jobs.

        Returns whether it was created (False: it already existed), or the seconds to wait when the cap is reached
        (the object queues) or the API server refused the Job (status and an Event say why).
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
        with self.rt.capacity_lock:
            running = count_active_jobs(self.rt, component)
            in_namespace = count_active_jobs(self.rt, component, self.namespace) if namespace_limit else 0
            if running >= limit or (namespace_limit and in_namespace >= namespace_limit):
                self.rt.waiting_for_capacity.add(self.key)
                if running >= limit:
                    reason = "QueueFull"
                    message = (
                        f"waiting for a {component} slot: {running} of {limit} {component} Jobs are running "
                        f"(operator setting max_{component}_jobs)"
                    )
                else:
                    reason = "NamespaceQueueFull"
                    message = (
                        f"waiting for a {component} slot: {in_namespace} of the {namespace_limit} {component} Jobs "
                        f"namespace {self.namespace} may run at once are running "
                        f"(operator setting max_{component}_jobs_per_namespace)"
                    )
                self.status.active_job = None
                self.set_phase(waiting_phase, message)
                self.condition(condition_type, False, reason, message)
                self.condition(READY, False, "Queued", message)
                return 30.0
            try:
                created = self.rt.kube.create_job(self.namespace, manifest)
            except Rejected as err:
                message = f"the API server refused the {component} Job {manifest['metadata']['name']}: {err}"
                if self.old.message != truncate(message):
                    self.event("Warning", "JobRejected", message)
                self.status.active_job = None
                self.set_phase(waiting_phase, message)
                self.condition(condition_type, False, "JobRejected", message)
                self.condition(DEGRADED, True, "JobRejected", message)
                return 60.0
        self.rt.waiting_for_capacity.discard(self.key)
        return created

    def owned_jobs(self, component: str, owner_label: str) -> list[JobState]:
        """This object's Jobs of ``component``; Jobs of a deleted object of the same name (another UID) are skipped,
        the garbage collector removes them."""
        uid = self.body["metadata"].get("uid")
        out = []
        for job in self.rt.kube.list_jobs(
            selector(**{"langmerge.dev/component": component, owner_label: label_value(self.name)}), self.namespace
        ):
            refs = job.metadata.owner_references or []
            if uid and refs and not any(r.uid == uid for r in refs):
                continue
            out.append(job_state(job))
        return out
