"""What every reconcile pass works with: settings, the two seams (Kubernetes, S3), the queue, a clock."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from langmerge.constants import API_VERSION, EXPERT_KIND, MERGED_KIND
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
    base_digest: tuple[str, str] | None = None  # (uri@revision, digest)
    base_polled: float = 0.0


@dataclass
class Runtime:
    settings: Settings
    kube: Kube
    store: ObjectStore
    #: Schedules a key on the work queue from any thread.
    enqueue: Callable[[Key, float], None] = lambda key, delay: None
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    memos: dict[Key, Memo] = field(default_factory=dict)
    #: Serialises "count running Jobs, then create one" so the concurrency cap holds.
    capacity_lock: threading.Lock = field(default_factory=threading.Lock)
    #: Objects waiting for a free Job slot; woken when a Job finishes.
    waiting_for_capacity: set[Key] = field(default_factory=set)

    def now(self) -> datetime:
        return self.clock()

    def memo(self, key: Key) -> Memo:
        return self.memos.setdefault(key, Memo())

    def monotonic(self) -> float:
        return time.monotonic()

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

    def wake_waiting(self, kind: str) -> None:
        """A Job slot freed up: wake the objects of ``kind`` that wait for one."""
        for key in [k for k in self.waiting_for_capacity if k[0] == kind]:
            self.waiting_for_capacity.discard(key)
            self.enqueue(key, 0.0)


def thread_safe_enqueue(
    loop: asyncio.AbstractEventLoop, add: Callable[[Key], None], add_after: Callable[[Key, float], None]
) -> Callable[[Key, float], None]:
    """An ``enqueue`` that may be called from worker threads."""

    def enqueue(key: Key, delay: float) -> None:
        if delay <= 0:
            loop.call_soon_threadsafe(add, key)
        else:
            loop.call_soon_threadsafe(add_after, key, delay)

    return enqueue


__all__ = ["EXPERT", "MERGED", "MERGED_KIND", "Key", "Memo", "Runtime", "expert_key", "merged_key", "object_key"]
