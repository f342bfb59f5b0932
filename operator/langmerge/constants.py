"""Names shared by the operator, the trainer and the tools: API group, kinds, labels and annotations."""

from __future__ import annotations

GROUP = "langmerge.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

EXPERT_KIND = "LanguageExpert"
EXPERT_PLURAL = "languageexperts"
MERGED_KIND = "MergedModel"
MERGED_PLURAL = "mergedmodels"
CATEGORY = "langmerge"

#: Labels on every object the operator creates.
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "langmerge"
LABEL_COMPONENT = "langmerge.dev/component"  # "training" or "merge"
LABEL_EXPERT = "langmerge.dev/expert"
LABEL_MERGED = "langmerge.dev/merged-model"
LABEL_FINGERPRINT = "langmerge.dev/fingerprint"
LABEL_LANGUAGE = "langmerge.dev/language"
LABEL_TASK = "langmerge.dev/task"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"

COMPONENT_TRAINING = "training"
COMPONENT_MERGE = "merge"

#: Annotations on Jobs.
ANNOTATION_ATTEMPT = "langmerge.dev/attempt"
ANNOTATION_DATA_DIGEST = "langmerge.dev/data-digest"
ANNOTATION_ARTIFACT = "langmerge.dev/artifact-uri"
#: A copy of the Job's ``spec.podFailurePolicy`` as JSON. API servers older than 1.26 drop the field on write; the
#: local Job runner (development only) reads the policy from here when the spec has none.
ANNOTATION_POD_FAILURE_POLICY = "langmerge.dev/pod-failure-policy"

#: A copy of a Job's ``spec.suspend`` ("true"/"false"). API servers before 1.21 drop the field on write; the local
#: Job runner and the local Kueue stand-in (development only) read and write the annotation there. Where the API
#: server keeps ``spec.suspend`` (every current one), the field rules and the annotation is only the creation value.
ANNOTATION_SUSPEND = "langmerge.dev/suspend"

#: Kubeflow Trainer's TrainJob (the ``trainjob`` training runtime).
TRAINER_GROUP = "trainer.kubeflow.org"
TRAINER_VERSION = "v1alpha1"
TRAINJOB_KIND = "TrainJob"
TRAINJOB_PLURAL = "trainjobs"
#: KServe's InferenceService (spec.serving kserve targets).
KSERVE_GROUP = "serving.kserve.io"
KSERVE_VERSION = "v1beta1"
ISVC_KIND = "InferenceService"
ISVC_PLURAL = "inferenceservices"
#: Prefix of the annotations that record, on an InferenceService, the rollout the operator drives there.
SERVING_ANNOTATION_PREFIX = "serving.langmerge.dev/"
#: The runtime kind a TrainJob refers to, and the name of the trainer container in Kubeflow Trainer's torch runtimes.
TRAINING_RUNTIME_KIND = "ClusterTrainingRuntime"
TRAINJOB_CONTAINER = "node"

#: Prefix of kopf's own annotations on our objects (progress and diff-base storage).
KOPF_ANNOTATION_PREFIX = "kopf.langmerge.dev"

#: Name of the trainer's command inside the trainer image.
TRAINER_COMMAND = "langmerge-trainer"
#: Name of the trainer's container in a Job's pod.
TRAINER_CONTAINER = "trainer"

#: Exit statuses of ``langmerge-trainer`` (the Job builders' podFailurePolicy matches on them).
EXIT_OK = 0
#: Failed in a way another attempt may not (S3 or a node had a problem): counts against the Job's backoffLimit.
EXIT_FAILED = 1
#: The command line or the task document is invalid: no attempt can succeed.
EXIT_USAGE = 2
#: Stopped early after saving a checkpoint (preemption notice); the next attempt resumes.
EXIT_PREEMPTED = 3
#: An error only the user can fix (bad data, bad spec, inputs that changed): the Job fails at once, no second pod.
EXIT_USER_ERROR = 4
#: Exit statuses that fail a Job at once (``FailJob`` in its podFailurePolicy).
EXIT_NOT_RETRYABLE = (EXIT_USAGE, EXIT_USER_ERROR)
