"""Building blocks shared by both custom resources.

Every model here is the single source of truth for one part of the API: the CRD schema is generated from it
(:mod:`langmerge.api.crdgen`), the operator parses specs with it, and the trainer reads its task from it.
Field descriptions become the CRD's ``description`` fields, so they are written for the person running ``kubectl explain``.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

#: An ``s3://bucket/prefix`` location. Bucket names follow S3's DNS rules; keys must not contain ``//``.
S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/([^/]+/?)*)?$"
#: A Kubernetes quantity such as ``32Gi``, ``500m`` or ``4``.
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
#: An extended resource name such as ``nvidia.com/gpu`` or ``amd.com/gpu``.
RESOURCE_NAME_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[a-zA-Z0-9]([-_.a-zA-Z0-9]*[a-zA-Z0-9])?$"
)
#: An object name (DNS-1123 subdomain, as for most Kubernetes objects).
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
#: A container image reference.
IMAGE_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9._\-/:@]*$"


class ApiModel(BaseModel):
    """Base of every API object: camelCase on the wire, snake_case in Python, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_enum_values=True,
    )

    def to_api(self) -> dict[str, Any]:
        """The object as it appears in Kubernetes: camelCase keys, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class StatusModel(ApiModel):
    """Status objects are written by the operator; unknown fields from newer operators are tolerated."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        frozen=False,
        use_enum_values=True,
    )


class BaseModelRef(ApiModel):
    """The base model both a LanguageExpert trains on and a MergedModel merges onto."""

    uri: Annotated[
        str,
        Field(
            description="Location of the base model: an S3 prefix holding a Hugging Face format folder "
            "(config.json, *.safetensors, tokenizer files).",
            pattern=S3_URI_PATTERN,
            max_length=1024,
        ),
    ]
    revision: Annotated[
        str | None,
        Field(
            default=None,
            description="Optional revision label of the base model. The operator also digests the objects under "
            "`uri`, so a changed model is noticed without it; bump it to force a new fingerprint.",
            max_length=128,
        ),
    ] = None

    def identity(self) -> str:
        """A short human label, e.g. for error messages."""
        return self.uri if not self.revision else f"{self.uri}@{self.revision}"


class Toleration(ApiModel):
    """A Kubernetes toleration, copied to the Job's pod template."""

    key: Annotated[str | None, Field(default=None, description="Taint key the toleration applies to.")] = None
    operator: Annotated[
        str,
        Field(default="Equal", description="Relation to the value.", json_schema_extra={"enum": ["Equal", "Exists"]}),
    ] = "Equal"
    value: Annotated[str | None, Field(default=None, description="Taint value matched with Equal.")] = None
    effect: Annotated[
        str | None,
        Field(
            default=None,
            description="Taint effect to match; empty matches all.",
            json_schema_extra={"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
        ),
    ] = None
    toleration_seconds: Annotated[
        int | None, Field(default=None, ge=0, description="How long a NoExecute taint is tolerated.")
    ] = None


class Resources(ApiModel):
    """What the Job's pod asks the scheduler for."""

    gpus: Annotated[int, Field(default=1, ge=0, le=16, description="GPUs per Job (0 runs on CPU).")] = 1
    gpu_resource_name: Annotated[
        str | None,
        Field(
            default=None,
            description="Extended resource name of the GPU; defaults to the operator's setting (nvidia.com/gpu).",
            pattern=RESOURCE_NAME_PATTERN,
            max_length=253,
        ),
    ] = None
    cpu: Annotated[
        str, Field(default="4", description="CPU request (a Kubernetes quantity).", pattern=QUANTITY_PATTERN)
    ] = "4"
    memory: Annotated[
        str,
        Field(
            default="32Gi", description="Memory request and limit (a Kubernetes quantity).", pattern=QUANTITY_PATTERN
        ),
    ] = "32Gi"
    node_selector: Annotated[
        dict[str, str], Field(default_factory=dict, description="Node labels the Job's pod must match.")
    ]
    tolerations: Annotated[
        list[Toleration], Field(default_factory=list, description="Tolerations for tainted (e.g. GPU) nodes.")
    ]
    priority_class_name: Annotated[
        str | None, Field(default=None, description="PriorityClass of the Job's pod.", pattern=NAME_PATTERN)
    ] = None
    active_deadline_seconds: Annotated[
        int,
        Field(default=86400, ge=60, le=30 * 86400, description="Wall-clock limit of one Job; the Job fails after it."),
    ] = 86400


class OnChange(StrEnum):
    """What to do when the desired state changes while a Job for an older one runs."""

    WAIT = "wait"
    RESTART = "restart"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(StatusModel):
    """A Kubernetes-style condition (metav1.Condition)."""

    type: Annotated[str, Field(description="Condition type, e.g. Ready.")]
    status: Annotated[ConditionStatus, Field(description="True, False or Unknown.")]
    reason: Annotated[str, Field(default="", description="CamelCase reason of the last transition.")] = ""
    message: Annotated[str, Field(default="", description="Human-readable details.")] = ""
    last_transition_time: Annotated[
        str | None, Field(default=None, description="When the status last changed (RFC 3339).")
    ] = None
    observed_generation: Annotated[
        int | None, Field(default=None, description="The .metadata.generation the condition was computed for.")
    ] = None


#: ``status.health`` when the Degraded condition is False.
HEALTHY = "OK"
#: ``status.health``: the Degraded condition in one word, for ``kubectl get`` (a printer column).
Health = Annotated[
    str | None,
    Field(
        default=None,
        description="OK, or 'Degraded: <reason>' while the Degraded condition is True (e.g. StorageUnavailable "
        "during an S3 outage: every object shows it within seconds).",
    ),
]


_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def label_key_problem(key: str) -> str | None:
    """Why ``key`` is not a label key the API server accepts (``[prefix/]name``), or None."""
    prefix, sep, name = key.rpartition("/")
    if sep and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return f"label key {key!r}: the prefix must be a DNS subdomain (lower case, at most 253 characters)"
    if len(name) > 63 or not _LABEL_NAME.match(name):
        return (
            f"label key {key!r}: the name must be at most 63 characters, alphanumeric at both ends, with '-', '_' "
            "or '.' between"
        )
    return None


def label_value_problem(value: str) -> str | None:
    """Why ``value`` is not a label value the API server accepts, or None."""
    if value and (len(value) > 63 or not _LABEL_NAME.match(value)):
        return (
            f"label value {value!r}: at most 63 characters, empty or alphanumeric at both ends, with '-', '_' or "
            "'.' between"
        )
    return None


class LabelSelectorRequirement(ApiModel):
    key: Annotated[str, Field(description="Label key.", min_length=1)]
    operator: Annotated[
        str,
        Field(
            description="Relation of the key to the values.",
            json_schema_extra={"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
        ),
    ]
    values: Annotated[list[str], Field(default_factory=list, description="Values for In and NotIn.")]

    @model_validator(mode="after")
    def _valid_for_the_api_server(self) -> LabelSelectorRequirement:
        problems = [label_key_problem(self.key), *(label_value_problem(v) for v in self.values)]
        if self.operator in ("In", "NotIn") and not self.values:
            problems.append(f"operator {self.operator} on {self.key!r} needs at least one value")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            problems.append(f"operator {self.operator} on {self.key!r} takes no values")
        if self.operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            problems.append(f"unknown operator {self.operator!r} (In, NotIn, Exists, DoesNotExist)")
        found = [p for p in problems if p]
        if found:
            raise ValueError("; ".join(found))
        return self


class LabelSelector(ApiModel):
    """A Kubernetes label selector."""

    match_labels: Annotated[dict[str, str], Field(default_factory=dict, description="Labels that must match exactly.")]
    match_expressions: Annotated[
        list[LabelSelectorRequirement], Field(default_factory=list, description="Set-based requirements.")
    ]

    @field_validator("match_labels")
    @classmethod
    def _labels_valid(cls, value: dict[str, str]) -> dict[str, str]:
        problems = [p for k, v in value.items() for p in (label_key_problem(k), label_value_problem(v)) if p]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    def to_query(self) -> str:
        """The selector in the API's ``labelSelector`` query syntax."""
        parts = [f"{k}={v}" for k, v in sorted(self.match_labels.items())]
        for req in self.match_expressions:
            if req.operator == "In":
                parts.append(f"{req.key} in ({','.join(req.values)})")
            elif req.operator == "NotIn":
                parts.append(f"{req.key} notin ({','.join(req.values)})")
            elif req.operator == "Exists":
                parts.append(req.key)
            else:
                parts.append(f"!{req.key}")
        return ",".join(parts)

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether an object with ``labels`` is selected (the same semantics as the API server)."""
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for req in self.match_expressions:
            present = req.key in labels
            if req.operator == "In" and not (present and labels[req.key] in req.values):
                return False
            if req.operator == "NotIn" and present and labels[req.key] in req.values:
                return False
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
        return True
