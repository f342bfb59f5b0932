"""The whole serving path with the real model server: the operator (simulated training and merge Jobs, whose merges are
a real tiny model's full weights), the local serving runner standing in for KServe, and ``langmerge-trainer serve``
processes behind its router. Revision 1 is served; revision 2 has broken weights (planted in its merge): it never
loads, is rolled back, and clients keep getting answers from revision 1 all along.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from langmerge.dev.serving import LocalServingRunner, ServingConfig, passthrough_env
from langmerge.store import ObjectStore
from langmerge.tasks import MergeTask
from operator_harness import (
    DIALOG_ROWS,
    SimulatedJobs,
    apply_expert,
    apply_merged,
    dialog_expert,
    events,
    get_merged,
    put_jsonl,
    run_operator,
    seed_fake_base_model,
    status_of,
    wait_for,
)
from serving_helpers import RequestLoop, Services, isvc_api, predict

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

__all__ = ["isvc_api"]  # a fixture, shared

ISVC = "dialog"


@pytest.fixture
def real_runner(kube: Any, namespace: str, tmp_path: Path) -> Iterator[LocalServingRunner]:
    config = ServingConfig(
        work_root=tmp_path / "serving",
        namespace=namespace,
        extra_env=(
            ("PYTHONUNBUFFERED", "1"),
            ("OMP_NUM_THREADS", "1"),
            ("LANGMERGE_MODEL_CACHE", str(tmp_path / "model-cache")),
            *passthrough_env(),
        ),
        ready_timeout_seconds=240.0,
        kill_grace_seconds=5.0,
        drain_timeout_seconds=10.0,
    )
    with LocalServingRunner(kube, config) as runner:
        assert runner.synced.wait(10)
        yield runner


def served(kube: Any, namespace: str) -> dict[str, Any]:
    status = status_of(get_merged(kube, namespace, "mm"))
    return next((s for s in status.get("serving") or [] if s["target"] == f"kserve/{ISVC}"), {})


def test_broken_weights_are_rolled_back_and_clients_never_notice(
    kube: Any,
    s3: ObjectStore,
    bucket: str,
    namespace: str,
    isvc_api: client.CustomObjectsApi,
    real_runner: LocalServingRunner,
    tiny_model_dir: Path,
) -> None:
    seed_fake_base_model(s3, f"s3://{bucket}/base")
    put_jsonl(s3, f"s3://{bucket}/data/es/part-0.jsonl", DIALOG_ROWS)
    model_files = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()}
    merges: list[str] = []

    def merge_files(task: MergeTask) -> dict[str, bytes]:
        """The first merge is the real tiny model; every later one has garbage weights (its config is fine)."""
        merges.append(task.fingerprint)
        if len(merges) == 1:
            return model_files
        return {**model_files, "model.safetensors": b"\x00garbage, not a safetensors header"}

    Services(isvc_api, namespace).create(ISVC, "")
    spec = {
        "baseModel": {"uri": f"s3://{bucket}/base"},
        "experts": {"names": ["dialog-es"]},
        "method": "linear",
        "output": {"uri": f"s3://{bucket}/merged/dialog", "format": "full-weights"},
        "settleSeconds": 1,
        "serving": [
            {
                "kserve": {
                    "inferenceService": ISVC,
                    "canaryTrafficPercent": 20,
                    "promoteAfter": "2s",
                    "readyTimeout": "4m",
                }
            }
        ],
    }
    with (
        run_operator(namespace, f"s3://{bucket}/artifacts", kserve="true", serving_poll_seconds="0.5"),
        SimulatedJobs(kube, s3, namespace, merge_files=merge_files),
    ):
        apply_merged(kube, namespace, "mm", spec)
        apply_expert(kube, namespace, "dialog-es", dialog_expert(bucket, "es", lora=None))
        first = wait_for(
            lambda: (s := served(kube, namespace)).get("phase") == "Promoted" and s.get("revision") == 1 and s,
            300,
            what=lambda: f"revision 1 served: {served(kube, namespace)}",
        )
        fingerprint1 = status_of(get_merged(kube, namespace, "mm"))["fingerprint"]
        code, answer, _ = predict(first["url"], ISVC)
        assert code == 200 and answer["model_version"] == fingerprint1
        assert isinstance(answer["predictions"][0]["generated_text"], str), "a real generation"

        with RequestLoop(first["url"], ISVC) as loop:
            put_jsonl(s3, f"s3://{bucket}/data/es/part-1.jsonl", DIALOG_ROWS[:5])
            back = wait_for(
                lambda: (s := served(kube, namespace)).get("phase") == "RolledBack" and s,
                300,
                what=lambda: f"revision 2 rolled back: {served(kube, namespace)}",
            )
            time.sleep(1.0)
        assert back["revision"] == 1 and "revision 2 rolled back to revision 1: it failed to load" in back["message"]
        assert "ModelLoadFailed" in back["message"]
        assert set(loop.codes) == {200}, f"clients saw failures while revision 2 failed to load: {loop.codes}"
        assert loop.codes[200] > 0
        assert predict(first["url"], ISVC)[1]["model_version"] == fingerprint1
        assert status_of(get_merged(kube, namespace, "mm"))["revision"] == 2, "published, yet not served"
        warnings = [e.message for e in events(kube, namespace, "mm") if e.reason == "RolledBack"]
        assert len(warnings) == 1 and "cannot load" in warnings[0], warnings
