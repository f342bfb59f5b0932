"""Fault injection on the real local control plane: stop and restart its S3 server or API server (same ports, same
data), or put a server in front of a client that accepts connections and never answers."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from langmerge.dev.controlplane import ControlPlane, Endpoints
from langmerge.store import ObjectStore, S3Config


@contextlib.contextmanager
def stopped(cluster: ControlPlane, component: str) -> Iterator[None]:
    """``component`` (``seaweedfs`` or ``kube-apiserver``) is down inside the block; after it, it answers again on
    its old port, even if the block failed. ``start()`` waits until it answers; for S3 this also waits until it
    takes writes again (right after a restart SeaweedFS lists before its volume server has re-registered)."""
    before = cluster.endpoints()
    cluster.stop_component(component)
    try:
        yield
    finally:
        after = cluster.start()
        assert (after.s3_endpoint, after.apiserver_url) == (before.s3_endpoint, before.apiserver_url)
        if component == "seaweedfs":
            _wait_writable(after)


def _wait_writable(endpoints: Endpoints, timeout: float = 60.0) -> None:
    store = ObjectStore.from_config(
        S3Config(endpoint_url=endpoints.s3_endpoint, read_timeout=5, max_attempts=1),
        aws_access_key_id=endpoints.s3_access_key,
        aws_secret_access_key=endpoints.s3_secret_key,
    )
    bucket = "fault-injection-probe"
    deadline = time.monotonic() + timeout
    while True:
        try:
            store.ensure_bucket(bucket)
            store.put_bytes(f"s3://{bucket}/probe", b"1")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class BlackHole:
    """A TCP server on a loopback port that accepts connections and never answers: a hung server."""

    def __init__(self) -> None:
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port = int(self._server.getsockname()[1])
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> BlackHole:
        self._server.settimeout(0.1)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for sock in [*self._held, self._server]:
            sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            self._held.append(conn)


def elapsed(since: float) -> float:
    return time.monotonic() - since
