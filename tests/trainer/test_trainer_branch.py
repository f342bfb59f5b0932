"""An expert that starts from a trunk's committed adapter (``TrainTask.init_adapter``): it begins exactly at the
trunk's weights and trains on from there; a trunk of another LoRA shape, or one that changed since it was selected,
stops the Job with an error no retry can fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_helpers import FAST_LORA, make_task, put_jsonl, sample_pairs

from langmerge.api.expert import Lora
from langmerge.artifacts import BaseModelIdentity, failure_uri
from langmerge.store import ObjectStore
from langmerge.tasks import AdapterSource, TrainTask
from langmerge_trainer.branch import AdapterDigestMismatch, InitAdapterError, load_init_adapter
from langmerge_trainer.evaluate import load_causal_lm
from langmerge_trainer.train import attach_lora, run_train_task


def _adapter_tensors(s3: ObjectStore, uri: str, tmp: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    s3.download_prefix(uri, tmp)
    return load_file(str(tmp / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def trunk(s3: ObjectStore, base_env: tuple[str, BaseModelIdentity]) -> tuple[Any, str]:
    bucket, base = base_env
    data = f"s3://{bucket}/data/trunk"
    put_jsonl(s3, f"{data}/a.jsonl", [p.row() for p in sample_pairs("es", 48) + sample_pairs("it", 48)])
    task = make_task(bucket=bucket, base=base, data_uri=data, fingerprint="trunk00000000001", language="mul")
    return run_train_task(task, s3, device="cpu"), data


def test_a_branch_starts_at_the_trunks_weights(
    s3: ObjectStore,
    base_env: tuple[str, BaseModelIdentity],
    trunk: tuple[Any, str],
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    manifest, _ = trunk
    lora = Lora.model_validate(FAST_LORA)
    saved = _adapter_tensors(s3, manifest.adapter_uri, tmp_path / "trunk")
    torch.manual_seed(7)  # another fresh init than the trunk's
    model = attach_lora(load_causal_lm(tiny_model_dir, torch.device("cpu")), lora)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert load_init_adapter(model, tmp_path / "trunk") == len(saved) == len(before)
    after = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for key, tensor in saved.items():
        name = next(n for n in after if n.replace(".default", "") == key)
        assert torch.equal(after[name], tensor) and not torch.equal(before[name], tensor)


def test_a_branch_trains_on_from_the_trunk(
    s3: ObjectStore, base_env: tuple[str, BaseModelIdentity], trunk: tuple[Any, str], tmp_path: Path
) -> None:
    bucket, base = base_env
    manifest, _ = trunk
    data = f"s3://{bucket}/data/branch-es"
    put_jsonl(s3, f"{data}/a.jsonl", [p.row() for p in sample_pairs("es", 64)])
    source = AdapterSource(uri=manifest.adapter_uri, digest=manifest.adapter_digest, source="trunk")
    task = make_task(bucket=bucket, base=base, data_uri=data, fingerprint="branch0000000001")
    branch = run_train_task(task.model_copy(update={"init_adapter": source}), s3, device="cpu")
    scratch = run_train_task(
        make_task(bucket=bucket, base=base, data_uri=data, fingerprint="scratch000000001"), s3, device="cpu"
    )
    trunk_t = _adapter_tensors(s3, manifest.adapter_uri, tmp_path / "t")
    branch_t = _adapter_tensors(s3, branch.adapter_uri, tmp_path / "b")
    scratch_t = _adapter_tensors(s3, scratch.adapter_uri, tmp_path / "s")
    # the branch moved away from the trunk, and stayed closer to it than a run from a fresh init
    dist = {k: float((branch_t[k] - trunk_t[k]).norm()) for k in trunk_t}
    fresh = {k: float((scratch_t[k] - trunk_t[k]).norm()) for k in trunk_t}
    assert all(d > 0 for d in dist.values())
    assert sum(dist.values()) < sum(fresh.values())
    assert branch.metrics.eval_loss is not None and branch.metrics.eval_loss < branch.base_metrics.eval_loss  # type: ignore[union-attr]


def test_a_trunk_of_another_shape_or_another_digest_is_a_user_error(
    s3: ObjectStore, base_env: tuple[str, BaseModelIdentity], trunk: tuple[Any, str]
) -> None:
    bucket, base = base_env
    manifest, _ = trunk
    data = f"s3://{bucket}/data/branch-it"
    put_jsonl(s3, f"{data}/a.jsonl", [p.row() for p in sample_pairs("it", 32)])
    wrong_rank: TrainTask = make_task(
        bucket=bucket, base=base, data_uri=data, fingerprint="wrongrank0000001", lora={"rank": 4, "alpha": 8}
    ).model_copy(update={"init_adapter": AdapterSource(uri=manifest.adapter_uri, digest=manifest.adapter_digest)})
    with pytest.raises(InitAdapterError, match="has shape"):
        run_train_task(wrong_rank, s3, device="cpu")
    assert s3.get_json(failure_uri(wrong_rank.output_uri, 1))["retryable"] is False
    changed = make_task(bucket=bucket, base=base, data_uri=data, fingerprint="changed000000001").model_copy(
        update={"init_adapter": AdapterSource(uri=manifest.adapter_uri, digest="0" * 16)}
    )
    with pytest.raises(AdapterDigestMismatch, match="expected 0000000000000000"):
        run_train_task(changed, s3, device="cpu")
    assert s3.get_json(failure_uri(changed.output_uri, 1))["retryable"] is False
