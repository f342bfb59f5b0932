"""A de-duplicating work queue with delayed re-queues and per-key backoff (the client-go pattern, on asyncio).

kopf's event handlers only *enqueue* keys; workers take a key, reconcile it level-triggered (read everything fresh),
and may ask to be woken again later. A key is processed by one worker at a time; a key added while it is being
processed is processed once more afterwards, so no change is lost and no object is reconciled concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass
class WorkQueue(Generic[K]):
    """Keys waiting for a worker. Must be used from one event loop."""

    #: First retry delay after an error; doubles per consecutive failure of the same key.
    base_backoff: float = 1.0
    max_backoff: float = 300.0
    _ready: list[K] = field(default_factory=list)
    _queued: set[K] = field(default_factory=set)
    _processing: set[K] = field(default_factory=set)
    _dirty: set[K] = field(default_factory=set)
    _delayed: list[tuple[float, int, K]] = field(default_factory=list)
    _due: dict[K, float] = field(default_factory=dict)
    _failures: dict[K, int] = field(default_factory=dict)
    _counter: itertools.count[int] = field(default_factory=itertools.count)
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    _closed: bool = False

    def add(self, key: K) -> None:
        """Queue ``key`` now (no-op if already queued; re-run after the current pass if being processed)."""
        if self._closed:
            return
        if key in self._processing:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._ready.append(key)
        self._wakeup.set()

    def add_after(self, key: K, delay: float) -> None:
        """Queue ``key`` after ``delay`` seconds. The earliest pending time wins; processing a key drops its timer
        (each pass of the reconciler schedules its own next wake-up)."""
        if delay <= 0:
            self.add(key)
            return
        due = time.monotonic() + delay
        if key in self._due and self._due[key] <= due:
            return
        self._due[key] = due
        heapq.heappush(self._delayed, (due, next(self._counter), key))
        self._wakeup.set()

    def add_rate_limited(self, key: K) -> float:
        """Queue ``key`` after its exponential backoff; returns the delay used."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay = float(min(self.max_backoff, self.base_backoff * (2.0**failures)))
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """Reset ``key``'s backoff after a successful pass."""
        self._failures.pop(key, None)

    def _promote_due(self) -> float | None:
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            due, _, key = heapq.heappop(self._delayed)
            if self._due.get(key) != due:
                continue  # superseded by an earlier timer or dropped when the key was processed
            del self._due[key]
            self.add(key)
        return self._delayed[0][0] - now if self._delayed else None

    async def get(self) -> K:
        """Wait for the next key and mark it as being processed."""
        while True:
            wait = self._promote_due()
            if self._ready:
                key = self._ready.pop(0)
                self._queued.discard(key)
                self._processing.add(key)
                self._due.pop(key, None)
                return key
            if self._closed:
                raise asyncio.CancelledError
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=wait)

    def done(self, key: K) -> None:
        """Mark ``key`` processed; if it was added meanwhile, queue it again."""
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()

    def __len__(self) -> int:
        return len(self._ready) + len(self._due)

    def pending(self) -> set[K]:
        """Keys queued now or later (for diagnostics and tests)."""
        return set(self._ready) | set(self._due) | self._dirty
