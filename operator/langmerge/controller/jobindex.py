"""The operator's Jobs in memory, and the operator-wide Job slots.

:class:`JobIndex` is fed by the Job watch kopf already runs (and one LIST at start-up and every
``job_relist_seconds`` as a safety net), so a reconcile pass reads Job state from memory instead of LISTing Jobs.
:class:`Slots` caps the running Jobs per component: an object that finds no free slot waits in a FIFO and is woken
when a Job ends, instead of polling. Both are thread-safe and hold their lock only for in-memory work, never across
a request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from langmerge.constants import LABEL_COMPONENT, LABEL_EXPERT, LABEL_MERGED, TRAINJOB_KIND
from langmerge.controller.jobs import JobState, job_state
from langmerge.controller.trainjobs import trainjob_state

#: A Job's identity: (namespace, name).
JobId = tuple[str, str]

#: A reserved slot whose Job the watch has not shown after this many seconds is given back (the create failed
#: without an answer, or the watch lags; the next relist settles it either way).
RESERVATION_SECONDS = 120.0


def _rv(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if obj is None:
            return None
        obj = obj.get(key) if isinstance(obj, dict) else getattr(obj, _snake(key), None)
    return obj


def _snake(name: str) -> str:
    return {
        "resourceVersion": "resource_version",
        "ownerReferences": "owner_references",
        "deletionTimestamp": "deletion_timestamp",
    }.get(name, name)


@dataclass(frozen=True)
class IndexedJob:
    namespace: str
    component: str
    #: The value of the owner's label (``langmerge.dev/expert`` or ``langmerge.dev/merged-model``).
    owner: str
    owner_uids: tuple[str, ...]
    #: The full name in the controller reference (the label holds a shortened one).
    owner_name: str | None
    resource_version: int
    state: JobState
    #: Deleted, waiting for its finalizers: no longer the owner's Job (and not running).
    deleting: bool = False


def index_entry(body: Any, kind: str | None = None) -> IndexedJob | None:
    """One Job or TrainJob (a watch event's dict or a client model) as an index entry; None if it is not one of
    ours. ``kind`` (else the body's own) tells a TrainJob, whose state comes from its own conditions."""
    labels = _get(body, "metadata", "labels") or {}
    component = labels.get(LABEL_COMPONENT)
    owner = labels.get(LABEL_EXPERT) or labels.get(LABEL_MERGED)
    namespace = _get(body, "metadata", "namespace")
    if not component or not owner or not namespace:
        return None
    refs = _get(body, "metadata", "ownerReferences") or []
    return IndexedJob(
        namespace=str(namespace),
        component=str(component),
        owner=str(owner),
        owner_uids=tuple(str(_get(r, "uid")) for r in refs if _get(r, "uid")),
        owner_name=next((str(_get(r, "name")) for r in refs if _get(r, "controller")), None),
        resource_version=_rv(_get(body, "metadata", "resourceVersion")),
        state=trainjob_state(body) if (kind or _get(body, "kind")) == TRAINJOB_KIND else job_state(body),
        deleting=_get(body, "metadata", "deletionTimestamp") is not None,
    )


class JobIndex:
    """Every Job of ours the watch reported, by (namespace, name)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[JobId, IndexedJob] = {}
        #: Set once a full listing was loaded: before that the index may miss Jobs.
        self.synced = threading.Event()

    def apply(self, event_type: str, body: Any) -> IndexedJob | None:
        """A watch event. Returns the entry (None if not ours). An older resourceVersion never overwrites a newer."""
        entry = index_entry(body)
        if entry is None:
            return None
        job_id = (entry.namespace, entry.state.name)
        with self._lock:
            known = self._jobs.get(job_id)
            if event_type == "DELETED":
                if known is None or known.resource_version <= entry.resource_version or not entry.resource_version:
                    self._jobs.pop(job_id, None)
            elif known is None or entry.resource_version >= known.resource_version:
                self._jobs[job_id] = entry
        return entry

    def replace(
        self, bodies: Iterable[Any], list_version: str, namespace: str | None = None, kind: str = "Job"
    ) -> None:
        """A full listing of ``kind`` (Jobs or TrainJobs, of ``namespace`` or cluster-wide) at ``list_version``: those
        of that kind it lacks are gone, unless an event newer than the list added them meanwhile."""
        listed = {(e.namespace, e.state.name): e for b in bodies if (e := index_entry(b, kind)) is not None}
        at = _rv(list_version)
        with self._lock:
            for job_id, known in list(self._jobs.items()):
                if (namespace is not None and job_id[0] != namespace) or known.state.kind != kind:
                    continue
                if job_id not in listed and (not at or known.resource_version <= at):
                    del self._jobs[job_id]
            for job_id, entry in listed.items():
                current = self._jobs.get(job_id)
                if current is None or entry.resource_version >= current.resource_version:
                    self._jobs[job_id] = entry
        self.synced.set()

    def get(self, job_id: JobId) -> IndexedJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def owned(
        self, namespace: str, component: str, owner: str, uid: str | None = None, *, name: str | None = None
    ) -> list[JobState]:
        """The Jobs of ``component`` that the object ``owner`` (its label value) owns. Jobs being deleted, Jobs of a
        deleted object of the same name (another ``uid``), and Jobs whose controller reference names another object
        than ``name`` (the label value is shortened: two long names may share it) are left out."""
        with self._lock:
            entries = [
                e
                for e in self._jobs.values()
                if e.namespace == namespace and e.component == component and e.owner == owner and not e.deleting
            ]
        return [
            e.state
            for e in entries
            if not (uid and e.owner_uids and uid not in e.owner_uids)
            and not (name and e.owner_name and e.owner_name != name)
        ]

    def active(self, component: str) -> set[JobId]:
        """The running Jobs of ``component``: active and admitted (one that Kueue holds suspended takes no slot)."""
        with self._lock:
            return {
                (e.namespace, e.state.name) for e in self._jobs.values() if e.component == component and e.state.running
            }

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)


@dataclass
class _Waiter:
    component: str
    since: float
    namespace: str = ""
    #: The per-namespace cap this object is under (0: none).
    namespace_limit: int = 0


@dataclass(frozen=True)
class Grant:
    """The answer of :meth:`Slots.acquire`."""

    granted: bool
    #: Why not: ``QueueFull`` (the operator-wide cap) or ``NamespaceQueueFull`` (the namespace's cap).
    reason: str = ""
    #: Running Jobs counted against the cap that applies, and that cap.
    running: int = 0
    limit: int = 0


@dataclass
class Slots:
    """Operator-wide caps of running Jobs per component, with the objects waiting for a slot in arrival order.

    A slot is taken by reserving the Job's name before creating it; the reservation turns into the running Job once
    the watch shows it. Objects that find every slot taken wait in a FIFO; :meth:`wake` returns as many of them as
    there are free slots (not all of them: 300 queued experts must not all wake for one free slot).
    """

    index: JobIndex
    limits: dict[str, int]
    clock: Callable[[], float] = time.monotonic
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _reserved: dict[JobId, tuple[str, float]] = field(default_factory=dict)
    _waiting: dict[Any, _Waiter] = field(default_factory=dict)
    _woken: dict[Any, _Waiter] = field(default_factory=dict)

    def _running_locked(self, component: str) -> set[JobId]:
        now = self.clock()
        active = self.index.active(component)
        for job_id, (comp, at) in list(self._reserved.items()):
            if self.index.get(job_id) is not None or now - at > RESERVATION_SECONDS:
                del self._reserved[job_id]  # the watch shows it now (or it never came)
            elif comp == component:
                active.add(job_id)
        return active

    def running(self, component: str, namespace: str | None = None) -> int:
        with self._lock:
            return sum(1 for ns, _ in self._running_locked(component) if namespace in (None, ns))

    @staticmethod
    def _capped(waiter: _Waiter, running: set[JobId]) -> bool:
        """Whether ``waiter``'s namespace is at its own cap (a free operator-wide slot is no use to it)."""
        if not waiter.namespace_limit:
            return False
        return sum(1 for ns, _ in running if ns == waiter.namespace) >= waiter.namespace_limit

    def acquire(self, key: Any, component: str, job_id: JobId, *, namespace_limit: int = 0) -> Grant:
        """Take a slot for the Job ``job_id`` of object ``key``, under the operator-wide cap of ``component`` and, if
        ``namespace_limit``, the cap of Jobs in ``job_id``'s namespace.

        A Job that exists already (or is reserved) needs no new slot. Otherwise the slot goes to ``key`` only if no
        object that waits longer (and could use it) is still owed one; if none is free, ``key`` waits, keeping its
        place in the line.
        """
        with self._lock:
            running = self._running_locked(component)
            limit = self.limits[component]
            if self.index.get(job_id) is not None or job_id in self._reserved:
                self._waiting.pop(key, None)
                self._woken.pop(key, None)
                return Grant(True, running=len(running), limit=limit)
            known = self._waiting.get(key) or self._woken.get(key)
            mine = _Waiter(component, known.since if known else self.clock(), job_id[0], namespace_limit)
            ahead = sum(
                1
                for other, w in (*self._waiting.items(), *self._woken.items())
                if other != key and w.component == component and w.since < mine.since and not self._capped(w, running)
            )
            if len(running) + ahead >= limit:
                self._woken.pop(key, None)
                self._waiting[key] = mine
                return Grant(False, "QueueFull", len(running), limit)
            if self._capped(mine, running):
                self._woken.pop(key, None)
                self._waiting[key] = mine
                in_namespace = sum(1 for ns, _ in running if ns == mine.namespace)
                return Grant(False, "NamespaceQueueFull", in_namespace, namespace_limit)
            self._waiting.pop(key, None)
            self._woken.pop(key, None)
            self._reserved[job_id] = (component, self.clock())
            return Grant(True, running=len(running) + 1, limit=limit)

    def release(self, job_id: JobId) -> None:
        """The Job was not created after all: give its reservation back."""
        with self._lock:
            self._reserved.pop(job_id, None)

    def wake(self, component: str) -> list[Any]:
        """The waiting objects to run now: the longest-waiting ones that can use a slot (their namespace is below its
        cap), as many as slots are free and not yet promised to an object woken before."""
        with self._lock:
            running = self._running_locked(component)
            free = self.limits[component] - len(running)
            free -= sum(1 for w in self._woken.values() if w.component == component)
            waiting = sorted(
                (
                    (w.since, k)
                    for k, w in self._waiting.items()
                    if w.component == component and not self._capped(w, running)
                ),
                key=lambda x: x[0],
            )
            keys = [k for _, k in waiting[: max(0, free)]]
            for k in keys:
                self._woken[k] = self._waiting.pop(k)
            return keys

    def pass_done(self, key: Any) -> str | None:
        """``key``'s pass ended: a wake it did not use goes to the next in line. Returns the component to wake again
        (if ``key`` was woken and neither took a slot nor queued again)."""
        with self._lock:
            woken = self._woken.pop(key, None)
            return woken.component if woken is not None else None

    def forget(self, key: Any) -> None:
        """The object is gone: it waits no more."""
        with self._lock:
            self._waiting.pop(key, None)
            self._woken.pop(key, None)

    def count_waiting(self, component: str) -> int:
        with self._lock:
            return sum(1 for w in self._waiting.values() if w.component == component)

    def waiting(self, component: str | None = None) -> list[Any]:
        """Objects waiting for a slot, longest-waiting first."""
        with self._lock:
            items = [(w.since, k) for k, w in self._waiting.items() if component in (None, w.component)]
        return [k for _, k in sorted(items, key=lambda x: x[0])]
