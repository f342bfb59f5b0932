"""A de-duplicating work queue with delayed re-queues and per-key backoff (the client-go pattern, on asyncio).

kopf's event handlers only *enqueue* keys; workers take a key, reconcile it level-triggered (read everything fresh),
and may ask to be woken again later. A key is processed by one worker at a time; a key added while it is being
processed is processed once more afterwards, so no change is lost and no object is reconciled concurrently.

Safe from any thread: kopf runs synchronous handlers in executor threads and reconcilers run on a thread pool, so
every method except :meth:`get` may be called from any thread. All state sits behind one lock (never held while
waiting), and a waiting :meth:`get` is woken through its event loop's thread-safe ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    """Keys waiting for a worker. :meth:`get` runs on one event loop; everything else may be called from any thread."""

    def __init__(self, base_backoff: float = 1.0, max_backoff: float = 300.0) -> None:
        #: First retry delay after an error; doubles per consecutive failure of the same key, up to ``max_backoff``.
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self._lock = threading.Lock()
        self._ready: deque[K] = deque()
        self._queued: set[K] = set()
        self._processing: set[K] = set()
        self._dirty: set[K] = set()
        self._delayed: list[tuple[float, int, K]] = []
        self._due: dict[K, float] = {}
        self._failures: dict[K, int] = {}
        self._counter = itertools.count()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None

    # -- adding (any thread) -----------------------------------------------------------------------------------------
    def add(self, key: K) -> None:
        """Queue ``key`` now (no-op if already queued; re-run after the current pass if being processed)."""
        with self._lock:
            if not self._add_locked(key):
                return
        self._notify()

    def _add_locked(self, key: K) -> bool:
        if self._closed:
            return False
        if key in self._processing:
            self._dirty.add(key)
            return False
        if key in self._queued:
            return False
        self._queued.add(key)
        self._ready.append(key)
        return True

    def add_after(self, key: K, delay: float) -> None:
        """Queue ``key`` after ``delay`` seconds. The earliest pending time wins; processing a key drops its timer
        (each pass of the reconciler schedules its own next wake-up)."""
        if delay <= 0:
            self.add(key)
            return
        due = time.monotonic() + delay
        with self._lock:
            if self._closed or (key in self._due and self._due[key] <= due):
                return
            self._due[key] = due
            heapq.heappush(self._delayed, (due, next(self._counter), key))
        self._notify()

    def add_rate_limited(self, key: K, cap: float | None = None) -> float:
        """Queue ``key`` after its exponential backoff (at most ``cap`` seconds if given); returns the delay used."""
        with self._lock:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
        delay = float(
            min(self.max_backoff, cap if cap is not None else self.max_backoff, self.base_backoff * 2.0**failures)
        )
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """Reset ``key``'s backoff after a successful pass."""
        with self._lock:
            self._failures.pop(key, None)

    def done(self, key: K) -> None:
        """Mark ``key`` processed; if it was added meanwhile, queue it again."""
        with self._lock:
            self._processing.discard(key)
            again = key in self._dirty
            if again:
                self._dirty.discard(key)
                again = self._add_locked(key)
        if again:
            self._notify()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._notify()

    def _notify(self) -> None:
        """Wake a waiting :meth:`get`, from whichever thread this runs on."""
        loop, wakeup = self._loop, self._wakeup
        if loop is None or wakeup is None:
            return  # no get() has run yet: the first one finds the key without waiting
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(wakeup.set)

    # -- taking (the event loop) -------------------------------------------------------------------------------------
    def _promote_due_locked(self) -> float | None:
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            due, _, key = heapq.heappop(self._delayed)
            if self._due.get(key) != due:
                continue  # superseded by an earlier timer or dropped when the key was processed
            del self._due[key]
            self._add_locked(key)
        return self._delayed[0][0] - now if self._delayed else None

    async def get(self) -> K:
        """Wait for the next key and mark it as being processed."""
        if self._wakeup is None:
            self._loop = asyncio.get_running_loop()
            self._wakeup = asyncio.Event()
        wakeup = self._wakeup
        while True:
            with self._lock:
                # Cleared under the lock before looking: an add() after the look sets it again (no lost wake-up).
                wakeup.clear()
                wait = self._promote_due_locked()
                if self._ready:
                    key = self._ready.popleft()
                    self._queued.discard(key)
                    self._processing.add(key)
                    self._due.pop(key, None)
                    return key
                if self._closed:
                    raise asyncio.CancelledError
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), timeout=wait)

    # -- diagnostics ---------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            return len(self._ready) + len(self._due)

    def pending(self) -> set[K]:
        """Keys queued now or later (for diagnostics and tests)."""
        with self._lock:
            return set(self._ready) | set(self._due) | self._dirty

    def processing(self) -> set[K]:
        """Keys a worker is processing now."""
        with self._lock:
            return set(self._processing)
