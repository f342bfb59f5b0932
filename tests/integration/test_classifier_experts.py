"""Sequence-classification experts through the operator, on the real API server + S3 with the real trainer.

Two classifier LanguageExperts (a tiny encoder, topic labels) train in training Jobs, a MergedModel merges them and
gates on accuracy (in absolute points), revision 1 is published with per-language accuracy and macro-F1. The ja
expert's data has no "science" example: it is Ready with its label counts, a LabelsMissing condition and Event, and
the merge takes the science row of the head from it alone. Then an expert with a different label list is refused by
the MergedModel, and an expert whose data has a label outside its set fails with the file and line in its status
and an Event.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from langmerge import artifacts
from langmerge.artifacts import MergeManifest, PublishedRevision
from langmerge.dev.jobrunner import LocalJobRunner, RunnerConfig
from langmerge.store import ObjectStore
from langmerge_trainer.bench.workloads import topic_data
from operator_harness import (
    apply_expert,
    apply_merged,
    condition,
    events,
    get_expert,
    get_merged,
    put_jsonl,
    run_operator,
    status_of,
    wait_for,
)

pytestmark = pytest.mark.integration

LABELS = ["money", "science"]
TASK = {"langmerge.dev/task": "topic"}


def _expert(bucket: str, language: str, data: str, labels: list[str] = LABELS) -> dict[str, Any]:
    return {
        "language": language,
        "task": "topic",
        "taskType": "sequence-classification",
        "labels": labels,
        "baseModel": {"uri": f"s3://{bucket}/models/tiny-bert"},
        "dataset": {"uri": f"s3://{bucket}/{data}/{language}", "evalFraction": 0.3},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["query", "value", "dense"]},
        # Two epochs of a tiny random encoder predict one label for every input (a collapse): this test is about
        # the operator's flow for classifiers, so the adapter is committed anyway.
        "training": {
            "epochs": 2,
            "learningRate": 1e-2,
            "batchSize": 8,
            "maxSeqLength": 48,
            "seed": 1,
            "collapseCheck": False,
        },
        "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
        "schedule": {"pollIntervalSeconds": 5, "settleSeconds": 0},
        "retry": {"limit": 0},
    }


def _s3_secret(kube: Any, namespace: str) -> None:
    """The S3 credentials Secret the Jobs read (as `langmerge up` creates it), unless the namespace has it."""
    import os

    from kubernetes import client

    from langmerge.dev.demo import SECRET

    try:
        client.CoreV1Api(kube).create_namespaced_secret(
            namespace,
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": SECRET},
                "stringData": {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
            },
        )
    except client.ApiException as err:
        if err.status != 409:  # the namespace fixture may have made it already
            raise


def test_classifier_experts_merge_and_gate_on_accuracy(
    control_plane: Any, kube: Any, s3: ObjectStore, namespace: str, tmp_path: Path
) -> None:
    from langmerge_trainer.sample import build_tiny_bert

    bucket = f"cls-{uuid.uuid4().hex[:10]}"
    s3.ensure_bucket(bucket)
    _s3_secret(kube, namespace)
    texts = [r["text"] for lang in ("it", "ja") for r in topic_data(lang, LABELS).train]
    s3.upload_dir(build_tiny_bert(tmp_path / "tiny-bert", texts), f"s3://{bucket}/models/tiny-bert")
    put_jsonl(s3, f"s3://{bucket}/data/it/part-0.jsonl", topic_data("it", LABELS).train[:60])
    # ja has money only (as the benchmark's nl expert had no psychology)
    ja_rows = [r for r in topic_data("ja", LABELS).train[:60] if r["label"] == "money"]
    put_jsonl(s3, f"s3://{bucket}/data/ja/part-0.jsonl", ja_rows)
    merged_uri = f"s3://{bucket}/merged/topic"

    runner = LocalJobRunner(
        kube,
        RunnerConfig(
            work_root=tmp_path / "jobs",
            parallel=2,
            namespace=namespace,
            extra_env=(
                ("PYTHONUNBUFFERED", "1"),
                ("OMP_NUM_THREADS", "1"),
                ("TOKENIZERS_PARALLELISM", "false"),
                ("LANGMERGE_MODEL_CACHE", str(tmp_path / "models")),
                ("HOME", str(tmp_path / "home")),
                ("TMPDIR", str(tmp_path)),
            ),
        ),
    )
    grants = {namespace: {"read": [f"s3://{bucket}/models/", f"s3://{bucket}/data/", f"s3://{bucket}/bad/"]}}
    grants[namespace]["readWrite"] = [f"s3://{bucket}/merged/"]
    with (
        run_operator(
            namespace,
            f"s3://{bucket}/artifacts",
            max_training_jobs=2,
            resync_seconds=3,
            uri_grants=json.dumps(grants),
        ),
        runner,
    ):
        for lang in ("it", "ja"):
            apply_expert(kube, namespace, f"topic-{lang}", _expert(bucket, lang, "data"), labels=TASK)
        apply_merged(
            kube,
            namespace,
            "topic",
            {
                "baseModel": {"uri": f"s3://{bucket}/models/tiny-bert"},
                "experts": {"selector": {"matchLabels": TASK}},
                # a linear merge is exactly low rank: published as a PEFT adapter (heads included) with no
                # re-factorisation error (TIES as an adapter would need output.maxRelativeError or full weights)
                "method": "linear",
                "output": {"uri": merged_uri, "format": "peft-adapter"},
                "evaluation": {"metric": "accuracy", "maxRegression": 1.0},
                "settleSeconds": 0,
            },
        )
        wait_for(
            lambda: status_of(get_merged(kube, namespace, "topic")).get("revision") == 1,
            timeout=420,
            interval=1,
            what="revision 1 of the merged classifier",
        )
        for lang in ("it", "ja"):
            status = status_of(get_expert(kube, namespace, f"topic-{lang}"))
            assert status["phase"] == "Ready"
            metrics = status["adapter"]["metrics"]
            assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["macroF1"] <= 1 and metrics["evalLoss"] > 0
        mstatus = status_of(get_merged(kube, namespace, "topic"))
        for lang in ("it", "ja"):
            figures = mstatus["metrics"][lang]
            merged, expert = figures["merged"], figures["expert"]
            # accuracy is gated in absolute points: the regression shown is expert - merged
            assert figures["regression"] == pytest.approx(expert["accuracy"] - merged["accuracy"], abs=1e-6)
        gate = condition(get_merged(kube, namespace, "topic"), "QualityGate")
        assert gate is not None and gate["status"] == "True"

        # Label coverage: ja's counts show science at 0, its condition and one Event say so; it covers both labels.
        ja = get_expert(kube, namespace, "topic-ja")
        ja_counts = status_of(ja)["adapter"]["labelCounts"]
        assert ja_counts["science"] == 0 and 0 < ja_counts["money"] <= len(ja_rows), ja_counts
        covered = condition(ja, "LabelsCovered")
        assert covered is not None and covered["status"] == "False" and covered["reason"] == "LabelsMissing"
        missing = [e.message for e in events(kube, namespace, "topic-ja") if e.reason == "LabelsMissing"]
        assert len(missing) == 1 and "'science'" in missing[0], missing
        it_counts = status_of(get_expert(kube, namespace, "topic-it"))["adapter"]["labelCounts"]
        assert it_counts["science"] > 0 and it_counts["money"] > 0
        assert condition(get_expert(kube, namespace, "topic-it"), "LabelsCovered")["status"] == "True"  # type: ignore[index]
        assert condition(get_merged(kube, namespace, "topic"), "LabelsCovered")["status"] == "True"  # type: ignore[index]

        # An expert with another label list under the same selector: the merge is refused, with the reason.
        apply_expert(kube, namespace, "topic-ko", _expert(bucket, "ko", "data", ["science", "money"]), labels=TASK)

        def refused() -> dict[str, Any] | None:
            obj = get_merged(kube, namespace, "topic")
            return obj if "same label list" in (status_of(obj).get("message") or "") else None

        failed = wait_for(refused, timeout=60, interval=0.5, what="the MergedModel refusing experts with other labels")
        assert "topic-ko has labels ['science', 'money']" in status_of(failed)["message"]
        wait_for(
            lambda: any(e.reason == "TaskTypeMismatch" for e in events(kube, namespace, "topic")),
            timeout=30,
            what="a TaskTypeMismatch Event",
        )

        # Data with a label outside the expert's set: the training Job fails, the status names file and line.
        put_jsonl(
            s3,
            f"s3://{bucket}/bad/pt/part-0.jsonl",
            [{"text": "Quanto custa?", "label": "money"}] * 6 + [{"text": "Que filme!", "label": "movies"}],
        )
        apply_expert(kube, namespace, "topic-pt", _expert(bucket, "pt", "bad"), labels={"other": "x"})

        def failed_expert() -> dict[str, Any] | None:
            obj = get_expert(kube, namespace, "topic-pt")
            return obj if status_of(obj).get("phase") == "Failed" else None

        expert = wait_for(failed_expert, timeout=180, interval=1, what="the expert with a bad label to fail")
        message = status_of(expert)["message"]
        assert "bad/pt/part-0.jsonl, line 7" in message and 'label "movies" is not one of' in message, message

    current = PublishedRevision.model_validate(s3.get_json(artifacts.current_uri(merged_uri)))
    manifest = MergeManifest.model_validate(s3.get_json(current.manifest_uri))
    assert sorted(manifest.evaluation) == ["it", "ja"]
    # the science row of the merged head is it's alone; money's is both experts'
    assert manifest.head_support == {
        "money": {"it": it_counts["money"], "ja": ja_counts["money"]},
        "science": {"it": it_counts["science"]},
    }
    assert all(m.accuracy is not None and m.macro_f1 is not None for m in manifest.evaluation.values())
