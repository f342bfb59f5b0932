"""Fault injection for tests: a loopback TCP proxy in front of a real server (the API server, S3) that can go away,
and a view of our S3 seam that lags behind a commit (to replay a race deterministically)."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

from langmerge.store import NotFound, ObjectStore


class TcpProxy:
    """A loopback TCP forwarder that can drop every connection and refuse new ones, like an API server restart.

    ``stop()`` closes every connection and the listening socket (new connections are refused) until ``start()``;
    ``outage(seconds)`` does both, ``seconds`` apart, in the background.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        #: Set when the proxy forwards again after an ``outage``.
        self.recovered = threading.Event()

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(32)
        server.settimeout(0.1)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self._close_all()

    def outage(self, seconds: float) -> threading.Timer:
        """Stop now and start again after ``seconds`` (``recovered`` is set then)."""
        self.recovered.clear()
        self.stop()

        def back() -> None:
            self.start()
            self.recovered.set()

        timer = threading.Timer(seconds, back)
        timer.daemon = True
        timer.start()
        return timer

    def _close_all(self) -> None:
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def _accept(self, server: socket.socket) -> None:
        while self._server is server:
            try:
                downstream, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                downstream.close()
                continue
            downstream.settimeout(None)
            with self._lock:
                self._sockets += [downstream, upstream]
            for src, dst in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


class LateView(ObjectStore):
    """Our S3 seam as seen by a run that checked for the commit before another run made it: the manifest stays
    invisible to it until it tries to commit its own."""

    def __init__(self, inner: ObjectStore, manifest_uri: str) -> None:
        super().__init__(inner.client)
        self.manifest_uri = manifest_uri
        self.hidden = True

    def get_bytes(self, uri: str) -> tuple[bytes, str]:
        if self.hidden and uri == self.manifest_uri:
            raise NotFound(uri)
        return super().get_bytes(uri)

    def put_bytes(self, uri: str, data: bytes, **kwargs: Any) -> str:
        if uri == self.manifest_uri:
            self.hidden = False
        return super().put_bytes(uri, data, **kwargs)
