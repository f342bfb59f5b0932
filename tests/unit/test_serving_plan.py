"""The rollout of published revisions to a KServe InferenceService, step by step (:func:`serving.plan`, pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from langmerge.api.serving import KServeTarget, ServingPhase, parse_duration
from langmerge.controller import cloudevents
from langmerge.controller.serving import (
    A_PHASE,
    A_PREVIOUS_URI,
    A_READY_AT,
    A_REVISION,
    Desired,
    Observed,
    Rollout,
    Step,
    plan,
    summary,
)

NOW = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)
OWNER = ("demo/dialog", "uid-1")
URI1 = "s3://b/out/merges/fp1"
URI2 = "s3://b/out/merges/fp2"
URI3 = "s3://b/out/merges/fp3"


def target(**kw: Any) -> KServeTarget:
    return KServeTarget.model_validate({"inferenceService": "dialog", **kw})


def serving(
    uri: str | None, *, generation: int = 2, observed: int | None = 2, ready: bool = True, **kw: Any
) -> Observed:
    """An InferenceService that KServe has acted on (generation == observedGeneration), its latest revision ready."""
    fields: dict[str, Any] = {
        "resource_version": "7",
        "generation": generation,
        "observed_generation": observed,
        "storage_uri": uri,
        "ready": ready,
        "latest_created_revision": "dialog-predictor-00002",
        "latest_ready_revision": "dialog-predictor-00002" if ready else "dialog-predictor-00001",
        "transition": "UpToDate" if ready else "InProgress",
        "url": "http://127.0.0.1:8080",
    }
    fields.update(kw)
    return Observed(**fields)


def step(t: KServeTarget, desired: Desired | None, rollout: Rollout, observed: Observed, now: datetime = NOW) -> Step:
    return plan(t, desired, rollout, observed, owner=OWNER, now=now, poll=2.0)


def annotations(s: Step) -> dict[str, str | None]:
    assert s.patch is not None
    result: dict[str, str | None] = s.patch["metadata"]["annotations"]
    assert s.patch["metadata"]["resourceVersion"] == "7", "every write is conditional on what was read"
    return result


def promoted(revision: int, uri: str) -> Rollout:
    return Rollout(owner=OWNER[0], owner_uid=OWNER[1], revision=revision, storage_uri=uri, phase="Promoted")


def test_the_first_rollout_takes_every_request() -> None:
    s = step(target(), Desired(1, URI1, "fp1"), Rollout(), serving(None, ready=False, observed=1, generation=1))
    assert s.patch is not None
    assert s.patch["spec"]["predictor"] == {"canaryTrafficPercent": None, "model": {"storageUri": URI1}}
    assert annotations(s)[A_PHASE] == ServingPhase.PROGRESSING
    assert s.status.phase == ServingPhase.PROGRESSING and s.status.canary_revision == 1
    assert [a.reason for a in s.announcements] == ["RollingOut"]


def test_a_new_revision_starts_as_a_canary_beside_what_serves() -> None:
    s = step(target(canaryTrafficPercent=20), Desired(2, URI2, "fp2"), promoted(1, URI1), serving(URI1))
    assert s.patch is not None
    assert s.patch["spec"]["predictor"] == {"canaryTrafficPercent": 20, "model": {"storageUri": URI2}}
    a = annotations(s)
    assert (a[A_REVISION], a[A_PREVIOUS_URI], a[A_PHASE]) == ("2", URI1, "Progressing")
    assert s.status.revision == 1 and s.status.canary_revision == 2
    assert s.requeue == 2.0


def rolling(phase: str = "Progressing", since: datetime = NOW, ready_at: datetime | None = None) -> Rollout:
    return Rollout(
        owner=OWNER[0],
        owner_uid=OWNER[1],
        revision=2,
        storage_uri=URI2,
        previous_revision=1,
        previous_uri=URI1,
        phase=phase,
        since=since.strftime("%Y-%m-%dT%H:%M:%SZ"),
        ready_at=ready_at.strftime("%Y-%m-%dT%H:%M:%SZ") if ready_at else None,
    )


def test_a_ready_canary_is_recorded_and_announced_once() -> None:
    t = target(promoteAfter="10m")
    s = step(t, Desired(2, URI2, "fp2"), rolling(), serving(URI2, canary=10, generation=3, observed=3))
    a = annotations(s)
    assert a[A_PHASE] == "Canary" and a[A_READY_AT] == "2026-12-07T12:00:00Z"
    assert "spec" not in (s.patch or {}), "recording the canary changes no predictor field"
    assert [(x.reason, x.cloud) for x in s.announcements] == [("CanaryStarted", cloudevents.CANARY_STARTED)]
    assert s.requeue is not None and 0 < s.requeue <= 2.0
    # The next pass, before promoteAfter: nothing to write, nothing to announce.
    again = step(
        t,
        Desired(2, URI2, "fp2"),
        rolling("Canary", ready_at=NOW),
        serving(URI2, canary=10, generation=3, observed=3),
        NOW + timedelta(minutes=5),
    )
    assert again.patch is None and again.announcements == ()
    assert again.status.phase == ServingPhase.CANARY


def test_the_canary_is_promoted_after_promote_after() -> None:
    t = target(promoteAfter="10m")
    s = step(
        t,
        Desired(2, URI2, "fp2"),
        rolling("Canary", ready_at=NOW),
        serving(URI2, canary=10, generation=3, observed=3),
        NOW + timedelta(minutes=10),
    )
    assert s.patch is not None and s.patch["spec"]["predictor"] == {"canaryTrafficPercent": None}
    assert annotations(s)[A_PHASE] == "Promoted"
    assert [(x.reason, x.cloud) for x in s.announcements] == [("Promoted", cloudevents.PROMOTED)]
    assert s.status.revision == 2 and s.status.canary_revision is None


def test_promote_after_zero_promotes_as_soon_as_ready() -> None:
    s = step(
        target(promoteAfter="0s"),
        Desired(2, URI2, "fp2"),
        rolling(),
        serving(URI2, canary=10, generation=3, observed=3),
    )
    assert s.patch is not None and s.patch["spec"]["predictor"] == {"canaryTrafficPercent": None}
    assert [x.reason for x in s.announcements] == ["CanaryStarted", "Promoted"]


def test_a_revision_that_fails_to_load_is_rolled_back() -> None:
    observed = serving(
        URI2,
        canary=10,
        generation=3,
        observed=3,
        latest_created_revision="dialog-predictor-00003",
        latest_ready_revision="dialog-predictor-00002",
        transition="BlockedByFailedLoad",
        failure="ModelLoadFailed: bad weights",
    )
    s = step(target(), Desired(2, URI2, "fp2"), rolling(), observed)
    assert s.patch is not None
    assert s.patch["spec"]["predictor"] == {"canaryTrafficPercent": None, "model": {"storageUri": URI1}}
    a = annotations(s)
    assert (a[A_PHASE], a[A_REVISION]) == ("RolledBack", "1")
    assert [(x.type, x.reason, x.cloud) for x in s.announcements] == [
        ("Warning", "RolledBack", cloudevents.ROLLED_BACK)
    ]
    assert "bad weights" in (s.status.message or "")
    # That revision is not rolled out again; the next one is.
    record = Rollout.from_annotations({k: v for k, v in a.items() if v is not None})
    restored = serving(URI1, generation=4, observed=4)
    assert step(target(), Desired(2, URI2, "fp2"), record, restored).patch is None
    nxt = step(target(), Desired(3, URI3, "fp3"), record, restored)
    assert nxt.patch is not None and nxt.patch["spec"]["predictor"]["model"] == {"storageUri": URI3}
    assert annotations(nxt)[A_PREVIOUS_URI] == URI1


def test_a_first_revision_that_failed_is_left_in_place_and_promoted_if_it_recovers() -> None:
    failing = serving(
        URI1, generation=1, observed=1, ready=False, transition="BlockedByFailedLoad", failure="ModelLoadFailed: S3"
    )
    first = Rollout(
        owner=OWNER[0],
        owner_uid=OWNER[1],
        revision=1,
        storage_uri=URI1,
        phase="Progressing",
        since="2026-12-07T12:00:00Z",
    )
    s = step(target(), Desired(1, URI1, "fp1"), first, failing)
    assert s.status.phase == ServingPhase.FAILED and s.patch is not None and "spec" not in s.patch
    assert [(a.reason, a.cloud) for a in s.announcements] == [("ServingFailed", cloudevents.FAILED)]
    record = Rollout.from_annotations({k: v for k, v in annotations(s).items() if v is not None})
    assert step(target(), Desired(1, URI1, "fp1"), record, failing).patch is None, "not tried again"
    recovered = step(target(), Desired(1, URI1, "fp1"), record, serving(URI1, generation=1, observed=1))
    assert recovered.status.phase == ServingPhase.PROMOTED and recovered.status.revision == 1
    assert [a.reason for a in recovered.announcements] == ["Promoted"]


def test_a_revision_not_ready_in_time_is_rolled_back() -> None:
    t = target(readyTimeout="5m")
    loading = serving(
        URI2, canary=10, generation=3, observed=3, ready=True, latest_ready_revision="x", transition="InProgress"
    )
    wait = step(t, Desired(2, URI2, "fp2"), rolling(), loading, NOW + timedelta(minutes=4))
    assert wait.patch is None and wait.requeue == 2.0 and wait.status.phase == ServingPhase.PROGRESSING
    late = step(t, Desired(2, URI2, "fp2"), rolling(), loading, NOW + timedelta(minutes=5))
    assert late.patch is not None and late.status.phase == ServingPhase.ROLLED_BACK
    assert "readyTimeout 5m" in (late.status.message or "")


def test_a_canary_superseded_by_a_newer_revision_keeps_the_same_fallback() -> None:
    s = step(target(), Desired(3, URI3, "fp3"), rolling("Canary", ready_at=NOW), serving(URI2, canary=10))
    a = annotations(s)
    assert (a[A_REVISION], a[A_PREVIOUS_URI]) == ("3", URI1)


def test_a_pin_to_what_serves_is_promoted_without_a_rollout() -> None:
    s = step(
        target(),
        Desired(4, URI1, "fp1"),
        Rollout(rolled_back=2, rolled_back_uri=URI2, revision=1, storage_uri=URI1, phase="RolledBack"),
        serving(URI1),
    )
    assert s.patch is not None and "spec" not in s.patch
    assert s.status.phase == ServingPhase.PROMOTED and s.status.revision == 4


def test_nothing_published_is_nothing_to_roll_out() -> None:
    s = step(target(), None, Rollout(), serving(None))
    assert s.patch is None and s.status.message == "nothing is published yet"


def test_summary_names_each_inference_service() -> None:
    canary = step(target(), Desired(2, URI2, "fp2"), rolling("Canary", ready_at=NOW), serving(URI2, canary=10)).status
    assert summary([canary]) == "dialog: Canary r2 (r1 serves)"


@pytest.mark.parametrize(("text", "seconds"), [("10m", 600), ("1h30m", 5400), ("0s", 0), ("250ms", 0.25)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_every_patch_keeps_the_inference_service_valid() -> None:
    """The operator's merge patches, applied to the sample InferenceService, validate against KServe's models."""
    pytest.importorskip("kserve")
    from langmerge.dev.demo import sample_inference_service
    from langmerge.dev.serving import merge_patch, validate_inferenceservice

    isvc = sample_inference_service()
    isvc["metadata"]["resourceVersion"] = "7"
    steps = [
        step(target(), Desired(1, URI1, "fp1"), Rollout(), serving(None, ready=False, observed=1, generation=1)),
        step(target(canaryTrafficPercent=20), Desired(2, URI2, "fp2"), promoted(1, URI1), serving(URI1)),
        step(target(promoteAfter="0s"), Desired(2, URI2, "fp2"), rolling(), serving(URI2, canary=10)),
        step(target(), Desired(2, URI2, "fp2"), rolling(), serving(URI2, canary=10, transition="BlockedByFailedLoad")),
    ]
    for s in steps:
        assert s.patch is not None
        assert validate_inferenceservice(s.patch, partial=True) == []
        isvc = merge_patch(isvc, s.patch)
        assert validate_inferenceservice(isvc) == [], s.patch
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == URI1, "the last step rolled revision 2 back"
