"""Fixtures for the trainer tests: the tiny base model and sample data in the real local S3, and task builders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from trainer_helpers import new_bucket, upload_model

from langmerge.artifacts import BaseModelIdentity
from langmerge.store import ObjectStore


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One model cache for the session (the tiny model has the same digest in every bucket)."""
    path = tmp_path_factory.mktemp("model-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("LANGMERGE_MODEL_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def base_env(s3: ObjectStore, tiny_model_dir: Path) -> tuple[str, BaseModelIdentity]:
    """A bucket for the module with the tiny base model uploaded: (bucket, base identity)."""
    bucket = new_bucket(s3)
    base = upload_model(s3, tiny_model_dir, f"s3://{bucket}/models/tiny-llama")
    return bucket, base
