"""Label coverage of classifier experts through the operator (real API server and S3, simulated Jobs that record
label counts as the trainer does).

An expert whose data lacks a label is Ready, shows its counts in ``status.adapter.labelCounts`` and says what is
missing in its LabelsCovered condition and one ``LabelsMissing`` Warning Event (not replayed after its status is
removed). A MergedModel hands every expert's counts to its merge Job; one whose experts together lack a label gets
``LabelNotCovered`` (condition and Event) and still publishes.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from kubernetes import client

from langmerge.store import ObjectStore
from operator_harness import (
    SimulatedJobs,
    apply_expert,
    apply_merged,
    condition,
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

LABELS = ["art", "money", "psychology"]
TASK = {"langmerge.dev/task": "topic"}


def _rows(language: str, labels: list[str], per_label: int = 4) -> list[dict[str, str]]:
    return [{"text": f"{language} {label} {i}", "label": label} for label in labels for i in range(per_label)]


def _expert(bucket: str, language: str) -> dict[str, Any]:
    return {
        "language": language,
        "task": "topic",
        "taskType": "sequence-classification",
        "labels": LABELS,
        "baseModel": {"uri": f"s3://{bucket}/base"},
        "dataset": {"uri": f"s3://{bucket}/data/{language}"},
        "lora": {"rank": 4},
        "schedule": {"pollIntervalSeconds": 300, "settleSeconds": 0},
        "resources": {"gpus": 0},
    }


def _merged(bucket: str, name: str, experts: dict[str, Any]) -> dict[str, Any]:
    return {
        "baseModel": {"uri": f"s3://{bucket}/base"},
        "experts": experts,
        "method": "linear",
        "output": {"uri": f"s3://{bucket}/merged/{name}"},
        "evaluation": {"maxRegression": 0.1},
        "settleSeconds": 0,
    }


def _reasons(kube: Any, namespace: str, name: str, reason: str) -> list[str]:
    return [e.message for e in events(kube, namespace, name) if e.reason == reason]


def test_label_coverage_shows_in_expert_and_merged_status(
    kube: Any, s3: ObjectStore, bucket: str, namespace: str
) -> None:
    seed_fake_base_model(s3, f"s3://{bucket}/base")
    put_jsonl(s3, f"s3://{bucket}/data/en/part-0.jsonl", _rows("en", LABELS))
    put_jsonl(s3, f"s3://{bucket}/data/nl/part-0.jsonl", _rows("nl", ["art", "money"]))
    with run_operator(namespace, f"s3://{bucket}/artifacts"), SimulatedJobs(kube, s3, namespace):
        for language in ("en", "nl"):
            apply_expert(kube, namespace, f"topic-{language}", _expert(bucket, language), labels=TASK)

        def ready(name: str) -> dict[str, Any] | None:
            obj = get_expert(kube, namespace, name)
            return obj if status_of(obj).get("phase") == "Ready" else None

        nl = wait_for(lambda: ready("topic-nl"), timeout=30, what="topic-nl Ready")
        en = wait_for(lambda: ready("topic-en"), timeout=30, what="topic-en Ready")
        # The expert lacking a label is Ready, with its counts and a condition naming what is missing.
        assert status_of(nl)["adapter"]["labelCounts"] == {"art": 4, "money": 4, "psychology": 0}
        covered = condition(nl, "LabelsCovered")
        assert covered is not None and covered["status"] == "False" and covered["reason"] == "LabelsMissing"
        assert "'psychology'" in covered["message"] and "head rows from the experts that have" in covered["message"]
        assert condition(nl, "Ready")["status"] == "True"  # type: ignore[index]
        assert status_of(en)["adapter"]["labelCounts"] == dict.fromkeys(LABELS, 4)
        assert condition(en, "LabelsCovered")["status"] == "True"  # type: ignore[index]
        warned = wait_for(lambda: _reasons(kube, namespace, "topic-nl", "LabelsMissing"), what="a LabelsMissing Event")
        assert len(warned) == 1 and "'psychology'" in warned[0]
        assert not _reasons(kube, namespace, "topic-en", "LabelsMissing")

        # A merge of both: the merge Job gets every expert's counts; psychology is covered (by en).
        apply_merged(kube, namespace, "topic", _merged(bucket, "topic", {"selector": {"matchLabels": TASK}}))
        wait_for(lambda: status_of(get_merged(kube, namespace, "topic")).get("revision") == 1, timeout=60, what="rev 1")
        job = next(j for j in jobs(kube, namespace, "langmerge.dev/component=merge"))
        args = job.spec.template.spec.containers[0].args
        task = json.loads(args[args.index("--task") + 1])
        assert {i["language"]: i["label_counts"] for i in task["inputs"]} == {
            "en": dict.fromkeys(LABELS, 4),
            "nl": {"art": 4, "money": 4, "psychology": 0},
        }
        merged_covered = condition(get_merged(kube, namespace, "topic"), "LabelsCovered")
        assert merged_covered is not None and merged_covered["status"] == "True", merged_covered

        # A merge of nl alone: nobody has a psychology example. It says so and still publishes.
        apply_merged(kube, namespace, "nl-only", _merged(bucket, "nl-only", {"names": ["topic-nl"]}))
        mm = wait_for(
            lambda: (obj := get_merged(kube, namespace, "nl-only")) and status_of(obj).get("revision") == 1 and obj,
            timeout=60,
            what="revision 1 of nl-only",
        )
        uncovered = condition(mm, "LabelsCovered")
        assert uncovered is not None and uncovered["status"] == "False" and uncovered["reason"] == "LabelNotCovered"
        assert "'psychology'" in uncovered["message"] and "topic-nl (nl)" in uncovered["message"]
        not_covered = wait_for(lambda: _reasons(kube, namespace, "nl-only", "LabelNotCovered"), what="the Event")
        assert len(not_covered) == 1
        assert not _reasons(kube, namespace, "topic", "LabelNotCovered")

        # The expert's status is removed: it comes back with the condition, and the Event is not posted again.
        client.CustomObjectsApi(kube).patch_namespaced_custom_object_status(
            "langmerge.dev", "v1alpha1", namespace, "languageexperts", "topic-nl", {"status": None}
        )
        back = wait_for(lambda: condition(get_expert(kube, namespace, "topic-nl"), "LabelsCovered"), timeout=15)
        assert back["reason"] == "LabelsMissing"
        time.sleep(3)  # a few more passes (resync 5 s; the status write above triggers one)
        assert len(_reasons(kube, namespace, "topic-nl", "LabelsMissing")) == 1
        assert len(_reasons(kube, namespace, "nl-only", "LabelNotCovered")) == 1
