"""What every reconcile pass works with: settings, the two seams (Kubernetes, S3), the queue, a clock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from langmerge.constants import API_VERSION, COMPONENT_MERGE, COMPONENT_TRAINING, EXPERT_KIND, MERGED_KIND
from langmerge.controller.cloudevents import EventSender
from langmerge.controller.jobindex import JobIndex, Slots
from langmerge.kube import Kube, ObjectKey, post_event
from langmerge.settings import Settings
from langmerge.store import ObjectStore

EXPERT = "expert"
MERGED = "merged"

#: A work-queue key: (kind, namespace, name) with kind ``expert`` or ``merged``.
Key = tuple[str, str, str]


def expert_key(namespace: str, name: str) -> Key:
    return (EXPERT, namespace, name)


def merged_key(namespace: str, name: str) -> Key:
    return (MERGED, namespace, name)


def object_key(key: Key) -> ObjectKey:
    return ObjectKey(namespace=key[1], name=key[2])


@dataclass
class Memo:
    """In-memory, per-object facts that need not survive a restart (a restart simply re-reads them)."""

    last_poll: float = 0.0
    #: What the last pass wrote to status (phase, fingerprints, ...), to notice a status edited or lost by others.
    written: tuple[Any, ...] | None = None
    #: Committed records are immutable: a manifest read once is not read again (fingerprint -> record).
    manifests: dict[str, Any] = field(default_factory=dict)
    #: (fingerprint, monotonic time) of the last look for a manifest that was not there.
    manifest_absent: tuple[str, float] | None = None
    #: (prefix, failure records, monotonic time): failure records change only when one of our Jobs ends.
    failures: tuple[str, dict[int, Any], float] | None = None
    #: The published revision whose after-effects (history, Event, garbage collection) this process has done.
    observed_revision: int | None = None
    #: (artifact prefix, object uid, monotonic time) of the last claim of the prefix that found it ours.
    claimed: tuple[str, str | None, float] | None = None
    #: What the last label-coverage Warning Event was about (an expert's adapter digest, a MergedModel's message):
    #: posted once, not again on the next pass nor after someone removed the status.
    labels_warned: str | None = None
    #: schedule.followData false: (fingerprint, monotonic time, manifest or None) of the last search for an adapter of
    #: the current spec trained on earlier data.
    earlier: tuple[str, float, Any] | None = None


@dataclass
class Runtime:
    settings: Settings
    kube: Kube
    store: ObjectStore
    #: Schedules a key on the work queue from any thread.
    enqueue: Callable[[Key, float], None] = lambda key, delay: None
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    memos: dict[Key, Memo] = field(default_factory=dict)
    #: Our Jobs as the watch reports them (no LIST per pass).
    jobs: JobIndex = field(default_factory=JobIndex)
    #: Operator-wide Job slots per component and the objects waiting for one.
    slots: Slots = field(init=False)
    #: Base-model digests shared by every object on the same base model: uri@revision -> (digest, objects, time).
    base_digests: dict[str, tuple[str, int, float]] = field(default_factory=dict)
    _storage_lock: threading.Lock = field(default_factory=threading.Lock)
    #: Objects whose last pass found S3 unavailable: woken as soon as a probe gets an answer again.
    _storage_waiters: set[Key] = field(default_factory=set)
    #: While the health probe finds S3 down: what every object's Degraded condition says (set by the manager).
    storage_outage: str | None = None
    #: Delivers spec.serving's CloudEvents in the background (set by the manager; None: none are sent).
    cloud_events: EventSender[Key] | None = None

    def __post_init__(self) -> None:
        self.slots = Slots(
            self.jobs,
            {COMPONENT_TRAINING: self.settings.max_training_jobs, COMPONENT_MERGE: self.settings.max_merge_jobs},
        )

    def now(self) -> datetime:
        return self.clock()

    def memo(self, key: Key) -> Memo:
        return self.memos.setdefault(key, Memo())

    def monotonic(self) -> float:
        return time.monotonic()

    # -- S3 outages ----------------------------------------------------------------------------------------------
    def wait_for_storage(self, key: Key) -> None:
        """``key`` could not reach S3: run it again as soon as S3 answers (see :meth:`storage_waiters`)."""
        with self._storage_lock:
            self._storage_waiters.add(key)

    def storage_waiters(self, *, take: bool = False) -> set[Key]:
        """The objects waiting for S3 to come back (``take``: and stop tracking them)."""
        with self._storage_lock:
            keys = set(self._storage_waiters)
            if take:
                self._storage_waiters.clear()
            return keys

    def forget(self, key: Key) -> None:
        """The object is gone: drop what this process remembers about it."""
        self.memos.pop(key, None)
        self.slots.forget(key)
        if self.cloud_events is not None:
            self.cloud_events.forget(key)
        with self._storage_lock:
            self._storage_waiters.discard(key)

    def event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = body.get("metadata", {})
        kind = body.get("kind") or EXPERT_KIND
        post_event(
            self.kube,
            {
                "apiVersion": body.get("apiVersion", API_VERSION),
                "kind": kind,
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            type_,
            reason,
            message,
            component="langmerge-operator",
        )

    def wake_waiting(self, component: str) -> None:
        """Job slots of ``component`` may be free: run the longest-waiting objects, one per free slot."""
        for key in self.slots.wake(component):
            self.enqueue(key, 0.0)


__all__ = ["EXPERT", "MERGED", "MERGED_KIND", "Key", "Memo", "Runtime", "expert_key", "merged_key", "object_key"]
