"""The work queue under threads: kopf runs synchronous handlers in executor threads and the reconcilers run on a
thread pool, so keys are added from many threads while asyncio workers take them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from langmerge.controller.workqueue import WorkQueue

KEYS = [f"key-{i}" for i in range(16)]


@pytest.fixture(autouse=True)
def _frequent_thread_switches() -> Iterator[None]:
    """Switch threads as often as possible so that unsynchronised code shows its races."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def test_a_key_added_from_another_thread_wakes_an_idle_worker() -> None:
    async def scenario() -> float:
        q: WorkQueue[str] = WorkQueue()
        taken = asyncio.ensure_future(q.get())
        await asyncio.sleep(0.05)  # the worker waits on an empty queue, with no timer pending
        started = time.monotonic()

        # A bare thread (an executor's future would wake the loop by itself when it completes).
        def add_later() -> None:
            time.sleep(0.1)  # the loop is back in its wait by then
            q.add("a")

        threading.Thread(target=add_later).start()
        done, _ = await asyncio.wait({taken}, timeout=3)
        assert done, "the worker was not woken by a key added from another thread"
        assert taken.result() == "a"
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 1.0


def test_hammered_from_threads_one_worker_per_key_and_no_add_lost() -> None:
    """8 threads add and delay-add 16 keys 16,000 times while 8 workers reconcile on a thread pool: a key is never
    processed by two workers at once, and every key is processed after its last add."""
    guard = threading.Lock()
    active: Counter[str] = Counter()
    overlaps: list[str] = []
    last_add: dict[str, float] = {}
    last_start: dict[str, float] = {}
    passes = Counter[str]()

    async def scenario() -> None:
        q: WorkQueue[str] = WorkQueue()
        loop = asyncio.get_running_loop()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)

        def produce(seed: int) -> None:
            rnd = random.Random(seed)
            for _ in range(2000):
                key = rnd.choice(KEYS)
                with guard:
                    last_add[key] = time.monotonic()
                if rnd.random() < 0.2:
                    q.add_after(key, rnd.random() * 0.005)
                else:
                    q.add(key)

        def reconcile(key: str) -> None:
            with guard:
                active[key] += 1
                if active[key] > 1:
                    overlaps.append(key)
                last_start[key] = time.monotonic()
                passes[key] += 1
            time.sleep(0.0002)
            with guard:
                active[key] -= 1

        async def worker() -> None:
            while True:
                key = await q.get()
                try:
                    await loop.run_in_executor(pool, reconcile, key)
                finally:
                    q.done(key)

        workers = [asyncio.create_task(worker()) for _ in range(8)]
        producers = [threading.Thread(target=produce, args=(seed,)) for seed in range(8)]
        for t in producers:
            t.start()
        await loop.run_in_executor(None, lambda: [t.join() for t in producers])

        def settled() -> bool:
            with guard:
                return all(last_start.get(k, -1.0) >= t for k, t in last_add.items()) and not any(active.values())

        deadline = time.monotonic() + 20
        while not (settled() and not q.pending()):
            assert time.monotonic() < deadline, f"keys not processed after their last add: {q.pending()}"
            await asyncio.sleep(0.01)
        q.close()
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        pool.shutdown()

    asyncio.run(scenario())
    assert not overlaps, f"keys processed by two workers at once: {sorted(set(overlaps))}"
    assert set(passes) == set(KEYS)
    # De-duplication: far fewer passes than adds.
    assert sum(passes.values()) < 16_000


def test_rate_limit_cap_bounds_the_delay_of_an_outage() -> None:
    q: WorkQueue[str] = WorkQueue(base_backoff=1, max_backoff=300)
    delays = [q.add_rate_limited("k", cap=5.0) for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert q.add_rate_limited("k") == 64.0
