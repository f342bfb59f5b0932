"""The running controller: work queue, worker tasks, leader election, and the mapping from watch events to keys.

kopf delivers watch events (see :mod:`.main`); this module turns them into queue keys and runs the reconcilers on a
thread pool (they do blocking Kubernetes and S3 calls). Only the elected leader processes keys, so several replicas
never act at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes.client.exceptions import ApiException

from langmerge.constants import (
    COMPONENT_MERGE,
    COMPONENT_TRAINING,
    EXPERT_PLURAL,
    LABEL_COMPONENT,
    LABEL_EXPERT,
    LABEL_MERGED,
    MERGED_PLURAL,
)
from langmerge.controller import metrics
from langmerge.controller.experts import reconcile_expert
from langmerge.controller.jobs import job_state
from langmerge.controller.merged import reconcile_merged
from langmerge.controller.runtime import EXPERT, MERGED, Key, Runtime, expert_key, merged_key, thread_safe_enqueue
from langmerge.controller.workqueue import WorkQueue
from langmerge.kube import Kube, load_client
from langmerge.settings import Settings
from langmerge.store import ObjectStore

log = logging.getLogger("langmerge.controller")

Reconciler = Callable[[Runtime, Key], float | None]
RECONCILERS: dict[str, Reconciler] = {EXPERT: reconcile_expert, MERGED: reconcile_merged}


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
        from kubernetes import client

        api = client.CoordinationV1Api(self.kube.api)
        now = datetime.now(UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds, "renewTime": stamp}
        try:
            lease = api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as err:
            if err.status != 404:
                raise
            body = {
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {**spec, "acquireTime": stamp},
            }
            try:
                api.create_namespaced_lease(self.namespace, body)
            except ApiException as err2:
                if err2.status == 409:
                    return False
                raise
            return True
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
        try:
            api.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as err:
            if err.status == 409:
                return False  # someone else renewed or took it in between
            raise
        return True

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
        self.leader = LeaderElection(kube, os.environ.get("LANGMERGE_LEADER_ELECTION_NAMESPACE") or None)
        self.tasks: list[asyncio.Task[None]] = []
        self._seen: dict[Key, tuple[Any, ...]] = {}

    @classmethod
    def from_environment(cls) -> Controller:
        settings = Settings.from_env()
        kube = Kube(load_client(os.environ.get("KUBECONFIG") or None))
        store = ObjectStore.from_config(settings.s3)
        return cls(settings, kube, store)

    # -- lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.rt.enqueue = thread_safe_enqueue(loop, self.queue.add, self.queue.add_after)
        workers = max(1, min(self.settings.workers, 8))
        self.tasks = [asyncio.create_task(self._worker(i)) for i in range(workers)]
        self.tasks.append(asyncio.create_task(self.leader.run(self._resync_all)))

    async def stop(self) -> None:
        self.queue.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _resync_all(self) -> None:
        """Became leader: look at every object once (events seen while following may be stale)."""
        for key in list(self._seen):
            self.queue.add(key)

    async def _worker(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.leader.leading.wait()
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
            except Exception:
                metrics.RECONCILE_ERRORS.labels(key[0]).inc()
                delay = self.queue.add_rate_limited(key)
                log.exception("reconcile of %s %s/%s failed; retrying in %.0fs", key[0], key[1], key[2], delay)
            else:
                self.queue.forget(key)
                if requeue is not None:
                    self.queue.add_after(key, requeue)
            finally:
                metrics.RECONCILE_SECONDS.labels(key[0]).observe(time.monotonic() - started)
                self.queue.done(key)

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
        previous = self._seen.get(key)
        if event_type == "DELETED":
            self._seen.pop(key, None)
            self.queue.add(key)
            self._wake_merged(namespace)
            return
        self._seen[key] = (*spec_view, *output_view)
        if previous is None or previous[:2] != spec_view:
            self.queue.add(key)
        if previous is None or previous[2:] != output_view:
            self._wake_merged(namespace)

    def on_merged_event(self, event_type: str, body: dict[str, Any]) -> None:
        meta = body.get("metadata", {})
        namespace, name = meta.get("namespace"), meta.get("name")
        if not namespace or not name:
            return
        key = merged_key(namespace, name)
        view = (meta.get("generation"), meta.get("deletionTimestamp"))
        if event_type == "DELETED":
            self._seen.pop(key, None)
            self.queue.add(key)
            return
        if self._seen.get(key) != view:
            self._seen[key] = view
            self.queue.add(key)

    def on_job_event(self, event_type: str, body: dict[str, Any]) -> None:
        meta = body.get("metadata", {})
        labels = meta.get("labels") or {}
        namespace = meta.get("namespace")
        if not namespace:
            return
        state = job_state(body)
        component = labels.get(LABEL_COMPONENT)
        if component == COMPONENT_TRAINING and labels.get(LABEL_EXPERT):
            owner = self._owner_name(meta, labels[LABEL_EXPERT])
            self.queue.add(expert_key(namespace, owner))
            if not state.active or event_type == "DELETED":
                self.rt.wake_waiting(EXPERT)
        elif component == COMPONENT_MERGE and labels.get(LABEL_MERGED):
            owner = self._owner_name(meta, labels[LABEL_MERGED])
            self.queue.add(merged_key(namespace, owner))
            if not state.active or event_type == "DELETED":
                self.rt.wake_waiting(MERGED)

    @staticmethod
    def _owner_name(meta: dict[str, Any], fallback: str) -> str:
        for ref in meta.get("ownerReferences") or []:
            if ref.get("controller"):
                return str(ref.get("name"))
        return fallback

    def _wake_merged(self, namespace: str) -> None:
        for key in list(self._seen):
            if key[0] == MERGED and key[1] == namespace:
                self.queue.add(key)


__all__ = ["EXPERT_PLURAL", "MERGED_PLURAL", "Controller", "LeaderElection"]
