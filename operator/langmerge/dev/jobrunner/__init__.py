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

The package, by seam:

* :mod:`.config`: :class:`RunnerConfig`, image rules, condition reasons and messages;
* :mod:`.mapping`: Job-to-process mapping (pure): image -> local command, ``$(VAR)`` expansion, podFailurePolicy,
  termination messages, a TrainJob's nodes;
* :mod:`.environment`: Secret handling: the container's environment resolved as kubelet does, from Secrets and
  ConfigMaps read from the API server;
* :mod:`.status`: status writing (pure): what the Job controller (or Kubeflow Trainer) writes to ``/status``;
* :mod:`.worker`, :mod:`.processes`, :mod:`.api`: process supervision: one worker per Job runs its attempts and
  writes its status;
* :mod:`.runner`: :class:`LocalJobRunner`, which watches Jobs and hands them to workers; :mod:`.cli`: ``langmerge
  jobrunner`` (also ``python -m langmerge.dev.jobrunner``).

What it shares with the local serving runner lives outside the package: the settings, work folder, list + watch loop
and life cycle in :mod:`langmerge.dev.watching`, the command-line pieces in :mod:`langmerge.dev.runnercli`.
"""

from __future__ import annotations

from langmerge.dev.jobrunner.cli import build_parser, main
from langmerge.dev.jobrunner.config import (
    CONTAINER_PATH,
    DEFAULT_BACKOFF_LIMIT,
    DEFAULT_TRAINER_PATTERN,
    HOST_IMAGE,
    JOB,
    MESSAGE_BACKOFF_LIMIT,
    MESSAGE_COMPLETE,
    MESSAGE_DEADLINE,
    REASON_BACKOFF_LIMIT,
    REASON_COMMAND,
    REASON_COMPLETE,
    REASON_CONFIG,
    REASON_DEADLINE,
    REASON_IMAGE,
    REASON_POD_FAILURE_POLICY,
    REASON_UNSUPPORTED,
    TERMINATION_LOG_TAIL_BYTES,
    TERMINATION_LOG_TAIL_LINES,
    TERMINATION_MESSAGE_ENV,
    TERMINATION_MESSAGE_MAX_BYTES,
    TRAINER_MODULE,
    TRAINJOB,
    TRAINJOB_NODE,
    ImageRule,
    Mode,
    RunnerConfig,
    RunnerError,
)
from langmerge.dev.jobrunner.environment import (
    ContainerConfigError,
    ObjectSource,
    PodIdentity,
    child_environment,
    field_value,
    pod_identity,
    resolve_env,
)
from langmerge.dev.jobrunner.mapping import (
    NotRunnable,
    container_exit_code,
    expand,
    free_port,
    image_repository,
    match_image,
    match_pod_failure_policy,
    plan_command,
    pod_failure_policy,
    termination_message,
    torch_env,
    trainjob_container,
    trainjob_layout,
)
from langmerge.dev.jobrunner.runner import LocalJobRunner
from langmerge.dev.jobrunner.status import (
    MESSAGE_TRAINJOB_COMPLETE,
    MESSAGE_TRAINJOB_RESUMED,
    MESSAGE_TRAINJOB_SUSPENDED,
    REASON_TRAINJOB_COMPLETE,
    condition,
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

__all__ = [
    "CONTAINER_PATH",
    "DEFAULT_BACKOFF_LIMIT",
    "DEFAULT_TRAINER_PATTERN",
    "HOST_IMAGE",
    "JOB",
    "MESSAGE_BACKOFF_LIMIT",
    "MESSAGE_COMPLETE",
    "MESSAGE_DEADLINE",
    "MESSAGE_TRAINJOB_COMPLETE",
    "MESSAGE_TRAINJOB_RESUMED",
    "MESSAGE_TRAINJOB_SUSPENDED",
    "REASON_BACKOFF_LIMIT",
    "REASON_COMMAND",
    "REASON_COMPLETE",
    "REASON_CONFIG",
    "REASON_DEADLINE",
    "REASON_IMAGE",
    "REASON_POD_FAILURE_POLICY",
    "REASON_TRAINJOB_COMPLETE",
    "REASON_UNSUPPORTED",
    "TERMINATION_LOG_TAIL_BYTES",
    "TERMINATION_LOG_TAIL_LINES",
    "TERMINATION_MESSAGE_ENV",
    "TERMINATION_MESSAGE_MAX_BYTES",
    "TRAINER_MODULE",
    "TRAINJOB",
    "TRAINJOB_NODE",
    "ContainerConfigError",
    "ImageRule",
    "LocalJobRunner",
    "Mode",
    "NotRunnable",
    "ObjectSource",
    "PodIdentity",
    "RunnerConfig",
    "RunnerError",
    "build_parser",
    "child_environment",
    "condition",
    "container_exit_code",
    "expand",
    "field_value",
    "free_port",
    "image_repository",
    "is_suspended",
    "job_finished",
    "main",
    "match_image",
    "match_pod_failure_policy",
    "parse_rfc3339",
    "plan_command",
    "pod_failure_policy",
    "pod_identity",
    "resolve_env",
    "rfc3339",
    "status_complete",
    "status_failed",
    "status_resumed",
    "status_retrying",
    "status_started",
    "status_suspended",
    "termination_message",
    "torch_env",
    "trainjob_condition",
    "trainjob_container",
    "trainjob_layout",
    "unsupported_reason",
    "wants_to_run",
    "was_suspended",
]
