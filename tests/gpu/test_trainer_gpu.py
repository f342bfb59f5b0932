"""The tiny expert trained on CUDA in bf16 against the real local S3 (skipped where there is no GPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from langmerge.api.expert import LanguageExpertSpec
from langmerge.store import ObjectStore
from langmerge.tasks import TrainTask
from langmerge_trainer.sample import corpus_pairs


@pytest.fixture
def task(
    s3: ObjectStore, bucket: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> TrainTask:
    import json

    from langmerge.artifacts import BaseModelIdentity

    monkeypatch.setenv("LANGMERGE_MODEL_CACHE", str(tmp_path / "cache"))
    base_uri = f"s3://{bucket}/models/tiny"
    s3.upload_dir(tiny_model_dir, base_uri)
    digest, _ = s3.prefix_digest(base_uri)
    rows = [json.dumps(p.row(), ensure_ascii=False) for p in corpus_pairs("es")[:96]]
    s3.put_bytes(f"s3://{bucket}/data/es/a.jsonl", ("\n".join(rows) + "\n").encode())
    spec = LanguageExpertSpec.model_validate(
        {
            "language": "es",
            "task": "chat",
            "baseModel": {"uri": base_uri},
            "dataset": {"uri": f"s3://{bucket}/data/es", "evalFraction": 0.15},
            "lora": {
                "rank": 8,
                "alpha": 16,
                "dropout": 0.0,
                "targetModules": ["q_proj", "v_proj", "o_proj", "lm_head"],
            },
            "training": {"epochs": 2, "learningRate": 1e-2, "batchSize": 8, "maxSeqLength": 64, "seed": 7},
        }
    )
    return TrainTask(
        fingerprint="gpu0000000000001",
        output_uri=f"s3://{bucket}/experts/default/es/gpu0000000000001",
        namespace="default",
        name="chat-es",
        spec=spec,
        base_model=BaseModelIdentity(uri=base_uri, digest=digest),
        data_digest="d" * 16,
    )


def test_tiny_expert_on_cuda_in_bf16(s3: ObjectStore, task: TrainTask, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from langmerge_trainer.train import run_train_task

    manifest = run_train_task(task, s3, device="cuda")
    assert manifest.cost.gpus == 1 and manifest.cost.device != "cpu"
    assert manifest.cost.gpu_seconds == pytest.approx(manifest.cost.wall_seconds)
    assert manifest.versions.cuda
    assert manifest.metrics.eval_loss is not None and math.isfinite(manifest.metrics.eval_loss)
    assert manifest.base_metrics is not None and manifest.base_metrics.eval_loss is not None
    assert manifest.metrics.eval_loss < manifest.base_metrics.eval_loss
    s3.download_prefix(manifest.adapter_uri, tmp_path / "adapter")
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert weights and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    # A second run is a no-op on GPU too.
    assert run_train_task(task, s3, device="cuda") == manifest
