"""The ``trainjob`` training runtime: a pure builder of Kubeflow Trainer ``TrainJob`` objects, typed with the
``kubeflow-trainer-api`` package's models, and a reader of their state. No I/O.

A TrainJob names a ``ClusterTrainingRuntime`` (``runtimeRef``, the operator setting ``trainjob_runtime``, e.g.
Kubeflow's ``torch-distributed``) and overrides its trainer: image, command, env, ``numNodes``,
``numProcPerNode`` (one process per GPU, one on CPU) and ``resourcesPerNode``. The torch runtime starts one pod per
node and injects torchrun's ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and
``PET_MASTER_PORT``; ``langmerge-trainer distributed`` reads them as torchrun does. Pod settings the runtime does not
take from the trainer (security contexts, scratch volumes, node selector, tolerations, service account, pod labels)
go in a ``runtimePatches`` entry of the operator's.

The operator tracks a TrainJob by its conditions exactly as a Job: ``Complete``, ``Failed`` and ``Suspended``
(Kueue admits a TrainJob by unsuspending it, and preempts it by suspending it again).
"""

from __future__ import annotations

import json
from typing import Any

from langmerge.constants import (
    ANNOTATION_ARTIFACT,
    ANNOTATION_ATTEMPT,
    ANNOTATION_DATA_DIGEST,
    ANNOTATION_POD_FAILURE_POLICY,
    EXPERT_KIND,
    LABEL_FINGERPRINT,
    TRAINER_COMMAND,
    TRAINER_GROUP,
    TRAINER_VERSION,
    TRAINING_RUNTIME_KIND,
    TRAINJOB_CONTAINER,
    TRAINJOB_KIND,
)
from langmerge.controller.jobs import (
    JobState,
    Owner,
    _env,
    _get,
    _resources,
    _time,
    container_security_context,
    kueue_labels,
    owner_hash,
    pod_failure_policy,
    pod_security_context,
    pod_volumes,
    train_args,
    training_labels,
    volume_mounts,
)
from langmerge.settings import Settings
from langmerge.tasks import TrainTask

#: The ``manager`` of the operator's runtime patch.
PATCH_MANAGER = "langmerge.dev/operator"
#: The replicated job of Kubeflow's torch runtimes that runs the trainer nodes.
NODE_REPLICATED_JOB = "node"
#: Longest TrainJob name: Kubeflow Trainer requires an RFC 1035 label (<= 63), and JobSet derives pod host names
#: ``<name>-node-<job>-<index>`` from it, which must stay within 63 characters too.
MAX_NAME = 46


def trainjob_name(owner: Owner, fingerprint: str, attempt: int) -> str:
    """``<name>-<fp10>-<owner hash>-<attempt>``: deterministic, unique per object, an RFC 1035 label of <= 46
    characters (a letter first, no dots)."""
    suffix = f"-{fingerprint[:10]}-{owner_hash(owner)}-{attempt}"
    base = owner.name.replace(".", "-")
    if not base[:1].isalpha():
        base = f"t{base}"
    return f"{base[: MAX_NAME - len(suffix)].rstrip('-')}{suffix}"


def build_trainjob(owner: Owner, task: TrainTask, settings: Settings) -> dict[str, Any]:
    """The TrainJob of one attempt at one fingerprint of a LanguageExpert (``trainjob`` runtime)."""
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_env_var import IoK8sApiCoreV1EnvVar
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_pod_security_context import IoK8sApiCoreV1PodSecurityContext
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_resource_requirements import IoK8sApiCoreV1ResourceRequirements
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_security_context import IoK8sApiCoreV1SecurityContext
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_toleration import IoK8sApiCoreV1Toleration
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_volume import IoK8sApiCoreV1Volume
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_volume_mount import IoK8sApiCoreV1VolumeMount
    from kubeflow_trainer_api.models.io_k8s_apimachinery_pkg_apis_meta_v1_object_meta import (
        IoK8sApimachineryPkgApisMetaV1ObjectMeta,
    )
    from kubeflow_trainer_api.models.io_k8s_apimachinery_pkg_apis_meta_v1_owner_reference import (
        IoK8sApimachineryPkgApisMetaV1OwnerReference,
    )
    from kubeflow_trainer_api.models.trainer_v1alpha1_container_patch import TrainerV1alpha1ContainerPatch
    from kubeflow_trainer_api.models.trainer_v1alpha1_job_set_spec_patch import TrainerV1alpha1JobSetSpecPatch
    from kubeflow_trainer_api.models.trainer_v1alpha1_job_set_template_patch import TrainerV1alpha1JobSetTemplatePatch
    from kubeflow_trainer_api.models.trainer_v1alpha1_job_spec_patch import TrainerV1alpha1JobSpecPatch
    from kubeflow_trainer_api.models.trainer_v1alpha1_job_template_patch import TrainerV1alpha1JobTemplatePatch
    from kubeflow_trainer_api.models.trainer_v1alpha1_pod_spec_patch import TrainerV1alpha1PodSpecPatch
    from kubeflow_trainer_api.models.trainer_v1alpha1_pod_template_patch import TrainerV1alpha1PodTemplatePatch
    from kubeflow_trainer_api.models.trainer_v1alpha1_replicated_job_patch import TrainerV1alpha1ReplicatedJobPatch
    from kubeflow_trainer_api.models.trainer_v1alpha1_runtime_patch import TrainerV1alpha1RuntimePatch
    from kubeflow_trainer_api.models.trainer_v1alpha1_runtime_ref import TrainerV1alpha1RuntimeRef
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job_spec import TrainerV1alpha1TrainJobSpec
    from kubeflow_trainer_api.models.trainer_v1alpha1_trainer import TrainerV1alpha1Trainer
    from kubeflow_trainer_api.models.trainer_v1alpha1_training_runtime_spec_patch import (
        TrainerV1alpha1TrainingRuntimeSpecPatch,
    )

    assert owner.kind == EXPERT_KIND
    spec = task.spec
    resources = spec.resources
    pod_labels = training_labels(owner, task)
    labels = kueue_labels(pod_labels, settings)  # the queue-name label on the TrainJob only, not on its pods
    policy = pod_failure_policy(TRAINJOB_CONTAINER)
    annotations = {
        ANNOTATION_ATTEMPT: str(task.attempt),
        ANNOTATION_DATA_DIGEST: task.data_digest,
        ANNOTATION_ARTIFACT: task.output_uri,
        # What the operator expects of the runtime's node Job; the local Job runner (development only) applies it.
        ANNOTATION_POD_FAILURE_POLICY: json.dumps(policy, separators=(",", ":")),
    }
    ref = owner.reference()
    pod = TrainerV1alpha1PodSpecPatch(
        security_context=IoK8sApiCoreV1PodSecurityContext.from_dict(pod_security_context()),
        volumes=[IoK8sApiCoreV1Volume.from_dict(v) for v in pod_volumes()],
        containers=[
            TrainerV1alpha1ContainerPatch(
                name=TRAINJOB_CONTAINER,
                security_context=IoK8sApiCoreV1SecurityContext.from_dict(container_security_context()),
                volume_mounts=[IoK8sApiCoreV1VolumeMount.from_dict(m) for m in volume_mounts()],
            )
        ],
        node_selector=dict(resources.node_selector) or None,
        tolerations=[IoK8sApiCoreV1Toleration.from_dict(t.to_api()) for t in resources.tolerations] or None,
        service_account_name=settings.job_service_account or None,
    )
    patch = TrainerV1alpha1RuntimePatch(
        manager=PATCH_MANAGER,
        training_runtime_spec=TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=TrainerV1alpha1JobSetTemplatePatch(
                spec=TrainerV1alpha1JobSetSpecPatch(
                    replicated_jobs=[
                        TrainerV1alpha1ReplicatedJobPatch(
                            name=NODE_REPLICATED_JOB,
                            template=TrainerV1alpha1JobTemplatePatch(
                                spec=TrainerV1alpha1JobSpecPatch(
                                    template=TrainerV1alpha1PodTemplatePatch(
                                        metadata=IoK8sApimachineryPkgApisMetaV1ObjectMeta(labels=pod_labels),
                                        spec=pod,
                                    )
                                )
                            ),
                        )
                    ]
                )
            )
        ),
    )
    trainjob = TrainerV1alpha1TrainJob(
        api_version=f"{TRAINER_GROUP}/{TRAINER_VERSION}",
        kind=TRAINJOB_KIND,
        metadata=IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=trainjob_name(owner, task.fingerprint, task.attempt),
            namespace=owner.namespace,
            labels=labels,
            annotations=annotations,
            owner_references=[
                IoK8sApimachineryPkgApisMetaV1OwnerReference(
                    api_version=ref["apiVersion"],
                    kind=ref["kind"],
                    name=ref["name"],
                    uid=ref["uid"],
                    controller=True,
                    block_owner_deletion=True,
                )
            ],
        ),
        spec=TrainerV1alpha1TrainJobSpec(
            runtime_ref=TrainerV1alpha1RuntimeRef(
                api_group=TRAINER_GROUP, kind=TRAINING_RUNTIME_KIND, name=settings.trainjob_runtime
            ),
            # Kueue admits a TrainJob by unsuspending it.
            suspend=True if settings.kueue_queue else None,
            active_deadline_seconds=resources.active_deadline_seconds,
            trainer=TrainerV1alpha1Trainer(
                image=task.image or settings.trainer_image,
                command=[TRAINER_COMMAND],
                args=train_args(task, layout_from_env=True),
                env=[IoK8sApiCoreV1EnvVar.from_dict(e) for e in _env(settings)],
                num_nodes=resources.nodes,
                num_proc_per_node=resources.processes_per_node(),
                resources_per_node=IoK8sApiCoreV1ResourceRequirements.from_dict(_resources(resources, settings)),
            ),
            runtime_patches=[patch],
        ),
    )
    manifest: dict[str, Any] = trainjob.to_dict()
    return manifest


def trainjob_state(obj: Any) -> JobState:
    """Summarise a TrainJob (a dict, as the API returns it) by its conditions, as Kubeflow Trainer writes them."""
    conditions = _get(obj, "status", "conditions") or []
    succeeded = failed = suspended_condition = False
    reason = message = ""
    finished = started = None
    for cond in conditions:
        ctype, status = _get(cond, "type"), _get(cond, "status")
        if ctype == "Suspended":
            suspended_condition = status == "True"
            if status != "True":
                started = _time(_get(cond, "lastTransitionTime"))  # resumed: admitted and running since
            continue
        if status != "True":
            continue
        if ctype == "Complete":
            succeeded = True
            finished = _time(_get(cond, "lastTransitionTime"))
        elif ctype == "Failed":
            failed = True
            reason = str(_get(cond, "reason") or "Failed")
            message = str(_get(cond, "message") or "")
            finished = _time(_get(cond, "lastTransitionTime"))
    labels = _get(obj, "metadata", "labels") or {}
    annotations = _get(obj, "metadata", "annotations") or {}
    deleting = _get(obj, "metadata", "deletionTimestamp") is not None
    suspend = _get(obj, "spec", "suspend")
    created = _time(_get(obj, "metadata", "creationTimestamp"))
    return JobState(
        name=str(_get(obj, "metadata", "name")),
        fingerprint=str(labels.get(LABEL_FINGERPRINT, "")),
        attempt=int(annotations.get(ANNOTATION_ATTEMPT, "1") or 1),
        active=not (succeeded or failed or deleting),
        succeeded=succeeded,
        failed=failed,
        reason=reason,
        message=message,
        created=created,
        started=started or (None if suspend else created),
        finished=finished,
        suspended=bool(suspend) or suspended_condition,
        kind=TRAINJOB_KIND,
    )
