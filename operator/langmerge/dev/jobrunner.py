"""The local Job runner: what kubelet and the Job controller would do for our Jobs. Development only.

The local control plane (:mod:`langmerge.dev.controlplane`) has an API server but no kubelet and no Job controller, so a
Job never gets a pod or a status. This runner watches ``batch/v1`` Jobs and, for each unfinished one:

* maps the first container's image to a local command (:class:`ImageRule`): *trainer* images run
  ``langmerge-trainer <args>`` as ``<python> -m langmerge_trainer <args>`` with this project's Python; *host* images run
  ``command + args`` as they are (tests use them). Any other image fails the Job (reason ``ImageNotRunnableLocally``);
* resolves the pod template's environment as kubelet does (``value`` with ``$(VAR)`` expansion, ``secretKeyRef`` and
  ``configMapKeyRef`` from the real objects, ``fieldRef``, ``envFrom``); a missing Secret or key fails the Job with
  kubelet's message (reason ``CreateContainerConfigError``). The child sees only a minimal environment plus that;
* runs the command in a scratch folder ``<work_root>/<namespace>/<job>/<attempt>`` in its own process group, with
  stdout and stderr in ``<logs_dir>/<namespace>_<job>_<attempt>.log``;
* writes the Job's status through ``/status`` like the Job controller (``startTime``, ``active``, ``succeeded``,
  ``failed``, ``completionTime``, ``Complete``/``Failed`` conditions), enforcing ``activeDeadlineSeconds``,
  ``backoffLimit`` and ``podFailurePolicy`` (``FailJob``, ``Ignore`` and ``Count`` rules on the container's exit code
  or on the pseudo pod's ``DisruptionTarget`` condition). API servers before 1.26 (like the local one) drop
  ``spec.podFailurePolicy`` on write, so when the spec has none the runner reads the policy from the Job's
  ``langmerge.dev/pod-failure-policy`` annotation (JSON), which the operator's Job builders also write: a
  development-only path;
* follows suspension as the Job controller does (``spec.suspend``, or on an API server that drops it the
  ``langmerge.dev/suspend`` annotation the operator's builders and :mod:`langmerge.dev.kueue` write): a suspended
  Job does not run; one suspended while it runs gets SIGTERM (the trainer checkpoints), a ``Suspended`` condition
  and no failure; resumed, it runs again;
* runs Kubeflow Trainer TrainJobs (``trainer.kubeflow.org/v1alpha1``, when the API server serves them) as the torch
  runtime would: ``numNodes`` processes of the trainer container (image, command, args, env), each with the
  ``PET_NNODES``/``PET_NPROC_PER_NODE``/``PET_NODE_RANK``/``PET_MASTER_ADDR``/``PET_MASTER_PORT`` variables Kubeflow
  injects (rendezvous on 127.0.0.1, a free port per attempt); a node that fails stops the others and fails the
  TrainJob (the annotation's podFailurePolicy decides the reason; a disrupted attempt runs again), all nodes done
  is ``Complete``;
* emulates disruptions (:meth:`LocalJobRunner.disrupt`: preemption, node drain): the running attempt gets the
  ``DisruptionTarget`` condition and SIGTERM, then SIGKILL after the grace period, as kubelet does;
* maps the container's termination message file to ``<attempt folder>/termination-log``, named to the process in
  ``LANGMERGE_TERMINATION_MESSAGE_PATH`` (the trainer writes there; Kubernetes would mount the file at
  ``terminationMessagePath``). With no pods to keep it in, the last attempt's message (or, with
  ``terminationMessagePolicy: FallbackToLogsOnError``, its log tail) is appended to the Job's Failed condition.

At most :attr:`RunnerConfig.parallel` Jobs run at once; the others wait in order of creation (``active`` is set only
while a Job's process runs). A Job deleted while it runs has its process group killed. Stopping the runner kills its
children and leaves their Jobs ``active``; the next runner on the same work folder starts them again, like pods
rescheduled after a node loss (it also kills processes a crashed runner left behind).

As on a cluster, ``command`` and ``args`` get ``$(VAR)`` expansion from the container's env, and ``$$`` is the escape
for ``$`` (a shell's ``$$`` is written ``$$$$``). Not emulated: volumes and ``volumeMounts`` (use env for paths; the
runner's ``extra_env`` can point them at local folders), ``workingDir`` (the scratch folder is the working directory),
resources and GPUs, init and sidecar containers (init containers are refused; only the first container runs),
and pod objects (none are created).

One runner per cluster scope: two runners watching the same Jobs would both run them. Use :attr:`RunnerConfig.namespace`
or :attr:`RunnerConfig.label_selector` to split the work. Never point it at a shared cluster: it executes what Jobs say.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import fcntl
import fnmatch
import functools
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol, TypeVar
from urllib.parse import urlparse

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from langmerge.constants import (
    ANNOTATION_POD_FAILURE_POLICY,
    ANNOTATION_SUSPEND,
    TRAINER_COMMAND,
    TRAINER_GROUP,
    TRAINER_VERSION,
    TRAINJOB_KIND,
    TRAINJOB_PLURAL,
)

log = logging.getLogger("langmerge.jobrunner")

Mode = Literal["trainer", "host"]
T = TypeVar("T")

#: The kinds the runner runs.
JOB = "Job"
TRAINJOB = TRAINJOB_KIND

#: Default pattern of trainer images, matched against the image's repository (no tag, no digest).
DEFAULT_TRAINER_PATTERN = "*langmerge*trainer*"
#: The conventional host image of tests: its ``command + args`` run as they are (enable it with an :class:`ImageRule`).
HOST_IMAGE = "langmerge.local/host"
#: The trainer's Python module inside the trainer image.
TRAINER_MODULE = "langmerge_trainer"
#: A container's default PATH; the runner's Python folder goes first so ``python`` is the project's.
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Condition reasons.
REASON_COMPLETE = "CompletionsReached"
REASON_BACKOFF_LIMIT = "BackoffLimitExceeded"
REASON_DEADLINE = "DeadlineExceeded"
REASON_IMAGE = "ImageNotRunnableLocally"
REASON_COMMAND = "CommandNotRunnableLocally"
REASON_CONFIG = "CreateContainerConfigError"
REASON_UNSUPPORTED = "UnsupportedByLocalRunner"
REASON_POD_FAILURE_POLICY = "PodFailurePolicy"

#: The environment variable naming the file the process writes its termination message to.
TERMINATION_MESSAGE_ENV = "LANGMERGE_TERMINATION_MESSAGE_PATH"
#: Kubernetes keeps at most this many bytes of a termination message, and a log tail of at most this many lines.
TERMINATION_MESSAGE_MAX_BYTES = 4096
TERMINATION_LOG_TAIL_BYTES = 2048
TERMINATION_LOG_TAIL_LINES = 80

MESSAGE_COMPLETE = "Reached expected number of succeeded pods"
MESSAGE_BACKOFF_LIMIT = "Job has reached the specified backoff limit"
MESSAGE_DEADLINE = "Job was active longer than specified deadline"

#: Kubernetes' default ``spec.backoffLimit``.
DEFAULT_BACKOFF_LIMIT = 6

_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
_PYTHON = re.compile(r"python[0-9.]*")
_FIELD_SUBSCRIPT = re.compile(r"metadata\.(labels|annotations)\['(.+)'\]")
_HAVE_WAITID = hasattr(os, "waitid") and hasattr(os, "WNOWAIT")


class RunnerError(RuntimeError):
    """The runner cannot start (bad configuration, work folder already in use)."""


# ---------------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRule:
    """Images whose repository (the reference without ``:tag`` or ``@digest``) matches ``pattern`` run in ``mode``.

    ``pattern`` is a case-sensitive shell pattern (``fnmatch``; ``*`` also matches ``/``).
    """

    pattern: str
    mode: Mode


@dataclass(frozen=True)
class RunnerConfig:
    """How the local Job runner maps, runs and reports Jobs."""

    #: Root of the scratch folders: ``<work_root>/<namespace>/<job>/<attempt>``. One runner per folder (locked).
    work_root: Path
    #: Folder of the attempt logs ``<namespace>_<job>_<attempt>.log`` (default ``<work_root>/_logs``).
    logs_dir: Path | None = None
    #: Most Jobs running at once; the others wait in order of creation.
    parallel: int = 1
    #: Run only Jobs in this namespace (None: all namespaces).
    namespace: str | None = None
    #: Run only Jobs matching this label selector (None: all Jobs).
    label_selector: str | None = None
    #: Image -> mode; the first matching rule wins; an image no rule matches fails its Job.
    image_rules: tuple[ImageRule, ...] = (ImageRule(DEFAULT_TRAINER_PATTERN, "trainer"),)
    #: The Python that runs trainer Jobs (``<python> -m <trainer_module>``); its folder leads the children's PATH.
    python: str = sys.executable
    #: Module run for ``langmerge-trainer`` in trainer mode.
    trainer_module: str = TRAINER_MODULE
    #: The trainer image's entrypoint, as Jobs name it in ``command``.
    trainer_command: str = TRAINER_COMMAND
    #: Extra environment of every child, applied last (over the Job's env): e.g. a shared model cache folder.
    extra_env: tuple[tuple[str, str], ...] = (("PYTHONUNBUFFERED", "1"),)
    #: Seconds between full re-lists of Jobs, the fallback for anything a watch missed.
    resync_seconds: float = 30.0
    #: Server-side timeout of one watch request (seconds); the client's read timeout is 10 s longer.
    watch_timeout_seconds: int = 60
    #: Connect and read timeout of every other API request (seconds).
    request_timeout_seconds: float = 15.0
    #: Seconds between SIGTERM and SIGKILL when a process group is stopped.
    kill_grace_seconds: float = 5.0
    #: Delay before re-running a failed attempt; it doubles per failure up to ``retry_delay_max_seconds``.
    retry_delay_seconds: float = 1.0
    #: Longest delay between attempts.
    retry_delay_max_seconds: float = 60.0
    #: How often a running process is checked for exit, deadline and cancellation (seconds).
    poll_seconds: float = 0.1
    #: Also run Kubeflow Trainer TrainJobs (``trainer.kubeflow.org/v1alpha1``) when the API server serves them.
    trainjobs: bool = True

    def __post_init__(self) -> None:
        if self.parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {self.parallel}")
        for name in ("resync_seconds", "request_timeout_seconds", "poll_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.watch_timeout_seconds < 1:
            raise ValueError("watch_timeout_seconds must be >= 1")
        for name in ("kill_grace_seconds", "retry_delay_seconds", "retry_delay_max_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for rule in self.image_rules:
            if rule.mode not in ("trainer", "host"):
                raise ValueError(f"image rule {rule.pattern!r}: mode must be 'trainer' or 'host', got {rule.mode!r}")
        for key, _ in self.extra_env:
            if not key or "=" in key:
                raise ValueError(f"extra_env: invalid variable name {key!r}")

    @property
    def logs_path(self) -> Path:
        return self.logs_dir if self.logs_dir is not None else self.work_root / "_logs"

    def attempt_dir(self, namespace: str, job: str, attempt: int) -> Path:
        """The scratch folder (working directory) of one attempt."""
        return self.work_root / namespace / job / str(attempt)

    def attempt_log(self, namespace: str, job: str, attempt: int) -> Path:
        """The log file (stdout and stderr) of one attempt."""
        return self.logs_path / f"{namespace}_{job}_{attempt}.log"


# ---------------------------------------------------------------------------------------------------------------------
# Pure parts: image mapping, command mapping, $(VAR) expansion
# ---------------------------------------------------------------------------------------------------------------------
class NotRunnable(Exception):
    """The Job cannot run locally; ``reason`` and ``message`` go into its ``Failed`` condition."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def image_repository(image: str) -> str:
    """``registry:5000/org/name:tag@sha256:...`` -> ``registry:5000/org/name``."""
    ref = image.split("@", 1)[0]
    colon = ref.rfind(":")
    if colon > ref.rfind("/"):
        ref = ref[:colon]
    return ref


def match_image(image: str, rules: Sequence[ImageRule]) -> Mode | None:
    """The mode of the first rule whose pattern matches the image's repository, else None."""
    repository = image_repository(image.strip())
    for rule in rules:
        if fnmatch.fnmatchcase(repository, rule.pattern):
            return rule.mode
    return None


def plan_command(container: Mapping[str, Any], config: RunnerConfig) -> tuple[Mode, list[str]]:
    """The local argv of a container (before ``$(VAR)`` expansion); :class:`NotRunnable` if there is none."""
    image = str(container.get("image") or "")
    name = str(container.get("name") or "")
    mode = match_image(image, config.image_rules)
    if mode is None:
        patterns = ", ".join(repr(r.pattern) for r in config.image_rules) or "none"
        raise NotRunnable(
            REASON_IMAGE,
            f'image "{image}" of container "{name}" cannot run on the local Job runner: it runs only images whose '
            f"repository matches one of its image rules ({patterns})",
        )
    command = [str(x) for x in container.get("command") or []]
    args = [str(x) for x in container.get("args") or []]
    if mode == "host":
        if not command:
            raise NotRunnable(
                REASON_IMAGE,
                f'image "{image}" runs host commands on the local Job runner, but container "{name}" sets no '
                "command (a host image has no entrypoint)",
            )
        return mode, command + args
    tail = _trainer_tail(command, config)
    if tail is None:
        raise NotRunnable(
            REASON_COMMAND,
            f'container "{name}" of trainer image "{image}" runs {command!r}; the local Job runner runs only '
            f'"{config.trainer_command} ..." (or the image entrypoint with args) in trainer images',
        )
    return mode, [config.python, "-m", config.trainer_module, *tail, *args]


def _trainer_tail(command: list[str], config: RunnerConfig) -> list[str] | None:
    """The trainer's arguments within ``command``; None if ``command`` does not run the trainer."""
    if not command:
        return []  # the image's entrypoint is the trainer
    program = os.path.basename(command[0])
    if program == config.trainer_command:
        return command[1:]
    if (
        _PYTHON.fullmatch(program)
        and command[1:2] == ["-m"]
        and command[2:3] in ([TRAINER_MODULE], [config.trainer_module])
    ):
        return command[3:]
    return None


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined variables are replaced, ``$$`` is a literal ``$``, the rest is kept."""
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(text):
        if text[cursor] == "$" and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            nxt = text[cursor + 1]
            advance = 1
            if nxt == "$":
                out.append("$")
            elif nxt == "(":
                close = text.find(")", cursor + 2)
                if close == -1:
                    out.append("$(")
                else:
                    var = text[cursor + 2 : close]
                    out.append(env.get(var, f"$({var})"))
                    advance = close - cursor
            else:
                out.append("$" + nxt)
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    out.append(text[checkpoint:])
    return "".join(out)


# ---------------------------------------------------------------------------------------------------------------------
# Pure parts: podFailurePolicy
# ---------------------------------------------------------------------------------------------------------------------
def pod_failure_policy(job: Mapping[str, Any]) -> dict[str, Any] | None:
    """The Job's ``spec.podFailurePolicy``, else the one in its ``langmerge.dev/pod-failure-policy`` annotation."""
    policy = (job.get("spec") or {}).get("podFailurePolicy")
    if policy:
        return dict(policy)
    raw = ((job.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_POD_FAILURE_POLICY)
    if not raw:
        return None
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as err:
        log.warning("annotation %s is not JSON (%s); no podFailurePolicy", ANNOTATION_POD_FAILURE_POLICY, err)
        return None
    return parsed if isinstance(parsed, dict) else None


def container_exit_code(code: int) -> int:
    """The exit code Kubernetes reports for a process: 128 + the signal for a process killed by one."""
    return 128 - code if code < 0 else code


def match_pod_failure_policy(
    policy: Mapping[str, Any] | None,
    *,
    pod: str,
    container: str,
    exit_code: int,
    conditions: Sequence[Mapping[str, str]],
) -> tuple[str, str] | None:
    """The (action, message) of the first rule matching a failed pod, as the Job controller words it; None if none.

    ``exit_code`` is the container's (see :func:`container_exit_code`); ``conditions`` are the pod's conditions.
    """
    for index, rule in enumerate((policy or {}).get("rules") or []):
        action = str(rule.get("action") or "")
        codes = rule.get("onExitCodes")
        if codes:
            if codes.get("containerName") not in (None, container) or exit_code == 0:
                continue
            values = {int(v) for v in codes.get("values") or []}
            inside = exit_code in values
            if inside == (codes.get("operator") == "In"):
                return action, (
                    f"Container {container} for pod {pod} failed with exit code {exit_code} matching {action} rule "
                    f"at index {index}"
                )
            continue
        for pattern in rule.get("onPodConditions") or []:
            wanted = (pattern.get("type"), pattern.get("status", "True"))
            if any((c.get("type"), c.get("status")) == wanted for c in conditions):
                return action, f"Pod {pod} has condition {wanted[0]} matching {action} rule at index {index}"
    return None


def termination_message(path: Path, log_path: Path, *, fallback_to_logs: bool) -> str:
    """What kubelet would keep as the container's termination message: the file's first 4 KiB, or (with
    ``FallbackToLogsOnError``, for a failed container that wrote none) the log's last 80 lines / 2 KiB."""
    text = ""
    with contextlib.suppress(OSError):
        text = path.read_bytes()[:TERMINATION_MESSAGE_MAX_BYTES].decode("utf-8", "replace").strip()
    if text or not fallback_to_logs:
        return text
    with contextlib.suppress(OSError):
        data = log_path.read_bytes()[-TERMINATION_LOG_TAIL_BYTES:]
        text = "\n".join(data.decode("utf-8", "replace").splitlines()[-TERMINATION_LOG_TAIL_LINES:]).strip()
    return text


# ---------------------------------------------------------------------------------------------------------------------
# Pure parts: environment resolution
# ---------------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------------
# Pure parts: Job status, as the Job controller writes it
# ---------------------------------------------------------------------------------------------------------------------
def rfc3339(epoch: float | None = None) -> str:
    """A Kubernetes timestamp (UTC, whole seconds)."""
    moment = dt.datetime.fromtimestamp(time.time() if epoch is None else epoch, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(value: str) -> float:
    """Seconds since the epoch of a Kubernetes timestamp."""
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def job_finished(job: Mapping[str, Any]) -> str | None:
    """``"Complete"`` or ``"Failed"`` if the Job has that condition set to True, else None."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return str(cond["type"])
    return None


def is_suspended(job: Mapping[str, Any]) -> bool:
    """``spec.suspend``; where the API server dropped it (before 1.21), the ``langmerge.dev/suspend`` annotation."""
    spec = job.get("spec") or {}
    if "suspend" in spec:
        return bool(spec.get("suspend"))
    return ((job.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_SUSPEND) == "true"


def wants_to_run(job: Mapping[str, Any]) -> bool:
    """Unfinished, not being deleted, not suspended and not paused (``parallelism: 0``)."""
    spec = job.get("spec") or {}
    return (
        job_finished(job) is None
        and not (job.get("metadata") or {}).get("deletionTimestamp")
        and not is_suspended(job)
        and spec.get("parallelism") != 0
    )


def unsupported_reason(job: Mapping[str, Any]) -> str | None:
    """Why the local runner cannot run this Job's shape, or None."""
    spec = job.get("spec") or {}
    pod = (spec.get("template") or {}).get("spec") or {}
    completions, parallelism = spec.get("completions"), spec.get("parallelism")
    if completions not in (None, 1) or parallelism not in (None, 1):
        return (
            "the local Job runner runs only Jobs with completions=1 and parallelism=1; "
            f"this Job has completions={completions}, parallelism={parallelism}"
        )
    if spec.get("completionMode") not in (None, "NonIndexed"):
        return f"the local Job runner does not support completionMode={spec.get('completionMode')}"
    if pod.get("initContainers"):
        return "the local Job runner does not run initContainers"
    if not pod.get("containers"):
        return "the Job's pod template has no containers"
    return None


def condition(kind: str, reason: str, message: str, now: str) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastProbeTime": now,
        "lastTransitionTime": now,
    }


def _with_condition(conditions: Sequence[Mapping[str, Any]] | None, new: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(c) for c in conditions or [] if c.get("type") != new["type"]] + [new]


def status_started(status: Mapping[str, Any], now: str) -> dict[str, Any]:
    """Status patch when an attempt starts (``startTime`` only the first time)."""
    patch: dict[str, Any] = {"active": 1}
    if not status.get("startTime"):
        patch["startTime"] = now
    return patch


def status_suspended(status: Mapping[str, Any], now: str) -> dict[str, Any]:
    """Status patch of a Job suspended while it ran (Kueue preempted it): no pod runs, nothing failed."""
    cond = {**condition("Suspended", "JobSuspended", "Job suspended", now)}
    return {"active": None, "conditions": _with_condition(status.get("conditions"), cond)}


def status_resumed(status: Mapping[str, Any], now: str) -> dict[str, Any]:
    """Status patch of a suspended Job that runs again (its ``startTime`` restarts, as on a cluster)."""
    cond = {**condition("Suspended", "JobResumed", "Job resumed", now), "status": "False"}
    return {"active": 1, "startTime": now, "conditions": _with_condition(status.get("conditions"), cond)}


def was_suspended(status: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Suspended" and c.get("status") == "True" for c in status.get("conditions") or [])


def status_retrying(failed: int) -> dict[str, Any]:
    """Status patch after a failed attempt that will be re-run."""
    return {"failed": failed, "active": 1}


def status_complete(status: Mapping[str, Any], now: str) -> dict[str, Any]:
    """Status patch of a Job whose attempt succeeded."""
    patch: dict[str, Any] = {
        "active": None,
        "succeeded": 1,
        "completionTime": now,
        "conditions": _with_condition(
            status.get("conditions"), condition("Complete", REASON_COMPLETE, MESSAGE_COMPLETE, now)
        ),
    }
    if not status.get("startTime"):
        patch["startTime"] = now
    return patch


def status_failed(
    status: Mapping[str, Any], reason: str, message: str, now: str, *, failed: int | None = None
) -> dict[str, Any]:
    """Status patch of a Job that failed for good (``failed`` is the new count of failed attempts, if it changed)."""
    patch: dict[str, Any] = {
        "active": None,
        "conditions": _with_condition(status.get("conditions"), condition("Failed", reason, message, now)),
    }
    if failed is not None:
        patch["failed"] = failed
    if not status.get("startTime"):
        patch["startTime"] = now
    return patch


# ---------------------------------------------------------------------------------------------------------------------
# API plumbing
# ---------------------------------------------------------------------------------------------------------------------
def _transient(err: BaseException) -> bool:
    """Worth retrying: the API server is unreachable, restarting or overloaded."""
    if isinstance(err, ApiException):
        return err.status in (None, 0, 408, 429) or int(err.status) >= 500
    return isinstance(err, urllib3.exceptions.HTTPError | OSError | json.JSONDecodeError)


def _api_message(err: ApiException) -> str:
    with contextlib.suppress(ValueError, TypeError):
        return str(json.loads(err.body)["message"])
    return f"{err.status} {err.reason}"


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


def _iter_lines(resp: Any) -> Iterator[bytes]:
    buffer = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


class _Gone(Exception):
    """The Job was deleted (or replaced by another with the same name)."""


class _Cancelled(Exception):
    """The worker was told to stop."""


# ---------------------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------------------
def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the process has exited, without reaping it (so its process group id stays valid for a final kill)."""
    if _HAVE_WAITID:
        try:
            return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True
    return proc.poll() is not None


def _proc_start_ticks(pid: int) -> int | None:
    """The start time of a live process (Linux ``/proc``), to tell it apart from a later process with the same PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            return None
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _with_last_words(message: str, last_words: str) -> str:
    """A Failed condition's message with the last attempt's termination message on one line."""
    if not last_words:
        return message
    return f"{message}; termination message: {' | '.join(line.strip() for line in last_words.splitlines() if line.strip())}"


def _exit_description(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


# ---------------------------------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------------------------------
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


class _Worker:
    """Runs one Job: its attempts one after another, and its status."""

    def __init__(self, runner: LocalJobRunner, job: dict[str, Any]) -> None:
        meta = job["metadata"]
        self.runner = runner
        self.config = runner.config
        self.uid: str = meta["uid"]
        self.namespace: str = meta.get("namespace") or "default"
        self.name: str = meta["name"]
        self.job = job
        self.kind = JOB
        self._cancel = threading.Event()
        self.cancel_reason = ""
        self._disrupted = threading.Event()
        self._disruption = ""
        self.thread = threading.Thread(target=self._main, name=f"job {self.namespace}/{self.name}", daemon=True)

    def observe(self, job: dict[str, Any]) -> None:
        self.job = job

    def cancel(self, reason: str) -> None:
        if not self._cancel.is_set():
            self.cancel_reason = reason
            self._cancel.set()

    def disrupt(self, reason: str) -> None:
        """Give the running attempt the DisruptionTarget condition and stop it (SIGTERM, then SIGKILL)."""
        self._disruption = reason
        self._disrupted.set()

    def _take_disruption(self) -> str:
        """The reason the attempt that just ended was disrupted ("" if it was not); clears it."""
        if not self._disrupted.is_set():
            return ""
        self._disrupted.clear()
        return self._disruption or "Disrupted"

    @property
    def _status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.job.get("status") or {}
        return status

    # -- main --------------------------------------------------------------------------------------------------------
    def _main(self) -> None:
        closed = False
        try:
            closed = self._run()
        except _Gone:
            log.info("Job %s/%s is gone", self.namespace, self.name)
            closed = True
        except _Cancelled:
            log.info("Job %s/%s: stopped (%s)", self.namespace, self.name, self.cancel_reason)
            closed = self.cancel_reason == "deleted"
        except Exception:
            log.exception("Job %s/%s: the local runner failed; it will be retried", self.namespace, self.name)
        finally:
            self.runner._worker_done(self, closed)

    def _run(self) -> bool:
        """Run the Job to its end; True when it is finished (or gone) for this runner."""
        job = self._call(self._read)
        if job is None or job["metadata"].get("uid") != self.uid:
            raise _Gone
        self.job = job
        if job_finished(job) is not None:
            return True
        if not wants_to_run(job):
            return False
        problem = unsupported_reason(job)
        if problem:
            self._fail(REASON_UNSUPPORTED, problem)
            return True
        container: dict[str, Any] = job["spec"]["template"]["spec"]["containers"][0]
        if len(job["spec"]["template"]["spec"]["containers"]) > 1:
            log.warning("Job %s/%s: only the first container runs locally", self.namespace, self.name)
        try:
            _, argv = plan_command(container, self.config)
        except NotRunnable as err:
            self._fail(err.reason, err.message)
            return True

        started_at = time.time()
        if was_suspended(self._status):  # Kueue admitted it again after a preemption
            self._patch(status_resumed(self._status, rfc3339(started_at)))
        if self._status.get("startTime"):
            started_at = parse_rfc3339(self._status["startTime"])
        if self._status.get("active") != 1 or not self._status.get("startTime"):
            self._patch(status_started(self._status, rfc3339()))
        failed = int(self._status.get("failed") or 0)
        delay = self.config.retry_delay_seconds
        while True:
            if self._deadline_passed(started_at):
                self._fail(REASON_DEADLINE, MESSAGE_DEADLINE)
                return True
            attempt = self._claim_attempt(failed)
            pod = pod_identity(self.job, attempt)
            objects = _ApiObjects(self.runner._core, self.config.request_timeout_seconds)
            try:
                resolved = self._call(functools.partial(resolve_env, container, pod, objects))
            except ContainerConfigError as err:
                self._fail(REASON_CONFIG, err.message)
                return True
            workdir = self.config.attempt_dir(self.namespace, self.name, attempt)
            env = child_environment(
                resolved, home=workdir, tmpdir=workdir / "tmp", hostname=pod.name, config=self.config
            )
            message_file = workdir / "termination-log"
            message_file.touch()
            env[TERMINATION_MESSAGE_ENV] = str(message_file)
            command = [expand(arg, resolved) for arg in argv]
            outcome = self._run_attempt(command, env, attempt, started_at)
            disruption = self._take_disruption()
            log_path = self.config.attempt_log(self.namespace, self.name, attempt)
            if outcome == "deadline":
                self._fail(REASON_DEADLINE, MESSAGE_DEADLINE, failed=failed + 1)
                return True
            if outcome == "suspended":
                log.info("Job %s/%s: suspended while attempt %d ran; it runs again once resumed", *self._id(attempt))
                self._patch(status_suspended(self._status, rfc3339()))
                return False
            if outcome == 0:
                log.info("Job %s/%s: attempt %d succeeded", self.namespace, self.name, attempt)
                self._patch(status_complete(self._status, rfc3339()))
                return True
            assert isinstance(outcome, int)
            ended = _exit_description(outcome) + (f" after a disruption ({disruption})" if disruption else "")
            log.info("Job %s/%s: attempt %d %s", self.namespace, self.name, attempt, ended)
            fallback = container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
            last_words = termination_message(message_file, log_path, fallback_to_logs=fallback)
            conditions = [{"type": "DisruptionTarget", "status": "True", "reason": disruption}] if disruption else []
            matched = match_pod_failure_policy(
                pod_failure_policy(self.job),
                pod=f"{pod.namespace}/{pod.name}",
                container=str(container.get("name") or ""),
                exit_code=container_exit_code(outcome),
                conditions=conditions,
            )
            if matched is not None and matched[0] == "FailJob":
                self._fail(REASON_POD_FAILURE_POLICY, _with_last_words(matched[1], last_words), failed=failed + 1)
                return True
            if matched is not None and matched[0] == "Ignore":
                log.info("Job %s/%s: not counted against backoffLimit: %s", self.namespace, self.name, matched[1])
                self._sleep(self.config.retry_delay_seconds, started_at)
                continue
            failed += 1
            limit = self._backoff_limit()
            if failed > limit:
                detail = f" ({failed} failed attempts; the last {ended}, log: {log_path})"
                self._fail(
                    REASON_BACKOFF_LIMIT, _with_last_words(MESSAGE_BACKOFF_LIMIT + detail, last_words), failed=failed
                )
                return True
            self._patch(status_retrying(failed))
            self._sleep(delay, started_at)
            delay = min(delay * 2, self.config.retry_delay_max_seconds)

    # -- one attempt -------------------------------------------------------------------------------------------------
    def _claim_attempt(self, first: int) -> int:
        """The first attempt number >= ``first`` whose scratch folder does not exist yet (created now)."""
        for attempt in itertools.count(first):
            path = self.config.attempt_dir(self.namespace, self.name, attempt)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                path.mkdir()
            except FileExistsError:
                continue
            (path / "tmp").mkdir()
            return attempt
        raise AssertionError("unreachable")

    def _id(self, attempt: int) -> tuple[str, str, int]:
        return self.namespace, self.name, attempt

    def _run_attempt(self, argv: list[str], env: dict[str, str], attempt: int, started_at: float) -> int | str:
        """Run one process; its exit code (negative: killed by that signal), ``"deadline"`` or ``"suspended"``."""
        workdir = self.config.attempt_dir(self.namespace, self.name, attempt)
        log_path = self.config.attempt_log(self.namespace, self.name, attempt)
        log.info("Job %s/%s: attempt %d runs %s (log %s)", self.namespace, self.name, attempt, argv, log_path)
        with log_path.open("ab") as out:
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as err:
                out.write(f"langmerge jobrunner: cannot start {argv[0]!r}: {err}\n".encode())
                return 126 if isinstance(err, PermissionError) else 127
        pid_file = self.runner._pids_dir / f"{self.namespace}_{self.name}_{attempt}.json"
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(json.dumps({"pid": proc.pid, "start": _proc_start_ticks(proc.pid)}))
        try:
            while True:
                if _exited(proc):
                    _killpg(proc.pid, signal.SIGKILL)  # whatever the main process left behind in its group
                    return proc.wait()
                if self._cancel.is_set():
                    self._terminate(proc)
                    raise _Cancelled
                if self._disrupted.is_set():
                    log.info(
                        "Job %s/%s: disrupting attempt %d (%s)", self.namespace, self.name, attempt, self._disruption
                    )
                    self._terminate(proc)
                    return proc.wait()
                if self._deadline_passed(started_at):
                    log.info("Job %s/%s: deadline exceeded, killing attempt %d", self.namespace, self.name, attempt)
                    self._terminate(proc)
                    return "deadline"
                if is_suspended(self.job):  # SIGTERM (the process may checkpoint), SIGKILL after the grace period
                    self._terminate(proc)
                    return "suspended"
                self._cancel.wait(self.config.poll_seconds)
        finally:
            pid_file.unlink(missing_ok=True)

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM to the process group, SIGKILL after the grace period, then reap."""
        _killpg(proc.pid, signal.SIGTERM)
        limit = time.monotonic() + self.config.kill_grace_seconds
        while not _exited(proc) and time.monotonic() < limit:
            time.sleep(0.02)
        _killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    # -- spec --------------------------------------------------------------------------------------------------------
    def _backoff_limit(self) -> int:
        value = (self.job.get("spec") or {}).get("backoffLimit")
        return DEFAULT_BACKOFF_LIMIT if value is None else int(value)

    def _deadline_passed(self, started_at: float) -> bool:
        seconds = (self.job.get("spec") or {}).get("activeDeadlineSeconds")
        return seconds is not None and time.time() >= started_at + float(seconds)

    def _sleep(self, seconds: float, started_at: float) -> None:
        limit = time.monotonic() + seconds
        while time.monotonic() < limit and not self._deadline_passed(started_at):
            if self._cancel.wait(min(self.config.poll_seconds, max(0.0, limit - time.monotonic()))):
                raise _Cancelled

    # -- API ---------------------------------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], T]) -> T:
        """Call ``fn``, retrying while the API server is unreachable; :class:`_Cancelled` once cancelled."""
        delay = 0.2
        while True:
            if self._cancel.is_set():
                raise _Cancelled
            try:
                return fn()
            except Exception as err:
                if not _transient(err):
                    raise
                log.warning("Job %s/%s: API call failed (%s); retrying", self.namespace, self.name, err)
            if self._cancel.wait(delay):
                raise _Cancelled
            delay = min(delay * 2, 5.0)

    def _read(self) -> dict[str, Any] | None:
        try:
            resp = self.runner._batch.read_namespaced_job(
                self.name, self.namespace, _preload_content=False, _request_timeout=self.config.request_timeout_seconds
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        job: dict[str, Any] = json.loads(resp.data)
        return job

    def _patch(self, status: dict[str, Any]) -> None:
        """Merge-patch the Job's status (guarded by its uid); :class:`_Gone` if the Job is no longer there."""

        def call() -> dict[str, Any]:
            try:
                resp = self.runner._batch.patch_namespaced_job_status(
                    self.name,
                    self.namespace,
                    {"metadata": {"uid": self.uid}, "status": status},
                    _content_type="application/merge-patch+json",
                    _preload_content=False,
                    _request_timeout=self.config.request_timeout_seconds,
                )
            except ApiException as err:
                if err.status == 404 or (err.status == 422 and "metadata.uid" in str(err.body)):
                    raise _Gone from err
                raise
            obj: dict[str, Any] = json.loads(resp.data)
            return obj

        self.job = self._call(call)

    def _fail(self, reason: str, message: str, *, failed: int | None = None) -> None:
        log.info("Job %s/%s failed: %s: %s", self.namespace, self.name, reason, message)
        self._patch(status_failed(self._status, reason, message, rfc3339(), failed=failed))


# ---------------------------------------------------------------------------------------------------------------------
# TrainJobs: what Kubeflow Trainer's torch runtime would do, one local process per node
# ---------------------------------------------------------------------------------------------------------------------
#: Condition reasons of a TrainJob run locally.
REASON_TRAINJOB_COMPLETE = "JobsCompleted"
MESSAGE_TRAINJOB_COMPLETE = "TrainJob completed"
MESSAGE_TRAINJOB_SUSPENDED = "TrainJob is suspended"
MESSAGE_TRAINJOB_RESUMED = "TrainJob is resumed"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the rendezvous port of one attempt)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def trainjob_layout(trainjob: Mapping[str, Any]) -> tuple[int, int]:
    """(numNodes, numProcPerNode) of a TrainJob's trainer (1 and 1 when unset; ``auto`` is 1 on this CPU host)."""
    trainer = (trainjob.get("spec") or {}).get("trainer") or {}
    nodes = int(trainer.get("numNodes") or 1)
    per_node = trainer.get("numProcPerNode")
    procs = int(per_node) if isinstance(per_node, int) or (isinstance(per_node, str) and per_node.isdigit()) else 1
    return nodes, procs


def trainjob_container(trainjob: Mapping[str, Any]) -> dict[str, Any]:
    """The trainer container of a TrainJob as the torch runtime builds it: the trainer's image, command, args and
    env, plus the env of the runtime patches' ``node`` container."""
    spec = trainjob.get("spec") or {}
    trainer = spec.get("trainer") or {}
    env = list(trainer.get("env") or [])
    for patch in spec.get("runtimePatches") or []:
        template = ((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}
        for job in template.get("replicatedJobs") or []:
            pod = (((job.get("template") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
            for container in pod.get("containers") or []:
                if container.get("name") == TRAINJOB_NODE:
                    env += list(container.get("env") or [])
    return {
        "name": TRAINJOB_NODE,
        "image": trainer.get("image") or "",
        "command": list(trainer.get("command") or []),
        "args": list(trainer.get("args") or []),
        "env": env,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def torch_env(*, nodes: int, per_node: int, node_rank: int, port: int) -> dict[str, str]:
    """What Kubeflow Trainer's torch plugin injects into the node containers (torchrun reads ``PET_*``)."""
    return {
        "PET_NNODES": str(nodes),
        "PET_NPROC_PER_NODE": str(per_node),
        "PET_NODE_RANK": str(node_rank),
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(port),
    }


def trainjob_condition(
    status: Mapping[str, Any], kind: str, value: str, reason: str, message: str, now: str
) -> list[Any]:
    cond = {"type": kind, "status": value, "reason": reason, "message": message, "lastTransitionTime": now}
    return [dict(c) for c in status.get("conditions") or [] if c.get("type") != kind] + [cond]


#: The torch runtime's trainer container (and replicated job) name.
TRAINJOB_NODE = "node"


class _TrainJobWorker(_Worker):
    """Runs one TrainJob: ``numNodes`` local processes (each the trainer's launcher with ``numProcPerNode`` workers)
    joined by torchrun's rendezvous on 127.0.0.1, with the variables Kubeflow Trainer injects. A node that fails
    stops the others; the TrainJob then fails (a JobSet without restarts), except that a disrupted attempt (the
    ``Ignore`` rule of the podFailurePolicy in its annotation) runs again. Suspension (Kueue) stops the nodes with
    SIGTERM (they checkpoint) and records a ``Suspended`` condition; unsuspended, the TrainJob runs again."""

    def __init__(self, runner: LocalJobRunner, job: dict[str, Any]) -> None:
        super().__init__(runner, job)
        self.kind = TRAINJOB
        self._culprit: int | None = None

    # -- API
    def _read(self) -> dict[str, Any] | None:
        try:
            resp = self.runner._custom.get_namespaced_custom_object(
                TRAINER_GROUP,
                TRAINER_VERSION,
                self.namespace,
                TRAINJOB_PLURAL,
                self.name,
                _preload_content=False,
                _request_timeout=self.config.request_timeout_seconds,
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        job: dict[str, Any] = json.loads(resp.data)
        return job

    def _patch(self, status: dict[str, Any]) -> None:
        def call() -> dict[str, Any]:
            try:
                resp = self.runner._custom.patch_namespaced_custom_object_status(
                    TRAINER_GROUP,
                    TRAINER_VERSION,
                    self.namespace,
                    TRAINJOB_PLURAL,
                    self.name,
                    {"metadata": {"uid": self.uid}, "status": status},
                    _content_type="application/merge-patch+json",
                    _preload_content=False,
                    _request_timeout=self.config.request_timeout_seconds,
                )
            except ApiException as err:
                if err.status == 404 or (err.status == 422 and "metadata.uid" in str(err.body)):
                    raise _Gone from err
                raise
            obj: dict[str, Any] = json.loads(resp.data)
            return obj

        self.job = self._call(call)

    def _condition(self, kind: str, value: str, reason: str, message: str) -> None:
        self._patch({"conditions": trainjob_condition(self._status, kind, value, reason, message, rfc3339())})

    def _fail(self, reason: str, message: str, *, failed: int | None = None) -> None:
        log.info("TrainJob %s/%s failed: %s: %s", self.namespace, self.name, reason, message)
        self._condition("Failed", "True", reason, message)

    # -- main
    def _run(self) -> bool:
        job = self._call(self._read)
        if job is None or job["metadata"].get("uid") != self.uid:
            raise _Gone
        self.job = job
        if job_finished(job) is not None:
            return True
        if not wants_to_run(job):
            return False
        container = trainjob_container(job)
        try:
            _, argv = plan_command(container, self.config)
        except NotRunnable as err:
            self._fail(err.reason, err.message)
            return True
        if was_suspended(self._status):
            self._condition("Suspended", "False", "Resumed", MESSAGE_TRAINJOB_RESUMED)
        nodes, per_node = trainjob_layout(job)
        started_at = time.time()
        attempt = 0
        while True:
            if self._deadline_passed(started_at):
                self._fail(REASON_DEADLINE, MESSAGE_DEADLINE)
                return True
            attempt = self._claim_attempt(attempt + 1)
            port = free_port()
            objects = _ApiObjects(self.runner._core, self.config.request_timeout_seconds)
            envs: list[dict[str, str]] = []
            for rank in range(nodes):
                pod = PodIdentity(
                    name=f"{self.name}-{TRAINJOB_NODE}-0-{rank}",
                    namespace=self.namespace,
                    uid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"langmerge-jobrunner:{self.uid}/{attempt}/{rank}")),
                    labels=dict((job.get("metadata") or {}).get("labels") or {}),
                    annotations={"batch.kubernetes.io/job-completion-index": str(rank)},
                )
                try:
                    resolved = self._call(functools.partial(resolve_env, container, pod, objects))
                except ContainerConfigError as err:
                    self._fail(REASON_CONFIG, err.message)
                    return True
                workdir = self.config.attempt_dir(self.namespace, self.name, attempt) / f"{TRAINJOB_NODE}-{rank}"
                (workdir / "tmp").mkdir(parents=True, exist_ok=True)
                env = child_environment(
                    {**resolved, **torch_env(nodes=nodes, per_node=per_node, node_rank=rank, port=port)},
                    home=workdir,
                    tmpdir=workdir / "tmp",
                    hostname=pod.name,
                    config=self.config,
                )
                (workdir / "termination-log").touch()
                env[TERMINATION_MESSAGE_ENV] = str(workdir / "termination-log")
                envs.append(env)
            command = [expand(arg, envs[0]) for arg in argv]
            self._culprit = None
            outcome = self._run_nodes(command, envs, attempt, started_at)
            disruption = self._take_disruption()
            if outcome == "deadline":
                self._fail(REASON_DEADLINE, MESSAGE_DEADLINE)
                return True
            if outcome == "suspended":
                log.info("TrainJob %s/%s: suspended while attempt %d ran", *self._id(attempt))
                self._condition("Suspended", "True", "Suspended", MESSAGE_TRAINJOB_SUSPENDED)
                return False
            assert isinstance(outcome, list)
            if all(code == 0 for code in outcome):
                log.info("TrainJob %s/%s: attempt %d succeeded on %d node(s)", *self._id(attempt), nodes)
                self._condition("Complete", "True", REASON_TRAINJOB_COMPLETE, MESSAGE_TRAINJOB_COMPLETE)
                return True
            culprit = self._culprit if self._culprit is not None and outcome[self._culprit] != 0 else None
            rank = culprit if culprit is not None else next(r for r, c in enumerate(outcome) if c != 0)
            code = outcome[rank]
            workdir = self.config.attempt_dir(self.namespace, self.name, attempt) / f"{TRAINJOB_NODE}-{rank}"
            last_words = termination_message(
                workdir / "termination-log",
                self.config.attempt_log(self.namespace, f"{self.name}-{TRAINJOB_NODE}-{rank}", attempt),
                fallback_to_logs=True,
            )
            conditions = [{"type": "DisruptionTarget", "status": "True", "reason": disruption}] if disruption else []
            pod_name = f"{self.namespace}/{self.name}-{TRAINJOB_NODE}-0-{rank}"
            matched = match_pod_failure_policy(
                pod_failure_policy(job),
                pod=pod_name,
                container=TRAINJOB_NODE,
                exit_code=container_exit_code(code),
                conditions=conditions,
            )
            if matched is not None and matched[0] == "Ignore":
                log.info("TrainJob %s/%s: runs again (not counted): %s", self.namespace, self.name, matched[1])
                self._sleep(self.config.retry_delay_seconds, started_at)
                continue
            if matched is not None and matched[0] == "FailJob":
                self._fail(REASON_POD_FAILURE_POLICY, _with_last_words(matched[1], last_words))
                return True
            message = f"node {rank} {_exit_description(code)} (attempt {attempt})"
            self._fail(REASON_BACKOFF_LIMIT, _with_last_words(message, last_words))
            return True

    def _run_nodes(
        self, argv: list[str], envs: list[dict[str, str]], attempt: int, started_at: float
    ) -> list[int] | str:
        """Run one process per node; their exit codes (the others are stopped once one fails), ``"deadline"`` or
        ``"suspended"``."""
        procs: list[subprocess.Popen[bytes]] = []
        pid_files: list[Path] = []
        try:
            for rank, env in enumerate(envs):
                node = f"{self.name}-{TRAINJOB_NODE}-{rank}"
                log_path = self.config.attempt_log(self.namespace, node, attempt)
                workdir = self.config.attempt_dir(self.namespace, self.name, attempt) / f"{TRAINJOB_NODE}-{rank}"
                log.info(
                    "TrainJob %s/%s: attempt %d node %d runs %s (log %s)", *self._id(attempt), rank, argv, log_path
                )
                with log_path.open("ab") as out:
                    proc = subprocess.Popen(
                        argv,
                        cwd=workdir,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        close_fds=True,
                    )
                procs.append(proc)
                pid_file = self.runner._pids_dir / f"{self.namespace}_{node}_{attempt}.json"
                pid_file.parent.mkdir(parents=True, exist_ok=True)
                pid_file.write_text(json.dumps({"pid": proc.pid, "start": _proc_start_ticks(proc.pid)}))
                pid_files.append(pid_file)
            while True:
                done = [_exited(p) for p in procs]
                failed = [rank for rank, (d, p) in enumerate(zip(done, procs, strict=True)) if d and p.poll() != 0]
                if all(done) or failed:
                    self._culprit = failed[0] if failed else None  # the node whose failure stopped the others
                    self._stop_all(procs)
                    return [p.wait() for p in procs]
                if self._cancel.is_set():
                    self._stop_all(procs)
                    raise _Cancelled
                if self._disrupted.is_set():
                    log.info("TrainJob %s/%s: disrupting attempt %d (%s)", *self._id(attempt), self._disruption)
                    self._stop_all(procs)
                    return [p.wait() for p in procs]
                if self._deadline_passed(started_at):
                    self._stop_all(procs)
                    return "deadline"
                if is_suspended(self.job):
                    self._stop_all(procs)
                    return "suspended"
                self._cancel.wait(self.config.poll_seconds)
        except OSError as err:
            log.error("TrainJob %s/%s: cannot start %r: %s", self.namespace, self.name, argv[0], err)
            self._stop_all(procs)
            return [127]
        finally:
            for path in pid_files:
                path.unlink(missing_ok=True)

    def _stop_all(self, procs: Sequence[subprocess.Popen[bytes]]) -> None:
        """SIGTERM to every node's process group, SIGKILL after the grace period, then reap."""
        for proc in procs:
            if not _exited(proc):
                _killpg(proc.pid, signal.SIGTERM)
        limit = time.monotonic() + self.config.kill_grace_seconds
        while not all(_exited(p) for p in procs) and time.monotonic() < limit:
            time.sleep(0.02)
        for proc in procs:
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------
def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="langmerge jobrunner",
        description="Run the Jobs of a local development API server as local processes (what kubelet and the Job "
        "controller would do). Development only.",
    )
    parser.add_argument("--kubeconfig", help="kubeconfig of the local API server (default: $KUBECONFIG)")
    parser.add_argument("--parallel", type=int, default=1, help="most Jobs running at once (default 1)")
    parser.add_argument(
        "--work-dir", default=".langmerge/jobrunner", help="scratch folders and logs (default .langmerge/jobrunner)"
    )
    parser.add_argument("--logs-dir", help="attempt logs (default WORK_DIR/_logs)")
    parser.add_argument("--namespace", "-n", help="run only Jobs in this namespace (default: all)")
    parser.add_argument("--selector", "-l", help="run only Jobs matching this label selector")
    parser.add_argument(
        "--trainer-image",
        action="append",
        metavar="PATTERN",
        help=f"repository pattern of trainer images (repeatable; default {DEFAULT_TRAINER_PATTERN!r})",
    )
    parser.add_argument(
        "--host-image",
        action="append",
        default=[],
        metavar="PATTERN",
        help=f"repository pattern of images whose command runs as-is on this host (repeatable; e.g. {HOST_IMAGE})",
    )
    parser.add_argument("--python", default=sys.executable, help="Python that runs langmerge-trainer")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        type=_env_pair,
        metavar="KEY=VALUE",
        help="extra environment for every Job's process, e.g. HF_HOME=/path/to/shared/cache (repeatable)",
    )
    parser.add_argument("--resync-seconds", type=float, default=30.0, help="seconds between full re-lists")
    parser.add_argument("--kill-grace-seconds", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("--retry-delay-seconds", type=float, default=1.0, help="first delay before a retry")
    parser.add_argument(
        "--allow-remote", action="store_true", help="allow an API server that is not on this machine (dangerous)"
    )
    parser.add_argument("--log-level", default="INFO")
    return parser


def _is_loopback(url: str) -> bool:
    host = (urlparse(url).hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def main(argv: Sequence[str] | None = None) -> int:
    """``langmerge jobrunner``: run until SIGINT or SIGTERM."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from langmerge.kube import load_client

    api = load_client(args.kubeconfig)
    host = str(api.configuration.host)
    if not _is_loopback(host) and not args.allow_remote:
        print(
            f"refusing to run Jobs of {host}: the local Job runner executes what Jobs say on this machine; it is meant "
            "for the local development API server (pass --allow-remote to override)",
            file=sys.stderr,
        )
        return 2
    rules = tuple(ImageRule(p, "trainer") for p in (args.trainer_image or [DEFAULT_TRAINER_PATTERN]))
    rules += tuple(ImageRule(p, "host") for p in args.host_image)
    try:
        config = RunnerConfig(
            work_root=Path(args.work_dir).resolve(),
            logs_dir=Path(args.logs_dir).resolve() if args.logs_dir else None,
            parallel=args.parallel,
            namespace=args.namespace,
            label_selector=args.selector,
            image_rules=rules,
            python=args.python,
            extra_env=(("PYTHONUNBUFFERED", "1"), *args.env),
            resync_seconds=args.resync_seconds,
            kill_grace_seconds=args.kill_grace_seconds,
            retry_delay_seconds=args.retry_delay_seconds,
        )
    except ValueError as err:
        print(f"langmerge jobrunner: {err}", file=sys.stderr)
        return 2
    runner = LocalJobRunner(api, config)

    def on_signal(signum: int, frame: object) -> None:
        runner.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        runner.run_forever()
    except RunnerError as err:
        print(f"langmerge jobrunner: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
