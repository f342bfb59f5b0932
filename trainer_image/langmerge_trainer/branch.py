"""Adapters read back from S3: checked against the digest the operator selected them by, and (for an expert that
branches from a trunk) loaded as the starting point of training.

An expert with ``spec.initFrom`` starts from another expert's committed adapter, the *trunk* (typically trained on
every language's data): its LoRA factors and classifier head are copied into the freshly attached adapter before the
first step, so training continues from the trunk instead of from zero. The branch's LoRA shape must equal the
trunk's (rank, alpha, target modules; the operator refuses a mismatch before a Job starts); every tensor of the trunk
must land in a parameter of the same shape, or training stops with :class:`InitAdapterError` (no retry can fix it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from langmerge.store import ObjectStore, file_sha256, files_digest


class AdapterDigestMismatch(ValueError):
    """An adapter in S3 is not the one the operator selected (it changed or was replaced)."""


class InitAdapterError(ValueError):
    """The starting adapter does not fit the expert's model (another LoRA shape, another head). No retry fixes it."""


def download_checked(store: ObjectStore, uri: str, digest: str | None, target: Path) -> Path:
    """The adapter files under ``uri`` in ``target``, their digest checked against ``digest`` (when given)."""
    paths = store.download_prefix(uri, target)
    if not paths:
        raise FileNotFoundError(f"no adapter files under {uri}")
    if digest is not None:
        files = {p.relative_to(target).as_posix(): (p.stat().st_size, file_sha256(p)) for p in paths}
        actual = files_digest(files)
        if actual != digest:
            raise AdapterDigestMismatch(f"adapter under {uri} has digest {actual}, expected {digest}")
    return target


def load_init_adapter(model: Any, folder: Path, *, what: str = "the starting adapter") -> int:
    """Copy the LoRA factors and head tensors of the PEFT adapter in ``folder`` into ``model``'s (freshly attached)
    adapter. Returns how many tensors were copied."""
    import torch
    from safetensors.torch import load_file

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise InitAdapterError(f"{what} has no adapter_model.safetensors")
    saved = load_file(str(path))
    parameters = dict(model.named_parameters())
    copied = 0
    with torch.no_grad():
        for key, tensor in saved.items():
            target = _parameter_for(key, parameters)
            if target is None:
                raise InitAdapterError(f"{what} has tensor {key}, which this expert's model does not have")
            if tuple(target.shape) != tuple(tensor.shape):
                raise InitAdapterError(
                    f"{what}'s {key} has shape {tuple(tensor.shape)}, this expert's {tuple(target.shape)}: "
                    "the LoRA rank, target modules or labels differ"
                )
            target.copy_(tensor.to(dtype=target.dtype, device=target.device))
            copied += 1
    trainable = sum(1 for p in parameters.values() if p.requires_grad)
    if copied < trainable:
        raise InitAdapterError(
            f"{what} has {copied} tensors, this expert trains {trainable}: the LoRA target modules or heads differ"
        )
    return copied


def _parameter_for(key: str, parameters: dict[str, Any]) -> Any:
    """The model parameter a saved PEFT key belongs to: saved keys drop the adapter name (``lora_A.weight``), the
    model's carry it (``lora_A.default.weight``); a head saved as ``classifier.weight`` trains as
    ``classifier.modules_to_save.default.weight``."""
    candidates = [key]
    for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
        if f".{part}." in key or key.endswith(f".{part}"):
            candidates.append(key.replace(f".{part}", f".{part}.default", 1))
    stem, _, leaf = key.rpartition(".")
    candidates.append(f"{stem}.modules_to_save.default.{leaf}")
    for candidate in candidates:
        if candidate in parameters:
            return parameters[candidate]
    return None
