"""The local Job runner's configuration and constants: image rules, folders, timeouts, condition reasons."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from langmerge.constants import TRAINER_COMMAND, TRAINJOB_KIND
from langmerge.dev.watching import LocalRunnerConfig, check_not_negative, check_positive

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
class RunnerConfig(LocalRunnerConfig):
    """How the local Job runner maps, runs and reports Jobs. Besides its own fields it has those of
    :class:`~langmerge.dev.watching.LocalRunnerConfig` (keyword-only): ``extra_env`` (applied over the Job's env),
    ``resync_seconds``, ``watch_timeout_seconds``, ``request_timeout_seconds`` and ``kill_grace_seconds``.

    ``work_root`` is the root of the scratch folders ``<work_root>/<namespace>/<job>/<attempt>``; the attempt logs are
    ``<namespace>_<job>_<attempt>.log`` in ``logs_dir`` (default ``<work_root>/_logs``).
    """

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
        check_positive(self, "poll_seconds")
        check_not_negative(self, "retry_delay_seconds", "retry_delay_max_seconds")
        for rule in self.image_rules:
            if rule.mode not in ("trainer", "host"):
                raise ValueError(f"image rule {rule.pattern!r}: mode must be 'trainer' or 'host', got {rule.mode!r}")
        super().__post_init__()

    def attempt_dir(self, namespace: str, job: str, attempt: int) -> Path:
        """The scratch folder (working directory) of one attempt."""
        return self.work_root / namespace / job / str(attempt)

    def attempt_log(self, namespace: str, job: str, attempt: int) -> Path:
        """The log file (stdout and stderr) of one attempt."""
        return self.logs_path / f"{namespace}_{job}_{attempt}.log"


#: The torch runtime's trainer container (and replicated job) name.
TRAINJOB_NODE = "node"
