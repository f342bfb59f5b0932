"""The only seam to the Kubernetes API outside kopf's own machinery.

A small typed wrapper over the official client: custom resources of our kinds, their status subresource, the Jobs we
own, Secrets by name, Events, and the leader-election Lease. Unit tests replace this class; integration tests run it
against a real API server.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from langmerge.constants import (
    EXPERT_PLURAL,
    GROUP,
    ISVC_PLURAL,
    KSERVE_GROUP,
    KSERVE_VERSION,
    MERGED_PLURAL,
    TRAINER_GROUP,
    TRAINER_VERSION,
    TRAINJOB_KIND,
    TRAINJOB_PLURAL,
    VERSION,
)


class Rejected(Exception):
    """The API server refused an object (forbidden, invalid, quota): a problem a retry alone will not fix."""


class Expired(Exception):
    """A watch's resourceVersion is too old (410 Gone): list again."""


class Forbidden(Exception):
    """RBAC does not allow the request."""


class Conflict(Exception):
    """The object changed since it was read (409 on a write that named the resourceVersion read)."""


#: Accept header of a metadata-only read: the API server returns the object's metadata, never its data.
PARTIAL_METADATA = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


def api_message(err: ApiException) -> str:
    """The human part of an API error (its Status message), else the reason."""
    import json

    try:
        body = err.body.decode() if isinstance(err.body, bytes) else err.body
        return str(json.loads(body).get("message") or err.reason)
    except (TypeError, ValueError, AttributeError):
        return str(err.reason)


def load_client(kubeconfig: str | None = None) -> ApiClient:
    """An ApiClient from a kubeconfig file, else the in-cluster ServiceAccount, else ``~/.kube/config``."""
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    try:
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        return ApiClient(cfg)
    except config.ConfigException:
        return config.new_client_from_config()


def install_crds(api: ApiClient, crds: list[dict[str, Any]] | None = None, timeout: float = 30.0) -> None:
    """Create or update our CRDs and wait until the API server serves them."""
    from langmerge.api.crdgen import all_crds

    ext = client.ApiextensionsV1Api(api)
    objects = crds if crds is not None else list(all_crds().values())
    for crd in objects:
        name = crd["metadata"]["name"]
        try:
            ext.create_custom_resource_definition(crd)
        except ApiException as err:
            if err.status != 409:
                raise
            current = ext.read_custom_resource_definition(name)
            crd = {**crd, "metadata": {**crd["metadata"], "resourceVersion": current.metadata.resource_version}}
            ext.replace_custom_resource_definition(name, crd)
    deadline = time.monotonic() + timeout
    for crd in objects:
        name = crd["metadata"]["name"]
        while True:
            obj = ext.read_custom_resource_definition(name)
            conds = {c.type: c.status for c in (obj.status.conditions or [])} if obj.status else {}
            if conds.get("Established") == "True":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not established")
            time.sleep(0.2)


@dataclass(frozen=True)
class ObjectKey:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


#: The name the operator's writes carry in ``metadata.managedFields`` (and the prefix of its User-Agent).
FIELD_MANAGER = "langmerge-operator"


def operator_client(kubeconfig: str | None = None) -> ApiClient:
    """The operator's ApiClient, like :func:`load_client`, identified as ``langmerge-operator`` to the API server and
    with one retry per request (not urllib3's three: each try may take the whole request timeout)."""
    from importlib import metadata

    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            config.load_kube_config(client_configuration=cfg)
    cfg.retries = 1
    api = ApiClient(cfg)
    try:
        version = metadata.version("langmerge")
    except metadata.PackageNotFoundError:
        version = "dev"
    api.user_agent = f"{FIELD_MANAGER}/{version}"
    return api


class Kube:
    """What the operator does with the API beyond kopf's watches.

    Every request carries a timeout (``timeout`` seconds for the whole request), so a hung API server delays one
    reconcile pass, never the operator; every write names :data:`FIELD_MANAGER`.
    """

    def __init__(
        self, api: ApiClient, timeout: float = 30.0, on_request: Callable[[str, str], None] | None = None
    ) -> None:
        self.api = api
        self.timeout = timeout
        #: Called with (verb, resource) before each request (the operator counts them in a Prometheus metric).
        self.on_request = on_request or (lambda verb, resource: None)
        self.custom = client.CustomObjectsApi(api)
        self.batch = client.BatchV1Api(api)
        self.core = client.CoreV1Api(api)
        self.coordination = client.CoordinationV1Api(api)

    # -- our custom resources ------------------------------------------------------------------------------------
    def get_expert(self, key: ObjectKey) -> dict[str, Any] | None:
        return self._get(EXPERT_PLURAL, key)

    def get_merged(self, key: ObjectKey) -> dict[str, Any] | None:
        return self._get(MERGED_PLURAL, key)

    def _get(self, plural: str, key: ObjectKey) -> dict[str, Any] | None:
        self.on_request("get", plural)
        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, key.namespace, plural, key.name, _request_timeout=self.timeout
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return obj

    def list_experts(self, namespace: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        self.on_request("list", EXPERT_PLURAL)
        kwargs: dict[str, Any] = {"_request_timeout": self.timeout}
        if label_selector:
            kwargs["label_selector"] = label_selector
        resp = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, EXPERT_PLURAL, **kwargs)
        items: list[dict[str, Any]] = resp.get("items", [])
        return items

    def list_all(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        self.on_request("list", plural)
        if namespace:
            resp = self.custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, _request_timeout=self.timeout
            )
        else:
            resp = self.custom.list_cluster_custom_object(GROUP, VERSION, plural, _request_timeout=self.timeout)
        items: list[dict[str, Any]] = resp.get("items", [])
        return items

    def list_merged(self, namespace: str) -> list[dict[str, Any]]:
        return self.list_all(MERGED_PLURAL, namespace)

    def patch_status(self, plural: str, key: ObjectKey, status: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the status subresource. Returns the object, or None if it is gone."""
        self.on_request("patch", f"{plural}/status")
        try:
            obj: dict[str, Any] = self.custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                key.namespace,
                plural,
                key.name,
                {"status": status},
                field_manager=FIELD_MANAGER,
                _request_timeout=self.timeout,
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return obj

    # -- Jobs --------------------------------------------------------------------------------------------------------
    def list_jobs(self, label_selector: str, namespace: str | None = None) -> list[Any]:
        return self.list_jobs_versioned(label_selector, namespace)[0]

    def list_jobs_versioned(self, label_selector: str, namespace: str | None = None) -> tuple[list[Any], str]:
        """The Jobs matching ``label_selector`` and the list's resourceVersion (one paginated LIST)."""
        items: list[Any] = []
        token: str | None = None
        while True:
            self.on_request("list", "jobs")
            kwargs: dict[str, Any] = {"label_selector": label_selector, "limit": 500, "_request_timeout": self.timeout}
            if token:
                kwargs["_continue"] = token
            if namespace:
                resp = self.batch.list_namespaced_job(namespace, **kwargs)
            else:
                resp = self.batch.list_job_for_all_namespaces(**kwargs)
            items.extend(resp.items)
            token = resp.metadata._continue
            if not token:
                return items, str(resp.metadata.resource_version or "")

    def create_job(self, namespace: str, manifest: dict[str, Any]) -> bool:
        """Create a Job; False if it already exists (409). :class:`Rejected` for 400/403/422 (e.g. a quota)."""
        self.on_request("create", "jobs")
        try:
            self.batch.create_namespaced_job(
                namespace, manifest, field_manager=FIELD_MANAGER, _request_timeout=self.timeout
            )
        except ApiException as err:
            if err.status == 409:
                return False
            if err.status in (400, 403, 422):
                raise Rejected(f"{err.status} {api_message(err)}") from err
            raise
        return True

    def delete_job(self, namespace: str, name: str) -> bool:
        """Delete a Job and its pods (background propagation); False if it was gone."""
        self.on_request("delete", "jobs")
        try:
            self.batch.delete_namespaced_job(
                name, namespace, propagation_policy="Background", _request_timeout=self.timeout
            )
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    # -- TrainJobs (Kubeflow Trainer) ----------------------------------------------------------------------------
    def list_trainjobs_versioned(self, label_selector: str, namespace: str | None = None) -> tuple[list[Any], str]:
        """The TrainJobs matching ``label_selector`` (dicts) and the list's resourceVersion (one paginated LIST)."""
        items: list[Any] = []
        token: str | None = None
        group = (TRAINER_GROUP, TRAINER_VERSION)
        while True:
            self.on_request("list", TRAINJOB_PLURAL)
            kwargs: dict[str, Any] = {"label_selector": label_selector, "limit": 500, "_request_timeout": self.timeout}
            if token:
                kwargs["_continue"] = token
            if namespace:
                resp = self.custom.list_namespaced_custom_object(*group, namespace, TRAINJOB_PLURAL, **kwargs)
            else:
                resp = self.custom.list_cluster_custom_object(*group, TRAINJOB_PLURAL, **kwargs)
            for item in resp.get("items") or []:
                item.setdefault("kind", TRAINJOB_KIND)
                items.append(item)
            meta = resp.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return items, str(meta.get("resourceVersion") or "")

    def watch_trainjobs(
        self, label_selector: str, namespace: str | None, resource_version: str, timeout_seconds: int
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event type, TrainJob) from ``resource_version`` on, for at most ``timeout_seconds`` (the server ends the
        watch then). :class:`Expired` when the version is too old (relist)."""
        from kubernetes import watch

        group = (TRAINER_GROUP, TRAINER_VERSION)
        if namespace:
            fn: Any = functools.partial(self.custom.list_namespaced_custom_object, *group, namespace, TRAINJOB_PLURAL)
        else:
            fn = functools.partial(self.custom.list_cluster_custom_object, *group, TRAINJOB_PLURAL)
        self.on_request("watch", TRAINJOB_PLURAL)
        stream = watch.Watch().stream(
            fn,
            label_selector=label_selector,
            resource_version=resource_version,
            timeout_seconds=timeout_seconds,
            allow_watch_bookmarks=True,
            _request_timeout=(self.timeout, timeout_seconds + self.timeout),
        )
        for event in stream:
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Expired(str(obj.get("message") or "410 Gone"))
                raise ApiException(status=obj.get("code"), reason=str(obj.get("message")))
            if kind in ("ADDED", "MODIFIED", "DELETED") and isinstance(obj, dict):
                obj.setdefault("kind", TRAINJOB_KIND)
                yield str(kind), obj

    def create_trainjob(self, namespace: str, manifest: dict[str, Any]) -> bool:
        """Create a TrainJob; False if it exists (409). :class:`Rejected` for 400/403/404/422 (404: no TrainJob CRD)."""
        self.on_request("create", TRAINJOB_PLURAL)
        try:
            self.custom.create_namespaced_custom_object(
                TRAINER_GROUP,
                TRAINER_VERSION,
                namespace,
                TRAINJOB_PLURAL,
                manifest,
                field_manager=FIELD_MANAGER,
                _request_timeout=self.timeout,
            )
        except ApiException as err:
            if err.status == 409:
                return False
            if err.status in (400, 403, 404, 422):
                raise Rejected(f"{err.status} {api_message(err)}") from err
            raise
        return True

    def delete_trainjob(self, namespace: str, name: str) -> bool:
        """Delete a TrainJob (its JobSet and pods follow); False if it was gone."""
        self.on_request("delete", TRAINJOB_PLURAL)
        try:
            self.custom.delete_namespaced_custom_object(
                TRAINER_GROUP,
                TRAINER_VERSION,
                namespace,
                TRAINJOB_PLURAL,
                name,
                propagation_policy="Background",
                _request_timeout=self.timeout,
            )
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    def create_workload(self, namespace: str, manifest: dict[str, Any]) -> bool:
        """Create a Job or a TrainJob, by the manifest's kind."""
        if manifest.get("kind") == TRAINJOB_KIND:
            return self.create_trainjob(namespace, manifest)
        return self.create_job(namespace, manifest)

    def delete_workload(self, kind: str, namespace: str, name: str) -> bool:
        """Delete a Job or a TrainJob."""
        if kind == TRAINJOB_KIND:
            return self.delete_trainjob(namespace, name)
        return self.delete_job(namespace, name)

    # -- Leases (leader election) ---------------------------------------------------------------------------------
    def read_lease(self, namespace: str, name: str) -> Any | None:
        """The coordination.k8s.io/v1 Lease (the client's ``V1Lease``), or None if it does not exist."""
        self.on_request("get", "leases")
        try:
            return self.coordination.read_namespaced_lease(name, namespace, _request_timeout=self.timeout)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def create_lease(self, namespace: str, body: dict[str, Any]) -> bool:
        """Create a Lease; False if one of that name exists already (409: another replica was first)."""
        self.on_request("create", "leases")
        try:
            self.coordination.create_namespaced_lease(namespace, body, _request_timeout=self.timeout)
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        return True

    def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> bool:
        """Replace a Lease (``body`` carries the resourceVersion read); False on 409: it changed in between."""
        self.on_request("update", "leases")
        try:
            self.coordination.replace_namespaced_lease(name, namespace, body, _request_timeout=self.timeout)
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        return True

    # -- InferenceServices (KServe) ------------------------------------------------------------------------------
    def get_inference_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The InferenceService, or None when it (or KServe's CRD) does not exist. :class:`Forbidden` when RBAC does
        not allow reading it (the chart grants it with ``serving.kserve.enabled``)."""
        self.on_request("get", ISVC_PLURAL)
        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
                KSERVE_GROUP, KSERVE_VERSION, namespace, ISVC_PLURAL, name, _request_timeout=self.timeout
            )
        except ApiException as err:
            if err.status == 404:
                return None
            if err.status == 403:
                raise Forbidden(api_message(err)) from err
            raise
        return obj

    def patch_inference_service(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """JSON-merge-patch an InferenceService. A ``metadata.resourceVersion`` in ``patch`` makes it conditional:
        :class:`Conflict` when the object changed since (read it again). :class:`Rejected` for 400/404/422,
        :class:`Forbidden` for 403."""
        self.on_request("patch", ISVC_PLURAL)
        try:
            obj: dict[str, Any] = self.custom.patch_namespaced_custom_object(
                KSERVE_GROUP,
                KSERVE_VERSION,
                namespace,
                ISVC_PLURAL,
                name,
                patch,
                field_manager=FIELD_MANAGER,
                _request_timeout=self.timeout,
                _content_type="application/merge-patch+json",
            )
        except ApiException as err:
            if err.status == 409:
                raise Conflict(api_message(err)) from err
            if err.status == 403:
                raise Forbidden(api_message(err)) from err
            if err.status in (400, 404, 422):
                raise Rejected(f"{err.status} {api_message(err)}") from err
            raise
        return obj

    # -- Secrets and Events --------------------------------------------------------------------------------------
    def secret_exists(self, namespace: str, name: str) -> bool:
        """Whether the Secret exists, read as PartialObjectMetadata: its data never leaves the API server.

        :class:`Forbidden` if RBAC does not allow it (the chart grants ``get`` on this one name only)."""
        self.on_request("get", "secrets")
        try:
            resp = self.core.read_namespaced_secret(
                name,
                namespace,
                _preload_content=False,
                _headers={"Accept": PARTIAL_METADATA},
                _request_timeout=self.timeout,
            )
        except ApiException as err:
            if err.status == 404:
                return False
            if err.status == 403:
                raise Forbidden(api_message(err)) from err
            raise
        resp.release_conn()
        return True


_event_counter = itertools.count()


def event_name(involved: dict[str, Any]) -> str:
    """A unique, valid Event name: the object's name (shortened), a hash of its namespace, name and uid, and a
    timestamp with a per-process counter, so neither long names nor two objects sharing a prefix collide."""
    identity = f"{involved.get('namespace')}/{involved.get('name')}/{involved.get('uid')}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:10]
    base = str(involved.get("name") or "object")[:200].rstrip(".-")
    return f"{base}.{digest}.{time.time_ns():x}{next(_event_counter) % 4096:03x}"


def post_event(kube: Kube, involved: dict[str, Any], type_: str, reason: str, message: str, component: str) -> None:
    """Create a core/v1 Event about ``involved`` (apiVersion, kind, name, namespace, uid). Best effort."""
    from datetime import UTC, datetime

    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": event_name(involved), "namespace": involved["namespace"]},
        "involvedObject": involved,
        "reason": reason,
        "message": message[:1024],
        "type": type_,
        "source": {"component": component},
        "reportingComponent": component,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    kube.on_request("create", "events")
    with contextlib.suppress(ApiException):
        kube.core.create_namespaced_event(
            involved["namespace"], body, field_manager=FIELD_MANAGER, _request_timeout=kube.timeout
        )
