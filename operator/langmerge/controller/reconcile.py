"""What both reconcilers share: one pass over one object, with its status edited in memory and written once."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import ValidationError

from langmerge.api.common import Condition
from langmerge.controller.jobs import JobState, job_state, label_value, selector
from langmerge.controller.runtime import Key, Runtime, object_key
from langmerge.controller.status import DEGRADED, READY, merge_patch_body, set_condition, truncate
from langmerge.kube import Rejected


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


def count_active_jobs(rt: Runtime, component: str) -> int:
    """Running Jobs of ``component`` (training or merge) in the watched namespaces."""
    namespaces = rt.settings.namespaces or (None,)
    return sum(
        1
        for ns in namespaces
        for job in rt.kube.list_jobs(selector(**{"langmerge.dev/component": component}), ns)
        if job_state(job).active
    )


def delete_jobs_of(rt: Runtime, namespace: str, owner_label: str, name: str) -> int:
    """The owner is gone: delete its Jobs (the garbage collector would too, where it runs). Returns how many."""
    deleted = 0
    for job in rt.kube.list_jobs(selector(**{owner_label: label_value(name)}), namespace):
        if rt.kube.delete_job(namespace, job.metadata.name):
            deleted += 1
    return deleted


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
        with self.rt.capacity_lock:
            running = count_active_jobs(self.rt, component)
            if running >= limit:
                self.rt.waiting_for_capacity.add(self.key)
                message = (
                    f"waiting for a {component} slot: {running} of {limit} {component} Jobs are running "
                    f"(operator setting max_{component}_jobs)"
                )
                self.status.active_job = None
                self.set_phase(waiting_phase, message)
                self.condition(condition_type, False, "QueueFull", message)
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
