"""The local serving runner: what KServe (with Knative) does for InferenceServices, on the local control plane, with
local processes. Development and tests only.

It watches ``serving.kserve.io/v1beta1`` InferenceServices (list + watch with periodic re-lists, the local Job
runner's loop: :class:`langmerge.dev.watching.ListWatch`; it waits quietly while the CRD is absent) and for each one:

* starts a router (:class:`~langmerge.dev.serving.router.Router`) on 127.0.0.1, whose address is the service's
  ``status.url`` for the runner's life;
* runs one model-server process per predictor revision ``<isvc>-predictor-NNNNN``: a new revision for each new
  ``spec.predictor`` (without ``canaryTrafficPercent``, which only splits traffic), except that a spec equal to one
  of a revision still running reuses that revision (a rollback is instant). The command is
  :attr:`ServingConfig.command_template` (``python -m langmerge_trainer serve ...`` by default), for the model formats
  in :attr:`ServingConfig.model_formats`; the environment is the model container's ``env``/``envFrom`` resolved as the
  local Job runner resolves a Job's (:mod:`langmerge.dev.jobrunner.environment`), plus
  :attr:`ServingConfig.extra_env` and ``LANGMERGE_LIFELINE`` when the runner has one. Logs go to
  ``<logs>/<namespace>_<revision>.log``;
* waits until ``GET /v2/models/<isvc>/ready`` answers 200. A process that exits first, or is not ready within
  :attr:`ServingConfig.ready_timeout_seconds`, fails its revision (``BlockedByFailedLoad``, ``lastFailureInfo`` with
  the last lines of its log) and never takes traffic. A ready process that exits later is restarted, out of the
  router until it is ready again;
* shifts traffic as KServe does: a ready latest revision takes ``canaryTrafficPercent`` % (the latest rolled-out
  revision the rest) or 100 % (it becomes the latest rolled-out, the one before it the previous); revisions that no
  longer take traffic leave the router, are drained (no request in flight) and stopped;
* writes ``/status`` like KServe: ``observedGeneration``, ``url``/``address``, the ``PredictorReady``,
  ``IngressReady``, ``LatestDeploymentReady`` and ``Ready`` conditions, ``components.predictor`` (the latest created,
  ready, rolled-out and previous revisions, ``traffic``), ``modelStatus`` (``transitionStatus``, ``states``,
  ``lastFailureInfo``) and, per running revision, a ``serving.langmerge.dev/storage-uri.<revision>`` annotation.

A deleted InferenceService has its processes and router stopped; :meth:`LocalServingRunner.stop` stops everything.
One runner per work folder (locked); processes a crashed runner left behind are killed on the next start.
"""

from __future__ import annotations

import contextlib
import http.client
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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from langmerge.constants import ISVC_KIND, ISVC_PLURAL, KSERVE_GROUP, KSERVE_VERSION, SERVING_ANNOTATION_PREFIX
from langmerge.dev.jobrunner.api import _api_message, _transient
from langmerge.dev.jobrunner.config import RunnerConfig
from langmerge.dev.jobrunner.environment import (
    ContainerConfigError,
    PodIdentity,
    _ApiObjects,
    child_environment,
    resolve_env,
)
from langmerge.dev.jobrunner.mapping import free_port
from langmerge.dev.jobrunner.processes import _killpg, _spawn
from langmerge.dev.jobrunner.status import rfc3339
from langmerge.dev.lifeline import ENV as LIFELINE_ENV
from langmerge.dev.serving.router import Backend, Router
from langmerge.dev.watching import (
    LocalRunner,
    LocalRunnerConfig,
    check_not_negative,
    check_positive,
    custom_lister,
)

log = logging.getLogger("langmerge.serving")

#: The model server's module (in the trainer image's Python).
SERVER_MODULE = "langmerge_trainer"
#: The arguments of ``langmerge_trainer serve`` that say what to serve where (a stand-in server takes the same).
SERVER_ARGS: tuple[str, ...] = (
    "--model-name",
    "{model_name}",
    "--storage-uri",
    "{storage_uri}",
    "--http-port",
    "{http_port}",
    "--grpc-port",
    "{grpc_port}",
)
#: The default command of a revision. Placeholders: ``{python}``, ``{model_name}`` (the InferenceService's name),
#: ``{storage_uri}``, ``{http_port}``, ``{grpc_port}``, ``{model_format}``, ``{namespace}``, ``{revision}``.
DEFAULT_COMMAND: tuple[str, ...] = ("{python}", "-m", SERVER_MODULE, "serve", *SERVER_ARGS)
#: Model formats served by default (KServe's ``huggingface`` runtime gets the same local server).
DEFAULT_MODEL_FORMATS = ("langmerge", "huggingface")
#: Variables of the runner's own environment that ``python -m langmerge.dev.serving`` passes to model servers.
PASSTHROUGH_ENV = (
    "LANGMERGE_S3_ENDPOINT",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "LANGMERGE_MODEL_CACHE",
    "HF_HOME",
)

#: Condition types and values (KServe's).
PREDICTOR_READY = "PredictorReady"
INGRESS_READY = "IngressReady"
LATEST_DEPLOYMENT_READY = "LatestDeploymentReady"
READY = "Ready"
#: ``modelStatus.transitionStatus`` values.
UP_TO_DATE = "UpToDate"
IN_PROGRESS = "InProgress"
BLOCKED = "BlockedByFailedLoad"
INVALID_SPEC = "InvalidSpec"
#: Model states.
PENDING = "Pending"
LOADING = "Loading"
LOADED = "Loaded"
FAILED_TO_LOAD = "FailedToLoad"
#: ``lastFailureInfo.reason`` of a revision that did not load.
REASON_LOAD_FAILED = "ModelLoadFailed"
#: Status annotation naming a revision's storage URI.
STORAGE_URI_ANNOTATION = f"{SERVING_ANNOTATION_PREFIX}storage-uri."

_PLACEHOLDERS = {
    "python": "python",
    "model_name": "m",
    "storage_uri": "s3://b/p",
    "http_port": "1",
    "grpc_port": "2",
    "model_format": "langmerge",
    "namespace": "n",
    "revision": "m-predictor-00001",
}
_REVISION_NUMBER = re.compile(r"-predictor-(\d+)$")


def passthrough_env(environ: Mapping[str, str] | None = None) -> tuple[tuple[str, str], ...]:
    """The :data:`PASSTHROUGH_ENV` variables set in ``environ`` (default: this process's environment)."""
    source = os.environ if environ is None else environ
    return tuple((k, source[k]) for k in PASSTHROUGH_ENV if source.get(k))


@dataclass(frozen=True)
class ServingConfig(LocalRunnerConfig):
    """How the local serving runner runs and reports InferenceServices. Besides its own fields it has those of
    :class:`~langmerge.dev.watching.LocalRunnerConfig` (keyword-only): ``extra_env`` (applied last to every model
    server's environment: S3 endpoint and credentials, a model cache folder), ``resync_seconds``,
    ``watch_timeout_seconds``, ``request_timeout_seconds`` and ``kill_grace_seconds`` (between SIGTERM and SIGKILL when
    a model server is stopped).

    ``work_root`` is the root of the revisions' working folders ``<work_root>/<namespace>/<isvc>/<revision>``; the
    revision logs are ``<namespace>_<revision>.log`` in ``logs_dir`` (default ``<work_root>/_logs``).
    """

    #: Serve only InferenceServices in this namespace (None: all namespaces).
    namespace: str | None = None
    #: Serve only InferenceServices matching this label selector (None: all).
    label_selector: str | None = None
    #: The Python of ``{python}`` in the command (its folder also leads the children's PATH).
    python: str = sys.executable
    #: A revision's command, each item ``str.format``-ed with the placeholders of :data:`DEFAULT_COMMAND` (a literal
    #: brace is doubled). Tests point it at a small stand-in server.
    command_template: tuple[str, ...] = DEFAULT_COMMAND
    #: ``spec.predictor.model.modelFormat.name`` values this runner serves; others are ``InvalidSpec``.
    model_formats: tuple[str, ...] = DEFAULT_MODEL_FORMATS
    #: A revision not ready this long after its start failed to load.
    ready_timeout_seconds: float = 900.0
    #: How often a starting model server is asked whether it is ready, and a running one checked for exit.
    poll_seconds: float = 0.25
    #: Longest wait for the requests in flight on a revision that left the router before it is stopped anyway.
    drain_timeout_seconds: float = 60.0
    #: Delay before restarting a ready model server that exited; doubles per restart up to 30 s.
    restart_delay_seconds: float = 1.0
    #: How long the router waits for a model server's answer.
    upstream_timeout_seconds: float = 300.0
    #: Lines of a failed model server's log kept in ``lastFailureInfo.message``.
    failure_log_lines: int = 20

    def __post_init__(self) -> None:
        if not self.command_template:
            raise ValueError("command_template must not be empty")
        try:
            [part.format(**_PLACEHOLDERS) for part in self.command_template]
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"command_template: bad placeholder {err} (known: {sorted(_PLACEHOLDERS)})") from None
        check_positive(self, "ready_timeout_seconds", "poll_seconds")
        check_not_negative(self, "drain_timeout_seconds", "restart_delay_seconds")
        if self.failure_log_lines < 1:
            raise ValueError("failure_log_lines must be >= 1")
        super().__post_init__()

    def revision_dir(self, namespace: str, isvc: str, revision: str) -> Path:
        """The working folder (and HOME) of a revision's model server."""
        return self.work_root / namespace / isvc / revision

    def revision_log(self, namespace: str, revision: str) -> Path:
        """The log file (stdout and stderr, every start appended) of a revision's model server."""
        return self.logs_path / f"{namespace}_{revision}.log"

    def command(self, **fields: str) -> list[str]:
        """The command of one model server (``fields``: the placeholders; ``python`` defaults to :attr:`python`)."""
        values = {"python": self.python, **fields}
        return [part.format(**values) for part in self.command_template]


class ServingError(RuntimeError):
    """The runner cannot start (work folder already in use)."""


# -- pure helpers ----------------------------------------------------------------------------------------------------
def revision_name(isvc: str, number: int) -> str:
    """KServe's (Knative's) revision name: ``<isvc>-predictor-00001``."""
    return f"{isvc}-predictor-{number:05d}"


def revision_number(name: str | None) -> int:
    """The number of a revision name (0 if it has none)."""
    match = _REVISION_NUMBER.search(name or "")
    return int(match.group(1)) if match else 0


def revision_template(predictor: Mapping[str, Any]) -> str:
    """What makes a revision: ``spec.predictor`` without ``canaryTrafficPercent`` (canonical JSON)."""
    return json.dumps({k: v for k, v in predictor.items() if k != "canaryTrafficPercent"}, sort_keys=True)


def merge_patch_diff(old: Any, new: Any) -> Any:
    """The JSON merge patch that turns ``old`` into ``new`` (``{}``: nothing to change)."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return new
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = merge_patch_diff(old[key], value) if isinstance(value, Mapping) else value
    return patch


def condition(
    observed: Iterable[Mapping[str, Any]], type_: str, status: str, reason: str = "", message: str = "", *, now: str
) -> dict[str, Any]:
    """A Knative condition; ``lastTransitionTime`` stays as observed while the status does not change."""
    previous = next((c for c in observed if c.get("type") == type_), None)
    since = previous.get("lastTransitionTime") if previous and previous.get("status") == status else None
    out: dict[str, Any] = {"type": type_, "status": status, "lastTransitionTime": since or now}
    if reason:
        out["reason"] = reason
    if message:
        out["message"] = message
    return out


def log_tail(path: Path, offset: int, lines: int, max_bytes: int = 2048) -> str:
    """The last ``lines`` non-empty lines written to ``path`` after ``offset`` (at most ``max_bytes``, the end)."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    kept = [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]
    joined = "\n".join(kept)
    return joined[-max_bytes:]


def _exit_code(returncode: int) -> int:
    """A container's exit code (a signal ``n`` is ``128 + n``)."""
    return 128 - returncode if returncode < 0 else returncode


# -- one revision: one model-server process --------------------------------------------------------------------------
@dataclass
class _Failure:
    message: str
    exit_code: int | None
    time: str


@dataclass
class _Revision:
    """A predictor revision and the thread that runs its model server."""

    service: _Service
    name: str
    template: str
    model: dict[str, Any]
    storage_uri: str
    model_format: str
    #: Loading (starting, or restarting after an exit) | Loaded | FailedToLoad (never loaded) | Stopped.
    state: str = LOADING
    url: str = ""
    pid: int | None = None
    failure: _Failure | None = None
    retiring: bool = False
    restarts: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        """Running or starting, and not on its way out."""
        return self.state in (LOADING, LOADED) and not self.retiring

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"serving-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the model server to stop (SIGTERM now, SIGKILL after the grace period); see :meth:`join`."""
        self._stop.set()
        if self.pid is not None:
            _killpg(self.pid, signal.SIGTERM)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the thread
    def _run(self) -> None:
        svc = self.service
        delay = svc.config.restart_delay_seconds
        try:
            while not self._stop.is_set():
                outcome = self._run_once()
                if outcome != "restart" or self._stop.is_set():
                    break
                self.restarts += 1
                log.warning(
                    "%s/%s: model server exited; restart %d in %.1fs", svc.namespace, self.name, self.restarts, delay
                )
                if self._stop.wait(delay):
                    break
                delay = min(max(delay * 2, 0.5), 30.0)
        except Exception:
            log.exception("%s/%s: model server supervision failed", svc.namespace, self.name)
            self._fail(_Failure("the local serving runner failed to run the model server", None, rfc3339()))
        finally:
            if self.state != FAILED_TO_LOAD:
                self.state = "Stopped"
            svc.kick()

    def _fail(self, failure: _Failure) -> None:
        self.failure = failure
        self.state = FAILED_TO_LOAD
        self.service.kick()

    def _environment(self, folder: Path) -> dict[str, str] | None:
        """The model server's environment, or None (the revision failed) if it cannot be built."""
        svc = self.service
        meta = svc.metadata
        pod = PodIdentity(
            name=f"{self.name}-deployment-local",
            namespace=svc.namespace,
            uid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"langmerge-serving:{svc.uid}/{self.name}/{self.restarts}")),
            labels={
                **(meta.get("labels") or {}),
                "serving.kserve.io/inferenceservice": svc.name,
                "serving.knative.dev/revision": self.name,
                "component": "predictor",
            },
            annotations=dict(meta.get("annotations") or {}),
            service_account=str(svc.predictor.get("serviceAccountName") or "default"),
        )
        delay = 0.5
        while True:
            try:
                resolved = resolve_env(self.model, pod, svc.objects)
                break
            except ContainerConfigError as err:
                self._fail(_Failure(err.message, None, rfc3339()))
                return None
            except Exception as err:  # the API server may be restarting
                if not _transient(err):
                    message = _api_message(err) if isinstance(err, ApiException) else str(err)
                    self._fail(_Failure(message, None, rfc3339()))
                    return None
                if self._stop.wait(delay):
                    return None
                delay = min(delay * 2, 10.0)
        runner_config = RunnerConfig(
            work_root=svc.config.work_root, python=svc.config.python, extra_env=svc.config.extra_env
        )
        tmp = folder / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env = child_environment(resolved, home=folder, tmpdir=tmp, hostname=pod.name, config=runner_config)
        lifeline = os.environ.get(LIFELINE_ENV)
        if lifeline:
            env[LIFELINE_ENV] = lifeline
        return env

    def _run_once(self) -> str:
        """One start of the model server: ``"restart"`` if it exited after it was ready, else ``"done"``."""
        svc = self.service
        config = svc.config
        folder = config.revision_dir(svc.namespace, svc.name, self.name)
        folder.mkdir(parents=True, exist_ok=True)
        self.state = LOADING
        self.url = ""
        env = self._environment(folder)
        if env is None or self._stop.is_set():
            return "done"
        http_port, grpc_port = free_port(), free_port()
        while grpc_port == http_port:
            grpc_port = free_port()
        argv = config.command(
            model_name=svc.name,
            storage_uri=self.storage_uri,
            http_port=str(http_port),
            grpc_port=str(grpc_port),
            model_format=self.model_format,
            namespace=svc.namespace,
            revision=self.name,
        )
        log_path = config.revision_log(svc.namespace, self.name)
        with log_path.open("ab") as out:
            offset = out.tell()
            try:
                proc = _spawn(argv, cwd=folder, env=env, out=out)
            except OSError as err:
                self._fail(_Failure(f"cannot start {argv[0]}: {err}", None, rfc3339()))
                return "done"
        self.pid = proc.pid
        svc.runner._record_pid(svc.namespace, self.name, proc.pid)
        log.info(
            "%s/%s: model server started (pid %d, port %d): %s", svc.namespace, self.name, proc.pid, http_port, argv
        )
        try:
            return self._supervise(proc, http_port, log_path, offset)
        finally:
            self._terminate(proc)
            self.pid = None
            svc.runner._forget_pid(svc.namespace, self.name)

    def _supervise(self, proc: subprocess.Popen[bytes], http_port: int, log_path: Path, offset: int) -> str:
        svc = self.service
        config = svc.config
        deadline = time.monotonic() + config.ready_timeout_seconds
        ready_path = f"/v2/models/{quote(svc.name, safe='')}/ready"
        while not self._stop.is_set():
            code = proc.poll()
            if code is not None:
                tail = log_tail(log_path, offset, config.failure_log_lines)
                self._fail(_Failure(tail or f"the model server exited with code {code}", _exit_code(code), rfc3339()))
                return "done"
            if _is_ready(http_port, ready_path, timeout=min(2.0, config.request_timeout_seconds)):
                break
            if time.monotonic() > deadline:
                tail = log_tail(log_path, offset, config.failure_log_lines)
                message = f"the model server was not ready within {config.ready_timeout_seconds:g}s"
                self._fail(_Failure(f"{message}\n{tail}" if tail else message, None, rfc3339()))
                return "done"
            self._stop.wait(config.poll_seconds)
        if self._stop.is_set():
            return "done"
        self.url = f"http://127.0.0.1:{http_port}"
        self.state = LOADED
        log.info("%s/%s: ready at %s", svc.namespace, self.name, self.url)
        svc.kick()
        while not self._stop.wait(config.poll_seconds):
            if proc.poll() is not None:
                self.state = LOADING
                self.url = ""
                svc.kick()
                return "restart"
        return "done"

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            _killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(self.service.config.kill_grace_seconds)
        _killpg(proc.pid, signal.SIGKILL)  # the whole group, grandchildren included
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5.0)


def _is_ready(port: int, path: str, timeout: float) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
    if resp.status != 200:
        return False
    with contextlib.suppress(ValueError, AttributeError):
        return json.loads(body).get("ready") is not False
    return True


# -- one InferenceService --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Traffic:
    revision: str
    percent: int
    tag: str | None = None


class _Service:
    """One InferenceService: its router, its revisions, the traffic between them, and its status."""

    def __init__(self, runner: LocalServingRunner, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        self.runner = runner
        self.config = runner.config
        self.objects = runner._objects
        self.namespace = str(meta.get("namespace") or "default")
        self.name = str(meta.get("name") or "")
        self.uid = str(meta.get("uid") or "")
        self.obj = obj
        self.router = Router(upstream_timeout=self.config.upstream_timeout_seconds, name=f"router-{self.name}")
        self.revisions: dict[str, _Revision] = {}
        predictor_status = ((obj.get("status") or {}).get("components") or {}).get("predictor") or {}
        self._next_number = revision_number(predictor_status.get("latestCreatedRevision")) + 1
        self.latest_created: str | None = None
        self.latest_ready: str | None = None
        self.latest_rolledout: str | None = None
        self.previous_rolledout: str | None = None
        self.traffic: list[_Traffic] = []
        self.acted_generation: int | None = None
        self.problem: tuple[str, str] | None = None
        self.last_failure: dict[str, Any] | None = None
        self._lock = threading.RLock()
        self._cond = threading.Condition()
        self._kicked = False
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"serving-{self.namespace}-{self.name}", daemon=True)

    # -- the object
    @property
    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = self.obj.get("metadata") or {}
        return meta

    @property
    def predictor(self) -> dict[str, Any]:
        predictor: dict[str, Any] = (self.obj.get("spec") or {}).get("predictor") or {}
        return predictor

    def observe(self, obj: dict[str, Any]) -> None:
        """A newer copy of the object (older ones, by resourceVersion, are ignored)."""
        with self._lock:
            if _rv(obj) >= _rv(self.obj):
                self.obj = obj
        self.kick()

    # -- life cycle
    def start(self) -> None:
        self.router.start()
        self._thread.start()

    def close(self) -> None:
        """Stop everything at once (the object was deleted, or the runner stops)."""
        self._closed.set()
        self.kick()
        with self._lock:
            revisions = list(self.revisions.values())
        for rev in revisions:
            rev.stop()
        deadline = time.monotonic() + self.config.kill_grace_seconds + 10.0
        for rev in revisions:
            rev.join(max(0.0, deadline - time.monotonic()))
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self.router.stop()

    def kick(self) -> None:
        with self._cond:
            self._kicked = True
            self._cond.notify_all()

    def _loop(self) -> None:
        delay = 0.5
        while not self._closed.is_set():
            try:
                self.reconcile()
                delay = 0.5
                wait = 1.0
            except Exception as err:
                if self._closed.is_set():
                    break
                if isinstance(err, ApiException) and err.status == 404:
                    wait = 1.0  # deleted: the watch will tell
                else:
                    log.warning(
                        "%s/%s: %s: %s; retrying in %.1fs", self.namespace, self.name, type(err).__name__, err, delay
                    )
                    wait, delay = delay, min(delay * 2, 10.0)
            with self._cond:
                if not self._kicked:
                    self._cond.wait(wait)
                self._kicked = False

    # -- reconciliation
    def reconcile(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._act_on_spec()
            self._shift_traffic()
            retire = [r for r in self.revisions.values() if r.alive and not self._needed(r)]
            for rev in retire:
                rev.retiring = True
            self.router.set_backends(self._backends())
            status = self.status(rfc3339())
            observed = self.obj.get("status") or {}
        for rev in retire:
            threading.Thread(target=self._drain_and_stop, args=(rev,), name=f"drain-{rev.name}", daemon=True).start()
        patch = merge_patch_diff(observed, status)
        if patch:
            self._write_status(patch)

    def _act_on_spec(self) -> None:
        generation = int(self.metadata.get("generation") or 0)
        if generation == self.acted_generation:
            return
        self.acted_generation = generation
        predictor = self.predictor
        model = predictor.get("model")
        self.problem = None
        if not isinstance(model, dict):
            self.problem = (
                "InvalidPredictorSpec",
                "spec.predictor.model is missing: the local serving runner runs model specs only",
            )
            return
        model_format = str((model.get("modelFormat") or {}).get("name") or "")
        if model_format not in self.config.model_formats:
            supported = ", ".join(self.config.model_formats)
            self.problem = (
                "NoSupportingRuntime",
                f"no local runtime for model format {model_format!r} (supported: {supported})",
            )
            return
        storage_uri = str(model.get("storageUri") or "")
        if not storage_uri:
            self.problem = ("NoStorageUri", "spec.predictor.model.storageUri is empty: nothing to serve yet")
            return
        template = revision_template(predictor)
        latest = self.revisions.get(self.latest_created or "")
        if latest is not None and latest.template == template:
            return  # only the traffic split changed
        running = [r for r in self.revisions.values() if r.alive and r.template == template]
        if running:
            reused = max(running, key=lambda r: (r.state == LOADED, revision_number(r.name)))
            log.info("%s/%s: generation %d reuses %s", self.namespace, self.name, generation, reused.name)
            self.latest_created = reused.name
            return
        name = revision_name(self.name, self._next_number)
        self._next_number += 1
        rev = _Revision(self, name, template, dict(model), storage_uri, model_format)
        self.revisions[name] = rev
        self.latest_created = name
        log.info("%s/%s: generation %d creates %s (%s)", self.namespace, self.name, generation, name, storage_uri)
        rev.start()

    def _canary_percent(self) -> int | None:
        value = self.predictor.get("canaryTrafficPercent")
        if isinstance(value, bool) or not isinstance(value, int) or value >= 100:
            return None
        return max(0, value)

    def _shift_traffic(self) -> None:
        latest = self.revisions.get(self.latest_created or "")
        if latest is not None and latest.state == FAILED_TO_LOAD and latest.failure is not None:
            self.last_failure = {
                "reason": REASON_LOAD_FAILED,
                "message": latest.failure.message,
                "modelRevisionName": latest.name,
                "time": latest.failure.time,
                **({"exitCode": latest.failure.exit_code} if latest.failure.exit_code is not None else {}),
            }
        if latest is not None and latest.state == LOADED and not latest.retiring:
            self.latest_ready = latest.name
            canary = self._canary_percent()
            rolled = self.revisions.get(self.latest_rolledout or "")
            if canary is not None and rolled is not None and rolled is not latest and rolled.alive:
                self.traffic = [_Traffic(latest.name, canary, "latest"), _Traffic(rolled.name, 100 - canary, "prev")]
                return
            if self.latest_rolledout != latest.name:
                self.previous_rolledout = self.latest_rolledout
                self.latest_rolledout = latest.name
            self.traffic = [_Traffic(latest.name, 100)]
            return
        # the latest is loading or failed: the revisions that served keep serving (those still there)
        kept = [t for t in self.traffic if t.revision in self.revisions and self.revisions[t.revision].alive]
        if len(kept) == 1 and kept[0].percent != 100:
            kept = [_Traffic(kept[0].revision, 100)]
        self.traffic = kept

    def _needed(self, rev: _Revision) -> bool:
        return rev.name == self.latest_created or any(t.revision == rev.name for t in self.traffic)

    def _backends(self) -> list[Backend]:
        out = []
        for t in self.traffic:
            rev = self.revisions.get(t.revision)
            if rev is not None and rev.state == LOADED and rev.url and t.percent > 0:
                out.append(Backend(rev.name, rev.url, rev.storage_uri, t.percent))
        return out

    def _drain_and_stop(self, rev: _Revision) -> None:
        if not self.router.wait_drained(rev.name, self.config.drain_timeout_seconds):
            log.warning(
                "%s/%s: requests still in flight after %.0fs; stopping anyway",
                self.namespace,
                rev.name,
                self.config.drain_timeout_seconds,
            )
        log.info("%s/%s: no longer takes traffic; stopping it", self.namespace, rev.name)
        rev.stop()
        rev.join()
        with self._lock:
            if self.revisions.get(rev.name) is rev and rev.state != FAILED_TO_LOAD:
                self.revisions.pop(rev.name, None)
        self.kick()

    # -- status
    def status(self, now: str) -> dict[str, Any]:
        """The whole ``status`` KServe would write now (call under the lock)."""
        observed = self.obj.get("status") or {}
        old_conditions = [c for c in observed.get("conditions") or [] if isinstance(c, Mapping)]
        latest = self.revisions.get(self.latest_created or "")
        serving = bool(self._backends())
        url = self.router.url

        if self.problem is not None:
            transition = INVALID_SPEC
            target = PENDING if latest is None else _model_state(latest)
        elif latest is None:
            transition, target = IN_PROGRESS, PENDING
        elif latest.state == LOADED and self.latest_ready == latest.name:
            transition, target = UP_TO_DATE, LOADED
        elif latest.state == FAILED_TO_LOAD:
            transition, target = BLOCKED, FAILED_TO_LOAD
        else:
            transition, target = IN_PROGRESS, LOADING
        if serving:
            active = LOADED
        elif latest is not None and self.problem is None:
            active = target
        else:
            active = PENDING

        if serving:
            predictor_ready: tuple[str, str, str] = ("True", "", "")
        elif self.problem is not None:
            predictor_ready = ("False", *self.problem)
        elif latest is not None and latest.state == FAILED_TO_LOAD:
            predictor_ready = ("False", "RevisionFailed", _failed_message(latest))
        elif latest is not None:
            predictor_ready = ("Unknown", "Deploying", f"revision {latest.name} is loading")
        else:
            predictor_ready = ("Unknown", "RevisionMissing", "no revision yet")
        if self.problem is not None:
            deployment: tuple[str, str, str] = ("False", *self.problem)
        elif transition == UP_TO_DATE:
            deployment = ("True", "", "")
        elif latest is not None and latest.state == FAILED_TO_LOAD:
            deployment = ("False", "RevisionFailed", _failed_message(latest))
        elif latest is not None:
            deployment = ("False", "Deploying", f"revision {latest.name} is loading")
        else:
            deployment = ("Unknown", "RevisionMissing", "no revision yet")
        ready = predictor_ready

        conditions = [
            condition(old_conditions, INGRESS_READY, "True", now=now),
            condition(old_conditions, LATEST_DEPLOYMENT_READY, *deployment, now=now),
            condition(old_conditions, PREDICTOR_READY, *predictor_ready, now=now),
            condition(old_conditions, READY, *ready, now=now),
        ]
        predictor: dict[str, Any] = {"url": url, "address": {"url": url}}
        for key, value in (
            ("latestCreatedRevision", self.latest_created),
            ("latestReadyRevision", self.latest_ready),
            ("latestRolledoutRevision", self.latest_rolledout),
            ("previousRolledoutRevision", self.previous_rolledout),
        ):
            if value:
                predictor[key] = value
        traffic = []
        for t in self.traffic:
            entry: dict[str, Any] = {
                "revisionName": t.revision,
                "percent": t.percent,
                "latestRevision": t.revision == self.latest_ready,
            }
            if t.tag:
                entry["tag"] = t.tag
            traffic.append(entry)
        if traffic:
            predictor["traffic"] = traffic
        model_status: dict[str, Any] = {
            "transitionStatus": transition,
            "states": {"activeModelState": active, "targetModelState": target},
        }
        if self.last_failure is not None:
            model_status["lastFailureInfo"] = dict(self.last_failure)
        status: dict[str, Any] = {
            "observedGeneration": self.acted_generation or 0,
            "url": url,
            "address": {"url": url},
            "conditions": conditions,
            "components": {"predictor": predictor},
            "modelStatus": model_status,
        }
        annotations = {
            f"{STORAGE_URI_ANNOTATION}{rev.name}": rev.storage_uri
            for rev in self.revisions.values()
            if rev.alive or rev.name == self.latest_created
        }
        if annotations:
            status["annotations"] = annotations
        return status

    def _write_status(self, patch: dict[str, Any]) -> None:
        body = {"metadata": {"uid": self.uid}, "status": patch}
        try:
            resp = self.runner._custom.patch_namespaced_custom_object_status(
                KSERVE_GROUP,
                KSERVE_VERSION,
                self.namespace,
                ISVC_PLURAL,
                self.name,
                body,
                _content_type="application/merge-patch+json",
                _preload_content=False,
                _request_timeout=self.config.request_timeout_seconds,
            )
        except ApiException as err:
            if err.status == 422 and "metadata.uid" in str(err.body):
                return  # replaced by another object of the same name: the watch will tell
            raise
        obj = json.loads(resp.data)
        with self._lock:
            if _rv(obj) >= _rv(self.obj):
                self.obj = obj


def _model_state(rev: _Revision) -> str:
    return {LOADED: LOADED, FAILED_TO_LOAD: FAILED_TO_LOAD}.get(rev.state, LOADING)


def _failed_message(rev: _Revision) -> str:
    detail = rev.failure.message.splitlines()[-1] if rev.failure and rev.failure.message else "failed to load"
    return f'Revision "{rev.name}" failed with message: {detail}'


def _rv(obj: Mapping[str, Any]) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


# -- the runner ------------------------------------------------------------------------------------------------------
class LocalServingRunner(LocalRunner[ServingConfig]):
    """Serves the InferenceServices of the API server with local processes and reports their status. Development
    only."""

    title = "local serving runner"
    lock_name = "_serving.lock"
    error = ServingError
    logger = log
    leftover = "model server"

    def __init__(self, api_client: Any, config: ServingConfig) -> None:
        super().__init__(config)
        self._custom = client.CustomObjectsApi(api_client)
        self._objects = _ApiObjects(client.CoreV1Api(api_client), config.request_timeout_seconds)
        self._lock = threading.Lock()
        self._services: dict[str, _Service] = {}  # by uid
        self._watch = self._list_watch(
            ISVC_KIND,
            custom_lister(self._custom, KSERVE_GROUP, KSERVE_VERSION, ISVC_PLURAL, config.namespace),
            config.label_selector,
            observe=self._observe,
            forget=lambda obj: self._forget(str((obj.get("metadata") or {}).get("uid") or "")),
            listed=self._listed,
            absent_recheck_seconds=2.0,  # no InferenceService CRD (yet)
        )
        #: Set after the first successful list (the runner knows the cluster's InferenceServices), or once it found
        #: no InferenceService CRD.
        self.synced = self._watch.synced

    # -- life cycle --------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Lock the work folder, kill what a crashed runner left there, then watch and serve in the background."""
        self._claim_work_folder()
        self._start_threads([(self._watch.run, "serving-watch")])
        log.info(
            "local serving runner started: %s, work folder %s",
            f"namespace {self.config.namespace}" if self.config.namespace else "all namespaces",
            self.config.work_root,
        )

    def stop(self) -> None:
        """Stop watching, then stop every model server and router."""
        self._begin_stop()
        with self._lock:
            services = list(self._services.values())
            self._services.clear()
        closers = [threading.Thread(target=s.close, daemon=True) for s in services]
        for thread in closers:
            thread.start()
        for thread in closers:
            thread.join()
        for thread in self._threads:
            thread.join(self.config.request_timeout_seconds)
        self._release_work_folder()

    # -- introspection -----------------------------------------------------------------------------------------------
    def _service(self, namespace: str, name: str) -> _Service | None:
        with self._lock:
            found = [s for s in self._services.values() if s.namespace == namespace and s.name == name]
        return found[-1] if found else None

    def endpoint(self, namespace: str, name: str) -> str | None:
        """The router's URL of an InferenceService this runner serves (its ``status.url``), or None."""
        svc = self._service(namespace, name)
        return svc.router.url if svc is not None else None

    def revisions(self, namespace: str, name: str) -> dict[str, str]:
        """Revision -> state (``Loading``, ``Loaded``, ``FailedToLoad``) of the revisions this runner keeps."""
        svc = self._service(namespace, name)
        if svc is None:
            return {}
        with svc._lock:
            return {r.name: r.state for r in svc.revisions.values() if r.state != "Stopped"}

    def pids(self, namespace: str, name: str) -> dict[str, int]:
        """Revision -> process id of the model servers running now."""
        svc = self._service(namespace, name)
        if svc is None:
            return {}
        with svc._lock:
            return {r.name: r.pid for r in svc.revisions.values() if r.pid is not None}

    def served(self) -> list[str]:
        """``namespace/name`` of the InferenceServices this runner serves now."""
        with self._lock:
            return sorted(f"{s.namespace}/{s.name}" for s in self._services.values())

    # -- watching ----------------------------------------------------------------------------------------------------
    def _listed(self, seen: set[str]) -> None:
        with self._lock:
            gone = [uid for uid in self._services if uid not in seen]
        for uid in gone:
            self._forget(uid)

    def _observe(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        uid = meta.get("uid")
        if not uid:
            return
        if meta.get("deletionTimestamp"):
            self._forget(str(uid))
            return
        with self._lock:
            if self._stopping.is_set():
                return
            svc = self._services.get(uid)
            if svc is None:
                svc = _Service(self, obj)
                self._services[uid] = svc
                svc.start()
                log.info("serving %s/%s at %s", svc.namespace, svc.name, svc.router.url)
                return
        svc.observe(obj)

    def _forget(self, uid: str) -> None:
        with self._lock:
            svc = self._services.pop(uid, None)
        if svc is not None:
            log.info("%s/%s deleted: stopping its model servers", svc.namespace, svc.name)
            threading.Thread(target=svc.close, name=f"close-{svc.name}", daemon=True).start()

    # -- pid records, for the next runner if this one crashes ------------------------------------------------------
    def _record_pid(self, namespace: str, revision: str, pid: int) -> None:
        self._work.record_pid(f"{namespace}_{revision}", pid)

    def _forget_pid(self, namespace: str, revision: str) -> None:
        self._work.forget_pid(f"{namespace}_{revision}")
