"""``MergedModel.spec.serving``: where each published revision is rolled out, and ``status.serving``: how it went.

Two kinds of target:

* ``kserve``: an existing KServe ``InferenceService`` in the MergedModel's namespace. On every publish the operator
  points its predictor's ``storageUri`` at the new revision's immutable merge prefix (never at ``current.json``) with
  ``canaryTrafficPercent``, follows the InferenceService's own status, promotes the revision to 100% once it has been
  Ready for ``promoteAfter``, and restores the previous ``storageUri`` when it is not Ready within ``readyTimeout`` or
  fails to load.
* ``cloudEvents``: an HTTP sink that receives a binary-mode CloudEvent for each publish, canary start, promotion,
  rollback and failure.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from langmerge.api.common import ApiModel, StatusModel

#: A duration: one or more number-unit pairs, e.g. ``10m``, ``1h30m``, ``45s``, ``0s``.
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
#: An InferenceService name (a DNS-1035 label: KServe derives Service names from it).
ISVC_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
#: An http(s) URL.
URL_PATTERN = r"^https?://[^\s/$.?#][^\s]*$"


def parse_duration(value: str) -> float:
    """Seconds in a duration such as ``10m`` or ``1h30m`` (:data:`DURATION_PATTERN`)."""
    if not re.fullmatch(DURATION_PATTERN, value):
        raise ValueError(f"{value!r} is not a duration such as 30s, 10m or 1h30m")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART.findall(value))


def _duration(description: str, default: str) -> Any:
    return Field(default=default, pattern=DURATION_PATTERN, max_length=32, description=description)


class ServingRuntime(StrEnum):
    #: langmerge's model server (``langmerge-trainer serve``, on KServe's Python model server): the merge prefix,
    #: PEFT adapter (on its base model) or full weights, causal LMs and sequence classifiers.
    LANGMERGE = "langmerge"
    #: KServe's Hugging Face runtime: full weights only (``storageUri`` is the revision's ``model/`` folder).
    HUGGINGFACE = "huggingface"


#: The output formats each runtime can load.
RUNTIME_FORMATS: dict[ServingRuntime, frozenset[str]] = {
    ServingRuntime.LANGMERGE: frozenset({"peft-adapter", "full-weights"}),
    ServingRuntime.HUGGINGFACE: frozenset({"full-weights"}),
}


class KServeTarget(ApiModel):
    """Roll each published revision out to an existing KServe InferenceService in this MergedModel's namespace."""

    inference_service: Annotated[
        str,
        Field(
            pattern=ISVC_NAME_PATTERN,
            max_length=63,
            description="Name of the InferenceService (in this MergedModel's namespace; it must exist). One "
            "MergedModel owns it: a second one naming it is refused.",
        ),
    ]
    runtime: Annotated[
        ServingRuntime,
        Field(
            default=ServingRuntime.LANGMERGE,
            description="What the predictor runs: langmerge (langmerge's KServe model server: PEFT adapter or full "
            "weights, storageUri is the revision's merge prefix) or huggingface (KServe's Hugging Face runtime: "
            "full-weights output only, storageUri is the revision's model/ folder). A format the runtime cannot load "
            "is refused before anything is rolled out.",
        ),
    ] = ServingRuntime.LANGMERGE
    canary_traffic_percent: Annotated[
        int,
        Field(
            default=10,
            ge=1,
            le=100,
            description="Share of requests the new revision gets while it is a canary; 100 rolls it out at once "
            "(no canary). The first rollout to an InferenceService that serves nothing yet always takes 100%.",
        ),
    ] = 10
    promote_after: Annotated[
        str,
        _duration("How long the canary must stay Ready and healthy before it gets 100% (0s: as soon as Ready).", "10m"),
    ] = "10m"
    ready_timeout: Annotated[
        str,
        _duration(
            "How long the new revision may take to become Ready; then the previous storageUri is restored.", "15m"
        ),
    ] = "15m"

    @field_validator("promote_after", "ready_timeout")
    @classmethod
    def _bounded(cls, value: str) -> str:
        if parse_duration(value) > 7 * 86400:
            raise ValueError(f"{value} is longer than 7 days")
        return value

    @property
    def promote_after_seconds(self) -> float:
        return parse_duration(self.promote_after)

    @property
    def ready_timeout_seconds(self) -> float:
        return parse_duration(self.ready_timeout)


class CloudEventsTarget(ApiModel):
    """Announce publishing and rollouts as binary-mode CloudEvents to an HTTP sink (e.g. a Knative Broker)."""

    sink: Annotated[
        str,
        Field(
            pattern=URL_PATTERN,
            max_length=2048,
            description="URL the events are POSTed to. Types: dev.langmerge.mergedmodel.published, .canary.started, "
            ".promoted, .rolledback, .failed; data: revision, URIs, per-language metrics. Delivery is retried with "
            "backoff (5 attempts per event); a failing sink shows in status and never delays a publish or a "
            "rollout.",
        ),
    ]


class ServingTarget(ApiModel):
    """One serving target: exactly one of kserve and cloudEvents."""

    kserve: Annotated[KServeTarget | None, Field(default=None, description="A KServe InferenceService.")] = None
    cloud_events: Annotated[CloudEventsTarget | None, Field(default=None, description="A CloudEvents sink.")] = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ServingTarget:
        if (self.kserve is None) == (self.cloud_events is None):
            raise ValueError("a serving target sets exactly one of kserve and cloudEvents")
        return self

    @property
    def key(self) -> str:
        """How status names the target: ``kserve/<name>`` or ``cloudEvents/<sink>``."""
        if self.kserve is not None:
            return f"kserve/{self.kserve.inference_service}"
        assert self.cloud_events is not None
        return f"cloudEvents/{self.cloud_events.sink}"


def unique_targets(targets: list[ServingTarget]) -> list[ServingTarget]:
    """``targets`` with no InferenceService or sink named twice (a ValueError names the repeated one)."""
    seen: set[str] = set()
    for target in targets:
        if target.key in seen:
            raise ValueError(f"serving target {target.key} is listed twice")
        seen.add(target.key)
    return targets


class ServingPhase(StrEnum):
    #: The InferenceService is being pointed at the revision, or the revision is loading.
    PROGRESSING = "Progressing"
    #: The revision is Ready and takes canaryTrafficPercent of requests until promoteAfter has passed.
    CANARY = "Canary"
    #: The revision takes every request.
    PROMOTED = "Promoted"
    #: The revision did not become Ready (or failed); the previous storageUri was restored.
    ROLLED_BACK = "RolledBack"
    #: The target cannot be served (no such InferenceService, owned by another MergedModel, format not servable).
    FAILED = "Failed"
    #: CloudEvents: the last event was delivered.
    DELIVERED = "Delivered"
    #: CloudEvents: the sink does not accept events (retrying).
    FAILING = "Failing"


class ServingStatus(StatusModel):
    """What one serving target does with the published revisions."""

    target: Annotated[str, Field(description="kserve/<InferenceService> or cloudEvents/<sink>.")]
    phase: Annotated[ServingPhase | None, Field(default=None)] = None
    revision: Annotated[
        int | None, Field(default=None, description="kserve: the revision serving all (or the non-canary) requests.")
    ] = None
    canary_revision: Annotated[
        int | None, Field(default=None, description="kserve: the revision in canary (or being rolled out).")
    ] = None
    storage_uri: Annotated[str | None, Field(default=None, description="kserve: the predictor's storageUri.")] = None
    url: Annotated[str | None, Field(default=None, description="kserve: the InferenceService's URL.")] = None
    since: Annotated[str | None, Field(default=None, description="When the phase began.")] = None
    message: Annotated[str | None, Field(default=None)] = None
    delivered: Annotated[int | None, Field(default=None, description="cloudEvents: events delivered.")] = None
    failed: Annotated[int | None, Field(default=None, description="cloudEvents: events given up.")] = None
    pending: Annotated[int | None, Field(default=None, description="cloudEvents: events waiting or retrying.")] = None
