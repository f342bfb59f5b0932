"""Pure builders of the Jobs the operator creates, and a reader of Job state. No I/O.

Jobs are written for current Kubernetes (ttlSecondsAfterFinished, Kueue's queue-name label, seccomp, a
podFailurePolicy); an older API server simply drops the fields it does not know. The podFailurePolicy is also copied
into an annotation, which is how the local Job runner (development only, on an API server that drops the field) reads it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from langmerge.api.common import Resources
from langmerge.artifacts import parse_time
from langmerge.constants import (
    ANNOTATION_ARTIFACT,
    ANNOTATION_ATTEMPT,
    ANNOTATION_DATA_DIGEST,
    ANNOTATION_POD_FAILURE_POLICY,
    ANNOTATION_SUSPEND,
    API_VERSION,
    COMPONENT_MERGE,
    COMPONENT_TRAINING,
    EXIT_NOT_RETRYABLE,
    EXPERT_KIND,
    LABEL_COMPONENT,
    LABEL_EXPERT,
    LABEL_FINGERPRINT,
    LABEL_KUEUE_QUEUE,
    LABEL_LANGUAGE,
    LABEL_MANAGED_BY,
    LABEL_MERGED,
    LABEL_TASK,
    MANAGED_BY,
    MERGED_KIND,
    TRAINER_COMMAND,
    TRAINER_CONTAINER,
)
from langmerge.settings import Settings
from langmerge.tasks import MergeTask, TrainTask

#: Where the Job's pod keeps downloaded base models and scratch files (emptyDir volumes).
CACHE_DIR = "/cache"
#: The non-root user of the trainer image.
TRAINER_UID = 1000
#: Where the trainer writes why it failed (Kubernetes shows it in the pod's status; the default path, made explicit).
TERMINATION_MESSAGE_PATH = "/dev/termination-log"

_LABEL_VALUE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class Owner:
    """The custom resource that owns a Job."""

    kind: str
    namespace: str
    name: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def label_value(value: str) -> str:
    """A valid label value (<= 63 chars, alphanumeric at both ends)."""
    cleaned = _LABEL_VALUE.sub("-", value)[:63]
    return cleaned.strip("-_.") or "x"


def owner_hash(owner: Owner, place: str = "") -> str:
    """8 hex digits identifying one object: its namespace, name and uid (a re-created object gets another), and
    ``place`` if given (where the Job writes)."""
    key = f"{owner.namespace}/{owner.name}/{owner.uid}" + (f"/{place}" if place else "")
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def job_name(owner: Owner, component: str, fingerprint: str, attempt: int, place: str = "") -> str:
    """Deterministic, unique, <= 63 characters: ``<name>-<train|merge>-<fp10>-<owner hash>-<attempt>``.

    The name is shortened to fit; the hash of namespace, name and uid keeps two objects whose names share a long
    prefix (or a deleted and re-created object) from ever mapping to the same Job. ``place`` (a merge Job's output
    prefix) enters the hash: the same merge into another output is another Job."""
    tag = "train" if component == COMPONENT_TRAINING else "merge"
    suffix = f"-{tag}-{fingerprint[:10]}-{owner_hash(owner, place)}-{attempt}"
    base = owner.name[: 63 - len(suffix)].rstrip("-.")
    return f"{base}{suffix}"


def selector(**labels: str) -> str:
    """A label selector string for our Jobs."""
    pairs = {LABEL_MANAGED_BY: MANAGED_BY, **labels}
    return ",".join(f"{k}={v}" for k, v in sorted(pairs.items()))


def _resources(resources: Resources, settings: Settings) -> dict[str, Any]:
    requests: dict[str, Any] = {"cpu": resources.cpu, "memory": resources.memory}
    limits: dict[str, Any] = {"memory": resources.memory}
    if resources.gpus > 0:
        gpu = resources.gpu_resource_name or settings.gpu_resource_name
        requests[gpu] = str(resources.gpus)
        limits[gpu] = str(resources.gpus)
    return {"requests": requests, "limits": limits}


def _env(settings: Settings) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if settings.s3_endpoint:
        env.append({"name": "LANGMERGE_S3_ENDPOINT", "value": settings.s3_endpoint})
    env += [
        {"name": "AWS_REGION", "value": settings.s3_region},
        {
            "name": "AWS_ACCESS_KEY_ID",
            "valueFrom": {
                "secretKeyRef": {"name": settings.s3_secret_name, "key": settings.s3_secret_access_key_id_key}
            },
        },
        {
            "name": "AWS_SECRET_ACCESS_KEY",
            "valueFrom": {
                "secretKeyRef": {"name": settings.s3_secret_name, "key": settings.s3_secret_secret_access_key_key}
            },
        },
        {"name": "LANGMERGE_MODEL_CACHE", "value": f"{CACHE_DIR}/models"},
        {"name": "LANGMERGE_LOG_LEVEL", "value": settings.trainer_log_level},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "HOME", "value": f"{CACHE_DIR}/home"},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    env += [{"name": k, "value": v} for k, v in settings.job_env]
    return env


def pod_failure_policy(container: str = TRAINER_CONTAINER) -> dict[str, Any]:
    """Fail the Job at once when the trainer reports an error no retry can fix (bad data, bad spec: a second pod
    would only fail again, after another GPU allocation and model download); do not count pods that were disrupted
    (preemption, node drain, eviction) against ``backoffLimit``: the next pod resumes from the last checkpoint."""
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": container,
                    "operator": "In",
                    "values": list(EXIT_NOT_RETRYABLE),
                },
            },
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": TRAINER_UID,
        "runAsGroup": TRAINER_UID,
        "fsGroup": TRAINER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def pod_volumes() -> list[dict[str, Any]]:
    """Scratch space of a trainer pod: the model cache, /tmp and shared memory (torch's workers and NCCL use it)."""
    return [
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
    ]


def volume_mounts() -> list[dict[str, Any]]:
    return [
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "shm", "mountPath": "/dev/shm"},
    ]


def kueue_labels(labels: dict[str, str], settings: Settings) -> dict[str, str]:
    """``labels`` plus Kueue's queue-name label when a queue is configured."""
    return {**labels, LABEL_KUEUE_QUEUE: settings.kueue_queue} if settings.kueue_queue else labels


def train_args(task: TrainTask, *, layout_from_env: bool = False) -> list[str]:
    """The trainer's arguments for one pod of ``task``: one process, or the launcher (torchrun) with one process
    per GPU. With ``layout_from_env`` (a TrainJob) the launcher reads nodes, processes per node, node rank and the
    rendezvous address from the ``PET_*`` variables Kubeflow Trainer injects, as torchrun does."""
    if layout_from_env:
        return ["distributed", "train", "--task", task.to_json()]
    per_node = task.spec.resources.processes_per_node()
    if per_node > 1:
        launcher = ["--standalone", "--nnodes=1", f"--nproc-per-node={per_node}"]
        return ["distributed", *launcher, "train", "--task", task.to_json()]
    return ["train", "--task", task.to_json()]


def _job(
    *,
    name: str,
    owner: Owner,
    labels: dict[str, str],
    annotations: dict[str, str],
    resources: Resources,
    image: str,
    args: list[str],
    settings: Settings,
) -> dict[str, Any]:
    pod_labels = labels  # the queue-name label goes on the Job only: Kueue manages the Job, not its pods
    labels = kueue_labels(labels, settings)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": pod_security_context(),
        "containers": [
            {
                "name": TRAINER_CONTAINER,
                "image": image,
                "imagePullPolicy": settings.image_pull_policy,
                "command": [TRAINER_COMMAND],
                "args": args,
                "env": _env(settings),
                "resources": _resources(resources, settings),
                "terminationMessagePath": TERMINATION_MESSAGE_PATH,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": container_security_context(),
                "volumeMounts": volume_mounts(),
            }
        ],
        "volumes": pod_volumes(),
    }
    if resources.node_selector:
        pod_spec["nodeSelector"] = dict(resources.node_selector)
    if resources.tolerations:
        pod_spec["tolerations"] = [t.to_api() for t in resources.tolerations]
    if resources.priority_class_name:
        pod_spec["priorityClassName"] = resources.priority_class_name
    if settings.job_service_account:
        pod_spec["serviceAccountName"] = settings.job_service_account
    policy = pod_failure_policy()
    annotations = {**annotations, ANNOTATION_POD_FAILURE_POLICY: json.dumps(policy, separators=(",", ":"))}
    spec: dict[str, Any] = {
        "backoffLimit": settings.job_backoff_limit,
        "podFailurePolicy": policy,
        "activeDeadlineSeconds": resources.active_deadline_seconds,
        "ttlSecondsAfterFinished": settings.job_ttl_seconds,
        "completions": 1,
        "parallelism": 1,
        "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
    }
    if settings.kueue_queue:
        # Kueue admits the Job by unsuspending it (and may suspend it again to preempt it).
        spec["suspend"] = True
        annotations = {**annotations, ANNOTATION_SUSPEND: "true"}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner.reference()],
        },
        "spec": spec,
    }


def training_labels(owner: Owner, task: TrainTask) -> dict[str, str]:
    """The labels of a training run (Job or TrainJob, and their pods): component, expert, fingerprint, language, task."""
    return {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_COMPONENT: COMPONENT_TRAINING,
        LABEL_EXPERT: label_value(owner.name),
        LABEL_FINGERPRINT: task.fingerprint,
        LABEL_LANGUAGE: label_value(task.spec.language),
        LABEL_TASK: label_value(task.spec.task),
    }


def build_training_job(owner: Owner, task: TrainTask, settings: Settings) -> dict[str, Any]:
    """The training Job of one attempt at one fingerprint of a LanguageExpert."""
    assert owner.kind == EXPERT_KIND
    spec = task.spec
    labels = training_labels(owner, task)
    return _job(
        name=job_name(owner, COMPONENT_TRAINING, task.fingerprint, task.attempt),
        owner=owner,
        labels=labels,
        annotations={
            ANNOTATION_ATTEMPT: str(task.attempt),
            ANNOTATION_DATA_DIGEST: task.data_digest,
            ANNOTATION_ARTIFACT: task.output_uri,
        },
        resources=spec.resources,
        image=task.image or settings.trainer_image,
        args=train_args(task),
        settings=settings,
    )


def build_merge_job(owner: Owner, task: MergeTask, resources: Resources, settings: Settings) -> dict[str, Any]:
    """The merge (and per-language evaluation) Job of one attempt at one fingerprint of a MergedModel."""
    assert owner.kind == MERGED_KIND
    labels = {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_COMPONENT: COMPONENT_MERGE,
        LABEL_MERGED: label_value(owner.name),
        LABEL_FINGERPRINT: task.fingerprint,
    }
    return _job(
        name=job_name(owner, COMPONENT_MERGE, task.fingerprint, task.attempt, place=task.output_uri),
        owner=owner,
        labels=labels,
        annotations={ANNOTATION_ATTEMPT: str(task.attempt), ANNOTATION_ARTIFACT: task.output_uri},
        resources=resources,
        image=task.image or settings.trainer_image,
        args=["merge", "--task", task.to_json()],
        settings=settings,
    )


def is_suspended(job: Any, annotations: dict[str, str]) -> bool:
    """``spec.suspend`` of a Job; where the API server dropped the field (before 1.21), its annotation copy."""
    suspend = _get(job, "spec", "suspend")
    if suspend is not None:
        return bool(suspend)
    return annotations.get(ANNOTATION_SUSPEND) == "true"


@dataclass(frozen=True)
class JobState:
    """What the operator needs to know about one of its Jobs."""

    name: str
    fingerprint: str
    attempt: int
    active: bool
    succeeded: bool
    failed: bool
    reason: str
    message: str
    created: str | None
    started: str | None
    finished: str | None
    #: Suspended (``spec.suspend``): waiting for Kueue's admission, or preempted by it.
    suspended: bool = False
    #: ``Job`` or ``TrainJob``.
    kind: str = "Job"
    #: Where it writes (its artifact prefix annotation), if recorded.
    artifact: str | None = None

    @property
    def running(self) -> bool:
        """Active and admitted: what counts toward the operator's caps (a suspended Job waits in Kueue)."""
        return self.active and not self.suspended

    def wall_seconds(self) -> float | None:
        start, end = parse_time(self.started), parse_time(self.finished)
        if start is None or end is None:
            return None
        return (end - start).total_seconds()


def _get(obj: Any, *path: str) -> Any:
    """Read a field from a Job given as a dict (camelCase) or as a client model (snake_case)."""
    for key in path:
        if obj is None:
            return None
        if isinstance(obj, dict):
            obj = obj.get(key)
        else:
            snake = re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()
            obj = getattr(obj, snake, None)
    return obj


def _time(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return str(value.strftime("%Y-%m-%dT%H:%M:%SZ"))


def job_state(job: Any) -> JobState:
    """Summarise a Job (dict or client model) by its status conditions, as the Job controller writes them."""
    conditions = _get(job, "status", "conditions") or []
    succeeded = failed = False
    reason = message = ""
    finished = None
    for cond in conditions:
        if _get(cond, "status") != "True":
            continue
        ctype = _get(cond, "type")
        if ctype == "Complete":
            succeeded = True
            finished = _time(_get(cond, "lastTransitionTime"))
        elif ctype == "Failed":
            failed = True
            reason = str(_get(cond, "reason") or "Failed")
            message = str(_get(cond, "message") or "")
            finished = _time(_get(cond, "lastTransitionTime"))
    if succeeded and not finished:
        finished = _time(_get(job, "status", "completionTime"))
    labels = _get(job, "metadata", "labels") or {}
    annotations = _get(job, "metadata", "annotations") or {}
    deleting = _get(job, "metadata", "deletionTimestamp") is not None
    return JobState(
        suspended=is_suspended(job, annotations),
        name=str(_get(job, "metadata", "name")),
        fingerprint=str(labels.get(LABEL_FINGERPRINT, "")),
        attempt=int(annotations.get(ANNOTATION_ATTEMPT, "1") or 1),
        active=not (succeeded or failed or deleting),
        succeeded=succeeded,
        failed=failed,
        reason=reason,
        message=message,
        created=_time(_get(job, "metadata", "creationTimestamp")),
        started=_time(_get(job, "status", "startTime")),
        finished=finished,
        artifact=annotations.get(ANNOTATION_ARTIFACT),
    )
