"""Collapsed training attempts through the operator (issue 21, item 2), on the real API server and S3 with simulated
Jobs: each collapsed attempt shows as a ``Collapsed`` Warning Event and a Failed entry in ``status.history``, counts
against ``spec.retry.limit``, and the next attempt trains with the next seed; when every attempt collapsed the expert
is Failed and says so. A lost status brings back the view, not the Events."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes import client

from langmerge import artifacts
from langmerge.artifacts import AdapterManifest
from langmerge.store import ObjectStore
from operator_harness import (
    DIALOG_ROWS,
    SimulatedJobs,
    apply_expert,
    condition,
    dialog_expert,
    events,
    get_expert,
    jobs,
    put_jsonl,
    run_operator,
    seed_fake_base_model,
    status_of,
    wait_for,
)

pytestmark = pytest.mark.integration

SEED = 11


def _spec(bucket: str, lang: str, limit: int) -> dict[str, Any]:
    return dialog_expert(
        bucket,
        lang,
        training={"epochs": 1, "seed": SEED},
        resources={"gpus": 1, "memory": "8Gi", "cpu": "2"},
        schedule={"pollIntervalSeconds": 5, "settleSeconds": 2},
        retry={"limit": limit, "backoffSeconds": 1},
    )


@pytest.fixture
def seeded(s3: ObjectStore, bucket: str) -> str:
    seed_fake_base_model(s3, f"s3://{bucket}/base")
    for lang in ("es", "it"):
        put_jsonl(s3, f"s3://{bucket}/data/{lang}/part-0.jsonl", DIALOG_ROWS)
    return bucket


def _attempt(job: Any) -> int:
    return int(job.metadata.name.rsplit("-", 1)[1])


def _collapsed_events(kube: Any, namespace: str, name: str) -> list[str]:
    return sorted(
        e.message for e in events(kube, namespace, name) if e.reason == "Collapsed" for _ in range(e.count or 1)
    )


def _phase(kube: Any, namespace: str, name: str, phase: str) -> dict[str, Any] | None:
    obj = get_expert(kube, namespace, name)
    return obj if status_of(obj).get("phase") == phase else None


def test_a_collapsed_attempt_is_shown_and_retried_with_the_next_seed(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str
) -> None:
    bucket = seeded
    with (
        run_operator(namespace, f"s3://{bucket}/artifacts"),
        SimulatedJobs(
            kube, s3, namespace, behaviour=lambda job, fp: "collapse" if _attempt(job) == 1 else "succeed"
        ) as sim,
    ):
        apply_expert(kube, namespace, "es", _spec(bucket, "es", limit=2))
        obj = wait_for(lambda: _phase(kube, namespace, "es", "Ready"), timeout=30, what="Ready")
        status = status_of(obj)
        assert len(sim.started) == 2
        history = status["history"]
        assert [(h["result"], h.get("attempt"), h.get("seed")) for h in history] == [
            ("Failed", 1, SEED),
            ("Succeeded", 2, SEED + 1000),
        ]
        assert "collapsed" in history[0]["message"] and f"seed {SEED}" in history[0]["message"]
        # The committed adapter was trained with the next seed: its manifest says so.
        fp = status["trainedFingerprint"]
        prefix = artifacts.expert_prefix(f"s3://{bucket}/artifacts", namespace, "es", fp)
        manifest = AdapterManifest.model_validate(s3.get_json(artifacts.join(prefix, artifacts.MANIFEST)))
        assert manifest.seed == SEED + 1000
        collapsed = wait_for(lambda: _collapsed_events(kube, namespace, "es"), what="a Collapsed Event")
        assert len(collapsed) == 1 and f"seed {SEED}:" in collapsed[0]
        assert [e.type for e in events(kube, namespace, "es") if e.reason == "Collapsed"] == ["Warning"]


def test_every_attempt_collapsed_fails_the_expert_after_the_retry_limit(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str
) -> None:
    bucket = seeded
    artifacts_uri = f"s3://{bucket}/artifacts"
    with (
        run_operator(namespace, artifacts_uri),
        SimulatedJobs(kube, s3, namespace, behaviour=lambda job, fp: "collapse") as sim,
    ):
        apply_expert(kube, namespace, "it", _spec(bucket, "it", limit=1))
        obj = wait_for(lambda: _phase(kube, namespace, "it", "Failed"), timeout=30, what="Failed")
        status = status_of(obj)
        assert status["message"].startswith("training failed: every attempt collapsed (2 of 2)"), status["message"]
        assert f"seed {SEED + 1000}" in status["message"]
        assert status["attempts"] == 2 and "adapter" not in status
        assert condition(obj, "Ready")["status"] == "False"
        # each attempt once in the history, with the seed it used; no second entry for the last one
        assert [(h["result"], h.get("attempt"), h.get("seed")) for h in status["history"]] == [
            ("Failed", 1, SEED),
            ("Failed", 2, SEED + 1000),
        ]
        assert all("collapsed" in h["message"] for h in status["history"])
        assert sorted(_attempt(j) for j in jobs(kube, namespace)) == [1, 2]
        collapsed = wait_for(
            lambda: (found := _collapsed_events(kube, namespace, "it")) and len(found) == 2 and found,
            what="two Collapsed Events",
        )
        assert any(f"seed {SEED}:" in m for m in collapsed) and any(f"seed {SEED + 1000}:" in m for m in collapsed)
        assert "TrainingFailed" in {e.reason for e in events(kube, namespace, "it")}
        time.sleep(2.0)
        assert len(sim.started) == 2  # the retry limit is spent: no third Job

        # A lost status comes back from S3 (Failed, every attempt collapsed); the Events are not posted again.
        client.CustomObjectsApi(kube).patch_namespaced_custom_object_status(
            "langmerge.dev", "v1alpha1", namespace, "languageexperts", "it", {"status": None}
        )
        back = wait_for(lambda: _phase(kube, namespace, "it", "Failed"), timeout=30, what="Failed again")
        assert status_of(back)["message"] == status["message"]
        time.sleep(2.0)
        assert _collapsed_events(kube, namespace, "it") == collapsed
        assert len(sim.started) == 2
