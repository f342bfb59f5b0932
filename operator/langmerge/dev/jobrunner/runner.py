"""The runner: watches Jobs (and TrainJobs), queues the unfinished ones and hands them to workers, at most
``parallel`` at once."""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client

from langmerge.constants import TRAINER_GROUP, TRAINER_VERSION, TRAINJOB_PLURAL
from langmerge.dev.jobrunner.config import JOB, TRAINJOB, RunnerConfig, RunnerError
from langmerge.dev.jobrunner.status import wants_to_run
from langmerge.dev.jobrunner.worker import _TrainJobWorker, _Worker
from langmerge.dev.watching import ListWatch, LocalRunner, custom_lister

log = logging.getLogger("langmerge.jobrunner")


@dataclass
class _Queued:
    job: dict[str, Any]
    key: tuple[str, int]
    kind: str = "Job"


class LocalJobRunner(LocalRunner[RunnerConfig]):
    """Runs unfinished Jobs of the API server as local processes and reports their status. Development only."""

    title = "local Job runner"
    lock_name = "_runner.lock"
    error = RunnerError
    logger = log

    def __init__(self, api_client: Any, config: RunnerConfig) -> None:
        super().__init__(config)
        self._batch = client.BatchV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        self._custom = client.CustomObjectsApi(api_client)
        self._cond = threading.Condition()
        self._pending: dict[str, _Queued] = {}
        self._running: dict[str, _Worker] = {}
        self._closed: set[str] = set()  # uids finished by this runner or deleted: stale events must not revive them
        self._seq = itertools.count()
        self._job_watch = self._watch_kind(JOB)
        self._trainjob_watch = self._watch_kind(TRAINJOB, absent_recheck_seconds=5.0)  # no CRD: only Jobs run
        #: Set after the first successful list (the runner knows the cluster's Jobs).
        self.synced = self._job_watch.synced

    # -- life cycle --------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Lock the work folder, kill what a crashed runner left there, then watch and run Jobs in the background."""
        self._claim_work_folder()
        targets: list[tuple[Callable[[], None], str]] = [
            (self._job_watch.run, "jobrunner-watch"),
            (self._dispatch_loop, "jobrunner-dispatch"),
        ]
        if self.config.trainjobs:
            targets.append((self._trainjob_watch.run, "jobrunner-watch-trainjobs"))
        self._start_threads(targets)
        log.info(
            "local Job runner started: %s, up to %d at once, work folder %s",
            f"namespace {self.config.namespace}" if self.config.namespace else "all namespaces",
            self.config.parallel,
            self.config.work_root,
        )

    def stop(self, timeout: float | None = None) -> None:
        """Kill the running processes (their Jobs stay active, to be resumed by the next runner) and stop watching."""
        self._begin_stop()
        with self._cond:
            workers = list(self._running.values())
            for worker in workers:
                worker.cancel("runner stopped")
            self._cond.notify_all()
        limit = time.monotonic() + (timeout if timeout is not None else self.config.kill_grace_seconds + 10.0)
        for worker in workers:
            worker.thread.join(max(0.0, limit - time.monotonic()))
        for thread in self._threads:
            thread.join(max(0.0, limit - time.monotonic()))
        self._release_work_folder()

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
    def _watch_kind(self, kind: str, absent_recheck_seconds: float | None = None) -> ListWatch:
        return self._list_watch(
            kind,
            self._list_fn(kind),
            self.config.label_selector,
            observe=self._observe,
            forget=self._forget,
            listed=functools.partial(self._listed, kind),
            absent_recheck_seconds=absent_recheck_seconds,
        )

    def _list_fn(self, kind: str) -> Callable[..., Any]:
        if kind == TRAINJOB:
            return custom_lister(self._custom, TRAINER_GROUP, TRAINER_VERSION, TRAINJOB_PLURAL, self.config.namespace)
        if self.config.namespace:
            return lambda **kw: self._batch.list_namespaced_job(self.config.namespace, **kw)
        return lambda **kw: self._batch.list_job_for_all_namespaces(**kw)

    def _listed(self, kind: str, seen: set[str]) -> None:
        """After a listing of ``kind``: what it lacks was deleted."""
        with self._cond:
            for uid in [u for u in self._pending if u not in seen and self._pending[u].kind == kind]:
                del self._pending[uid]
            for uid, worker in self._running.items():
                if uid not in seen and worker.kind == kind:
                    worker.cancel("deleted")

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
