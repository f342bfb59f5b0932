"""Pure status helpers: Kubernetes-style conditions and bounded histories. No I/O."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from langmerge.api.common import Condition, ConditionStatus

T = TypeVar("T")

#: Condition types.
READY = "Ready"
TRAINING = "Training"
DATA_CHANGED = "DataChanged"
DEGRADED = "Degraded"
MERGING = "Merging"
QUALITY_GATE = "QualityGate"
EXPERTS_READY = "ExpertsReady"
#: Sequence classifiers only: every label has training examples (an expert's own data; a MergedModel's experts
#: together).
LABELS_COVERED = "LabelsCovered"


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: bool | ConditionStatus,
    reason: str,
    message: str = "",
    *,
    generation: int | None,
    now: str,
) -> list[Condition]:
    """Return ``conditions`` with ``type_`` set. ``lastTransitionTime`` moves only when the status flips."""
    value = (
        status if isinstance(status, ConditionStatus) else (ConditionStatus.TRUE if status else ConditionStatus.FALSE)
    )
    out: list[Condition] = []
    found = False
    for cond in conditions:
        if cond.type != type_:
            out.append(cond)
            continue
        found = True
        transition = cond.last_transition_time if cond.status == value and cond.last_transition_time else now
        out.append(
            Condition(
                type=type_,
                status=value,
                reason=reason,
                message=message,
                last_transition_time=transition,
                observed_generation=generation,
            )
        )
    if not found:
        out.append(
            Condition(
                type=type_,
                status=value,
                reason=reason,
                message=message,
                last_transition_time=now,
                observed_generation=generation,
            )
        )
    return out


def without_condition(conditions: Sequence[Condition], type_: str) -> list[Condition]:
    """``conditions`` without ``type_`` (a condition that no longer applies, e.g. after a spec change)."""
    return [c for c in conditions if c.type != type_]


def missing_labels(labels: Sequence[str], counts: dict[str, int]) -> list[str]:
    """The labels of ``labels`` (in order) with no training example in ``counts``."""
    return [label for label in labels if counts.get(label, 0) <= 0]


def get_condition(conditions: Sequence[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: Sequence[Condition], type_: str) -> bool:
    cond = get_condition(conditions, type_)
    return cond is not None and cond.status == ConditionStatus.TRUE


def merge_patch_body(value: Any, *, in_list: bool = False) -> Any:
    """A status as a JSON merge patch: ``None`` on an object key deletes that key; inside arrays (which a merge patch
    replaces whole) ``None`` and empty-string fields are dropped, since there they would be literal nulls the schema
    rejects (the API client sends an empty string as null)."""
    if isinstance(value, dict):
        return {k: merge_patch_body(v, in_list=in_list) for k, v in value.items() if not (in_list and v in (None, ""))}
    if isinstance(value, list):
        return [merge_patch_body(v, in_list=True) for v in value]
    return value


def bounded(history: Sequence[T], item: T, limit: int) -> list[T]:
    """Append ``item`` and keep the newest ``limit`` entries."""
    out = [*history, item]
    return out[-limit:] if limit > 0 else out


def truncate(message: str, limit: int = 1024) -> str:
    """Status messages stay readable in ``kubectl describe``: one paragraph, bounded."""
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 3] + "..."
