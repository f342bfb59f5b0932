"""MergedModel reconciliation on the real API server and S3 with the operator in-process and simulated Jobs.

The real merge engine under the local Job runner, and loading the published model with transformers/peft, are
covered by the end-to-end test.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from langmerge import artifacts
from langmerge.constants import EXPERT_PLURAL, GROUP, VERSION
from langmerge.store import ObjectStore
from operator_harness import (
    DIALOG_ROWS,
    SimulatedJobs,
    apply_expert,
    apply_merged,
    condition,
    custom,
    dialog_expert,
    dialog_merged,
    events,
    get_expert,
    get_merged,
    jobs,
    put_jsonl,
    run_operator,
    seed_fake_base_model,
    status_of,
    wait_for,
)

pytestmark = pytest.mark.integration

LANGS = ("es", "it", "pt")
MERGE_JOBS = "langmerge.dev/component=merge"


def _expert(bucket: str, lang: str, base: str = "base") -> dict[str, Any]:
    return dialog_expert(bucket, lang, baseModel={"uri": f"s3://{bucket}/{base}"})


def _merged(bucket: str, **overrides: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "evaluation": {"maxRegression": 0.1},
        "publish": {"keepRevisions": 3},
        "settleSeconds": 2,
        "retry": {"limit": 1, "backoffSeconds": 1},
    }
    return dialog_merged(bucket, **{**defaults, **overrides})


@pytest.fixture
def seeded(s3: ObjectStore, bucket: str) -> str:
    seed_fake_base_model(s3, f"s3://{bucket}/base")
    seed_fake_base_model(s3, f"s3://{bucket}/other-base")
    for lang in LANGS:
        put_jsonl(s3, f"s3://{bucket}/data/{lang}/part-0.jsonl", DIALOG_ROWS)
    return bucket


def _experts(kube: Any, namespace: str, bucket: str) -> None:
    for lang in LANGS:
        apply_expert(kube, namespace, f"dialog-{lang}", _expert(bucket, lang), labels={"task": "dialog"})


def _published(kube: Any, namespace: str, revision: int) -> dict[str, Any] | None:
    obj = get_merged(kube, namespace, "mm")
    status = status_of(obj)
    return obj if status.get("revision") == revision and status.get("phase") == "Ready" else None


def _merge_jobs(kube: Any, namespace: str) -> list[Any]:
    return jobs(kube, namespace, MERGE_JOBS)


def test_merge_publish_retrain_remerge_and_gc(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    bucket = seeded
    out = f"s3://{bucket}/merged/dialog"
    with run_operator(namespace, f"s3://{bucket}/artifacts"), SimulatedJobs(kube, s3, namespace) as sim:
        apply_merged(kube, namespace, "mm", _merged(bucket, publish={"keepRevisions": 2}))
        waiting = wait_for(
            lambda: status_of(get_merged(kube, namespace, "mm")).get("phase") == "Waiting", what="Waiting"
        )
        assert waiting
        _experts(kube, namespace, bucket)
        obj = wait_for(lambda: _published(kube, namespace, 1), timeout=40, what="revision 1")
        status = status_of(obj)
        assert len(_merge_jobs(kube, namespace)) == 1, "three experts Ready -> one merge"
        assert sorted(i["language"] for i in status["inputs"]) == list(LANGS)
        current = s3.get_json(artifacts.current_uri(out))
        assert current["revision"] == 1 and current["fingerprint"] == status["fingerprint"]
        assert status["uri"] == current["model_uri"] and s3.exists(current["manifest_uri"])
        assert set(status["metrics"]) == set(LANGS) and status["metrics"]["es"]["regression"] == pytest.approx(0.025)
        assert condition(obj, "QualityGate")["status"] == "True" and condition(obj, "Ready")["status"] == "True"
        # the published adapter's fidelity: errors over modules and the ranks chosen, in status and the Event
        refactor = status["refactorization"]
        assert refactor["maxRelativeError"] == pytest.approx(0.0042) and refactor["worstModule"].endswith("q_proj")
        assert (refactor["minRank"], refactor["maxRank"]) == (12, 40)
        published = [e.message for e in events(kube, namespace, "mm") if e.reason == "Published"]
        assert any("adapter ranks 12-40 (mean 26), relative error max 0.0042" in m for m in published), published
        digests1 = {i["language"]: i["adapterDigest"] for i in status["inputs"]}

        # New data for one language: that expert alone retrains, then exactly one re-merge, revision 2.
        trained = len([j for j in sim.started if "-train-" in j])
        put_jsonl(s3, f"s3://{bucket}/data/pt/part-1.jsonl", DIALOG_ROWS[:7])
        obj = wait_for(lambda: _published(kube, namespace, 2), timeout=60, what="revision 2")
        status = status_of(obj)
        assert len([j for j in sim.started if "-train-" in j]) == trained + 1
        assert len(_merge_jobs(kube, namespace)) == 2
        digests2 = {i["language"]: i["adapterDigest"] for i in status["inputs"]}
        assert [lang for lang in LANGS if digests1[lang] != digests2[lang]] == ["pt"]
        assert status["history"][-1]["changedInputs"] == ["dialog-pt"] and status["history"][-1]["revision"] == 2

        # Two more revisions by weights; keepRevisions=2 keeps exactly two merge outputs.
        for i, weight in enumerate((0.5, 0.25)):
            apply_merged(
                kube,
                namespace,
                "mm",
                _merged(bucket, publish={"keepRevisions": 2}, parameters={"density": 1.0, "weights": {"es": weight}}),
            )
            wait_for(lambda r=3 + i: _published(kube, namespace, r), timeout=30, what=f"revision {3 + i}")
        from langmerge.controller.publish import merge_fingerprints_in_store

        kept = merge_fingerprints_in_store(s3, out)
        assert len(kept) == 2, kept
        assert status_of(get_merged(kube, namespace, "mm"))["fingerprint"] in kept
        assert [r["revision"] for r in status_of(get_merged(kube, namespace, "mm"))["history"]] == [1, 2, 3, 4]
        assert "GarbageCollected" in {e.reason for e in events(kube, namespace, "mm")}

        # An expert deleted: one re-merge of the others and no training; the history and the Event say what went.
        trained = len([j for j in sim.started if "-train-" in j])
        custom(kube).delete_namespaced_custom_object(GROUP, VERSION, namespace, EXPERT_PLURAL, "dialog-it")
        obj = wait_for(lambda: _published(kube, namespace, 5), timeout=30, what="revision 5 without dialog-it")
        status = status_of(obj)
        assert sorted(i["language"] for i in status["inputs"]) == ["es", "pt"]
        assert status["history"][-1]["removedInputs"] == ["dialog-it"]
        assert status["history"][-1].get("changedInputs", []) == []
        assert len([j for j in sim.started if "-train-" in j]) == trained and len(_merge_jobs(kube, namespace)) == 5
        published = [e.message for e in events(kube, namespace, "mm") if e.reason == "Published"]
        assert any("revision 5" in m and "removed inputs: dialog-it" in m for m in published), published


def test_two_experts_finishing_together_give_one_merge(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    bucket = seeded
    with run_operator(namespace, f"s3://{bucket}/artifacts"), SimulatedJobs(kube, s3, namespace) as sim:
        _experts(kube, namespace, bucket)
        # The settle window is wider than the operator's resync (5 s): the two data changes may be noticed one poll
        # apart, so their trainings may finish one poll apart, and that must still give one merge.
        apply_merged(kube, namespace, "mm", _merged(bucket, settleSeconds=12))
        wait_for(lambda: _published(kube, namespace, 1), timeout=60, what="revision 1")
        put_jsonl(s3, f"s3://{bucket}/data/es/part-1.jsonl", DIALOG_ROWS[:5])
        put_jsonl(s3, f"s3://{bucket}/data/it/part-1.jsonl", DIALOG_ROWS[:6])
        obj = wait_for(lambda: _published(kube, namespace, 2), timeout=90, what="revision 2")
        assert len(_merge_jobs(kube, namespace)) == 2, [j for j in sim.started]
        assert obj["status"]["history"][-1]["changedInputs"] == ["dialog-es", "dialog-it"]
        time.sleep(3)
        assert len(_merge_jobs(kube, namespace)) == 2


def test_planted_regression_is_not_published(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    bucket = seeded
    out = f"s3://{bucket}/merged/dialog"
    with run_operator(namespace, f"s3://{bucket}/artifacts"), SimulatedJobs(kube, s3, namespace) as sim:
        _experts(kube, namespace, bucket)
        apply_merged(kube, namespace, "mm", _merged(bucket))
        wait_for(lambda: _published(kube, namespace, 1), timeout=40, what="revision 1")
        sim.merge_losses = {"it": 3.1}  # +55% on Italian
        apply_merged(kube, namespace, "mm", _merged(bucket, method="linear", parameters={}))
        obj = wait_for(
            lambda: (
                status_of(get_merged(kube, namespace, "mm")).get("phase") == "Blocked"
                and get_merged(kube, namespace, "mm")
            ),
            timeout=30,
            what="Blocked",
        )
        gate = condition(obj, "QualityGate")
        assert gate["status"] == "False" and "it: evalLoss 3.1000 vs expert 2.0000 (+55.0% worse" in gate["message"]
        assert "es:" not in gate["message"]
        assert obj["status"]["revision"] == 1 and s3.get_json(artifacts.current_uri(out))["revision"] == 1
        assert "QualityGateFailed" in {e.reason for e in events(kube, namespace, "mm")}
        # Raising the allowed regression publishes the same merge without merging again.
        merges = len(_merge_jobs(kube, namespace))
        apply_merged(
            kube, namespace, "mm", _merged(bucket, method="linear", parameters={}, evaluation={"maxRegression": 1.0})
        )
        wait_for(lambda: _published(kube, namespace, 2), timeout=30, what="revision 2")
        assert len(_merge_jobs(kube, namespace)) == merges


def test_pin_revision_rolls_back_without_merging(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    bucket = seeded
    out = f"s3://{bucket}/merged/dialog"
    with run_operator(namespace, f"s3://{bucket}/artifacts"), SimulatedJobs(kube, s3, namespace):
        _experts(kube, namespace, bucket)
        apply_merged(kube, namespace, "mm", _merged(bucket))
        first = wait_for(lambda: _published(kube, namespace, 1), timeout=40, what="revision 1")["status"]["fingerprint"]
        apply_merged(kube, namespace, "mm", _merged(bucket, method="linear", parameters={}))
        wait_for(lambda: _published(kube, namespace, 2), timeout=30, what="revision 2")
        merges = len(_merge_jobs(kube, namespace))
        apply_merged(kube, namespace, "mm", _merged(bucket, method="linear", parameters={}, pinRevision=1))
        obj = wait_for(lambda: _published(kube, namespace, 3), timeout=30, what="rollback revision 3")
        current = s3.get_json(artifacts.current_uri(out))
        assert current["fingerprint"] == first and current["reason"] == "rollback" and current["rollback_of"] == 1
        assert obj["status"]["history"][-1]["reason"] == "rollback"
        assert condition(obj, "Ready")["reason"] == "Pinned"
        time.sleep(2)
        assert len(_merge_jobs(kube, namespace)) == merges and _published(kube, namespace, 3)
        # Unpinning resumes: the latest inputs' merge is published again (no new merge needed).
        apply_merged(kube, namespace, "mm", _merged(bucket, method="linear", parameters={}))
        wait_for(lambda: _published(kube, namespace, 4), timeout=30, what="revision 4")
        assert len(_merge_jobs(kube, namespace)) == merges


def test_base_model_mismatch_is_a_clear_error(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    bucket = seeded
    with run_operator(namespace, f"s3://{bucket}/artifacts"), SimulatedJobs(kube, s3, namespace):
        apply_expert(kube, namespace, "dialog-es", _expert(bucket, "es"), labels={"task": "dialog"})
        apply_expert(kube, namespace, "dialog-it", _expert(bucket, "it", base="other-base"), labels={"task": "dialog"})
        apply_merged(kube, namespace, "mm", _merged(bucket))
        obj = wait_for(
            lambda: (
                status_of(get_merged(kube, namespace, "mm")).get("phase") == "Failed"
                and get_merged(kube, namespace, "mm")
            ),
            what="Failed",
        )
        message = obj["status"]["message"]
        assert "LanguageExpert dialog-it is trained on" in message and "other-base" in message
        assert condition(obj, "Degraded")["reason"] == "BaseModelMismatch"
        assert _merge_jobs(kube, namespace) == []


def test_partial_readiness_policy(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    bucket = seeded
    with (
        run_operator(namespace, f"s3://{bucket}/artifacts"),
        SimulatedJobs(
            kube, s3, namespace, behaviour=lambda job, fp: "hang" if "dialog-pt" in job.metadata.name else "succeed"
        ),
    ):
        _experts(kube, namespace, bucket)
        apply_merged(kube, namespace, "mm", _merged(bucket))
        obj = wait_for(
            lambda: (
                (o := get_merged(kube, namespace, "mm")) and status_of(o).get("missingExperts") == ["dialog-pt"] and o
            ),
            timeout=30,
            what="missing pt",
        )
        assert obj["status"]["phase"] == "Waiting" and _merge_jobs(kube, namespace) == []
        apply_merged(kube, namespace, "mm", _merged(bucket, requireAllExperts=False))
        obj = wait_for(lambda: _published(kube, namespace, 1), timeout=30, what="partial revision 1")
        assert sorted(i["language"] for i in obj["status"]["inputs"]) == ["es", "it"]
        assert obj["status"]["missingExperts"] == ["dialog-pt"]
        assert condition(obj, "ExpertsReady")["reason"] == "PartiallyReady"
        assert get_expert(kube, namespace, "dialog-pt")["status"]["phase"] == "Training"


def _task_of(job: Any) -> dict[str, Any]:
    import json

    args = job.spec.template.spec.containers[0].args
    return dict(json.loads(args[args.index("--task") + 1]))


def test_search_choice_and_a_failed_error_bound_show_in_status_and_events(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str
) -> None:
    """spec.search reaches the merge Job; what it chose shows in status and the Published Event. A merge whose PEFT
    adapter would exceed output.maxRelativeError fails with the engine's message (worst module, what to do) in status
    and a Warning Event, and the searched revision stays published."""
    from operator_harness import REFACTOR_BOUND_MESSAGE

    bucket = seeded

    def behaviour(job: Any, fp: str) -> str:
        return "fail-bound" if _task_of(job).get("output", {}).get("rank") == 8 else "succeed"

    with run_operator(namespace, f"s3://{bucket}/artifacts"), SimulatedJobs(kube, s3, namespace, behaviour) as sim:
        _experts(kube, namespace, bucket)
        apply_merged(kube, namespace, "mm", _merged(bucket, search={"maxCandidates": 12, "objective": "worst"}))
        obj = wait_for(lambda: _published(kube, namespace, 1), timeout=40, what="revision 1 (searched)")
        merge_job = next(j for j in _merge_jobs(kube, namespace))
        assert _task_of(merge_job)["search"]["max_candidates"] == 12
        search = status_of(obj)["search"]
        assert search["chosen"]["method"] == "linear" and search["default"]["method"] == "ties"
        assert search["chosen"]["parameters"]["weights"]["es"] == 1.5 and search["candidates"] == 7
        published = [e.message for e in events(kube, namespace, "mm") if e.reason == "Published"]
        assert any(
            "search (worst evalLoss vs each expert, 7 candidates, exhausted) chose linear(" in m for m in published
        )

        apply_merged(
            kube,
            namespace,
            "mm",
            _merged(bucket, output={"uri": f"s3://{bucket}/merged/dialog", "rank": 8}),
        )
        failed = wait_for(
            lambda: (o := get_merged(kube, namespace, "mm")) and status_of(o).get("phase") == "Failed" and o,
            timeout=40,
            what="Failed",
        )
        status = status_of(failed)
        assert REFACTOR_BOUND_MESSAGE in status["message"] and "RefactorBoundExceeded" in status["message"]
        assert status["revision"] == 1  # the searched revision stays published
        warnings = [e.message for e in events(kube, namespace, "mm") if e.reason == "MergeFailed"]
        assert any("module model.layers.1.self_attn.q_proj has relative error 0.151" in m for m in warnings), warnings
        assert len([j for j in sim.started if "-merge-" in j]) == 2  # not retried: no retry can fix it


def test_a_moved_output_merges_anew_there(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    """The output moves to another prefix with the same inputs (the same merge fingerprint): the merge runs again into
    the new prefix and publishes its revision 1 there, on the first attempt; the earlier Job, which merged into the old
    prefix, is not taken for this one (it used to end in JobSucceededWithoutManifest)."""
    bucket = seeded
    moved = f"s3://{bucket}/merged/dialog-v2"
    with run_operator(namespace, f"s3://{bucket}/artifacts"), SimulatedJobs(kube, s3, namespace):
        _experts(kube, namespace, bucket)
        apply_merged(kube, namespace, "mm", _merged(bucket, settleSeconds=0, retry={"limit": 0, "backoffSeconds": 1}))
        first = wait_for(lambda: _published(kube, namespace, 1), timeout=40, what="revision 1")
        apply_merged(
            kube,
            namespace,
            "mm",
            _merged(bucket, settleSeconds=0, retry={"limit": 0, "backoffSeconds": 1}, output={"uri": moved}),
        )
        obj = wait_for(
            lambda: (o := _published(kube, namespace, 1)) and status_of(o)["uri"].startswith(moved) and o,
            timeout=40,
            what=lambda: f"revision 1 at the new prefix: {status_of(get_merged(kube, namespace, 'mm'))}",
        )
        assert status_of(obj)["fingerprint"] == status_of(first)["fingerprint"]
        assert s3.get_json(artifacts.current_uri(moved))["revision"] == 1
        assert len(_merge_jobs(kube, namespace)) == 2
