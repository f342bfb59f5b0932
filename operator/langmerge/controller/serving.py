"""Rolling published revisions out to KServe InferenceServices, and announcing them as CloudEvents.

The InferenceService is the record of a rollout, as S3 is the record of what was merged: the operator writes what it
is doing there, in ``serving.langmerge.dev/*`` annotations, in the same merge patch that changes the predictor.
A restarted operator (or one that lost the MergedModel's status) reads them back and carries on with the same
rollout: a canary that was started is not started again, a revision that was rolled back is not tried again.

One rollout, per published revision and InferenceService:

1. **Progressing**: the predictor's ``storageUri`` points at the revision's immutable merge prefix (never at
   ``current.json``), with ``canaryTrafficPercent`` when something Ready serves already (the first rollout takes
   100%). The annotations remember what served before.
2. **Canary**: KServe reports the new revision Ready (``latestReadyRevision == latestCreatedRevision`` for the
   current generation): it takes the canary's share until it has stayed healthy for ``promoteAfter``.
3. **Promoted**: ``canaryTrafficPercent`` is removed: the revision takes every request.
4. **RolledBack**: the revision did not become Ready within ``readyTimeout``, failed to load
   (``modelStatus.transitionStatus`` ``BlockedByFailedLoad`` / ``InvalidSpec``), or stopped being Ready as a canary:
   the previous ``storageUri`` is restored. That revision is not rolled out again; the next published one is.

:func:`plan` is pure (the InferenceService read, the rollout record, the clock in; a patch, a status and the
announcements out); :class:`Serving` does the reading, patching and announcing for one reconcile pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from langmerge import artifacts
from langmerge.api.merged import LanguageMetrics, MergedModelSpec
from langmerge.api.serving import KServeTarget, ServingPhase, ServingRuntime, ServingStatus, ServingTarget
from langmerge.artifacts import PublishedRevision
from langmerge.constants import SERVING_ANNOTATION_PREFIX
from langmerge.controller import cloudevents
from langmerge.controller.runtime import Key, Runtime
from langmerge.kube import Conflict, Forbidden, ObjectKey, Rejected

log = logging.getLogger(__name__)

#: modelStatus.transitionStatus values that mean the latest revision will not load.
LOAD_FAILURES = frozenset({"BlockedByFailedLoad", "InvalidSpec"})

# The rollout record on the InferenceService.
A_OWNER = SERVING_ANNOTATION_PREFIX + "owner"
A_OWNER_UID = SERVING_ANNOTATION_PREFIX + "owner-uid"
A_REVISION = SERVING_ANNOTATION_PREFIX + "revision"
A_STORAGE_URI = SERVING_ANNOTATION_PREFIX + "storage-uri"
A_PREVIOUS_REVISION = SERVING_ANNOTATION_PREFIX + "previous-revision"
A_PREVIOUS_URI = SERVING_ANNOTATION_PREFIX + "previous-storage-uri"
A_PHASE = SERVING_ANNOTATION_PREFIX + "phase"
A_SINCE = SERVING_ANNOTATION_PREFIX + "since"
A_READY_AT = SERVING_ANNOTATION_PREFIX + "ready-at"
A_ROLLED_BACK = SERVING_ANNOTATION_PREFIX + "rolled-back-revision"
A_ROLLED_BACK_URI = SERVING_ANNOTATION_PREFIX + "rolled-back-storage-uri"
A_MESSAGE = SERVING_ANNOTATION_PREFIX + "message"


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def fmt_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: str | None) -> datetime | None:
    return artifacts.parse_time(value) if value else None


@dataclass(frozen=True)
class Rollout:
    """The rollout record the operator keeps in the InferenceService's annotations."""

    owner: str | None = None
    owner_uid: str | None = None
    #: The published revision whose storageUri the operator set (after a rollback: the one restored).
    revision: int | None = None
    storage_uri: str | None = None
    #: What served every request before this rollout (what a rollback restores).
    previous_revision: int | None = None
    previous_uri: str | None = None
    phase: str | None = None
    since: str | None = None
    #: When the rolled-out revision was first seen Ready (promoteAfter counts from it).
    ready_at: str | None = None
    #: The revision last rolled back (and its storageUri): not rolled out again.
    rolled_back: int | None = None
    rolled_back_uri: str | None = None
    message: str | None = None

    @classmethod
    def from_annotations(cls, annotations: Mapping[str, str] | None) -> Rollout:
        a = annotations or {}
        return cls(
            owner=a.get(A_OWNER),
            owner_uid=a.get(A_OWNER_UID),
            revision=_int(a.get(A_REVISION)),
            storage_uri=a.get(A_STORAGE_URI),
            previous_revision=_int(a.get(A_PREVIOUS_REVISION)),
            previous_uri=a.get(A_PREVIOUS_URI) or None,
            phase=a.get(A_PHASE),
            since=a.get(A_SINCE),
            ready_at=a.get(A_READY_AT),
            rolled_back=_int(a.get(A_ROLLED_BACK)),
            rolled_back_uri=a.get(A_ROLLED_BACK_URI),
            message=a.get(A_MESSAGE),
        )

    def annotations(self) -> dict[str, str | None]:
        """The annotations as a merge patch (None removes one)."""

        def text(value: object) -> str | None:
            return None if value is None else str(value)

        return {
            A_OWNER: self.owner,
            A_OWNER_UID: self.owner_uid,
            A_REVISION: text(self.revision),
            A_STORAGE_URI: self.storage_uri,
            A_PREVIOUS_REVISION: text(self.previous_revision),
            A_PREVIOUS_URI: self.previous_uri,
            A_PHASE: self.phase,
            A_SINCE: self.since,
            A_READY_AT: self.ready_at,
            A_ROLLED_BACK: text(self.rolled_back),
            A_ROLLED_BACK_URI: self.rolled_back_uri,
            A_MESSAGE: self.message,
        }


def _condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any]:
    for cond in status.get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


@dataclass(frozen=True)
class Observed:
    """What the InferenceService says: its spec's predictor and KServe's status of it."""

    resource_version: str = ""
    generation: int = 0
    observed_generation: int | None = None
    has_model: bool = True
    storage_uri: str | None = None
    canary: int | None = None
    ready: bool = False
    latest_created_revision: str | None = None
    latest_ready_revision: str | None = None
    transition: str | None = None
    failure: str | None = None
    url: str | None = None

    @classmethod
    def read(cls, isvc: Mapping[str, Any]) -> Observed:
        meta = isvc.get("metadata") or {}
        predictor = (isvc.get("spec") or {}).get("predictor") or {}
        model = predictor.get("model")
        status = isvc.get("status") or {}
        component = (status.get("components") or {}).get("predictor") or {}
        model_status = status.get("modelStatus") or {}
        failure = model_status.get("lastFailureInfo") or {}
        canary = predictor.get("canaryTrafficPercent")
        observed = status.get("observedGeneration")
        return cls(
            resource_version=str(meta.get("resourceVersion") or ""),
            generation=int(meta.get("generation") or 0),
            observed_generation=int(observed) if isinstance(observed, int) else None,
            has_model=isinstance(model, dict),
            storage_uri=(model or {}).get("storageUri") or None,
            canary=canary if isinstance(canary, int) else None,
            ready=_condition(status, "Ready").get("status") == "True",
            latest_created_revision=component.get("latestCreatedRevision"),
            latest_ready_revision=component.get("latestReadyRevision"),
            transition=model_status.get("transitionStatus"),
            failure=": ".join(str(failure[k]) for k in ("reason", "message") if failure.get(k)) or None,
            url=status.get("url") or component.get("url"),
        )

    @property
    def current(self) -> bool:
        """KServe has acted on the latest spec."""
        return self.observed_generation is not None and self.observed_generation >= self.generation

    @property
    def latest_is_ready(self) -> bool:
        """The revision of the latest spec serves its share: Ready, and the latest created revision is the ready one."""
        return (
            self.current
            and self.ready
            and self.latest_created_revision is not None
            and self.latest_created_revision == self.latest_ready_revision
            and self.transition not in LOAD_FAILURES
        )

    @property
    def load_failed(self) -> bool:
        return self.current and self.transition in LOAD_FAILURES


@dataclass(frozen=True)
class Desired:
    """The published revision and where the target's runtime loads it from."""

    revision: int
    storage_uri: str
    fingerprint: str


def storage_uri(target: KServeTarget, record: PublishedRevision) -> str:
    """The revision's immutable location for ``target``'s runtime: the merge prefix (manifest and model; langmerge's
    model server reads the manifest to find the base model of an adapter) or its ``model/`` folder (huggingface)."""
    if ServingRuntime(target.runtime) == ServingRuntime.HUGGINGFACE:
        return record.model_uri.rstrip("/")
    prefix, _, name = record.manifest_uri.rpartition("/")
    return prefix if name == artifacts.MANIFEST else record.model_uri.rstrip("/")


@dataclass(frozen=True)
class Announcement:
    """A Kubernetes Event, and (``cloud`` set) the CloudEvent of the same moment."""

    type: str
    reason: str
    message: str
    cloud: str | None = None
    revision: int | None = None


@dataclass(frozen=True)
class Step:
    """What one pass does for one kserve target."""

    status: ServingStatus
    patch: dict[str, Any] | None = None
    announcements: tuple[Announcement, ...] = ()
    #: Seconds until the target needs another look (None: only when something changes).
    requeue: float | None = None


def _patch(observed: Observed, rollout: Rollout, predictor: dict[str, Any] | None = None) -> dict[str, Any]:
    """A merge patch of the rollout record (and the predictor), conditional on the resourceVersion that was read."""
    patch: dict[str, Any] = {
        "metadata": {"resourceVersion": observed.resource_version, "annotations": rollout.annotations()}
    }
    if predictor is not None:
        patch["spec"] = {"predictor": predictor}
    return patch


def _status(name: str, rollout: Rollout, observed: Observed, **changes: Any) -> ServingStatus:
    phase = rollout.phase
    rolling = phase in (ServingPhase.PROGRESSING, ServingPhase.CANARY)
    return ServingStatus(
        target=f"kserve/{name}",
        phase=ServingPhase(phase) if phase is not None and phase in set(ServingPhase) else None,
        revision=rollout.previous_revision if rolling else rollout.revision,
        canary_revision=rollout.revision if rolling else None,
        storage_uri=observed.storage_uri,
        url=observed.url,
        since=rollout.since,
        message=rollout.message,
    ).model_copy(update=changes)


def plan(
    target: KServeTarget,
    desired: Desired | None,
    rollout: Rollout,
    observed: Observed,
    *,
    owner: tuple[str, str],
    now: datetime,
    poll: float,
) -> Step:
    """The next step of rolling ``desired`` out to the InferenceService ``observed`` (owned by ``owner``: namespace/
    name and uid), given the rollout record ``rollout`` found on it."""
    name = target.inference_service
    at = fmt_time(now)
    if desired is None:
        return Step(_status(name, rollout, observed, message="nothing is published yet"))
    if not observed.has_model:
        message = (
            f"InferenceService {name} has no spec.predictor.model: langmerge rolls revisions out by setting "
            "spec.predictor.model.storageUri (KServe's current predictor API)"
        )
        return Step(
            _status(name, rollout, observed, phase=ServingPhase.FAILED, message=message),
            announcements=(Announcement("Warning", "ServingFailed", message, cloudevents.FAILED, desired.revision),),
        )
    mine = replace(rollout, owner=owner[0], owner_uid=owner[1])
    if rollout.revision == desired.revision and rollout.storage_uri == desired.storage_uri and rollout.phase:
        return _follow(target, desired, mine, observed, now, poll)
    if rollout.rolled_back == desired.revision and rollout.rolled_back_uri == desired.storage_uri:
        # This revision was rolled back: it stays so until the next publish (or a pin) brings another one.
        return Step(_status(name, rollout, observed))

    # A new rollout: remember what serves every request now, so that a rollback can restore it.
    if rollout.phase in (ServingPhase.PROGRESSING, ServingPhase.CANARY):
        previous = (rollout.previous_revision, rollout.previous_uri)  # a canary superseded: the same fallback
    elif rollout.phase is not None and rollout.storage_uri == observed.storage_uri:
        previous = (rollout.revision, observed.storage_uri)
    else:
        previous = (None, observed.storage_uri)
    serves = observed.ready and observed.storage_uri is not None
    if observed.storage_uri == desired.storage_uri and observed.latest_is_ready:
        # It serves this model already (a pin to what serves, or a record lost): nothing to roll out.
        message = f"revision {desired.revision} serves every request (it already served this model)"
        new = replace(
            mine,
            revision=desired.revision,
            storage_uri=desired.storage_uri,
            phase=ServingPhase.PROMOTED,
            since=at,
            ready_at=at,
            previous_revision=previous[0],
            previous_uri=previous[1],
            message=message,
        )
        removal = {"canaryTrafficPercent": None} if observed.canary is not None else None
        return Step(_status(name, new, observed), _patch(observed, new, removal))
    canary = target.canary_traffic_percent if target.canary_traffic_percent < 100 and serves else None
    served = f"revision {previous[0]}" if previous[0] is not None else (previous[1] or "nothing")
    if canary is not None:
        message = f"revision {desired.revision} rolling out as a {canary}% canary; {served} keeps {100 - canary}%"
    else:
        message = f"revision {desired.revision} rolling out to every request"
    new = replace(
        mine,
        revision=desired.revision,
        storage_uri=desired.storage_uri,
        previous_revision=previous[0],
        previous_uri=previous[1],
        phase=ServingPhase.PROGRESSING,
        since=at,
        ready_at=None,
        message=message,
    )
    predictor: dict[str, Any] = {"canaryTrafficPercent": canary, "model": {"storageUri": desired.storage_uri}}
    announce = Announcement("Normal", "RollingOut", f"InferenceService {name}: {message} ({desired.storage_uri})")
    return Step(_status(name, new, observed), _patch(observed, new, predictor), (announce,), poll)


def _follow(
    target: KServeTarget, desired: Desired, rollout: Rollout, observed: Observed, now: datetime, poll: float
) -> Step:
    """The recorded rollout of ``desired``: wait for it, promote it, or roll it back."""
    name = target.inference_service
    at = fmt_time(now)
    phase = rollout.phase
    if phase == ServingPhase.FAILED and observed.storage_uri == desired.storage_uri and observed.latest_is_ready:
        # Nothing served before it, so it was left in place; KServe kept trying and it serves now.
        message = f"revision {desired.revision} serves every request (it became Ready after failing to load)"
        new = replace(
            rollout,
            phase=ServingPhase.PROMOTED,
            since=at,
            ready_at=at,
            rolled_back=None,
            rolled_back_uri=None,
            message=message,
        )
        promoted = Announcement(
            "Normal", "Promoted", f"InferenceService {name}: {message}", cloudevents.PROMOTED, desired.revision
        )
        return Step(_status(name, new, observed), _patch(observed, new), (promoted,))
    if phase not in (ServingPhase.PROGRESSING, ServingPhase.CANARY):
        status = _status(name, rollout, observed)
        if phase == ServingPhase.PROMOTED and observed.storage_uri != desired.storage_uri:
            status = status.model_copy(
                update={
                    "message": f"revision {desired.revision} was promoted, but spec.predictor.model.storageUri was "
                    f"changed outside langmerge to {observed.storage_uri}; the next publish rolls out again"
                }
            )
        return Step(status)

    since = _parse_time(rollout.since) or now
    why: str | None = None
    if observed.load_failed:
        why = f"it failed to load ({observed.failure or observed.transition})"
    elif phase == ServingPhase.CANARY and observed.current and not observed.latest_is_ready:
        why = "the canary stopped being Ready" + (f" ({observed.failure})" if observed.failure else "")
    elif (
        phase == ServingPhase.PROGRESSING
        and not observed.latest_is_ready
        and (now - since).total_seconds() >= target.ready_timeout_seconds
    ):
        why = f"it was not Ready within readyTimeout {target.ready_timeout}"
    if why is not None:
        return _roll_back(name, desired, rollout, observed, at, why)

    if not observed.latest_is_ready:
        deadline = since + timedelta(seconds=target.ready_timeout_seconds)
        waiting = f"revision {desired.revision} is loading ({observed.transition or 'not Ready yet'}); rolled back if not Ready by {fmt_time(deadline)}"
        return Step(_status(name, rollout, observed, message=waiting), requeue=poll)

    announcements: list[Announcement] = []
    ready_at = _parse_time(rollout.ready_at)
    if phase == ServingPhase.PROGRESSING and observed.canary is not None:
        message = (
            f"revision {desired.revision} is Ready as a {observed.canary}% canary; promoted after {target.promote_after} "
            "if it stays healthy"
        )
        rollout = replace(rollout, phase=ServingPhase.CANARY, since=at, ready_at=at, message=message)
        ready_at = now
        announcements.append(
            Announcement(
                "Normal",
                "CanaryStarted",
                f"InferenceService {name}: {message}",
                cloudevents.CANARY_STARTED,
                desired.revision,
            )
        )
    elif phase == ServingPhase.PROGRESSING:
        ready_at = now  # no canary (the first rollout, or canaryTrafficPercent 100): promoted once Ready
    assert ready_at is not None or phase == ServingPhase.CANARY
    remaining = (ready_at or now) + timedelta(seconds=target.promote_after_seconds) - now
    if observed.canary is not None and remaining.total_seconds() > 0:
        patch = _patch(observed, rollout) if announcements else None
        wait = min(poll, remaining.total_seconds())
        return Step(_status(name, rollout, observed), patch, tuple(announcements), wait)

    served = "every request"
    message = f"revision {desired.revision} serves {served}"
    rollout = replace(
        rollout, phase=ServingPhase.PROMOTED, since=at, ready_at=fmt_time(ready_at or now), message=message
    )
    predictor = {"canaryTrafficPercent": None} if observed.canary is not None else None
    announcements.append(
        Announcement(
            "Normal", "Promoted", f"InferenceService {name}: {message}", cloudevents.PROMOTED, desired.revision
        )
    )
    return Step(_status(name, rollout, observed), _patch(observed, rollout, predictor), tuple(announcements))


def _roll_back(name: str, desired: Desired, rollout: Rollout, observed: Observed, at: str, why: str) -> Step:
    if rollout.previous_uri is None:
        message = f"revision {desired.revision} cannot be served: {why}; nothing served before it to restore"
        failed = replace(
            rollout,
            phase=ServingPhase.FAILED,
            since=at,
            message=message,
            rolled_back=desired.revision,
            rolled_back_uri=desired.storage_uri,
        )
        return Step(
            _status(name, failed, observed),
            _patch(observed, failed, {"canaryTrafficPercent": None} if observed.canary is not None else None),
            (
                Announcement(
                    "Warning",
                    "ServingFailed",
                    f"InferenceService {name}: {message}",
                    cloudevents.FAILED,
                    desired.revision,
                ),
            ),
        )
    back_to = f"revision {rollout.previous_revision}" if rollout.previous_revision is not None else rollout.previous_uri
    message = f"revision {desired.revision} rolled back to {back_to}: {why}"
    restored = replace(
        rollout,
        revision=rollout.previous_revision,
        storage_uri=rollout.previous_uri,
        previous_revision=None,
        previous_uri=None,
        phase=ServingPhase.ROLLED_BACK,
        since=at,
        ready_at=None,
        rolled_back=desired.revision,
        rolled_back_uri=desired.storage_uri,
        message=message,
    )
    predictor: dict[str, Any] = {"canaryTrafficPercent": None, "model": {"storageUri": rollout.previous_uri}}
    return Step(
        _status(name, restored, observed),
        _patch(observed, restored, predictor),
        (
            Announcement(
                "Warning",
                "RolledBack",
                f"InferenceService {name}: {message}",
                cloudevents.ROLLED_BACK,
                desired.revision,
            ),
        ),
    )


def rolled_back_revision(message: str | None) -> int | None:
    """The revision a RolledBack status message is about (``revision N rolled back to ...``)."""
    if not message or not message.startswith("revision "):
        return None
    return _int(message.split()[1])


def summary(statuses: list[ServingStatus]) -> str | None:
    """The SERVING column: each InferenceService's phase and revisions, e.g. ``dialog: Canary r3 (r2 serves)``."""
    parts = []
    for s in statuses:
        if not s.target.startswith("kserve/"):
            continue
        name = s.target.removeprefix("kserve/")
        if s.phase is None:
            parts.append(f"{name}: -")
        elif s.phase in (ServingPhase.PROGRESSING, ServingPhase.CANARY):
            serves = f" (r{s.revision} serves)" if s.revision is not None else ""
            parts.append(f"{name}: {s.phase} r{s.canary_revision}{serves}")
        elif s.phase == ServingPhase.FAILED:
            parts.append(f"{name}: Failed")
        else:
            parts.append(f"{name}: {s.phase} r{s.revision}" if s.revision is not None else f"{name}: {s.phase}")
    return "; ".join(parts) or None


def event_data(record: PublishedRevision, metrics: Mapping[str, LanguageMetrics], **extra: Any) -> dict[str, Any]:
    """A CloudEvent's data: the revision, its URIs and per-language metrics (merged, expert, base, regression)."""
    data: dict[str, Any] = {
        "revision": record.revision,
        "fingerprint": record.fingerprint,
        "reason": record.reason,
        "modelUri": record.model_uri,
        "manifestUri": record.manifest_uri,
        "outputFormat": record.output_format,
        "publishedAt": record.published_at,
        "metrics": {language: m.to_api() for language, m in sorted(metrics.items())},
    }
    if record.rollback_of is not None:
        data["rollbackOf"] = record.rollback_of
    data.update({k: v for k, v in extra.items() if v is not None})
    return data


@dataclass
class Serving:
    """One pass over a MergedModel's serving targets (its published revision ``record``)."""

    rt: Runtime
    key: Key
    body: Mapping[str, Any]
    spec: MergedModelSpec
    record: PublishedRevision | None
    metrics: Mapping[str, LanguageMetrics]
    #: Posts a Kubernetes Event about the MergedModel: (type, reason, message).
    post_event: Callable[[str, str, str], None]
    #: status.serving as the last pass wrote it.
    old: list[ServingStatus]

    @property
    def namespace(self) -> str:
        return self.key[1]

    @property
    def name(self) -> str:
        return self.key[2]

    @property
    def uid(self) -> str:
        return str((self.body.get("metadata") or {}).get("uid") or "")

    def run(self) -> tuple[list[ServingStatus], float | None]:
        statuses: list[ServingStatus] = []
        requeue: float | None = None
        listed = {t.key for t in self.spec.serving}
        for old in self.old:
            if old.target.startswith("kserve/") and old.target not in listed:
                self._release(old.target.removeprefix("kserve/"))
        for target in self.spec.serving:
            if target.kserve is not None:
                status, wait = self._kserve(target.kserve)
                statuses.append(status)
                if wait is not None:
                    requeue = wait if requeue is None else min(requeue, wait)
        for target in self.spec.serving:
            if target.cloud_events is not None:
                statuses.append(self._sink_status(target))
        order = [t.key for t in self.spec.serving]
        return sorted(statuses, key=lambda s: order.index(s.target) if s.target in order else len(order)), requeue

    # -- kserve ------------------------------------------------------------------------------------------------------
    def _old(self, target: str) -> ServingStatus | None:
        return next((s for s in self.old if s.target == target), None)

    def _failed(self, target: KServeTarget, reason: str, message: str) -> tuple[ServingStatus, float | None]:
        """The target cannot be served: status, and a Warning Event the first time this message shows."""
        key = f"kserve/{target.inference_service}"
        old = self._old(key)
        if old is None or old.phase != ServingPhase.FAILED or old.message != message:
            self.post_event("Warning", reason, message)
        status = ServingStatus(target=key, phase=ServingPhase.FAILED, message=message, since=fmt_time(self.rt.now()))
        if old is not None and old.phase == ServingPhase.FAILED and old.message == message:
            status.since = old.since
        return status, self.rt.settings.resync_seconds

    def _kserve(self, target: KServeTarget) -> tuple[ServingStatus, float | None]:
        name = target.inference_service
        where = f"InferenceService {self.namespace}/{name}"
        try:
            isvc = self.rt.kube.get_inference_service(self.namespace, name)
        except Forbidden as err:
            return self._failed(
                target,
                "ServingForbidden",
                f"the operator may not read {where} ({err}); grant it (serving.kserve.enabled)",
            )
        if isvc is None:
            return self._failed(
                target,
                "InferenceServiceNotFound",
                f"{where} does not exist (or KServe is not installed); create it with spec.predictor.model "
                "(modelFormat and runtime of the revisions) or remove the serving target",
            )
        rollout = Rollout.from_annotations((isvc.get("metadata") or {}).get("annotations"))
        if rollout.owner_uid and rollout.owner_uid != self.uid:
            owner = (rollout.owner or "").rpartition("/")[2]
            other = self.rt.kube.get_merged(ObjectKey(self.namespace, owner)) if owner else None
            if other is not None and (other.get("metadata") or {}).get("uid") == rollout.owner_uid:
                return self._failed(
                    target,
                    "InferenceServiceOwnedByAnother",
                    f"{where} is served by MergedModel {rollout.owner} (uid {rollout.owner_uid}); one MergedModel "
                    "rolls revisions out to an InferenceService",
                )
            # Its owner is gone: this object takes the InferenceService over, with what serves as the fallback.
            rollout = Rollout()
        desired = None
        if self.record is not None:
            desired = Desired(self.record.revision, storage_uri(target, self.record), self.record.fingerprint)
        observed = Observed.read(isvc)
        step = plan(
            target,
            desired,
            rollout,
            observed,
            owner=(f"{self.namespace}/{self.name}", self.uid),
            now=self.rt.now(),
            poll=self.rt.settings.serving_poll_seconds,
        )
        if step.patch is not None:
            try:
                self.rt.kube.patch_inference_service(self.namespace, name, step.patch)
            except Conflict:
                # Changed since it was read (KServe's status, or another MergedModel's claim): read it again soon.
                old = self._old(f"kserve/{name}")
                return (old or step.status), 0.5
            except Forbidden as err:
                return self._failed(
                    target,
                    "ServingForbidden",
                    f"the operator may not patch {where} ({err}); grant it (serving.kserve.enabled)",
                )
            except Rejected as err:
                return self._failed(target, "ServingRejected", f"the API server refused the patch of {where}: {err}")
        else:
            old = self._old(step.status.target)
            if old is not None and old.message == step.status.message and old.phase == step.status.phase:
                return step.status, step.requeue  # announced when it happened
        for a in step.announcements:
            self.post_event(a.type, a.reason, a.message)
            if a.cloud is not None:
                self.announce(
                    a.cloud,
                    a.revision if a.revision is not None else (desired.revision if desired else 0),
                    suffix=name,
                    target=f"kserve/{name}",
                    inferenceService=name,
                    storageUri=desired.storage_uri if desired else None,
                    url=observed.url,
                    message=a.message,
                )
        return step.status, step.requeue

    def _release(self, name: str) -> None:
        """A kserve target left spec.serving: give the InferenceService up (its owner annotations go; it keeps serving
        what it serves), so that another MergedModel may name it."""
        try:
            isvc = self.rt.kube.get_inference_service(self.namespace, name)
            if isvc is None:
                return
            meta = isvc.get("metadata") or {}
            if (meta.get("annotations") or {}).get(A_OWNER_UID) != self.uid:
                return
            patch = {
                "metadata": {
                    "resourceVersion": meta.get("resourceVersion"),
                    "annotations": {A_OWNER: None, A_OWNER_UID: None},
                }
            }
            self.rt.kube.patch_inference_service(self.namespace, name, patch)
        except (Conflict, Forbidden, Rejected) as err:
            log.info("%s/%s: InferenceService %s not released yet (%s)", self.namespace, self.name, name, err)
            return
        self.post_event(
            "Normal",
            "ServingTargetRemoved",
            f"InferenceService {self.namespace}/{name} is no longer in spec.serving: released (it keeps serving what it "
            "serves; another MergedModel may name it now)",
        )

    # -- CloudEvents ---------------------------------------------------------------------------------------------
    def announce(self, kind: str, revision: int, *, suffix: str | None = None, **extra: Any) -> None:
        """Send the CloudEvent ``kind`` about ``revision`` to every cloudEvents target (never blocks)."""
        sender = self.rt.cloud_events
        if sender is None or self.record is None:
            return
        record = self.record
        data = event_data(record, self.metrics, **extra)
        data["revision"] = revision
        for target in self.spec.serving:
            if target.cloud_events is None:
                continue
            headers, body = cloudevents.build_event(
                kind,
                namespace=self.namespace,
                name=self.name,
                uid=self.uid,
                revision=revision,
                data=data,
                suffix=suffix,
            )
            sender.send(self.key, target.cloud_events.sink, headers, body)

    def _sink_status(self, target: ServingTarget) -> ServingStatus:
        assert target.cloud_events is not None
        sink = target.cloud_events.sink
        sender = self.rt.cloud_events
        state = sender.state(self.key, sink) if sender is not None else None
        if state is None or (state.delivered == 0 and state.failed == 0 and state.pending == 0):
            return ServingStatus(target=target.key, message="no event sent yet", delivered=0, failed=0, pending=0)
        healthy = state.healthy
        return ServingStatus(
            target=target.key,
            phase=ServingPhase.DELIVERED if healthy else ServingPhase.FAILING,
            delivered=state.delivered,
            failed=state.failed,
            pending=state.pending,
            since=fmt_time(datetime.fromtimestamp(state.last_success_time, UTC)) if state.last_success_time else None,
            message=None if healthy else f"{sink}: {state.last_error}",
        )
