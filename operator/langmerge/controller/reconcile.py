"""What both reconcilers share: one pass over one object, with its status edited in memory and written once."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import ValidationError

from langmerge.api.common import Condition
from langmerge.controller.runtime import Key, Runtime, object_key
from langmerge.controller.status import merge_patch_body, set_condition, truncate


class _Status(Protocol):
    phase: Any
    message: str | None
    observed_generation: int | None
    conditions: list[Condition]

    def model_dump(self, *, mode: str, by_alias: bool) -> dict[str, Any]: ...

    def model_copy(self, *, deep: bool) -> Any: ...


StatusT = TypeVar("StatusT", bound=_Status)


def fmt_time(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def format_validation_error(err: ValidationError) -> str:
    """``spec.lora.rank: Input should be greater than or equal to 1; ...`` — one line a user can act on."""
    parts = []
    for e in err.errors():
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in e["loc"])
        parts.append(f"spec{loc}: {e['msg']}")
    return "; ".join(parts)


class ReconcilePass(Generic[StatusT]):
    """One pass: ``old`` is the status as read, ``status`` the one being built; :meth:`commit` writes the difference
    (nothing when nothing changed, so a pass never triggers itself) and posts the Events gathered on the way."""

    kind: ClassVar[str]
    plural: ClassVar[str]
    status_model: ClassVar[type[Any]]

    def __init__(self, rt: Runtime, key: Key, body: dict[str, Any]) -> None:
        self.rt = rt
        self.key = key
        self.body = body
        meta = body["metadata"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.generation: int | None = meta.get("generation")
        self.now = rt.now()
        self.now_s = fmt_time(self.now)
        try:
            self.old: StatusT = self.status_model.model_validate(body.get("status") or {})
        except ValidationError:
            self.old = self.status_model()
        self.status: StatusT = self.old.model_copy(deep=True)
        self.settings = rt.settings
        self.events: list[tuple[str, str, str]] = []

    def condition(self, type_: str, value: bool, reason: str, message: str = "") -> None:
        self.status.conditions = set_condition(
            self.status.conditions, type_, value, reason, truncate(message), generation=self.generation, now=self.now_s
        )

    def event(self, type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))

    def set_phase(self, phase: Any, message: str | None = None) -> None:
        self.status.phase = phase
        self.status.message = truncate(message) if message else None

    def commit(self, requeue: float | None) -> float | None:
        """Write the status if it changed, post the events, return the requeue delay."""
        self.status.observed_generation = self.generation
        new = self.status.model_dump(mode="json", by_alias=True)
        if new != self.old.model_dump(mode="json", by_alias=True):
            self.rt.kube.patch_status(self.plural, object_key(self.key), merge_patch_body(new))
        for type_, reason, message in self.events:
            self.rt.event({**self.body, "kind": self.kind}, type_, reason, message)
        return requeue
