"""The Job index (fed by the watch) and the operator-wide Job slots with their waiting line."""

from __future__ import annotations

import threading
from typing import Any

from langmerge.controller.jobindex import RESERVATION_SECONDS, Grant, JobIndex, Slots

TRAINING, MERGE = "training", "merge"


def job(
    name: str, *, owner: str = "es", component: str = TRAINING, rv: int = 1, done: bool = False, **meta: Any
) -> dict[str, Any]:
    label = "langmerge.dev/expert" if component == TRAINING else "langmerge.dev/merged-model"
    body: dict[str, Any] = {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "resourceVersion": str(rv),
            "labels": {"langmerge.dev/component": component, label: owner, "langmerge.dev/fingerprint": "fp"},
            "ownerReferences": [{"uid": f"uid-{owner}", "controller": True, "name": owner}],
            **meta,
        },
        "status": {"conditions": [{"type": "Complete", "status": "True"}]} if done else {},
    }
    return body


def test_index_follows_events_and_never_goes_back_in_time() -> None:
    index = JobIndex()
    index.apply("ADDED", job("a", rv=5))
    index.apply("MODIFIED", job("a", rv=4, done=True))  # an older event arriving late
    assert index.active(TRAINING) == {("ns", "a")}
    index.apply("MODIFIED", job("a", rv=6, done=True))
    assert index.active(TRAINING) == set()
    assert [j.name for j in index.owned("ns", TRAINING, "es")] == ["a"]
    assert index.owned("ns", TRAINING, "es", uid="uid-other") == []  # a Job of an earlier object of that name
    index.apply("MODIFIED", job("a", rv=7, deletionTimestamp="2026-01-01T00:00:00Z"))
    assert index.owned("ns", TRAINING, "es") == []  # on its way out
    index.apply("DELETED", job("a", rv=8))
    assert len(index) == 0
    assert index.apply("ADDED", {"metadata": {"name": "x", "namespace": "ns", "labels": {}}}) is None


def test_relist_drops_what_is_gone_but_keeps_what_is_newer_than_the_list() -> None:
    index = JobIndex()
    index.apply("ADDED", job("gone", rv=3))
    index.apply("ADDED", job("new", rv=12))  # created after the list was taken (at 10)
    index.replace([job("kept", rv=9)], "10", namespace="ns")
    assert {j.name for j in index.owned("ns", TRAINING, "es")} == {"kept", "new"}
    assert index.synced.is_set()


def test_slots_cap_fifo_and_reservations() -> None:
    now = [0.0]
    index = JobIndex()
    slots = Slots(index, {TRAINING: 2, MERGE: 1}, clock=lambda: now[0])
    assert slots.acquire("a", TRAINING, ("ns", "a-1")) == Grant(True, running=1, limit=2)
    assert slots.acquire("b", TRAINING, ("ns", "b-1")) == Grant(True, running=2, limit=2)
    # Reserved, not yet in the index: they count.
    now[0] = 1
    assert slots.acquire("c", TRAINING, ("ns", "c-1")) == Grant(False, "QueueFull", 2, 2)
    now[0] = 2
    assert slots.acquire("d", TRAINING, ("ns", "d-1")) == Grant(False, "QueueFull", 2, 2)
    assert slots.acquire("m", MERGE, ("ns", "m-1")).granted, "components have their own slots"
    assert slots.acquire("a", TRAINING, ("ns", "a-1")).granted, "a reserved Job needs no second slot"
    assert slots.waiting(TRAINING) == ["c", "d"]
    # The watch shows a's Job, then its end: one slot frees, the longest-waiting object is woken (only it).
    index.apply("ADDED", job("a-1", rv=1))
    assert slots.wake(TRAINING) == []
    index.apply("MODIFIED", job("a-1", rv=2, done=True))
    assert slots.wake(TRAINING) == ["c"]
    assert slots.wake(TRAINING) == [], "the free slot is promised to c"
    # A newcomer does not jump the line while c is owed the slot.
    now[0] = 3
    assert slots.acquire("e", TRAINING, ("ns", "e-1")) == Grant(False, "QueueFull", 1, 2)
    assert slots.acquire("c", TRAINING, ("ns", "c-1")) == Grant(True, running=2, limit=2)
    # An object woken that no longer needs a slot hands the wake on.
    index.apply("MODIFIED", job("b-1", rv=3, done=True, owner="b"))
    assert slots.wake(TRAINING) == ["d"]
    assert slots.pass_done("d") == TRAINING
    assert slots.wake(TRAINING) == ["e"]
    slots.forget("e")
    assert slots.waiting() == []


def test_reservation_given_back_and_expired() -> None:
    now = [0.0]
    slots = Slots(JobIndex(), {TRAINING: 1}, clock=lambda: now[0])
    assert slots.acquire("a", TRAINING, ("ns", "a-1")).granted
    assert not slots.acquire("b", TRAINING, ("ns", "b-1")).granted
    slots.release(("ns", "a-1"))  # the create failed
    assert slots.running(TRAINING) == 0
    assert slots.acquire("b", TRAINING, ("ns", "b-1")).granted
    now[0] = RESERVATION_SECONDS + 1  # the watch never showed it
    assert slots.running(TRAINING) == 0


def test_slots_from_many_threads_never_exceed_the_cap() -> None:
    slots = Slots(JobIndex(), {TRAINING: 3})
    granted: list[str] = []
    lock = threading.Lock()

    def take(i: int) -> None:
        if slots.acquire(f"k{i}", TRAINING, ("ns", f"j{i}")).granted:
            with lock:
                granted.append(f"k{i}")

    threads = [threading.Thread(target=take, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 3 and slots.running(TRAINING) == 3
    assert len(slots.waiting(TRAINING)) == 47


def test_namespace_cap_holds_without_blocking_other_namespaces() -> None:
    """Two per namespace, four in all: a third Job in namespace a waits (NamespaceQueueFull) and does not keep
    namespace b from the free operator-wide slots; when one of a's Jobs ends, a's waiter is woken."""
    index = JobIndex()
    slots = Slots(index, {TRAINING: 4})
    for i in range(2):
        assert slots.acquire(f"a{i}", TRAINING, ("a", f"a{i}-job"), namespace_limit=2).granted
    assert slots.acquire("a2", TRAINING, ("a", "a2-job"), namespace_limit=2) == Grant(False, "NamespaceQueueFull", 2, 2)
    assert slots.acquire("b0", TRAINING, ("b", "b0-job"), namespace_limit=2).granted
    assert slots.wake(TRAINING) == [], "a free operator-wide slot is no use to a2"
    body = job("a0-job", owner="a0", done=True)
    body["metadata"]["namespace"] = "a"
    index.apply("MODIFIED", body)
    assert slots.wake(TRAINING) == ["a2"]
    assert slots.acquire("a2", TRAINING, ("a", "a2-job"), namespace_limit=2).granted
