"""The main job end to end, as `langmerge up` runs it, on the real apiserver + S3 with the real trainer.

Operator in-process, the local Job runner running the trainer as subprocesses, the sample task (tiny base model,
es/it/pt dialog data): 3 adapters -> merged revision 1 -> new data for one language -> exactly one training Job and
one merge Job -> revision 2; everything read back from S3 and loaded with transformers/peft.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from langmerge import artifacts
from langmerge.artifacts import MergeManifest, PublishedRevision
from langmerge.dev.demo import UPDATED_LANGUAGE, Demo, Layout, sample_experts, sample_merged
from langmerge.dev.jobrunner import LocalJobRunner, RunnerConfig
from langmerge.kube import Kube
from langmerge.store import ObjectStore
from operator_harness import run_operator, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def _fast(doc: dict[str, Any]) -> dict[str, Any]:
    """The sample's experts, trained for fewer epochs so the test stays in CI's budget."""
    doc["spec"]["training"]["epochs"] = 2
    return doc


def test_sample_end_to_end(control_plane: Any, kube: Any, s3: ObjectStore, namespace: str, tmp_path: Path) -> None:
    import os

    uid = uuid.uuid4().hex[:8]
    layout = Layout(models_bucket=f"e2e-models-{uid}", data_bucket=f"e2e-data-{uid}", artifacts_bucket=f"e2e-art-{uid}")
    demo = Demo(state=tmp_path, kube=Kube(kube), store=s3, env=dict(os.environ), namespace=namespace, layout=layout)
    demo.prepare_storage()
    demo.ensure_secret()
    demo.seed("--pretrain-steps", "40", "--hidden-size", "64")

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
    with (
        run_operator(
            namespace,
            layout.artifacts_uri,
            max_training_jobs=2,
            resync_seconds=5,
            uri_grants=layout.uri_grants(namespace),
        ),
        runner,
    ):
        for doc in sample_experts(layout):
            demo.apply(_fast(doc))
        demo.apply(sample_merged(layout, serving=False))  # serving: test_walkthrough and the serving tests
        demo.watch(lambda: demo.revision() >= 1, "revision 1", timeout=600)
        assert len(demo.training_jobs()) == 4 and len(demo.merge_jobs()) == 1  # the trunk, then 3 experts from it

        demo.add_data()
        demo.watch(lambda: demo.revision() >= 2, "revision 2", timeout=600)
        training = demo.training_jobs()
        assert len(training) == 5, [j.metadata.name for j in training]  # one expert retrained, not the trunk
        assert sorted(j.metadata.name.split("-train-")[0] for j in training).count(f"dialog-{UPDATED_LANGUAGE}") == 2
        wait_for(lambda: len(demo.merge_jobs()) == 2, timeout=5, what="exactly two merge Jobs")
        merged = demo.merged()
        assert merged is not None
        history = merged["status"]["history"]
        assert [h["revision"] for h in history] == [1, 2]
        assert history[-1]["changedInputs"] == [f"dialog-{UPDATED_LANGUAGE}"]
        summary = demo.summary()
        print(summary)
        assert "maintenance updates: " in summary

    # Everything read back from S3 (the record), not from the status.
    current = PublishedRevision.model_validate(s3.get_json(artifacts.current_uri(layout.merged_uri)))
    assert current.revision == 2 and current.reason == "merged"
    manifest = MergeManifest.model_validate(s3.get_json(current.manifest_uri))
    assert manifest.fingerprint == current.fingerprint and sorted(manifest.evaluation) == ["es", "it", "pt"]
    for lang, metrics in manifest.evaluation.items():
        expert = manifest.expert_metrics[lang]
        assert metrics.eval_loss is not None and expert.eval_loss is not None
        assert metrics.eval_loss <= expert.eval_loss * 1.5, (lang, metrics, expert)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert manifest.output_format == "full-weights"  # the sample publishes TIES as exact full weights
    base_dir, model_dir = tmp_path / "base", tmp_path / "merged"
    s3.download_prefix(layout.base_uri, base_dir)
    s3.download_prefix(current.model_uri, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    ids = tokenizer("Olá, como vai você?", return_tensors="pt")
    with torch.no_grad():
        before = base(**ids).logits
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        after = model(**ids).logits
    assert torch.isfinite(after).all() and not torch.allclose(before, after)
