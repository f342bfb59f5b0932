"""Experts branched from a trunk (spec.initFrom) and merged relative to it (MergedModel spec.trunk), on the real API
server and S3 with the operator in-process and simulated Jobs: branches wait for the trunk and start from its
adapter; the merge names the trunk's adapter as its reference and never merges the trunk as a language; one
language's new data retrains that branch only; the trunk does not follow its data (followData false) and says so; a
trunk spec change retrains every branch and re-merges; a trunk of another shape and a stray expert are refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from langmerge.store import ObjectStore
from langmerge.tasks import MergeTask, TrainTask
from operator_harness import (
    DIALOG_ROWS,
    SimulatedJobs,
    apply_expert,
    apply_merged,
    condition,
    dialog_expert,
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

TASK = {"task": "dialog"}


def _expert(bucket: str, language: str, data: str, **extra: Any) -> dict[str, Any]:
    return dialog_expert(bucket, language, **{"dataset": {"uri": f"s3://{bucket}/{data}"}, **extra})


def _tasks(kube: Any, namespace: str, component: str) -> list[Any]:
    out = []
    for job in jobs(kube, namespace, f"langmerge.dev/component={component}"):
        args = job.spec.template.spec.containers[0].args
        raw = json.loads(args[args.index("--task") + 1])
        out.append(TrainTask.model_validate(raw) if component == "training" else MergeTask.model_validate(raw))
    return out


def _describe(kube: Any, namespace: str) -> str:
    out = []
    for name in ("trunk", "dialog-es", "dialog-it"):
        st = status_of(get_expert(kube, namespace, name))
        out.append(
            f"{name}: {st.get('phase')} {st.get('message')} {[(c.get('type'), c.get('reason')) for c in st.get('conditions', [])]}"
        )
    st = status_of(get_merged(kube, namespace, "mm"))
    out.append(f"mm: {st.get('phase')} {st.get('message')}")
    return "; ".join(out)


def _ready(kube: Any, namespace: str, name: str) -> dict[str, Any] | None:
    obj = get_expert(kube, namespace, name)
    return obj if status_of(obj).get("phase") == "Ready" else None


def test_branches_start_from_the_trunk_and_merge_relative_to_it(
    kube: Any, s3: ObjectStore, bucket: str, namespace: str
) -> None:
    seed_fake_base_model(s3, f"s3://{bucket}/base")
    for lang in ("es", "it"):
        put_jsonl(s3, f"s3://{bucket}/data/{lang}/part-0.jsonl", DIALOG_ROWS)
    trunk_spec = _expert(
        bucket, "mul", "data", schedule={"pollIntervalSeconds": 5, "settleSeconds": 1, "followData": False}
    )
    branch = {"initFrom": {"expert": "trunk"}}
    with run_operator(namespace, f"s3://{bucket}/artifacts"), SimulatedJobs(kube, s3, namespace, duration=1.0):
        # the branches first: they wait for the trunk, which does not exist yet
        for lang in ("es", "it"):
            apply_expert(
                kube, namespace, f"dialog-{lang}", _expert(bucket, lang, f"data/{lang}", **branch), labels=TASK
            )
        waiting = wait_for(
            lambda: condition(get_expert(kube, namespace, "dialog-es"), "Ready"), timeout=30, what="waiting"
        )
        assert waiting["reason"] == "TrunkNotFound" and not _tasks(kube, namespace, "training")
        apply_expert(kube, namespace, "trunk", trunk_spec, labels={"role": "trunk", **TASK})
        apply_merged(
            kube,
            namespace,
            "mm",
            {
                "baseModel": {"uri": f"s3://{bucket}/base"},
                "experts": {"selector": {"matchLabels": TASK}},  # matches the trunk too: it is left out
                "method": "ties",
                "output": {"uri": f"s3://{bucket}/merged/dialog"},
                "trunk": {"expert": "trunk"},
                "settleSeconds": 1,
            },
        )
        merged = wait_for(
            lambda: (
                status_of(get_merged(kube, namespace, "mm")).get("revision") == 1 and get_merged(kube, namespace, "mm")
            ),
            timeout=90,
            what="revision 1",
        )
        trunk = _ready(kube, namespace, "trunk")
        assert trunk is not None
        trunk_adapter = trunk["status"]["adapter"]
        for lang in ("es", "it"):
            status = get_expert(kube, namespace, f"dialog-{lang}")["status"]
            assert status["adapter"]["initDigest"] == trunk_adapter["digest"]
        trains = {t.name: t for t in _tasks(kube, namespace, "training")}
        assert trains["dialog-es"].init_adapter is not None
        assert (
            trains["dialog-es"].init_adapter.digest == trunk_adapter["digest"] and trains["trunk"].init_adapter is None
        )
        (merge,) = _tasks(kube, namespace, "merge")
        assert merge.reference is not None and merge.reference.uri == trunk_adapter["uri"]
        assert sorted(i.language for i in merge.inputs) == ["es", "it"]
        assert sorted(i["language"] for i in merged["status"]["inputs"]) == ["es", "it"]

        # new data for es: that branch retrains, the trunk (followData false) does not, and says why
        put_jsonl(s3, f"s3://{bucket}/data/es/part-1.jsonl", DIALOG_ROWS[:5])
        wait_for(
            lambda: status_of(get_merged(kube, namespace, "mm")).get("revision") == 2,
            timeout=90,
            what=lambda: _describe(kube, namespace),
        )
        names = [t.name for t in _tasks(kube, namespace, "training")]
        assert names.count("dialog-es") == 2 and names.count("dialog-it") == 1 and names.count("trunk") == 1
        changed = wait_for(
            lambda: (
                (c := condition(get_expert(kube, namespace, "trunk"), "DataChanged"))
                and c["reason"] == "NotFollowed"
                and c
            ),
            timeout=30,
            what="trunk DataChanged",
        )
        assert "does not retrain" in changed["message"] and _ready(kube, namespace, "trunk") is not None

        # a trunk spec change: the trunk retrains, then every branch, then one merge
        apply_expert(
            kube, namespace, "trunk", {**trunk_spec, "training": {"epochs": 1}}, labels={"role": "trunk", **TASK}
        )
        wait_for(
            lambda: status_of(get_merged(kube, namespace, "mm")).get("revision") == 3,
            timeout=150,
            what=lambda: _describe(kube, namespace),
        )
        names = [t.name for t in _tasks(kube, namespace, "training")]
        assert names.count("trunk") == 2 and names.count("dialog-es") == 3 and names.count("dialog-it") == 2
        new_trunk = get_expert(kube, namespace, "trunk")["status"]["adapter"]["digest"]
        assert new_trunk != trunk_adapter["digest"]
        assert all(
            get_expert(kube, namespace, f"dialog-{lang}")["status"]["adapter"]["initDigest"] == new_trunk
            for lang in ("es", "it")
        )


def test_a_trunk_of_another_shape_and_a_stray_expert_are_refused(
    kube: Any, s3: ObjectStore, bucket: str, namespace: str
) -> None:
    seed_fake_base_model(s3, f"s3://{bucket}/base")
    put_jsonl(s3, f"s3://{bucket}/data/es/part-0.jsonl", DIALOG_ROWS)
    with run_operator(namespace, f"s3://{bucket}/artifacts"), SimulatedJobs(kube, s3, namespace):
        apply_expert(kube, namespace, "trunk", _expert(bucket, "mul", "data"))
        apply_expert(
            kube,
            namespace,
            "dialog-es",
            _expert(bucket, "es", "data/es", lora={"rank": 8}, initFrom={"expert": "trunk"}),
            labels=TASK,
        )
        refused = wait_for(
            lambda: (
                (c := condition(get_expert(kube, namespace, "dialog-es"), "Training"))
                and c["reason"] == "InitFromMismatch"
                and c
            ),
            timeout=30,
            what="InitFromMismatch",
        )
        assert "its lora.rank is 4, this expert's 8" in refused["message"]
        assert "InitFromMismatch" in {e.reason for e in events(kube, namespace, "dialog-es")}
        apply_expert(kube, namespace, "dialog-it", _expert(bucket, "it", "data/es"), labels=TASK)
        apply_merged(
            kube,
            namespace,
            "mm",
            {
                "baseModel": {"uri": f"s3://{bucket}/base"},
                "experts": {"selector": {"matchLabels": TASK}},
                "output": {"uri": f"s3://{bucket}/merged/x"},
                "trunk": {"expert": "trunk"},
            },
        )
        failed = wait_for(
            lambda: (
                status_of(get_merged(kube, namespace, "mm")).get("phase") == "Failed"
                and get_merged(kube, namespace, "mm")
            ),
            timeout=30,
            what="Failed",
        )
        assert "LanguageExpert(s) dialog-it do not start from it" in failed["status"]["message"]
