"""Helpers shared by the trainer tests (imported as a plain module: the tests folder is not a package)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from langmerge.api.expert import LanguageExpertSpec
from langmerge.artifacts import BaseModelIdentity
from langmerge.store import ObjectStore
from langmerge.tasks import TrainTask
from langmerge_trainer.sample import Pair, corpus_pairs

#: Settings that make a tiny model learn something in a few seconds on one core.
FAST_TRAINING: dict[str, Any] = {
    "epochs": 2,
    "learningRate": 1e-2,
    "batchSize": 8,
    "maxSeqLength": 64,
    "warmupRatio": 0.1,
    "seed": 7,
    "progressEverySteps": 2,
    "checkpointEverySteps": 1000,
}
#: The tiny model is random: its final norm bounds what adapters on inner layers can change in the logits, so the
#: output head gets an adapter too, which lets a few steps beat the base clearly.
FAST_LORA: dict[str, Any] = {
    "rank": 8,
    "alpha": 16,
    "dropout": 0.0,
    "targetModules": ["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"],
}


def new_bucket(s3: ObjectStore) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3.client.create_bucket(Bucket=name)
    return name


def upload_model(s3: ObjectStore, folder: Path, uri: str) -> BaseModelIdentity:
    s3.upload_dir(folder, uri)
    digest, _count = s3.prefix_digest(uri)
    return BaseModelIdentity(uri=uri, digest=digest)


def put_jsonl(s3: ObjectStore, uri: str, rows: list[dict[str, Any]] | list[str]) -> None:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    s3.put_bytes(uri, ("\n".join(lines) + "\n").encode())


def listing_digest(uri: str) -> str:
    """The digest of the ``*.jsonl`` objects under ``uri``, as the operator lists them."""
    digest, _count = ObjectStore.from_config().prefix_digest(uri, suffix=".jsonl")
    return digest


def sample_pairs(language: str = "es", count: int = 64) -> list[Pair]:
    """A fixed, small slice of the language's corpus pairs."""
    return corpus_pairs(language)[:count]


def make_task(
    *,
    bucket: str,
    base: BaseModelIdentity,
    data_uri: str,
    fingerprint: str,
    language: str = "es",
    training: dict[str, Any] | None = None,
    lora: dict[str, Any] | None = None,
    dataset: dict[str, Any] | None = None,
    attempt: int = 1,
    data_digest: str | None = None,
) -> TrainTask:
    """A task as the operator would build it for the data under ``data_uri`` now (its listing digest, unless
    ``data_digest`` is given); ``fingerprint`` is any label (the task's output prefix ends with it)."""
    spec = LanguageExpertSpec.model_validate(
        {
            "language": language,
            "task": "chat",
            "baseModel": {"uri": base.uri},
            "dataset": {"uri": data_uri, "evalFraction": 0.15, **(dataset or {})},
            "lora": {**FAST_LORA, **(lora or {})},
            "training": {**FAST_TRAINING, **(training or {})},
            "resources": {"gpus": 0},
        }
    )
    return TrainTask(
        fingerprint=fingerprint,
        output_uri=f"s3://{bucket}/artifacts/experts/default/{language}/{fingerprint}",
        namespace="default",
        name=f"chat-{language}",
        spec=spec,
        base_model=base,
        data_digest=data_digest or listing_digest(data_uri),
        eval_data_digest=listing_digest(spec.dataset.eval_uri) if spec.dataset.eval_uri else None,
        image="langmerge/trainer:test",
        attempt=attempt,
    )
