"""Process supervision: one worker per Job (its attempts one after another, deadlines, suspension, disruption,
cancellation, and its status through ``/status``), and the TrainJob worker (one process per node)."""

from __future__ import annotations

import functools
import itertools
import json
import logging
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from kubernetes.client.exceptions import ApiException

from langmerge.constants import TRAINER_GROUP, TRAINER_VERSION, TRAINJOB_PLURAL
from langmerge.dev.jobrunner.api import _Cancelled, _Gone, _transient
from langmerge.dev.jobrunner.config import (
    DEFAULT_BACKOFF_LIMIT,
    JOB,
    MESSAGE_BACKOFF_LIMIT,
    MESSAGE_DEADLINE,
    REASON_BACKOFF_LIMIT,
    REASON_CONFIG,
    REASON_DEADLINE,
    REASON_POD_FAILURE_POLICY,
    REASON_UNSUPPORTED,
    TERMINATION_MESSAGE_ENV,
    TRAINJOB,
    TRAINJOB_NODE,
    RunnerConfig,
)
from langmerge.dev.jobrunner.environment import (
    ContainerConfigError,
    PodIdentity,
    _ApiObjects,
    child_environment,
    pod_identity,
    resolve_env,
)
from langmerge.dev.jobrunner.mapping import (
    NotRunnable,
    container_exit_code,
    expand,
    free_port,
    match_pod_failure_policy,
    plan_command,
    pod_failure_policy,
    termination_message,
    torch_env,
    trainjob_container,
    trainjob_layout,
)
from langmerge.dev.jobrunner.processes import (
    _exit_description,
    _exited,
    _killpg,
    _spawn,
    _with_last_words,
)
from langmerge.dev.jobrunner.status import (
    MESSAGE_TRAINJOB_COMPLETE,
    MESSAGE_TRAINJOB_RESUMED,
    MESSAGE_TRAINJOB_SUSPENDED,
    REASON_TRAINJOB_COMPLETE,
    is_suspended,
    job_finished,
    parse_rfc3339,
    rfc3339,
    status_complete,
    status_failed,
    status_resumed,
    status_retrying,
    status_started,
    status_suspended,
    trainjob_condition,
    unsupported_reason,
    wants_to_run,
    was_suspended,
)
from langmerge.dev.watching import WorkFolder

log = logging.getLogger("langmerge.jobrunner")
T = TypeVar("T")


class RunnerHandle(Protocol):
    """What a worker uses of the runner that started it (:class:`langmerge.dev.jobrunner.runner.LocalJobRunner`):
    a protocol, so that the runner imports its workers and never the other way round."""

    config: RunnerConfig
    _batch: Any
    _core: Any
    _custom: Any

    _work: WorkFolder

    def _worker_done(self, worker: _Worker, closed: bool) -> None: ...


class _Worker:
    """Runs one Job: its attempts one after another, and its status."""

    def __init__(self, runner: RunnerHandle, job: dict[str, Any]) -> None:
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

    def _refresh(self) -> bool | None:
        """Read the Job again (:class:`_Gone` if it was deleted or replaced): True if it is finished, False if it
        does not want to run (suspended), None to go on."""
        job = self._call(self._read)
        if job is None or job["metadata"].get("uid") != self.uid:
            raise _Gone
        self.job = job
        if job_finished(job) is not None:
            return True
        if not wants_to_run(job):
            return False
        return None

    def _run(self) -> bool:
        """Run the Job to its end; True when it is finished (or gone) for this runner."""
        settled = self._refresh()
        if settled is not None:
            return settled
        job = self.job
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
                proc = _spawn(argv, cwd=workdir, env=env, out=out)
            except OSError as err:
                out.write(f"langmerge jobrunner: cannot start {argv[0]!r}: {err}\n".encode())
                return 126 if isinstance(err, PermissionError) else 127
        pid_file = self._record_pid(self.name, attempt, proc)
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

    def _record_pid(self, name: str, attempt: int, proc: subprocess.Popen[bytes]) -> Path:
        """The process's pid and start time in the runner's pid folder, so that a later runner can kill what a
        crashed one left behind."""
        return self.runner._work.record_pid(f"{self.namespace}_{name}_{attempt}", proc.pid)

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
        """The Job as the API server has it, or None if it is gone."""
        try:
            resp = self._get_object()
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        job: dict[str, Any] = json.loads(resp.data)
        return job

    def _patch(self, status: dict[str, Any]) -> None:
        """Merge-patch the Job's status (guarded by its uid); :class:`_Gone` if the Job is no longer there."""
        body = {"metadata": {"uid": self.uid}, "status": status}

        def call() -> dict[str, Any]:
            try:
                resp = self._patch_status(body)
            except ApiException as err:
                if err.status == 404 or (err.status == 422 and "metadata.uid" in str(err.body)):
                    raise _Gone from err
                raise
            obj: dict[str, Any] = json.loads(resp.data)
            return obj

        self.job = self._call(call)

    def _get_object(self) -> Any:
        """GET of the Job (an unparsed response)."""
        return self.runner._batch.read_namespaced_job(
            self.name, self.namespace, _preload_content=False, _request_timeout=self.config.request_timeout_seconds
        )

    def _patch_status(self, body: dict[str, Any]) -> Any:
        """Merge-patch of the Job's /status with ``body`` (an unparsed response)."""
        return self.runner._batch.patch_namespaced_job_status(
            self.name,
            self.namespace,
            body,
            _content_type="application/merge-patch+json",
            _preload_content=False,
            _request_timeout=self.config.request_timeout_seconds,
        )

    def _fail(self, reason: str, message: str, *, failed: int | None = None) -> None:
        log.info("Job %s/%s failed: %s: %s", self.namespace, self.name, reason, message)
        self._patch(status_failed(self._status, reason, message, rfc3339(), failed=failed))


class _TrainJobWorker(_Worker):
    """Runs one TrainJob: ``numNodes`` local processes (each the trainer's launcher with ``numProcPerNode`` workers)
    joined by torchrun's rendezvous on 127.0.0.1, with the variables Kubeflow Trainer injects. A node that fails
    stops the others; the TrainJob then fails (a JobSet without restarts), except that a disrupted attempt (the
    ``Ignore`` rule of the podFailurePolicy in its annotation) runs again. Suspension (Kueue) stops the nodes with
    SIGTERM (they checkpoint) and records a ``Suspended`` condition; unsuspended, the TrainJob runs again."""

    def __init__(self, runner: RunnerHandle, job: dict[str, Any]) -> None:
        super().__init__(runner, job)
        self.kind = TRAINJOB
        self._culprit: int | None = None

    # -- API
    def _get_object(self) -> Any:
        return self.runner._custom.get_namespaced_custom_object(
            TRAINER_GROUP,
            TRAINER_VERSION,
            self.namespace,
            TRAINJOB_PLURAL,
            self.name,
            _preload_content=False,
            _request_timeout=self.config.request_timeout_seconds,
        )

    def _patch_status(self, body: dict[str, Any]) -> Any:
        return self.runner._custom.patch_namespaced_custom_object_status(
            TRAINER_GROUP,
            TRAINER_VERSION,
            self.namespace,
            TRAINJOB_PLURAL,
            self.name,
            body,
            _content_type="application/merge-patch+json",
            _preload_content=False,
            _request_timeout=self.config.request_timeout_seconds,
        )

    def _condition(self, kind: str, value: str, reason: str, message: str) -> None:
        self._patch({"conditions": trainjob_condition(self._status, kind, value, reason, message, rfc3339())})

    def _fail(self, reason: str, message: str, *, failed: int | None = None) -> None:
        log.info("TrainJob %s/%s failed: %s: %s", self.namespace, self.name, reason, message)
        self._condition("Failed", "True", reason, message)

    # -- main
    def _run(self) -> bool:
        settled = self._refresh()
        if settled is not None:
            return settled
        job = self.job
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
                    proc = _spawn(argv, cwd=workdir, env=env, out=out)
                procs.append(proc)
                pid_files.append(self._record_pid(node, attempt, proc))
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
