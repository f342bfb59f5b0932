"""CloudEvents of a MergedModel: the binary-mode event, and its delivery to a real HTTP sink on 127.0.0.1 that never
blocks the caller, retries with backoff, keeps per-(object, sink) order and reports its state."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from cloudevents.http import from_http

from langmerge.controller.cloudevents import (
    CANARY_STARTED,
    EVENT_TYPES,
    FAILED,
    PROMOTED,
    PUBLISHED,
    ROLLED_BACK,
    DeliveryState,
    EventSender,
    backoff_delay,
    build_event,
)
from serving_helpers import Sink

Key = tuple[str, str]
KEY: Key = ("demo", "dialog")
UID = "6f1c2a9e-0000-4000-8000-000000000001"


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def closed_port_url() -> str:
    """A URL nobody listens on (the port was just free): connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/events"


@pytest.fixture
def make_sender() -> Iterator[Callable[..., EventSender[Key]]]:
    senders: list[EventSender[Key]] = []

    def make(**kwargs: object) -> EventSender[Key]:
        kwargs.setdefault("timeout", 2.0)
        kwargs.setdefault("base_backoff", 0.01)
        kwargs.setdefault("max_backoff", 0.05)
        sender: EventSender[Key] = EventSender(**kwargs)  # type: ignore[arg-type]
        senders.append(sender)
        return sender

    yield make
    for sender in senders:
        sender.stop()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def event(revision: int = 3, kind: str = PUBLISHED, suffix: str | None = None) -> tuple[dict[str, str], bytes]:
    return build_event(
        kind,
        namespace="demo",
        name="dialog",
        uid=UID,
        revision=revision,
        data={"revision": revision, "storageUri": f"s3://b/o/merges/fp{revision}"},
        suffix=suffix,
    )


# -- the event ----------------------------------------------------------------------------------------------------------
def test_event_types_share_the_prefix() -> None:
    assert {PUBLISHED, CANARY_STARTED, PROMOTED, ROLLED_BACK, FAILED} == EVENT_TYPES
    assert CANARY_STARTED == "dev.langmerge.mergedmodel.canary.started"
    assert ROLLED_BACK == "dev.langmerge.mergedmodel.rolledback"


def test_build_event_is_binary_mode_with_a_deterministic_id() -> None:
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    headers, body = build_event(
        CANARY_STARTED, namespace="demo", name="dialog", uid=UID, revision=7, data={"percent": 10}, when=when
    )
    assert headers == {
        "ce-specversion": "1.0",
        "ce-type": "dev.langmerge.mergedmodel.canary.started",
        "ce-source": "/apis/langmerge.dev/v1alpha1/namespaces/demo/mergedmodels/dialog",
        "ce-subject": "revision/7",
        "ce-id": f"{UID}.7.canary.started",
        "ce-time": "2025-01-02T03:04:05+00:00",
        "content-type": "application/json",
    }
    assert json.loads(body) == {"percent": 10}
    # Re-built after a restart (a different time), it is the same event to the sink.
    again, _ = build_event("canary.started", namespace="demo", name="dialog", uid=UID, revision=7, data={})
    assert again["ce-id"] == headers["ce-id"]
    assert again["ce-time"] != headers["ce-time"]
    assert datetime.fromisoformat(again["ce-time"]).tzinfo is not None


def test_a_suffix_tells_events_of_one_kind_apart() -> None:
    headers, _ = event(revision=4, kind=CANARY_STARTED, suffix="50")
    assert headers["ce-id"] == f"{UID}.4.canary.started.50"


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown event kind"):
        build_event("dev.langmerge.mergedmodel.exploded", namespace="d", name="n", uid="u", revision=1, data={})


@pytest.mark.parametrize(
    ("failures", "base", "cap", "expected"),
    [(1, 1.0, 60.0, 1.0), (2, 1.0, 60.0, 2.0), (3, 1.0, 60.0, 4.0), (7, 1.0, 60.0, 60.0), (3, 0.5, 1.5, 1.5)],
)
def test_backoff_doubles_up_to_the_cap(failures: int, base: float, cap: float, expected: float) -> None:
    assert backoff_delay(failures, base, cap) == expected


# -- delivery -----------------------------------------------------------------------------------------------------------
def test_the_sink_receives_the_binary_mode_event(sink: Sink, make_sender: Callable[..., EventSender[Key]]) -> None:
    sender = make_sender()
    headers, body = event(revision=3)
    sender.send(KEY, sink.url, headers, body)
    wait_for(lambda: sender.state(KEY, sink.url).delivered == 1)

    [(got, got_body)] = sink.requests
    assert got["ce-specversion"] == "1.0"
    assert got["ce-type"] == PUBLISHED
    assert got["ce-source"] == "/apis/langmerge.dev/v1alpha1/namespaces/demo/mergedmodels/dialog"
    assert got["ce-subject"] == "revision/3"
    assert got["ce-id"] == f"{UID}.3.published"
    assert got["content-type"] == "application/json"
    assert json.loads(got_body) == {"revision": 3, "storageUri": "s3://b/o/merges/fp3"}
    parsed = from_http(got, got_body)  # the SDK's own receiver reads it back
    assert parsed["id"] == f"{UID}.3.published"
    assert parsed.data == {"revision": 3, "storageUri": "s3://b/o/merges/fp3"}

    state = sender.state(KEY, sink.url)
    assert state.healthy
    assert (state.delivered, state.failed, state.pending, state.last_error) == (1, 0, 0, None)
    assert state.last_event_id == f"{UID}.3.published"
    assert state.last_success_time is not None and abs(state.last_success_time - time.time()) < 60
    assert sender.state(KEY, "http://127.0.0.1:1/other") == DeliveryState()
    assert sender.states(KEY) == {sink.url: state}


def test_a_failing_sink_gets_the_event_on_the_third_try(
    sink: Sink, make_sender: Callable[..., EventSender[Key]]
) -> None:
    seen: list[DeliveryState] = []
    sender: EventSender[Key]

    def on_change(key: Key) -> None:
        assert key == KEY
        assert threading.current_thread().name == "langmerge-cloudevents"
        seen.append(sender.state(key, sink.url))

    sink.script = [500, 500]
    sender = make_sender(on_change=on_change, max_attempts=5)
    sender.send(KEY, sink.url, *event())
    wait_for(lambda: sender.state(KEY, sink.url).delivered == 1)
    wait_for(lambda: bool(seen) and seen[-1].delivered == 1)

    assert sink.ids() == [f"{UID}.3.published"] * 3  # the same event, re-sent
    errors = [s for s in seen if not s.healthy]
    assert errors and errors[0].last_error is not None and errors[0].last_error.startswith("HTTP 500")
    assert errors[0].pending == 1
    assert max(s.consecutive_errors for s in seen) == 2
    final = sender.state(KEY, sink.url)
    assert final.healthy and final.consecutive_errors == 0
    assert (final.delivered, final.failed, final.pending) == (1, 0, 0)
    assert final.last_error is not None and final.last_error.startswith("HTTP 500")  # kept for the record
    assert final.last_success_time is not None and final.last_error_time is not None
    assert final.last_success_time >= final.last_error_time


def test_a_sink_that_is_down_never_blocks_send_and_events_fail_after_max_attempts(
    closed_port_url: str, make_sender: Callable[..., EventSender[Key]]
) -> None:
    changed: list[Key] = []
    sender = make_sender(on_change=changed.append, max_attempts=3)
    started = time.monotonic()
    for revision in range(1, 21):
        sender.send(KEY, closed_port_url, *event(revision=revision))
    assert time.monotonic() - started < 0.5

    state = sender.state(KEY, closed_port_url)
    assert state.pending > 0
    wait_for(lambda: sender.state(KEY, closed_port_url).failed == 20)
    state = sender.state(KEY, closed_port_url)
    assert not state.healthy
    assert (state.delivered, state.pending, state.consecutive_errors) == (0, 0, 60)
    assert state.last_error is not None and "ConnectionRefusedError" in state.last_error
    assert state.last_event_id == f"{UID}.20.published"
    assert state.last_success_time is None
    assert KEY in changed


def test_send_returns_at_once_while_a_post_hangs(sink: Sink, make_sender: Callable[..., EventSender[Key]]) -> None:
    sink.hold = threading.Event()
    sender = make_sender()
    sender.send(KEY, sink.url, *event(revision=1))
    assert sink.entered.wait(5)  # the sender thread is stuck in the POST

    started = time.monotonic()
    for revision in range(2, 12):
        sender.send(KEY, sink.url, *event(revision=revision))
    assert time.monotonic() - started < 0.5
    assert sender.state(KEY, sink.url).pending == 11

    sink.hold.set()
    wait_for(lambda: sender.state(KEY, sink.url).delivered == 11)


def test_a_post_that_times_out_is_an_error(sink: Sink, make_sender: Callable[..., EventSender[Key]]) -> None:
    sink.hold = threading.Event()
    sender = make_sender(timeout=0.2, max_attempts=1)
    sender.send(KEY, sink.url, *event())
    wait_for(lambda: sender.state(KEY, sink.url).failed == 1)
    state = sender.state(KEY, sink.url)
    assert state.last_error is not None and "timed out" in state.last_error


def test_events_of_one_object_and_sink_arrive_in_order(
    sink: Sink, make_sender: Callable[..., EventSender[Key]]
) -> None:
    sink.script = [200, 500, 200, 503, 500, 200]  # failures in between must not reorder anything
    sender = make_sender()
    kinds = [PUBLISHED, CANARY_STARTED, PROMOTED, ROLLED_BACK, FAILED]
    expected = [f"{UID}.{revision}.{kind.rsplit('mergedmodel.')[1]}" for revision in (1, 2) for kind in kinds]
    for revision in (1, 2):
        for kind in kinds:
            sender.send(KEY, sink.url, *event(revision=revision, kind=kind))
    wait_for(lambda: sender.state(KEY, sink.url).delivered == len(expected))

    delivered_order = [i for n, i in enumerate(sink.ids()) if n not in (1, 3, 4)]  # the answers with 5xx
    assert delivered_order == expected
    assert sender.state(KEY, sink.url).consecutive_errors == 0


def test_a_sink_that_is_down_does_not_hold_up_another(
    sink: Sink, closed_port_url: str, make_sender: Callable[..., EventSender[Key]]
) -> None:
    other: Key = ("demo", "other")
    sender = make_sender(base_backoff=5.0, max_backoff=5.0, max_attempts=3)
    sender.send(other, closed_port_url, *event(revision=1))
    wait_for(lambda: sender.state(other, closed_port_url).consecutive_errors == 1)  # now backing off for 5 s

    started = time.monotonic()
    sender.send(KEY, sink.url, *event(revision=2))
    wait_for(lambda: sender.state(KEY, sink.url).delivered == 1)
    assert time.monotonic() - started < 2.0
    assert sender.state(other, closed_port_url).pending == 1


def test_backoff_doubles_between_attempts_up_to_the_cap(
    closed_port_url: str, make_sender: Callable[..., EventSender[Key]]
) -> None:
    now = [1000.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    sender = make_sender(
        base_backoff=1.0, max_backoff=4.0, max_attempts=5, clock=lambda: now[0], wall_clock=lambda: now[0], sleep=sleep
    )
    sender.send(KEY, closed_port_url, *event())
    wait_for(lambda: sender.state(KEY, closed_port_url).failed == 1)
    assert sleeps == pytest.approx([1.0, 2.0, 4.0, 4.0])
    assert sender.state(KEY, closed_port_url).last_error_time == pytest.approx(1011.0)


def test_a_full_queue_drops_the_oldest_waiting_event(sink: Sink, make_sender: Callable[..., EventSender[Key]]) -> None:
    sink.hold = threading.Event()
    sender = make_sender(max_queue=3)
    sender.send(KEY, sink.url, *event(revision=1))
    assert sink.entered.wait(5)  # revision 1 is in flight: it is not dropped
    for revision in range(2, 6):
        sender.send(KEY, sink.url, *event(revision=revision))

    state = sender.state(KEY, sink.url)
    assert (state.pending, state.dropped) == (3, 2)
    assert sender.dropped == 2
    sink.hold.set()
    wait_for(lambda: sender.state(KEY, sink.url).delivered == 3)
    assert sink.ids() == [f"{UID}.{revision}.published" for revision in (1, 4, 5)]


def test_forget_drops_the_objects_events_and_states(
    closed_port_url: str, sink: Sink, make_sender: Callable[..., EventSender[Key]]
) -> None:
    other: Key = ("demo", "other")
    sender = make_sender(base_backoff=5.0, max_backoff=5.0)
    sender.send(KEY, closed_port_url, *event(revision=1))
    sender.send(KEY, closed_port_url, *event(revision=2))
    sender.send(other, sink.url, *event(revision=1))
    wait_for(lambda: sender.state(other, sink.url).delivered == 1)

    sender.forget(KEY)
    assert sender.states(KEY) == {}
    assert sender.state(KEY, closed_port_url) == DeliveryState()
    assert sender.state(other, sink.url).delivered == 1
    sender.send(other, sink.url, *event(revision=2))  # the queue's count is right after forgetting
    wait_for(lambda: sender.state(other, sink.url).delivered == 2)


def test_on_change_that_raises_does_not_stop_delivery(sink: Sink, make_sender: Callable[..., EventSender[Key]]) -> None:
    calls: list[Key] = []

    def on_change(key: Key) -> None:
        calls.append(key)
        raise RuntimeError("the operator is not ready")

    sender = make_sender(on_change=on_change)
    sender.send(KEY, sink.url, *event(revision=1))
    wait_for(lambda: len(calls) == 1)
    sender.send(KEY, sink.url, *event(revision=2))
    wait_for(lambda: len(calls) == 2)
    assert sender.state(KEY, sink.url).delivered == 2


def test_stop_abandons_pending_events_at_once(
    closed_port_url: str, sink: Sink, make_sender: Callable[..., EventSender[Key]]
) -> None:
    sender = make_sender(base_backoff=30.0, max_backoff=30.0)
    sender.send(KEY, closed_port_url, *event())
    wait_for(lambda: sender.state(KEY, closed_port_url).consecutive_errors == 1)  # backing off for 30 s

    started = time.monotonic()
    sender.stop()
    assert time.monotonic() - started < 1.0
    sender.send(KEY, sink.url, *event())  # ignored once stopped
    time.sleep(0.05)
    assert sink.requests == []
    assert sender.state(KEY, sink.url) == DeliveryState()


def test_a_sink_url_that_is_not_http_is_an_error(make_sender: Callable[..., EventSender[Key]]) -> None:
    sender = make_sender(max_attempts=2)
    sender.send(KEY, "ftp://127.0.0.1/events", *event())
    wait_for(lambda: sender.state(KEY, "ftp://127.0.0.1/events").failed == 1)
    assert "unsupported sink URL" in (sender.state(KEY, "ftp://127.0.0.1/events").last_error or "")
