"""Secret handling: a container's environment resolved as kubelet does it (``value``, ``secretKeyRef``,
``configMapKeyRef``, ``fieldRef``, ``envFrom``), from Secrets and ConfigMaps read from the API server."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kubernetes.client.exceptions import ApiException

from langmerge.dev.jobrunner.api import _api_message, _transient
from langmerge.dev.jobrunner.config import CONTAINER_PATH, RunnerConfig
from langmerge.dev.jobrunner.mapping import expand

log = logging.getLogger("langmerge.jobrunner")

_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
_FIELD_SUBSCRIPT = re.compile(r"metadata\.(labels|annotations)\['(.+)'\]")


class ContainerConfigError(Exception):
    """The container's configuration cannot be built (kubelet's ``CreateContainerConfigError``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ObjectSource(Protocol):
    """Where Secrets and ConfigMaps come from: decoded string values, None if the object does not exist."""

    def secret(self, namespace: str, name: str) -> Mapping[str, str] | None: ...

    def config_map(self, namespace: str, name: str) -> Mapping[str, str] | None: ...


@dataclass(frozen=True)
class PodIdentity:
    """What ``fieldRef`` can see of the pseudo pod of one attempt."""

    name: str
    namespace: str
    uid: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    service_account: str = "default"
    node_name: str = "localhost"
    ip: str = "127.0.0.1"


def pod_identity(job: Mapping[str, Any], attempt: int) -> PodIdentity:
    """The pseudo pod ``<job>-<attempt>`` of a Job's attempt."""
    meta = job.get("metadata") or {}
    template = (job.get("spec") or {}).get("template") or {}
    tmeta = template.get("metadata") or {}
    tspec = template.get("spec") or {}
    return PodIdentity(
        name=f"{meta.get('name', '')}-{attempt}",
        namespace=str(meta.get("namespace") or "default"),
        uid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"langmerge-jobrunner:{meta.get('uid', '')}/{attempt}")),
        labels=dict(tmeta.get("labels") or {}),
        annotations=dict(tmeta.get("annotations") or {}),
        service_account=str(tspec.get("serviceAccountName") or tspec.get("serviceAccount") or "default"),
    )


def field_value(path: str, pod: PodIdentity) -> str:
    """The value of a ``fieldRef.fieldPath`` for the pseudo pod."""
    simple = {
        "metadata.name": pod.name,
        "metadata.namespace": pod.namespace,
        "metadata.uid": pod.uid,
        "spec.nodeName": pod.node_name,
        "spec.serviceAccountName": pod.service_account,
        "status.hostIP": pod.ip,
        "status.hostIPs": pod.ip,
        "status.podIP": pod.ip,
        "status.podIPs": pod.ip,
    }
    if path in simple:
        return simple[path]
    m = _FIELD_SUBSCRIPT.fullmatch(path)
    if m:
        source = pod.labels if m.group(1) == "labels" else pod.annotations
        return source.get(m.group(2), "")
    raise ContainerConfigError(f'unsupported fieldPath: "{path}"')


def resolve_env(container: Mapping[str, Any], pod: PodIdentity, source: ObjectSource) -> dict[str, str]:
    """The container's environment as kubelet builds it: ``envFrom`` first, then ``env`` in order.

    Raises :class:`ContainerConfigError` with kubelet's message for a missing non-optional Secret, ConfigMap or key.
    """
    env: dict[str, str] = {}
    secrets: dict[str, Mapping[str, str] | None] = {}
    config_maps: dict[str, Mapping[str, str] | None] = {}

    def get_secret(name: str) -> Mapping[str, str] | None:
        if name not in secrets:
            secrets[name] = source.secret(pod.namespace, name)
        return secrets[name]

    def get_config_map(name: str) -> Mapping[str, str] | None:
        if name not in config_maps:
            config_maps[name] = source.config_map(pod.namespace, name)
        return config_maps[name]

    for item in container.get("envFrom") or []:
        prefix = str(item.get("prefix") or "")
        if item.get("configMapRef") is not None:
            ref, plural, get = item["configMapRef"], "configmaps", get_config_map
        elif item.get("secretRef") is not None:
            ref, plural, get = item["secretRef"], "secrets", get_secret
        else:
            continue
        ref_name = str(ref.get("name") or "")
        data = get(ref_name)
        if data is None:
            if ref.get("optional"):
                continue
            raise ContainerConfigError(f'{plural} "{ref_name}" not found')
        for key, value in data.items():
            name = prefix + key
            if not _ENV_NAME.fullmatch(name):
                log.warning("%s/%s: envFrom skips invalid variable name %r", pod.namespace, pod.name, name)
                continue
            env[name] = value

    for var in container.get("env") or []:
        name = str(var.get("name") or "")
        value_from = var.get("valueFrom")
        value = str(var.get("value") or "")
        if value:
            env[name] = expand(value, env)
            continue
        if not value_from:
            env[name] = ""
            continue
        if value_from.get("fieldRef") is not None:
            env[name] = field_value(str(value_from["fieldRef"].get("fieldPath") or ""), pod)
        elif value_from.get("secretKeyRef") is not None:
            resolved = _key_ref(value_from["secretKeyRef"], "secrets", "Secret", get_secret, pod.namespace)
            if resolved is None:
                continue
            env[name] = resolved
        elif value_from.get("configMapKeyRef") is not None:
            resolved = _key_ref(value_from["configMapKeyRef"], "configmaps", "ConfigMap", get_config_map, pod.namespace)
            if resolved is None:
                continue
            env[name] = resolved
        elif value_from.get("resourceFieldRef") is not None:
            raise ContainerConfigError(f'env "{name}": resourceFieldRef is not supported by the local Job runner')
        else:
            env[name] = ""
    return env


def _key_ref(
    ref: Mapping[str, Any],
    plural: str,
    kind: str,
    get: Callable[[str], Mapping[str, str] | None],
    namespace: str,
) -> str | None:
    name = str(ref.get("name") or "")
    key = str(ref.get("key") or "")
    optional = bool(ref.get("optional"))
    data = get(name)
    if data is None:
        if optional:
            return None
        raise ContainerConfigError(f'{plural} "{name}" not found')
    if key not in data:
        if optional:
            return None
        raise ContainerConfigError(f"couldn't find key {key} in {kind} {namespace}/{name}")
    return data[key]


def child_environment(
    resolved: Mapping[str, str], *, home: Path, tmpdir: Path, hostname: str, config: RunnerConfig
) -> dict[str, str]:
    """The whole environment of a child: a minimal base, then the Job's resolved env, then the runner's extras."""
    python_dir = os.path.dirname(config.python)
    base = {
        "PATH": f"{python_dir}{os.pathsep}{CONTAINER_PATH}" if python_dir else CONTAINER_PATH,
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "TMPDIR": str(tmpdir),
        "HOSTNAME": hostname,
    }
    return {**base, **resolved, **dict(config.extra_env)}


class _ApiObjects:
    """Secrets and ConfigMaps read from the API server (an :class:`ObjectSource`)."""

    def __init__(self, core: Any, timeout: float) -> None:
        self._core = core
        self._timeout = timeout

    def secret(self, namespace: str, name: str) -> Mapping[str, str] | None:
        obj = self._read(self._core.read_namespaced_secret, namespace, name)
        if obj is None:
            return None
        return {k: base64.b64decode(v).decode("utf-8", "surrogateescape") for k, v in (obj.get("data") or {}).items()}

    def config_map(self, namespace: str, name: str) -> Mapping[str, str] | None:
        obj = self._read(self._core.read_namespaced_config_map, namespace, name)
        return None if obj is None else {k: str(v) for k, v in (obj.get("data") or {}).items()}

    def _read(self, fn: Callable[..., Any], namespace: str, name: str) -> dict[str, Any] | None:
        try:
            resp = fn(name, namespace, _preload_content=False, _request_timeout=self._timeout)
        except ApiException as err:
            if err.status == 404:
                return None
            if err.status is not None and 400 <= int(err.status) < 500 and not _transient(err):
                raise ContainerConfigError(_api_message(err)) from err
            raise
        obj: dict[str, Any] = json.loads(resp.data)
        return obj
