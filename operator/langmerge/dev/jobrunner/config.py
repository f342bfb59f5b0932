"""The local Job runner's configuration and constants: image rules, folders, timeouts, condition reasons."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from langmerge.constants import TRAINER_COMMAND, TRAINJOB_KIND

Mode = Literal["trainer", "host"]


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


class RunnerError(RuntimeError):
    """The runner cannot start (bad configuration, work folder already in use)."""


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


#: The torch runtime's trainer container (and replicated job) name.
TRAINJOB_NODE = "node"
