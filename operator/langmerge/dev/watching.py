"""What the local runners share: the local Job runner (:mod:`langmerge.dev.jobrunner`) and the local serving runner
(:mod:`langmerge.dev.serving`). Development only.

* :class:`LocalRunnerConfig`: the settings every local runner has (work folder, logs, children's extra environment,
  watch timing, kill grace), checked once;
* :class:`WorkFolder`: the work folder, locked by one runner at a time, with a record of every process group the
  runner runs there, so that the next runner kills what a crashed one left behind;
* :class:`ListWatch`: list + watch of one kind of object, re-listed every ``resync_seconds`` and whenever the watch
  expires (410 Gone) or fails (retried with backoff); a CRD that may be absent is looked for again now and then;
* :class:`LocalRunner`: the life cycle around them (start, stop, ``run_forever`` until :meth:`LocalRunner.request_stop`,
  ``with``).

Neither runner is imported here: they import this module.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import IO, Any, ClassVar, Generic, Self, TypeVar

from kubernetes.client.exceptions import ApiException

#: Callbacks of a :class:`ListWatch`: an object added or changed (also each object of a listing), an object deleted,
#: and the uids of a whole listing (what is not in it was deleted while nobody watched).
Observe = Callable[[dict[str, Any]], None]
Listed = Callable[[set[str]], None]


@dataclass(frozen=True)
class LocalRunnerConfig:
    """What every local runner's configuration has. The fields after ``logs_dir`` are keyword-only."""

    #: Root of the runner's working folders. One runner per folder (locked).
    work_root: Path
    #: Folder of the logs (default ``<work_root>/_logs``).
    logs_dir: Path | None = None
    _: KW_ONLY
    #: Extra environment of every child, applied last (over what the object names): e.g. a shared model cache folder.
    extra_env: tuple[tuple[str, str], ...] = (("PYTHONUNBUFFERED", "1"),)
    #: Seconds between full re-lists, the fallback for anything a watch missed.
    resync_seconds: float = 30.0
    #: Server-side timeout of one watch request (seconds); the client's read timeout is 10 s longer.
    watch_timeout_seconds: int = 60
    #: Connect and read timeout of every other API request (seconds).
    request_timeout_seconds: float = 15.0
    #: Seconds between SIGTERM and SIGKILL when a process group is stopped.
    kill_grace_seconds: float = 5.0

    def __post_init__(self) -> None:
        check_positive(self, "resync_seconds", "request_timeout_seconds")
        check_not_negative(self, "kill_grace_seconds")
        if self.watch_timeout_seconds < 1:
            raise ValueError("watch_timeout_seconds must be >= 1")
        for key, _value in self.extra_env:
            if not key or "=" in key:
                raise ValueError(f"extra_env: invalid variable name {key!r}")

    @property
    def logs_path(self) -> Path:
        return self.logs_dir if self.logs_dir is not None else self.work_root / "_logs"


def check_positive(config: object, *names: str) -> None:
    """``ValueError`` unless each named field of ``config`` is > 0."""
    for name in names:
        if getattr(config, name) <= 0:
            raise ValueError(f"{name} must be > 0")


def check_not_negative(config: object, *names: str) -> None:
    """``ValueError`` unless each named field of ``config`` is >= 0."""
    for name in names:
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0")


# -- the work folder -------------------------------------------------------------------------------------------------
def proc_start_ticks(pid: int) -> int | None:
    """The start time of a live process (Linux ``/proc``), to tell it apart from a later process with the same PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            return None
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


class WorkFolder:
    """A runner's work folder: one runner at a time holds its lock (``flock`` on ``lock_name``); ``_pids/`` has a record
    (pid and start time) of every process group the runner runs, so that the next runner can kill what a crashed one
    left behind."""

    def __init__(self, root: Path, lock_name: str, log: logging.Logger, leftover: str = "process group") -> None:
        self.root = root
        self._lock_path = root / lock_name
        self._lock_file: IO[str] | None = None
        self._log = log
        self._leftover = leftover  # how the warning about a killed leftover names it

    @property
    def pids_dir(self) -> Path:
        return self.root / "_pids"

    def lock(self) -> bool:
        """Create the folder and take its lock; False if another runner holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = self._lock_path.open("a+")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            return False
        self._lock_file = lock
        return True

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def record_pid(self, stem: str, pid: int) -> Path:
        """Record a process group (``<stem>.json``) that the runner starts; delete the file once it is gone."""
        self.pids_dir.mkdir(parents=True, exist_ok=True)
        path = self.pids_dir / f"{stem}.json"
        path.write_text(json.dumps({"pid": pid, "start": proc_start_ticks(pid)}))
        return path

    def forget_pid(self, stem: str) -> None:
        (self.pids_dir / f"{stem}.json").unlink(missing_ok=True)

    def kill_leftovers(self) -> None:
        """SIGKILL every recorded process group that still runs (same pid, same start time), and forget the records."""
        if not self.pids_dir.is_dir():
            return
        for path in self.pids_dir.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                record = json.loads(path.read_text())
                pid, ticks = int(record["pid"]), record.get("start")
                if ticks is not None and proc_start_ticks(pid) == ticks:
                    self._log.warning(
                        "killing %s %d left behind by a previous runner (%s)", self._leftover, pid, path.stem
                    )
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, signal.SIGKILL)
            path.unlink(missing_ok=True)


# -- list + watch ----------------------------------------------------------------------------------------------------
class WatchError(RuntimeError):
    """The API server ended a watch with an error other than 410 Gone (the watch starts again from a listing)."""


def iter_lines(resp: Any) -> Iterator[bytes]:
    """The non-empty lines of a streamed response (a watch's events)."""
    buffer = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


def custom_lister(api: Any, group: str, version: str, plural: str, namespace: str | None) -> Callable[..., Any]:
    """The list (and watch) call of custom objects: in ``namespace``, or in all namespaces if None."""
    if namespace:
        return lambda **kw: api.list_namespaced_custom_object(group, version, namespace, plural, **kw)
    return lambda **kw: api.list_cluster_custom_object(group, version, plural, **kw)


class ListWatch:
    """List + watch of one ``kind``: a listing, then watch events from its resourceVersion, a full re-list every
    ``resync_seconds`` (or when the watch expires), failures retried with backoff (0.5 s doubling up to 10 s) until
    ``stopping`` is set. With ``absent_recheck_seconds``, a 404 means the kind's CRD is not installed (yet): it is looked
    for again every ``absent_recheck_seconds`` (at most ``resync_seconds``), and :attr:`synced` is set as after a
    listing."""

    def __init__(
        self,
        kind: str,
        list_fn: Callable[..., Any],
        *,
        config: LocalRunnerConfig,
        label_selector: str | None,
        stopping: threading.Event,
        log: logging.Logger,
        observe: Observe,
        forget: Observe,
        listed: Listed,
        absent_recheck_seconds: float | None = None,
    ) -> None:
        self.kind = kind
        self._list_fn = list_fn
        self._config = config
        self._selector = {"label_selector": label_selector} if label_selector else {}
        self._stopping = stopping
        self._log = log
        self._observe = observe
        self._forget = forget
        self._listed = listed
        self._absent_recheck_seconds = absent_recheck_seconds
        self._response: Any = None
        #: Set after the first successful list (or once the CRD was found absent).
        self.synced = threading.Event()

    def shutdown(self) -> None:
        """Cut the watch request in flight short (from another thread)."""
        resp = self._response
        if resp is not None:
            with contextlib.suppress(Exception):
                resp.shutdown()

    def run(self) -> None:
        """The loop (a thread's target), until ``stopping`` is set."""
        rv: str | None = None
        listed_at = 0.0
        delay = 0.5
        absent_logged = False
        resync = self._config.resync_seconds
        while not self._stopping.is_set():
            try:
                if rv is None or time.monotonic() - listed_at >= resync:
                    rv = self._relist()
                    listed_at = time.monotonic()
                    self.synced.set()
                    absent_logged = False
                rv = self._watch(rv, listed_at + resync)
                delay = 0.5
            except ApiException as err:
                if self._stopping.is_set():
                    break
                rv = None
                if err.status == 410:
                    self._log.info("%s watch expired (410 Gone); re-listing", self.kind)
                    continue
                if err.status == 404 and self._absent_recheck_seconds is not None:
                    wait = min(resync, self._absent_recheck_seconds)
                    if not absent_logged:
                        self._log.info("no %s CRD on this API server (looked for every %gs)", self.kind, wait)
                        absent_logged = True
                    self.synced.set()
                    self._stopping.wait(wait)
                    continue
                self._log.warning(
                    "%s watch failed (%s %s); retrying in %.1fs", self.kind, err.status, err.reason, delay
                )
                self._stopping.wait(delay)
                delay = min(delay * 2, 10.0)
            except Exception as err:  # the API server may be down or restarting: keep trying
                if self._stopping.is_set():
                    break
                self._log.warning(
                    "%s watch failed (%s: %s); retrying in %.1fs", self.kind, type(err).__name__, err, delay
                )
                rv = None
                self._stopping.wait(delay)
                delay = min(delay * 2, 10.0)

    def _relist(self) -> str:
        resp = self._list_fn(
            **self._selector,
            _preload_content=False,
            _request_timeout=self._config.request_timeout_seconds,
        )
        listing = json.loads(resp.data)
        seen: set[str] = set()
        for obj in listing.get("items") or []:
            obj.setdefault("kind", self.kind)
            uid = (obj.get("metadata") or {}).get("uid")
            if uid:
                seen.add(uid)
            self._observe(obj)
        self._listed(seen)
        return str((listing.get("metadata") or {}).get("resourceVersion") or "")

    def _watch(self, rv: str, until: float) -> str | None:
        """Follow events from ``rv`` until ``until`` (monotonic); the last resourceVersion, or None to re-list."""
        config = self._config
        server_timeout = max(1, min(config.watch_timeout_seconds, int(until - time.monotonic()) + 1))
        resp = self._list_fn(
            **self._selector,
            watch=True,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=server_timeout,
            _preload_content=False,
            _request_timeout=(config.request_timeout_seconds, server_timeout + 10.0),
        )
        self._response = resp
        try:
            if self._stopping.is_set():
                return rv
            for line in iter_lines(resp):
                if self._stopping.is_set():
                    break
                event = json.loads(line)
                etype = event.get("type")
                obj = event.get("object") or {}
                if etype == "ERROR":
                    if obj.get("code") == 410:
                        self._log.info("%s watch expired (%s); re-listing", self.kind, obj.get("message"))
                        return None
                    raise WatchError(f"watch error: {obj.get('message') or obj}")
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                if etype in ("ADDED", "MODIFIED"):
                    obj.setdefault("kind", self.kind)
                    self._observe(obj)
                elif etype == "DELETED":
                    self._forget(obj)
                if new_rv:
                    rv = str(new_rv)
        finally:
            self._response = None
            with contextlib.suppress(Exception):  # a stream cut short must not go back to the pool half-read
                resp.close()
                resp.release_conn()
        return rv


# -- the life cycle --------------------------------------------------------------------------------------------------
ConfigT = TypeVar("ConfigT", bound=LocalRunnerConfig)


class LocalRunner(abc.ABC, Generic[ConfigT]):
    """The life cycle of a local runner. A subclass's :meth:`start` calls :meth:`_claim_work_folder` (lock the work
    folder, kill what a crashed runner left there) and :meth:`_start_threads`; its :meth:`stop` calls
    :meth:`_begin_stop` (stop watching), stops its own work, then :meth:`_release_work_folder`."""

    #: How messages name the runner (``"local Job runner"``).
    title: ClassVar[str]
    #: The lock file in the work folder.
    lock_name: ClassVar[str]
    #: What the runner raises when it cannot start (work folder in use, started twice).
    error: ClassVar[type[Exception]]
    #: The runner's logger.
    logger: ClassVar[logging.Logger]
    #: How the warning about a process a crashed runner left behind names it.
    leftover: ClassVar[str] = "process group"

    def __init__(self, config: ConfigT) -> None:
        self.config = config
        self._stopping = threading.Event()
        self._stop_requested = False  # a plain flag: set from signal handlers, where taking a lock could deadlock
        self._started = False
        self._threads: list[threading.Thread] = []
        self._watches: list[ListWatch] = []
        self._work = WorkFolder(config.work_root, self.lock_name, self.logger, self.leftover)

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    def request_stop(self) -> None:
        """Ask :meth:`run_forever` to return within a fraction of a second (safe in a signal handler)."""
        self._stop_requested = True

    def run_forever(self) -> None:
        """Start, then run until :meth:`request_stop` (or KeyboardInterrupt); stop on the way out."""
        self.start()
        try:
            while not self._stop_requested:
                time.sleep(0.2)
        finally:
            self.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- for subclasses
    def _list_watch(
        self,
        kind: str,
        list_fn: Callable[..., Any],
        label_selector: str | None,
        *,
        observe: Observe,
        forget: Observe,
        listed: Listed,
        absent_recheck_seconds: float | None = None,
    ) -> ListWatch:
        """A :class:`ListWatch` that stops with the runner (its thread is the subclass's to start)."""
        watch = ListWatch(
            kind,
            list_fn,
            config=self.config,
            label_selector=label_selector,
            stopping=self._stopping,
            log=self.logger,
            observe=observe,
            forget=forget,
            listed=listed,
            absent_recheck_seconds=absent_recheck_seconds,
        )
        self._watches.append(watch)
        return watch

    def _claim_work_folder(self) -> None:
        """Create the work and logs folders, lock the work folder and kill what a crashed runner left there."""
        if self._started:
            raise self.error(f"the {self.title} was already started")
        self._started = True
        self.config.work_root.mkdir(parents=True, exist_ok=True)
        self.config.logs_path.mkdir(parents=True, exist_ok=True)
        if not self._work.lock():
            raise self.error(f"another {self.title} uses {self.config.work_root}")
        self._work.kill_leftovers()

    def _start_threads(self, targets: list[tuple[Callable[[], None], str]]) -> None:
        """Start a daemon thread per ``(target, name)``; :meth:`stop` joins them."""
        for target, name in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _begin_stop(self) -> None:
        """Tell the threads to stop and cut the watch requests in flight short."""
        self._stopping.set()
        self._stop_requested = True
        for watch in self._watches:
            watch.shutdown()

    def _release_work_folder(self) -> None:
        self._work.unlock()
        self.logger.info("%s stopped", self.title)
