"""spec.serving on the real API server and S3: the operator in-process (simulated training and merge Jobs), the local
serving runner standing in for KServe (real processes, router and status), with the stand-in model server, and a real
CloudEvents sink on 127.0.0.1.

The real model server (``langmerge-trainer serve``) on real merged weights is covered by the walkthrough test.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from langmerge.controller import cloudevents
from langmerge.dev.serving import REVISION_HEADER, LocalServingRunner
from langmerge.store import ObjectStore
from operator_harness import (
    DIALOG_ROWS,
    SimulatedJobs,
    apply_expert,
    apply_merged,
    dialog_expert,
    dialog_merged,
    events,
    get_merged,
    put_jsonl,
    run_operator,
    seed_fake_base_model,
    status_of,
    wait_for,
)
from serving_helpers import (
    RequestLoop,
    Services,
    Sink,
    isvc_api,
    predict,
    stand_in_runner,
)

pytestmark = pytest.mark.integration

__all__ = ["isvc_api"]  # a fixture, shared

LANGS = ("es", "it")
ISVC = "dialog"
TARGET = f"kserve/{ISVC}"


@pytest.fixture
def serving(
    kube: Any, isvc_api: client.CustomObjectsApi, namespace: str, tmp_path: Path
) -> Iterator[tuple[LocalServingRunner, Services, Path]]:
    services = Services(isvc_api, namespace)
    services.create(ISVC, "")  # as a user would before the first publish: no storageUri yet
    for runner in stand_in_runner(kube, namespace, tmp_path):
        yield runner, services, tmp_path / "rules"


@pytest.fixture
def seeded(s3: ObjectStore, bucket: str) -> str:
    seed_fake_base_model(s3, f"s3://{bucket}/base")
    for lang in LANGS:
        put_jsonl(s3, f"s3://{bucket}/data/{lang}/part-0.jsonl", DIALOG_ROWS)
    return bucket


def _merged(bucket: str, kserve: dict[str, Any], *more: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    serving = [{"kserve": {"inferenceService": ISVC, **kserve}}, *more]
    return dialog_merged(bucket, **{"serving": serving, **overrides})


def _start(kube: Any, namespace: str, bucket: str, spec: dict[str, Any]) -> None:
    apply_merged(kube, namespace, "mm", spec)
    for lang in LANGS:
        apply_expert(kube, namespace, f"dialog-{lang}", dialog_expert(bucket, lang), labels={"task": "dialog"})


def _operator(namespace: str, bucket: str) -> Any:
    return run_operator(namespace, f"s3://{bucket}/artifacts", kserve="true", serving_poll_seconds="0.3")


def served(kube: Any, namespace: str, target: str = TARGET, name: str = "mm") -> dict[str, Any]:
    """MergedModel ``name``'s status.serving entry for ``target`` ({} while there is none)."""
    status = status_of(get_merged(kube, namespace, name))
    return next((s for s in status.get("serving") or [] if s["target"] == target), {})


def wait_serving(kube: Any, namespace: str, phase: str, revision: int, timeout: float = 60.0) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        s = served(kube, namespace)
        key = "canaryRevision" if phase in ("Progressing", "Canary") else "revision"
        return s if s.get("phase") == phase and s.get(key) == revision else None

    return wait_for(
        reached, timeout, what=lambda: f"{TARGET} {phase} r{revision}; status.serving: {served(kube, namespace)}"
    )


def merge_prefix(kube: Any, namespace: str, revision: int) -> str:
    status = status_of(get_merged(kube, namespace, "mm"))
    entry = next(h for h in status["history"] if h["revision"] == revision)
    return str(entry["uri"]).removesuffix("/model")


def reasons(kube: Any, namespace: str) -> Counter[str]:
    return Counter(e.reason for e in events(kube, namespace, "mm"))


def new_data(s3: ObjectStore, bucket: str, part: int) -> None:
    put_jsonl(
        s3, f"s3://{bucket}/data/es/part-{part}.jsonl", [{"prompt": f"n{i}", "completion": f" b{i}"} for i in range(5)]
    )


def test_publish_canary_promotion_and_cloudevents(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str, serving: tuple[LocalServingRunner, Services, Path]
) -> None:
    bucket = seeded
    _, services, _ = serving
    sink = Sink()
    try:
        with _operator(namespace, bucket), SimulatedJobs(kube, s3, namespace):
            kserve = {"canaryTrafficPercent": 25, "promoteAfter": "3s", "readyTimeout": "30s"}
            _start(kube, namespace, bucket, _merged(bucket, kserve, {"cloudEvents": {"sink": sink.url}}))
            # The first rollout: nothing served before, so the revision takes every request at once.
            first = wait_serving(kube, namespace, "Promoted", 1)
            uri1 = merge_prefix(kube, namespace, 1)
            isvc = services.get(ISVC)
            assert isvc["spec"]["predictor"]["model"]["storageUri"] == uri1, "the immutable merge prefix"
            assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]
            assert isvc["metadata"]["annotations"]["serving.langmerge.dev/owner"] == f"{namespace}/mm"
            url = first["url"]
            code, answer, _ = predict(url, ISVC)
            assert code == 200 and answer["model_version"] == uri1

            with RequestLoop(url, ISVC) as loop:
                new_data(s3, bucket, 1)
                canary = wait_serving(kube, namespace, "Canary", 2)
                assert canary["revision"] == 1, "revision 1 keeps the rest while 2 is the canary"
                traffic = services.get(ISVC)["status"]["components"]["predictor"]["traffic"]
                assert sorted(t["percent"] for t in traffic) == [25, 75]
                assert get_merged(kube, namespace, "mm")["status"]["servingSummary"] == f"{ISVC}: Canary r2 (r1 serves)"
                wait_serving(kube, namespace, "Promoted", 2)
                time.sleep(0.5)
            uri2 = merge_prefix(kube, namespace, 2)
            assert uri2 != uri1
            assert set(loop.codes) == {200}, f"requests failed during the switch: {loop.codes}"
            assert len(loop.revisions) >= 2, f"both revisions answered during the canary: {loop.revisions}"
            code, answer, headers = predict(url, ISVC)
            assert code == 200 and answer["model_version"] == uri2 and headers[REVISION_HEADER]
            isvc = services.get(ISVC)
            assert isvc["spec"]["predictor"]["model"]["storageUri"] == uri2
            assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]

            seen = reasons(kube, namespace)
            assert (seen["RollingOut"], seen["CanaryStarted"], seen["Promoted"]) == (2, 1, 2), seen
            history = {h["revision"]: h for h in get_merged(kube, namespace, "mm")["status"]["history"]}
            assert history[1]["serving"][TARGET].startswith("Promoted at ")
            assert history[2]["serving"][TARGET].startswith("Promoted at ")

            # Every announcement reached the sink, in binary mode, in order.
            wanted = [
                (cloudevents.PUBLISHED, "revision/1"),
                (cloudevents.PROMOTED, "revision/1"),
                (cloudevents.PUBLISHED, "revision/2"),
                (cloudevents.CANARY_STARTED, "revision/2"),
                (cloudevents.PROMOTED, "revision/2"),
            ]
            got = wait_for(
                lambda: (r := [(h["ce-type"], h["ce-subject"]) for h, _ in sink.events()]) == wanted and r,
                20,
                what=lambda: f"CloudEvents {[(h['ce-type'], h['ce-subject']) for h, _ in sink.events()]}",
            )
            assert got == wanted
            headers, data = sink.events()[-1]
            assert headers["ce-specversion"] == "1.0"
            assert headers["ce-source"] == f"/apis/langmerge.dev/v1alpha1/namespaces/{namespace}/mergedmodels/mm"
            assert headers["content-type"].startswith("application/json")
            assert data["revision"] == 2 and data["storageUri"] == uri2 and data["inferenceService"] == ISVC
            assert set(data["metrics"]) == set(LANGS) and data["metrics"]["es"]["merged"]["evalLoss"] > 0
            assert len({h["ce-id"] for h, _ in sink.events()}) == len(wanted), "one id per event"
            sink_status = wait_for(
                lambda: (s := served(kube, namespace, f"cloudEvents/{sink.url}")).get("delivered") == 5 and s, 10
            )
            assert sink_status["phase"] == "Delivered" and sink_status["failed"] == 0
    finally:
        sink.close()


def test_a_revision_that_cannot_load_is_rolled_back_and_pins_move_serving(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str, serving: tuple[LocalServingRunner, Services, Path]
) -> None:
    bucket = seeded
    _, services, rules = serving
    kserve = {"canaryTrafficPercent": 10, "promoteAfter": "1s", "readyTimeout": "30s"}
    with _operator(namespace, bucket), SimulatedJobs(kube, s3, namespace):
        _start(kube, namespace, bucket, _merged(bucket, kserve))
        url = wait_serving(kube, namespace, "Promoted", 1)["url"]
        uri1 = merge_prefix(kube, namespace, 1)
        rules.write_text(f"fail-except {uri1}\n")  # every other revision's weights "are broken" from now on
        with RequestLoop(url, ISVC) as loop:
            new_data(s3, bucket, 1)
            back = wait_serving(kube, namespace, "RolledBack", 1)
            time.sleep(0.5)
        assert set(loop.codes) == {200}, f"clients saw failures: {loop.codes}"
        assert "revision 2 rolled back to revision 1: it failed to load" in back["message"]
        assert services.get(ISVC)["spec"]["predictor"]["model"]["storageUri"] == uri1
        assert predict(url, ISVC)[1]["model_version"] == uri1
        warnings = [e.message for e in events(kube, namespace, "mm") if e.reason == "RolledBack"]
        assert len(warnings) == 1 and "ModelLoadFailed" in warnings[0], warnings
        history = {h["revision"]: h for h in get_merged(kube, namespace, "mm")["status"]["history"]}
        assert history[2]["serving"][TARGET].startswith("RolledBack at ")
        # Revision 2 stays rolled back: it is not tried again on later passes.
        generation = services.get(ISVC)["metadata"]["generation"]
        time.sleep(2)
        assert services.get(ISVC)["metadata"]["generation"] == generation

        # A pin publishes revision 1's model again (revision 3): it serves already, so nothing loads.
        apply_merged(kube, namespace, "mm", _merged(bucket, kserve, pinRevision=1))
        pinned = wait_serving(kube, namespace, "Promoted", 3)
        assert pinned["storageUri"] == uri1

        # The weights are fixed; the pin is lifted: revision 2's merge is published again (4) and now loads.
        rules.unlink()
        apply_merged(kube, namespace, "mm", _merged(bucket, kserve))
        wait_serving(kube, namespace, "Promoted", 4)
        assert services.get(ISVC)["spec"]["predictor"]["model"]["storageUri"] == merge_prefix(kube, namespace, 2)


def test_a_sink_that_is_down_is_retried_shown_and_blocks_nothing(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str, serving: tuple[LocalServingRunner, Services, Path]
) -> None:
    bucket = seeded
    probe = Sink()
    port = probe.server.server_address[1]
    probe.close()  # a port where nothing listens (for now)
    sink_url = f"http://127.0.0.1:{port}/events"
    with _operator(namespace, bucket), SimulatedJobs(kube, s3, namespace):
        _start(kube, namespace, bucket, _merged(bucket, {"promoteAfter": "0s"}, {"cloudEvents": {"sink": sink_url}}))
        wait_serving(kube, namespace, "Promoted", 1, timeout=60)  # the rollout did not wait for the sink
        failing = wait_for(
            lambda: (s := served(kube, namespace, f"cloudEvents/{sink_url}")).get("phase") == "Failing" and s, 20
        )
        assert "Connection refused" in failing["message"] or "refused" in failing["message"].lower(), failing
        sink = Sink(port)
        try:
            delivered = wait_for(
                lambda: (s := served(kube, namespace, f"cloudEvents/{sink_url}")).get("phase") == "Delivered" and s,
                40,
                what=lambda: f"sink status {served(kube, namespace, f'cloudEvents/{sink_url}')}",
            )
            assert delivered["delivered"] >= 1
            assert {h["ce-type"] for h, _ in sink.events()} & {cloudevents.PUBLISHED, cloudevents.PROMOTED}
        finally:
            sink.close()


def test_an_operator_restart_in_a_canary_resumes_the_same_rollout(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str, serving: tuple[LocalServingRunner, Services, Path]
) -> None:
    bucket = seeded
    _, services, _ = serving
    kserve = {"canaryTrafficPercent": 50, "promoteAfter": "8s", "readyTimeout": "30s"}
    with SimulatedJobs(kube, s3, namespace):
        with _operator(namespace, bucket):
            _start(kube, namespace, bucket, _merged(bucket, kserve))
            wait_serving(kube, namespace, "Promoted", 1)
            new_data(s3, bucket, 1)
            wait_serving(kube, namespace, "Canary", 2)
            isvc = services.get(ISVC)
        generation = isvc["metadata"]["generation"]
        ready_at = isvc["metadata"]["annotations"]["serving.langmerge.dev/ready-at"]
        with _operator(namespace, bucket):
            wait_serving(kube, namespace, "Promoted", 2, timeout=40)
    after = services.get(ISVC)
    assert after["metadata"]["generation"] == generation + 1, "one more spec change: the promotion"
    assert after["metadata"]["annotations"]["serving.langmerge.dev/ready-at"] == ready_at, "the same canary"
    seen = reasons(kube, namespace)
    assert (seen["RollingOut"], seen["CanaryStarted"], seen["Promoted"]) == (2, 1, 2), seen


def test_one_inference_service_is_served_by_one_merged_model(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str, serving: tuple[LocalServingRunner, Services, Path]
) -> None:
    bucket = seeded
    with _operator(namespace, bucket), SimulatedJobs(kube, s3, namespace):
        _start(kube, namespace, bucket, _merged(bucket, {"promoteAfter": "0s"}))
        wait_serving(kube, namespace, "Promoted", 1)
        other = _merged(bucket, {"promoteAfter": "0s"}, output={"uri": f"s3://{bucket}/merged/other"})
        apply_merged(kube, namespace, "mm2", other)

        def mm2_is(phase: str) -> dict[str, Any] | None:
            s = served(kube, namespace, name="mm2")
            return s if s.get("phase") == phase else None

        failed = wait_for(lambda: mm2_is("Failed"), 60, what="mm2 refused")
        assert f"is served by MergedModel {namespace}/mm" in failed["message"]
        assert any(e.reason == "InferenceServiceOwnedByAnother" for e in events(kube, namespace, "mm2"))
        assert served(kube, namespace)["phase"] == "Promoted", "the owner's rollout is untouched"

        # The owner lets it go (the target leaves its spec): the other one takes it over at its next pass.
        apply_merged(kube, namespace, "mm", _merged(bucket, {"promoteAfter": "0s"}, serving=[]))
        wait_for(lambda: any(e.reason == "ServingTargetRemoved" for e in events(kube, namespace, "mm")), 30)

        wait_for(lambda: mm2_is("Promoted"), 90, what="mm2 serves the InferenceService")
        assert status_of(get_merged(kube, namespace, "mm")).get("serving") == []
