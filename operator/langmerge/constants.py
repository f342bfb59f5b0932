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

#: Prefix of kopf's own annotations on our objects (progress and diff-base storage).
KOPF_ANNOTATION_PREFIX = "kopf.langmerge.dev"

#: Name of the trainer's command inside the trainer image.
TRAINER_COMMAND = "langmerge-trainer"
