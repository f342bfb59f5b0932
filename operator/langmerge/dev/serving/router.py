"""A traffic-splitting reverse proxy on 127.0.0.1: what KServe's ingress and Knative's traffic split do for one
InferenceService, in a thread of its own with its own event loop (development and tests only).

Every request goes to one backend chosen by the current weights, with a smooth weighted round robin (nginx's): over
any run of ``sum(weights)`` requests (weights divided by their gcd) each backend gets exactly its weight, evenly spread, so 10% is 10%. Responses get
``x-langmerge-revision`` and ``x-langmerge-storage-uri`` headers naming the revision that answered. The backend table
is replaced atomically (:meth:`Router.set_backends`); a request is counted in flight on its backend from the moment it
is picked, so :meth:`Router.wait_drained` after a table change tells when a backend that left it may be stopped. With
no backend of positive weight the router answers 503; a backend that cannot be reached gives 502.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import web

log = logging.getLogger("langmerge.serving.router")

#: The response headers the router adds.
REVISION_HEADER = "x-langmerge-revision"
STORAGE_URI_HEADER = "x-langmerge-storage-uri"

#: Headers that belong to one connection, not to the message (RFC 9110 section 7.6.1), plus those aiohttp recomputes.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


@dataclass(frozen=True)
class Backend:
    """One revision's model server, and its share of the traffic (a weight; 0 takes none)."""

    name: str
    url: str
    storage_uri: str = ""
    weight: int = 0


class _Table:
    """The backends and the round robin's state; every access under the router's lock."""

    def __init__(self, backends: Sequence[Backend]) -> None:
        self.backends = [b for b in backends if b.weight > 0]
        divisor = math.gcd(*(b.weight for b in self.backends)) if self.backends else 1
        self.weights = [b.weight // divisor for b in self.backends]  # 25/75 -> 1/3: exact over every 4 requests
        self.current = [0] * len(self.backends)
        self.total = sum(self.weights)

    def pick(self) -> Backend | None:
        if not self.backends:
            return None
        best = 0
        for i, weight in enumerate(self.weights):
            self.current[i] += weight
            if self.current[i] > self.current[best]:
                best = i
        self.current[best] -= self.total
        return self.backends[best]


class Router:
    """The reverse proxy of one InferenceService. ``start()`` binds 127.0.0.1 (``port`` 0: a free port) and serves in
    a background thread; ``stop()`` closes it."""

    def __init__(self, port: int = 0, *, upstream_timeout: float = 300.0, name: str = "router") -> None:
        self._requested_port = port
        self._upstream_timeout = upstream_timeout
        self._name = name
        self._lock = threading.Lock()
        self._table = _Table([])
        self._in_flight: dict[str, int] = {}
        self._served: dict[str, int] = {}
        self._drained = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.ServerRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._sock: socket.socket | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- life cycle --------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the router was already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._requested_port))
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        loop = asyncio.new_event_loop()
        self._loop = loop
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._open(sock))
            except BaseException as err:  # report to start(), which raises it
                failure.append(err)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._close())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"{self._name}-{self.port}", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._thread.join()
            raise failure[0]

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)

    def __enter__(self) -> Router:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _open(self, sock: socket.socket) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),  # a stopped backend leaves no pooled connection behind
            timeout=aiohttp.ClientTimeout(total=self._upstream_timeout),
            auto_decompress=False,
        )
        self._runner = web.ServerRunner(web.Server(self._handle, access_log=None), handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        if self._sock is not None:
            self._sock.close()

    # -- the table ---------------------------------------------------------------------------------------------------
    def set_backends(self, backends: Sequence[Backend]) -> None:
        """Replace the backend table (atomically: each request sees the old table or the new one)."""
        with self._lock:
            if [(b.name, b.url, b.storage_uri, b.weight) for b in backends if b.weight > 0] == [
                (b.name, b.url, b.storage_uri, b.weight) for b in self._table.backends
            ]:
                return
            self._table = _Table(backends)
        log.info(
            "%s: %s", self.url, ", ".join(f"{b.name} {b.weight}" for b in backends if b.weight > 0) or "no backend"
        )

    def backends(self) -> list[Backend]:
        """The backends taking traffic now."""
        with self._lock:
            return list(self._table.backends)

    def in_flight(self, name: str) -> int:
        """Requests being answered by backend ``name`` now."""
        with self._lock:
            return self._in_flight.get(name, 0)

    def served(self, name: str) -> int:
        """Requests backend ``name`` has answered (or failed) since the router started."""
        with self._lock:
            return self._served.get(name, 0)

    def wait_drained(self, name: str, timeout: float) -> bool:
        """Wait until no request is in flight on ``name`` (take it out of the table first); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._drained:
            while self._in_flight.get(name, 0) > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._drained.wait(left)
            return True

    def _acquire(self) -> Backend | None:
        with self._lock:
            backend = self._table.pick()
            if backend is not None:
                self._in_flight[backend.name] = self._in_flight.get(backend.name, 0) + 1
            return backend

    def _release(self, backend: Backend) -> None:
        with self._drained:
            left = self._in_flight.get(backend.name, 0) - 1
            if left > 0:
                self._in_flight[backend.name] = left
            else:
                self._in_flight.pop(backend.name, None)
            self._served[backend.name] = self._served.get(backend.name, 0) + 1
            self._drained.notify_all()

    # -- proxying ----------------------------------------------------------------------------------------------------
    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        backend = self._acquire()
        if backend is None:
            return _error(503, "no ready revision to serve this InferenceService")
        try:
            return await self._forward(request, body, backend)
        finally:
            self._release(backend)

    async def _forward(self, request: web.BaseRequest, body: bytes, backend: Backend) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["X-Forwarded-For"] = request.remote or "127.0.0.1"
        tags = {REVISION_HEADER: backend.name, STORAGE_URI_HEADER: backend.storage_uri}
        try:
            async with self._session.request(
                request.method,
                backend.url.rstrip("/") + request.rel_url.raw_path_qs,
                data=body if body else None,
                headers=headers,
                allow_redirects=False,
            ) as upstream:
                payload = await upstream.read()
                out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
                return web.Response(status=upstream.status, body=payload, headers={**out, **tags})
        except (TimeoutError, aiohttp.ClientError, OSError) as err:
            log.warning("%s: backend %s failed: %s", self.url, backend.name, err or type(err).__name__)
            response = _error(502, f"revision {backend.name} did not answer: {err or type(err).__name__}")
            response.headers.update(tags)
            return response


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=json.dumps({"error": message}), content_type="application/json")
