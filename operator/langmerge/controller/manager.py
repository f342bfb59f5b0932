"""The running controller: work queue, worker tasks, leader election, and the mapping from watch events to keys.

kopf delivers watch events (see :mod:`.main`); this module turns them into queue keys and runs the reconcilers on a
thread pool (they do blocking Kubernetes and S3 calls). Only the elected leader processes keys, so several replicas
never act at once. kopf calls the event methods from its executor threads: every structure they touch is
thread-safe (the queue, the Job index, the slots) or behind :attr:`Controller._lock`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from langmerge.constants import (
    COMPONENT_MERGE,
    COMPONENT_TRAINING,
    EXPERT_PLURAL,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    MERGED_PLURAL,
    TRAINJOB_KIND,
)
from langmerge.controller import metrics
from langmerge.controller.cloudevents import EventSender
from langmerge.controller.experts import reconcile_expert
from langmerge.controller.merged import reconcile_merged
from langmerge.controller.runtime import EXPERT, MERGED, Key, Runtime, expert_key, merged_key
from langmerge.controller.workqueue import WorkQueue
from langmerge.kube import Expired, Kube, operator_client
from langmerge.settings import Settings
from langmerge.store import ObjectStore, StorageUnavailable, split_uri

log = logging.getLogger("langmerge.controller")

Reconciler = Callable[[Runtime, Key], float | None]
RECONCILERS: dict[str, Reconciler] = {EXPERT: reconcile_expert, MERGED: reconcile_merged}
COMPONENTS: dict[str, str] = {EXPERT: COMPONENT_TRAINING, MERGED: COMPONENT_MERGE}

#: Longest wait before retrying an object whose pass failed because the API server (or S3) did not answer.
OUTAGE_RETRY_CAP_SECONDS = 10.0


def outage(err: BaseException) -> str | None:
    """A short description if ``err`` means a server did not answer (an outage that heals by itself), else None."""
    if isinstance(err, StorageUnavailable):
        return str(err)
    if isinstance(err, ApiException) and (err.status in (0, 429) or (err.status or 0) >= 500):
        return f"the Kubernetes API answered {err.status} {err.reason}"
    if isinstance(err, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError):
        return f"the Kubernetes API did not answer: {type(err).__name__}"
    return None


@dataclass
class LeaderElection:
    """A coordination.k8s.io/v1 Lease: only its holder reconciles. Disabled (always leader) without a namespace."""

    kube: Kube
    namespace: str | None
    name: str = "langmerge-operator"
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}")
    lease_seconds: int = 15
    renew_seconds: float = 5.0
    leading: asyncio.Event = field(default_factory=asyncio.Event)

    def _try(self) -> bool:
        now = datetime.now(UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds, "renewTime": stamp}
        if self.namespace is None:
            return True  # no election: always the leader
        lease = self.kube.read_lease(self.namespace, self.name)
        if lease is None:
            body = {
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {**spec, "acquireTime": stamp},
            }
            return self.kube.create_lease(self.namespace, body)
        holder = lease.spec.holder_identity
        renewed = lease.spec.renew_time
        expired = renewed is None or renewed + timedelta(seconds=lease.spec.lease_duration_seconds or 15) < now
        if holder != self.identity and not expired:
            return False
        body = {
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": lease.metadata.resource_version,
            },
            "spec": {**spec, "acquireTime": stamp if holder != self.identity else lease.spec.acquire_time},
        }
        # False on 409: someone else renewed or took it in between.
        return self.kube.replace_lease(self.namespace, self.name, body)

    async def run(self, on_acquired: Callable[[], None]) -> None:
        if not self.namespace:
            self.leading.set()
            on_acquired()
            return
        loop = asyncio.get_running_loop()
        while True:
            try:
                ok = await loop.run_in_executor(None, self._try)
            except Exception:
                log.exception("leader election failed; retrying")
                ok = False
            if ok and not self.leading.is_set():
                log.info("became the leader (%s)", self.identity)
                self.leading.set()
                on_acquired()
            elif not ok and self.leading.is_set():
                log.warning("lost the leadership (%s); pausing", self.identity)
                self.leading.clear()
            await asyncio.sleep(self.renew_seconds)


class Controller:
    """Owns the queue and the workers for one operator process."""

    def __init__(self, settings: Settings, kube: Kube, store: ObjectStore) -> None:
        self.settings = settings
        self.queue: WorkQueue[Key] = WorkQueue()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="reconcile")
        self.rt = Runtime(settings=settings, kube=kube, store=store)
        self.rt.enqueue = self.queue.add_after  # thread-safe; a delay <= 0 queues at once
        # A delivery that succeeds or starts failing shows in the object's status.serving at once.
        self.rt.cloud_events = EventSender(on_change=lambda key: self.queue.add_after(key, 0.0))
        self.leader = LeaderElection(
            kube, settings.leader_election_namespace or None, name=settings.leader_election_lease_name
        )
        self.tasks: list[asyncio.Task[None]] = []
        self._lock = threading.Lock()
        self._seen: dict[Key, tuple[Any, ...]] = {}
        #: Each expert's spec.initFrom (its trunk's name): a trunk's change wakes the experts that start from it.
        self._trunk_of: dict[Key, str | None] = {}
        self._index_ready = asyncio.Event()
        self._outage: str | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    @classmethod
    def from_environment(cls) -> Controller:
        settings = Settings.from_env()
        kube = Kube(
            operator_client(os.environ.get("KUBECONFIG") or None),
            timeout=settings.request_timeout_seconds,
            on_request=lambda verb, resource: metrics.KUBE_REQUESTS.labels(verb, resource).inc(),
        )
        store = ObjectStore.from_config(settings.s3)

        def count_s3(model: Any, **_: Any) -> None:
            metrics.S3_REQUESTS.labels(model.name).inc()

        store.client.meta.events.register("before-call.s3", count_s3)
        return cls(settings, kube, store)

    # -- lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        workers = max(1, min(self.settings.workers, 8))
        self.tasks = [asyncio.create_task(self._worker(i)) for i in range(workers)]
        self.tasks.append(asyncio.create_task(self.leader.run(self._resync_all)))
        self.tasks.append(asyncio.create_task(self._relist_jobs_forever()))
        if self.settings.trainjobs:
            self._stopping.clear()
            for namespace in self.settings.namespaces or (None,):
                thread = threading.Thread(
                    target=self._watch_trainjobs_forever, args=(namespace,), name="trainjob-watch", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        self.tasks.append(asyncio.create_task(self._probe_storage_forever()))

    async def stop(self) -> None:
        """Stop taking keys and let the passes in flight finish (each request has a timeout), so nothing this
        operator does happens after it stopped."""
        self.queue.close()
        self._stopping.set()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self.pool.shutdown, wait=True, cancel_futures=True)
        )
        if self.rt.cloud_events is not None:
            self.rt.cloud_events.stop()

    def _resync_all(self) -> None:
        """Became leader: look at every object once (events seen while following may be stale)."""
        with self._lock:
            keys = list(self._seen)
        for key in keys:
            self.queue.add(key)

    # -- the Job index ---------------------------------------------------------------------------------------------
    def relist_jobs(self) -> None:
        """One LIST of our Jobs per watched namespace (or cluster-wide) into the index: at start-up, before any
        pass runs, then every ``job_relist_seconds`` as a safety net for events a broken watch lost."""
        selector = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
        for namespace in self.settings.namespaces or (None,):
            items, version = self.rt.kube.list_jobs_versioned(selector, namespace)
            self.rt.jobs.replace(items, version, namespace=namespace)
            if self.settings.trainjobs:
                items, version = self.rt.kube.list_trainjobs_versioned(selector, namespace)
                self.rt.jobs.replace(items, version, namespace=namespace, kind=TRAINJOB_KIND)

    def _watch_trainjobs_forever(self, namespace: str | None) -> None:
        """Our TrainJobs' events into the index, as kopf's Job watch does for Jobs (own thread: the TrainJob kind
        exists only where Kubeflow Trainer is installed, so it is watched only with ``trainjobs`` on). Each watch
        starts from a fresh listing; it ends after a minute (or ``job_relist_seconds``) at most, or on an error (retried)."""
        selector = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
        delay = 1.0
        while not self._stopping.is_set():
            try:
                items, version = self.rt.kube.list_trainjobs_versioned(selector, namespace)
                self.rt.jobs.replace(items, version, namespace=namespace, kind=TRAINJOB_KIND)
                timeout = max(1, int(min(self.settings.job_relist_seconds, 60)))
                for event_type, body in self.rt.kube.watch_trainjobs(selector, namespace, version, timeout):
                    if self._stopping.is_set():
                        return
                    self.on_job_event(event_type, body)
                delay = 1.0
            except Expired:
                continue
            except Exception as err:
                if self._stopping.is_set():
                    return
                log.warning("watching TrainJobs failed (%s); retrying in %.0fs", outage(err) or err, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, OUTAGE_RETRY_CAP_SECONDS)

    async def _relist_jobs_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(self.pool, self.relist_jobs)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("listing Jobs failed (%s); retrying", outage(err) or err)
                await asyncio.sleep(min(OUTAGE_RETRY_CAP_SECONDS, self.settings.job_relist_seconds))
                continue
            self._index_ready.set()
            for kind in COMPONENTS:
                self.rt.wake_waiting(COMPONENTS[kind])
            await asyncio.sleep(self.settings.job_relist_seconds)

    # -- S3 outages ------------------------------------------------------------------------------------------------
    async def _probe_storage_forever(self) -> None:
        """Ask S3 every ``storage_probe_seconds`` (one HEAD of the artifacts bucket). When it stops answering, every
        object shows ``Degraded=True StorageUnavailable`` within seconds, whether or not its passes need S3; when it
        answers again, they heal and the objects that waited for it run. One WARNING line opens an outage and one
        closes it."""
        loop = asyncio.get_running_loop()
        bucket = split_uri(self.settings.artifacts_uri)[0]
        endpoint = self.rt.store.endpoint
        started = 0.0
        while True:
            await asyncio.sleep(self.settings.storage_probe_seconds)
            try:
                await loop.run_in_executor(self.pool, self.rt.store.probe, bucket)
            except StorageUnavailable as err:
                if self.rt.storage_outage is None:
                    started = time.monotonic()
                    self.rt.storage_outage = (
                        f"S3 at {endpoint} is unavailable: {err.detail}; the operator carries on as soon as it answers"
                    )
                    keys = self._all_keys()
                    log.warning(
                        "S3 at %s is not answering (%s): %d object(s) show Degraded=True StorageUnavailable until it does",
                        endpoint,
                        err.detail,
                        len(keys),
                    )
                    for key in keys:
                        self.queue.add(key)
                continue
            except Exception as err:  # a probe must never end the loop
                log.warning("probing S3 failed: %s", err)
                continue
            waiters = self.rt.storage_waiters(take=True)
            if self.rt.storage_outage is not None:
                self.rt.storage_outage = None
                waiters |= set(self._all_keys())
                log.warning(
                    "S3 at %s answers again after %.0fs; %d object(s) heal and carry on",
                    endpoint,
                    time.monotonic() - started,
                    len(waiters),
                )
            elif waiters:
                log.info("S3 at %s answers again; running %d waiting object(s)", endpoint, len(waiters))
            for key in waiters:
                self.queue.add(key)

    def _all_keys(self) -> list[Key]:
        with self._lock:
            return list(self._seen)

    # -- workers ---------------------------------------------------------------------------------------------------
    async def _worker(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.leader.leading.wait()
            await self._index_ready.wait()
            key = await self.queue.get()
            metrics.QUEUE_DEPTH.set(len(self.queue))
            started = time.monotonic()
            try:
                if not self.leader.leading.is_set():
                    self.queue.add_after(key, 1.0)
                    continue
                requeue = await loop.run_in_executor(self.pool, RECONCILERS[key[0]], self.rt, key)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                metrics.RECONCILE_ERRORS.labels(key[0]).inc()
                self._failed(key, err)
            else:
                self.queue.forget(key)
                if self._outage is not None:
                    log.warning("the outage is over (%s)", self._outage)
                    self._outage = None
                if requeue is not None:
                    self.queue.add_after(key, requeue)
            finally:
                metrics.RECONCILE_SECONDS.labels(key[0]).observe(time.monotonic() - started)
                self.queue.done(key)
                # A slot this object was woken for and did not take goes to the next in line.
                self.rt.slots.pass_done(key)
                component = COMPONENTS[key[0]]
                self.rt.wake_waiting(component)
                metrics.SLOT_WAITERS.labels(component).set(self.rt.slots.count_waiting(component))

    def _failed(self, key: Key, err: Exception) -> None:
        """A pass raised. An outage (API server or S3 not answering) is one log line and a retry within
        ``OUTAGE_RETRY_CAP_SECONDS``; anything else is a bug worth a traceback and backs off exponentially."""
        what = outage(err)
        if what is None:
            delay = self.queue.add_rate_limited(key)
            log.exception("reconcile of %s %s/%s failed; retrying in %.0fs", key[0], key[1], key[2], delay)
            return
        if isinstance(err, StorageUnavailable):
            self.rt.wait_for_storage(key)
        delay = self.queue.add_rate_limited(key, cap=OUTAGE_RETRY_CAP_SECONDS)
        if self._outage is None:
            log.warning("%s; objects are retried within %.0fs", what, OUTAGE_RETRY_CAP_SECONDS)
            self._outage = what
        else:
            log.debug("reconcile of %s %s/%s: %s; retrying in %.0fs", key[0], key[1], key[2], what, delay)

    # -- events ----------------------------------------------------------------------------------------------------
    def on_expert_event(self, event_type: str, body: dict[str, Any]) -> None:
        meta = body.get("metadata", {})
        namespace, name = meta.get("namespace"), meta.get("name")
        if not namespace or not name:
            return
        key = expert_key(namespace, name)
        status = body.get("status") or {}
        adapter = status.get("adapter") or {}
        spec_view = (meta.get("generation"), meta.get("deletionTimestamp"))
        output_view = (
            status.get("phase"),
            adapter.get("digest"),
            status.get("trainedFingerprint"),
            status.get("desiredFingerprint"),
            tuple(sorted((meta.get("labels") or {}).items())),
        )
        if event_type == "DELETED":
            with self._lock:
                self._seen.pop(key, None)
                self._trunk_of.pop(key, None)
            self.queue.add(key)
            self._wake_merged(namespace)
            self._wake_branches(namespace, name)
            return
        with self._lock:
            previous = self._seen.get(key)
            self._seen[key] = (*spec_view, *output_view)
        init_from = ((body.get("spec") or {}).get("initFrom") or {}).get("expert")
        with self._lock:
            self._trunk_of[key] = init_from
        if previous is None or previous[:2] != spec_view or self._status_drifted(key, status):
            self.queue.add(key)
        if previous is None or previous[2:] != output_view:
            self._wake_merged(namespace)
            self._wake_branches(namespace, name)

    def _status_drifted(self, key: Key, status: dict[str, Any]) -> bool:
        """Whether the status differs from what this process last wrote (someone removed or edited it): then the
        object runs at once instead of at its next poll."""
        memo = self.rt.memos.get(key)
        if memo is None or memo.written is None:
            return False
        adapter = status.get("adapter") or {}
        seen: tuple[Any, ...] = (status.get("phase"), status.get("observedGeneration"))
        if key[0] == EXPERT:
            seen += (status.get("trainedFingerprint"), status.get("desiredFingerprint"), adapter.get("digest"))
        else:
            seen += (status.get("revision"), status.get("fingerprint"))
        return seen != memo.written

    def on_merged_event(self, event_type: str, body: dict[str, Any]) -> None:
        meta = body.get("metadata", {})
        namespace, name = meta.get("namespace"), meta.get("name")
        if not namespace or not name:
            return
        key = merged_key(namespace, name)
        view = (meta.get("generation"), meta.get("deletionTimestamp"))
        if event_type == "DELETED":
            with self._lock:
                self._seen.pop(key, None)
            self.queue.add(key)
            # An object of the namespace may be waiting for the output prefix this one owned: it takes it now.
            self._wake_merged(namespace)
            return
        with self._lock:
            previous = self._seen.get(key)
            self._seen[key] = view
        if previous != view or self._status_drifted(key, body.get("status") or {}):
            self.queue.add(key)
        if previous is not None and previous != view:
            self._wake_merged(namespace)  # its spec changed: it may have let its output prefix go

    def on_job_event(self, event_type: str, body: dict[str, Any]) -> None:
        """A Job or TrainJob of ours changed (its body's ``kind`` tells which)."""
        entry = self.rt.jobs.apply(event_type, body)
        if entry is None:
            return
        ended = not entry.state.active or event_type == "DELETED"
        owner = self._owner_name(body.get("metadata", {}), entry.owner)
        key = (expert_key if entry.component == COMPONENT_TRAINING else merged_key)(entry.namespace, owner)
        memo = self.rt.memos.get(key)
        if memo is not None:
            # A Job of this object changed: what S3 holds for it may have too (a commit, a failure record).
            memo.manifest_absent = None
            memo.failures = None
        self.queue.add(key)
        if ended:
            self.rt.wake_waiting(entry.component)

    @staticmethod
    def _owner_name(meta: dict[str, Any], fallback: str) -> str:
        for ref in meta.get("ownerReferences") or []:
            if ref.get("controller"):
                return str(ref.get("name"))
        return fallback

    def _wake_branches(self, namespace: str, trunk: str) -> None:
        """The experts that start from ``trunk`` (spec.initFrom): its adapter changed, or it appeared or went."""
        with self._lock:
            keys = [k for k, t in self._trunk_of.items() if t == trunk and k[1] == namespace]
        for key in keys:
            self.queue.add(key)

    def _wake_merged(self, namespace: str) -> None:
        with self._lock:
            keys = [k for k in self._seen if k[0] == MERGED and k[1] == namespace]
        for key in keys:
            self.queue.add(key)


__all__ = ["EXPERT_PLURAL", "MERGED_PLURAL", "Controller", "LeaderElection"]
