"""The runner: watches Jobs (and TrainJobs), queues the unfinished ones and hands them to workers, at most
``parallel`` at once."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from langmerge.constants import TRAINER_GROUP, TRAINER_VERSION, TRAINJOB_PLURAL
from langmerge.dev.jobrunner.api import _iter_lines
from langmerge.dev.jobrunner.config import JOB, TRAINJOB, RunnerConfig, RunnerError
from langmerge.dev.jobrunner.processes import _killpg, _proc_start_ticks
from langmerge.dev.jobrunner.status import wants_to_run
from langmerge.dev.jobrunner.worker import _TrainJobWorker, _Worker

log = logging.getLogger("langmerge.jobrunner")


@dataclass
class _Queued:
    job: dict[str, Any]
    key: tuple[str, int]
    kind: str = "Job"


class LocalJobRunner:
    """Runs unfinished Jobs of the API server as local processes and reports their status. Development only."""

    def __init__(self, api_client: Any, config: RunnerConfig) -> None:
        self.config = config
        self._batch = client.BatchV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        self._custom = client.CustomObjectsApi(api_client)
        self._cond = threading.Condition()
        self._pending: dict[str, _Queued] = {}
        self._running: dict[str, _Worker] = {}
        self._closed: set[str] = set()  # uids finished by this runner or deleted: stale events must not revive them
        self._seq = itertools.count()
        self._stopping = threading.Event()
        self._stop_requested = False  # a plain flag: set from signal handlers, where taking a lock could deadlock
        self._threads: list[threading.Thread] = []
        self._watch_responses: dict[str, Any] = {}
        self._lock_file: IO[str] | None = None
        self._started = False
        #: Set after the first successful list (the runner knows the cluster's Jobs).
        self.synced = threading.Event()

    # -- life cycle --------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Lock the work folder, kill what a crashed runner left there, then watch and run Jobs in the background."""
        if self._started:
            raise RunnerError("the runner was already started")
        self._started = True
        self.config.work_root.mkdir(parents=True, exist_ok=True)
        self.config.logs_path.mkdir(parents=True, exist_ok=True)
        lock = (self.config.work_root / "_runner.lock").open("a+")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise RunnerError(f"another local Job runner uses {self.config.work_root}") from None
        self._lock_file = lock
        self._kill_leftovers()
        targets: list[tuple[Callable[[], None], str]] = [
            (self._watch_loop, "jobrunner-watch"),
            (self._dispatch_loop, "jobrunner-dispatch"),
        ]
        if self.config.trainjobs:
            targets.append((functools.partial(self._watch_loop, TRAINJOB), "jobrunner-watch-trainjobs"))
        for target, name in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info(
            "local Job runner started: %s, up to %d at once, work folder %s",
            f"namespace {self.config.namespace}" if self.config.namespace else "all namespaces",
            self.config.parallel,
            self.config.work_root,
        )

    def stop(self, timeout: float | None = None) -> None:
        """Kill the running processes (their Jobs stay active, to be resumed by the next runner) and stop watching."""
        self._stopping.set()
        self._stop_requested = True
        with self._cond:
            workers = list(self._running.values())
            for worker in workers:
                worker.cancel("runner stopped")
            self._cond.notify_all()
        for resp in list(self._watch_responses.values()):
            with contextlib.suppress(Exception):
                resp.shutdown()
        limit = time.monotonic() + (timeout if timeout is not None else self.config.kill_grace_seconds + 10.0)
        for worker in workers:
            worker.thread.join(max(0.0, limit - time.monotonic()))
        for thread in self._threads:
            thread.join(max(0.0, limit - time.monotonic()))
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        log.info("local Job runner stopped")

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

    def __enter__(self) -> LocalJobRunner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- introspection -----------------------------------------------------------------------------------------------
    def running_jobs(self) -> list[str]:
        """``namespace/name`` of the Jobs whose process runs now."""
        with self._cond:
            return sorted(f"{w.namespace}/{w.name}" for w in self._running.values())

    def disrupt(self, namespace: str, name: str, reason: str = "PreemptionByScheduler") -> bool:
        """Disrupt the running attempt of a Job, as a preemption or a node drain would: its pseudo pod gets the
        ``DisruptionTarget`` condition (``reason``) and its process SIGTERM, then SIGKILL after the grace period. The
        Job's podFailurePolicy decides whether that failure counts. False if the Job has no running process."""
        with self._cond:
            worker = next((w for w in self._running.values() if (w.namespace, w.name) == (namespace, name)), None)
        if worker is None:
            return False
        worker.disrupt(reason)
        return True

    def pending_jobs(self) -> list[str]:
        """``namespace/name`` of the Jobs waiting for a free slot, in the order they will start."""
        with self._cond:
            queued = sorted(self._pending.values(), key=lambda q: q.key)
            return [f"{q.job['metadata'].get('namespace')}/{q.job['metadata'].get('name')}" for q in queued]

    # -- watching ----------------------------------------------------------------------------------------------------
    def _list_fn(self, kind: str = JOB) -> Callable[..., Any]:
        if kind == TRAINJOB:
            group = (TRAINER_GROUP, TRAINER_VERSION)
            if self.config.namespace:
                ns = self.config.namespace
                return lambda **kw: self._custom.list_namespaced_custom_object(*group, ns, TRAINJOB_PLURAL, **kw)
            return lambda **kw: self._custom.list_cluster_custom_object(*group, TRAINJOB_PLURAL, **kw)
        if self.config.namespace:
            return lambda **kw: self._batch.list_namespaced_job(self.config.namespace, **kw)
        return lambda **kw: self._batch.list_job_for_all_namespaces(**kw)

    def _selector(self) -> dict[str, Any]:
        return {"label_selector": self.config.label_selector} if self.config.label_selector else {}

    def _watch_loop(self, kind: str = JOB) -> None:
        rv: str | None = None
        listed_at = 0.0
        delay = 0.5
        absent_logged = False
        while not self._stopping.is_set():
            try:
                if rv is None or time.monotonic() - listed_at >= self.config.resync_seconds:
                    rv = self._relist(kind)
                    listed_at = time.monotonic()
                    if kind == JOB:
                        self.synced.set()
                rv = self._watch(rv, listed_at + self.config.resync_seconds, kind)
                delay = 0.5
            except ApiException as err:
                if self._stopping.is_set():
                    break
                if err.status == 410:
                    log.info("watch expired (410 Gone); re-listing")
                    rv = None
                    continue
                if err.status == 404 and kind == TRAINJOB:  # no TrainJob CRD: look again now and then
                    if not absent_logged:
                        log.info("no TrainJob CRD on this API server: only Jobs run (checked every %.0fs)", delay)
                        absent_logged = True
                    rv = None
                    self._stopping.wait(min(self.config.resync_seconds, 5.0))
                    continue
                log.warning("%s watch failed (%s %s); retrying in %.1fs", kind, err.status, err.reason, delay)
                rv = None
                self._stopping.wait(delay)
                delay = min(delay * 2, 10.0)
            except Exception as err:  # the API server may be down or restarting: keep trying
                if self._stopping.is_set():
                    break
                log.warning("%s watch failed (%s: %s); retrying in %.1fs", kind, type(err).__name__, err, delay)
                rv = None
                self._stopping.wait(delay)
                delay = min(delay * 2, 10.0)

    def _relist(self, kind: str = JOB) -> str:
        resp = self._list_fn(kind)(
            **self._selector(),
            _preload_content=False,
            _request_timeout=self.config.request_timeout_seconds,
        )
        listing = json.loads(resp.data)
        items: list[dict[str, Any]] = listing.get("items") or []
        seen = set()
        for job in items:
            job.setdefault("kind", kind)
            seen.add((job.get("metadata") or {}).get("uid"))
            self._observe(job)
        with self._cond:
            for uid in [u for u in self._pending if u not in seen and self._pending[u].kind == kind]:
                del self._pending[uid]
            for uid, worker in self._running.items():
                if uid not in seen and worker.kind == kind:
                    worker.cancel("deleted")
        return str((listing.get("metadata") or {}).get("resourceVersion") or "")

    def _watch(self, rv: str, until: float, kind: str = JOB) -> str | None:
        """Follow events from ``rv`` until ``until`` (monotonic); the last resourceVersion, or None to re-list."""
        server_timeout = max(1, min(self.config.watch_timeout_seconds, int(until - time.monotonic()) + 1))
        resp = self._list_fn(kind)(
            **self._selector(),
            watch=True,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=server_timeout,
            _preload_content=False,
            _request_timeout=(self.config.request_timeout_seconds, server_timeout + 10.0),
        )
        self._watch_responses[kind] = resp
        try:
            if self._stopping.is_set():
                return rv
            for line in _iter_lines(resp):
                if self._stopping.is_set():
                    break
                event = json.loads(line)
                etype = event.get("type")
                obj = event.get("object") or {}
                if etype == "ERROR":
                    if obj.get("code") == 410:
                        log.info("watch expired (%s); re-listing", obj.get("message"))
                        return None
                    raise RunnerError(f"watch error: {obj.get('message') or obj}")
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                if etype in ("ADDED", "MODIFIED"):
                    obj.setdefault("kind", kind)
                    self._observe(obj)
                elif etype == "DELETED":
                    self._forget(obj)
                if new_rv:
                    rv = str(new_rv)
        finally:
            self._watch_responses.pop(kind, None)
            with contextlib.suppress(Exception):  # a stream cut short must not go back to the pool half-read
                resp.close()
                resp.release_conn()
        return rv

    def _observe(self, job: dict[str, Any]) -> None:
        meta = job.get("metadata") or {}
        uid = meta.get("uid")
        if not uid:
            return
        with self._cond:
            if uid in self._closed:
                return
            worker = self._running.get(uid)
            if meta.get("deletionTimestamp"):
                self._pending.pop(uid, None)
                if worker is not None:
                    worker.cancel("deleted")
                return
            if worker is not None:
                worker.observe(job)
                return
            if not wants_to_run(job):
                self._pending.pop(uid, None)
                return
            queued = self._pending.get(uid)
            if queued is not None:
                queued.job = job
                return
            kind = TRAINJOB if job.get("kind") == TRAINJOB else JOB
            self._pending[uid] = _Queued(job, (str(meta.get("creationTimestamp") or ""), next(self._seq)), kind)
            self._cond.notify_all()

    def _forget(self, job: Mapping[str, Any]) -> None:
        uid = (job.get("metadata") or {}).get("uid")
        if not uid:
            return
        with self._cond:
            self._closed.add(uid)
            self._pending.pop(uid, None)
            worker = self._running.get(uid)
            if worker is not None:
                worker.cancel("deleted")

    # -- scheduling --------------------------------------------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        with self._cond:
            while not self._stopping.is_set():
                while not self._stopping.is_set() and len(self._running) < self.config.parallel and self._pending:
                    uid = min(self._pending, key=lambda u: self._pending[u].key)
                    queued = self._pending.pop(uid)
                    worker = _TrainJobWorker(self, queued.job) if queued.kind == TRAINJOB else _Worker(self, queued.job)
                    self._running[uid] = worker
                    worker.thread.start()
                self._cond.wait(1.0)

    def _worker_done(self, worker: _Worker, closed: bool) -> None:
        with self._cond:
            if self._running.get(worker.uid) is worker:
                del self._running[worker.uid]
            if closed:
                self._closed.add(worker.uid)
            self._cond.notify_all()

    # -- leftovers of a crashed runner -------------------------------------------------------------------------------
    @property
    def _pids_dir(self) -> Path:
        return self.config.work_root / "_pids"

    def _kill_leftovers(self) -> None:
        if not self._pids_dir.is_dir():
            return
        for path in self._pids_dir.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                record = json.loads(path.read_text())
                pid, ticks = int(record["pid"]), record.get("start")
                if ticks is not None and _proc_start_ticks(pid) == ticks:
                    log.warning("killing process group %d left behind by a previous runner (%s)", pid, path.stem)
                    _killpg(pid, signal.SIGKILL)
            path.unlink(missing_ok=True)
