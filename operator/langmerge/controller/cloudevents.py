"""CloudEvents about a MergedModel's publishing and rollouts, delivered to an HTTP sink off the reconcile path.

:func:`build_event` is pure: it turns what happened into a binary-mode CloudEvent (``ce-*`` headers and a JSON body).
Its ``id`` is deterministic (``<uid>.<revision>.<kind>[.<suffix>]``), so an event re-sent after an operator restart is
recognisable by the sink as the one it has already seen.

:class:`EventSender` delivers them. :meth:`EventSender.send` only appends to a bounded queue and returns: a reconcile
pass never waits on a sink. One background thread POSTs the events; each (key, sink) pair is its own stream, delivered
strictly in order, retried with exponential backoff while the sink answers anything but 2xx or cannot be reached, and
given up (counted as failed) after ``max_attempts`` tries. A stream that is backing off does not hold up the others.
The outcome of each stream is a :class:`DeliveryState`; ``on_change(key)`` is called from the sender thread whenever
one of the key's states changes, so the operator can re-run that object's pass and show it in status.

HTTP goes through the standard library's :mod:`http.client` (no redirects are followed: a 3xx is an error).
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent

from langmerge.constants import API_VERSION, MERGED_PLURAL

log = logging.getLogger(__name__)

#: Every event type of a MergedModel starts with this.
TYPE_PREFIX = "dev.langmerge.mergedmodel."
#: A new revision was published (``current.json`` points at it).
PUBLISHED = TYPE_PREFIX + "published"
#: A revision started serving a canary share of the traffic.
CANARY_STARTED = TYPE_PREFIX + "canary.started"
#: A revision was promoted to take all the traffic.
PROMOTED = TYPE_PREFIX + "promoted"
#: Traffic went back to the previous revision.
ROLLED_BACK = TYPE_PREFIX + "rolledback"
#: Publishing or rolling out a revision failed.
FAILED = TYPE_PREFIX + "failed"
EVENT_TYPES = frozenset({PUBLISHED, CANARY_STARTED, PROMOTED, ROLLED_BACK, FAILED})

#: A POST to a sink that has not answered within this many seconds counts as a failed attempt.
DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_BASE_BACKOFF = 1.0
DEFAULT_MAX_BACKOFF = 60.0
DEFAULT_MAX_QUEUE = 1000
#: At most this many characters of a sink's error answer are kept in :attr:`DeliveryState.last_error`.
_ERROR_BODY_CHARS = 200

K = TypeVar("K", bound=Hashable)


def event_source(namespace: str, name: str) -> str:
    """The ``source`` of a MergedModel's events: its API path."""
    return f"/apis/{API_VERSION}/namespaces/{namespace}/{MERGED_PLURAL}/{name}"


def event_id(uid: str, revision: int, kind: str, suffix: str | None = None) -> str:
    """The deterministic ``id``: ``<uid>.<revision>.<kind>[.<suffix>]`` with ``kind`` the type without its prefix."""
    short = _event_type(kind).removeprefix(TYPE_PREFIX)
    parts = [uid, str(revision), short] + ([suffix] if suffix else [])
    return ".".join(parts)


def _event_type(kind: str) -> str:
    """``kind`` as a full event type; both ``PUBLISHED`` and its short form ``"published"`` are accepted."""
    full = kind if kind.startswith(TYPE_PREFIX) else TYPE_PREFIX + kind
    if full not in EVENT_TYPES:
        raise ValueError(f"unknown event kind {kind!r}; expected one of {sorted(EVENT_TYPES)}")
    return full


def _json_bytes(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def build_event(
    kind: str,
    *,
    namespace: str,
    name: str,
    uid: str,
    revision: int,
    data: Mapping[str, Any],
    suffix: str | None = None,
    when: datetime | None = None,
) -> tuple[dict[str, str], bytes]:
    """A binary-mode CloudEvent for the MergedModel ``namespace/name`` (``uid``) and its ``revision``.

    ``kind`` is one of the event types (:data:`PUBLISHED` ...) or its short form (``"canary.started"``). ``suffix``
    tells apart several events of one kind for one revision (a canary's steps), keeping the ``id`` deterministic.
    ``when`` (the event's ``time``) defaults to now (UTC). Returns the HTTP headers (``ce-*`` and ``content-type: application/json``) and the
    JSON body; raises ``ValueError`` for an unknown kind.
    """
    attributes = {
        "specversion": "1.0",
        "type": _event_type(kind),
        "source": event_source(namespace, name),
        "subject": f"revision/{revision}",
        "id": event_id(uid, revision, kind, suffix),
        "time": (when if when is not None else datetime.now(UTC)).isoformat(),
        "datacontenttype": "application/json",
    }
    headers, body = to_binary(CloudEvent(attributes, dict(data)), data_marshaller=_json_bytes)
    return dict(headers), body


def backoff_delay(failures: int, base: float, cap: float) -> float:
    """Seconds to wait after the ``failures``-th failed attempt (1, 2, 3 ...): ``base * 2**(failures-1)``, capped."""
    return float(min(cap, base * 2 ** max(0, failures - 1)))


class DeliveryError(Exception):
    """A sink answered with a status other than 2xx."""


def post_event(url: str, headers: Mapping[str, str], body: bytes, timeout: float) -> None:
    """POST one event to ``url``; returns on a 2xx answer, raises :class:`DeliveryError` or ``OSError`` otherwise."""
    parts = urllib.parse.urlsplit(url)
    conn: http.client.HTTPConnection
    if parts.scheme == "http":
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    elif parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=timeout)
    else:
        raise DeliveryError(f"unsupported sink URL {url!r} (expected http:// or https://)")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        conn.request("POST", path, body=body, headers=dict(headers))
        response = conn.getresponse()
        answer = response.read(_ERROR_BODY_CHARS)
    finally:
        conn.close()
    if not 200 <= response.status < 300:
        text = answer.decode("utf-8", "replace").strip()
        raise DeliveryError(f"HTTP {response.status} {response.reason}" + (f": {text}" if text else ""))


#: ``post(url, headers, body, timeout)``: returns on success, raises on any failure.
Poster = Callable[[str, Mapping[str, str], bytes, float], None]


@dataclass(frozen=True)
class DeliveryState:
    """How delivery of one object's events to one sink is going (a snapshot)."""

    #: Events the sink accepted (2xx).
    delivered: int = 0
    #: Events given up after ``max_attempts`` failed attempts.
    failed: int = 0
    #: Events dropped unsent because the queue was full (the oldest go first).
    dropped: int = 0
    #: Events queued or being retried.
    pending: int = 0
    #: Failed attempts since the last success (0 while healthy).
    consecutive_errors: int = 0
    #: The error of the latest failed attempt; kept after a recovery (see :attr:`healthy`).
    last_error: str | None = None
    #: Wall-clock time (seconds since the epoch) of the latest failed attempt.
    last_error_time: float | None = None
    #: Wall-clock time (seconds since the epoch) of the latest delivered event.
    last_success_time: float | None = None
    #: ``id`` of the latest event delivered or given up.
    last_event_id: str | None = None

    @property
    def healthy(self) -> bool:
        """True unless the latest attempt failed (the sink has not accepted anything since)."""
        return self.consecutive_errors == 0


@dataclass
class _Event:
    seq: int
    id: str
    headers: dict[str, str]
    body: bytes
    attempts: int = 0


@dataclass
class _Stream:
    """The queued events of one (key, sink), delivered head first."""

    events: deque[_Event] = field(default_factory=deque)
    #: Monotonic time before which the head is not tried (backoff).
    due: float = 0.0
    #: The head is being POSTed right now (outside the lock).
    in_flight: bool = False


class EventSender(Generic[K]):
    """Delivers events to HTTP sinks on a background thread; :meth:`send` never blocks.

    ``key`` identifies the object the events are about (the operator's work-queue key); states are kept per
    (key, sink) until :meth:`forget`. ``clock`` (monotonic seconds) schedules the retries and ``wall_clock`` stamps
    the states; ``sleep``, if given, replaces the waits between retries (a test passes one that advances a fake clock),
    otherwise the thread waits on an event that :meth:`send` and :meth:`stop` set. ``post`` is the HTTP seam.
    """

    def __init__(
        self,
        on_change: Callable[[K], None] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        base_backoff: float = DEFAULT_BASE_BACKOFF,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        max_queue: int = DEFAULT_MAX_QUEUE,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] | None = None,
        post: Poster = post_event,
    ) -> None:
        if max_attempts < 1 or max_queue < 1:
            raise ValueError("max_attempts and max_queue must be at least 1")
        self.on_change = on_change
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self.max_queue = max_queue
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._post = post
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._streams: dict[tuple[K, str], _Stream] = {}
        self._states: dict[tuple[K, str], DeliveryState] = {}
        self._changed: dict[K, None] = {}  # keys whose on_change is due (insertion-ordered set)
        self._queued = 0
        self._seq = 0
        self._dropped_total = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="langmerge-cloudevents", daemon=True)
        self._thread.start()

    # -- the caller's side (any thread, never blocks) -----------------------------------------------------------------
    def send(self, key: K, sink: str, headers: Mapping[str, str], body: bytes) -> None:
        """Queue one event for ``sink`` and return. If the queue is full, the oldest queued event (of any stream)
        that is not being sent right now is dropped and counted in its state's ``dropped``. Ignored after
        :meth:`stop`."""
        stream_key = (key, sink)
        with self._lock:
            if self._stopped:
                return
            self._seq += 1
            ev = _Event(seq=self._seq, id=headers.get("ce-id", ""), headers=dict(headers), body=body)
            self._streams.setdefault(stream_key, _Stream()).events.append(ev)
            self._queued += 1
            self._update(stream_key, lambda st: replace(st, pending=st.pending + 1), notify=False)
            while self._queued > self.max_queue and self._drop_oldest_locked():
                pass
        self._wakeup.set()

    def state(self, key: K, sink: str) -> DeliveryState:
        """The delivery state of ``key``'s events to ``sink`` (an all-zero state if nothing was sent)."""
        with self._lock:
            return self._states.get((key, sink), DeliveryState())

    def states(self, key: K) -> dict[str, DeliveryState]:
        """The delivery states of ``key``'s events, by sink."""
        with self._lock:
            return {sink: st for (k, sink), st in self._states.items() if k == key}

    @property
    def dropped(self) -> int:
        """Events dropped because the queue was full, over the sender's life."""
        with self._lock:
            return self._dropped_total

    def forget(self, key: K) -> None:
        """Drop ``key``'s queued events and states (the object is gone). An attempt in flight finishes unrecorded."""
        with self._lock:
            for stream_key in [sk for sk in self._streams if sk[0] == key]:
                self._queued -= len(self._streams.pop(stream_key).events)
            for stream_key in [sk for sk in self._states if sk[0] == key]:
                del self._states[stream_key]
            self._changed.pop(key, None)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread and wait for it (at most one POST's timeout); queued events are abandoned."""
        with self._lock:
            self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout)

    # -- bookkeeping (under the lock) ---------------------------------------------------------------------------------
    def _update(
        self, stream_key: tuple[K, str], change: Callable[[DeliveryState], DeliveryState], *, notify: bool = True
    ) -> None:
        """Replace a stream's state by ``change(state)``; its key's ``on_change`` is due if the state changed."""
        old = self._states.get(stream_key, DeliveryState())
        new = change(old)
        self._states[stream_key] = new
        if notify and new != old:
            self._changed[stream_key[0]] = None

    def _drop_oldest_locked(self) -> bool:
        oldest: tuple[int, tuple[K, str], int] | None = None  # (seq, stream key, index in its deque)
        for stream_key, stream in self._streams.items():
            index = 1 if stream.in_flight else 0
            if len(stream.events) > index and (oldest is None or stream.events[index].seq < oldest[0]):
                oldest = (stream.events[index].seq, stream_key, index)
        if oldest is None:
            return False
        _, stream_key, index = oldest
        stream = self._streams[stream_key]
        del stream.events[index]
        self._queued -= 1
        self._dropped_total += 1
        if not stream.events:
            del self._streams[stream_key]
        self._update(stream_key, lambda st: replace(st, pending=st.pending - 1, dropped=st.dropped + 1))
        log.warning("CloudEvents queue full (%d): dropped the oldest event for %s", self.max_queue, stream_key[1])
        return True

    def _next_locked(self, now: float) -> tuple[tuple[K, str], _Stream, _Event] | float | None:
        """The stream to try now, else the seconds until one is due (``None``: nothing queued)."""
        best: tuple[K, str] | None = None
        for stream_key, stream in self._streams.items():
            if stream.events and not stream.in_flight and (best is None or stream.due < self._streams[best].due):
                best = stream_key
        if best is None:
            return None
        stream = self._streams[best]
        if stream.due > now:
            return stream.due - now
        stream.in_flight = True
        return best, stream, stream.events[0]

    # -- the sender thread --------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopped:
                    return
                self._wakeup.clear()
                nxt = self._next_locked(self._clock())
                changed, self._changed = list(self._changed), {}
            self._notify(changed)
            if isinstance(nxt, tuple):
                self._attempt(*nxt)
            else:
                self._pause(nxt)

    def _pause(self, delay: float | None) -> None:
        if delay is not None and self._sleep is not None:
            self._sleep(delay)
        else:
            self._wakeup.wait(delay)

    def _attempt(self, stream_key: tuple[K, str], stream: _Stream, ev: _Event) -> None:
        error: str | None = None
        try:
            self._post(stream_key[1], ev.headers, ev.body, self.timeout)
        except Exception as exc:  # any failure of a sink is the sink's, never the operator's
            error = str(exc) if isinstance(exc, DeliveryError) else f"{type(exc).__name__}: {exc}"
        with self._lock:
            stream.in_flight = False
            if self._streams.get(stream_key) is not stream or not stream.events or stream.events[0] is not ev:
                return  # forgotten (or dropped) meanwhile
            ev.attempts += 1
            now = self._wall_clock()
            if error is None:
                self._finish_locked(stream_key, stream)
                self._update(
                    stream_key,
                    lambda st: replace(
                        st,
                        pending=st.pending - 1,
                        delivered=st.delivered + 1,
                        consecutive_errors=0,
                        last_success_time=now,
                        last_event_id=ev.id,
                    ),
                )
            elif ev.attempts >= self.max_attempts:
                self._finish_locked(stream_key, stream)
                self._update(
                    stream_key,
                    lambda st: replace(
                        st,
                        pending=st.pending - 1,
                        failed=st.failed + 1,
                        consecutive_errors=st.consecutive_errors + 1,
                        last_error=error,
                        last_error_time=now,
                        last_event_id=ev.id,
                    ),
                )
                log.warning(
                    "CloudEvent %s to %s given up after %d attempts: %s", ev.id, stream_key[1], ev.attempts, error
                )
            else:
                stream.due = self._clock() + backoff_delay(ev.attempts, self.base_backoff, self.max_backoff)
                self._update(
                    stream_key,
                    lambda st: replace(
                        st, consecutive_errors=st.consecutive_errors + 1, last_error=error, last_error_time=now
                    ),
                )

    def _finish_locked(self, stream_key: tuple[K, str], stream: _Stream) -> None:
        stream.events.popleft()
        self._queued -= 1
        stream.due = 0.0
        if not stream.events:
            del self._streams[stream_key]

    def _notify(self, keys: list[K]) -> None:
        if self.on_change is None:
            return
        for key in keys:
            try:
                self.on_change(key)
            except Exception:
                log.exception("on_change(%r) of the CloudEvents sender raised", key)
