"""Reading PEFT LoRA adapters: which modules they update, with which rank and scale, one module's factors at a time.

Each module's update is ``Delta = scale * B @ A`` with ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), where
``r`` and ``alpha`` follow the adapter's own ``rank_pattern`` / ``alpha_pattern`` (PEFT's matching rule: the pattern
matches the end of the module name at a dot boundary). Factors are returned in the orientation of the base weight:
for embeddings and ``fan_in_fan_out`` layers PEFT's update is ``(B A)^T``, so the factors are swapped and transposed.

Only plain LoRA can be merged as updates; DoRA magnitudes, LoRA biases, trainable tokens, ``target_parameters`` and
base-mutating initialisations (PiSSA, OLoRA, CorDA) are refused with a message. ``modules_to_save`` copies are read as
*heads* (:attr:`LoraAdapter.heads`): a sequence classifier's head trains fully and is merged by weighted averaging,
row by row by label support (see :func:`langmerge_trainer.merge.engine.merged_heads`); only modules named as
classifier heads are accepted.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from langmerge_trainer.classify import HEAD_MODULES
from langmerge_trainer.merge.method_math import LoraUpdate
from langmerge_trainer.merge.safetensors_io import SafetensorsReader

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

_LINEAR_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_EMBEDDING_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)$")
_BASE_MUTATING_INIT = ("pissa", "olora", "corda", "loftq")


class AdapterError(ValueError):
    """An adapter that cannot be merged (bad files, unsupported PEFT features)."""


@dataclass(frozen=True)
class LoraModule:
    """One module an adapter updates."""

    name: str
    #: ``linear`` or ``embedding``.
    kind: str
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scale: float
    #: Shape of the base weight (rows, columns).
    shape: tuple[int, int]
    #: PEFT's update is ``(B A)^T`` in the weight's orientation (embeddings, ``fan_in_fan_out``).
    transposed: bool


def match_pattern(patterns: dict[str, Any], module: str) -> Any | None:
    """The value of the first pattern that matches ``module`` as PEFT matches rank/alpha patterns, else None."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoraAdapter:
    """An adapter folder opened for reading: config, the modules it updates, lazy access to their factors."""

    def __init__(self, path: Path, language: str) -> None:
        self.path = path
        self.language = language
        config_path = path / ADAPTER_CONFIG
        weights_path = path / ADAPTER_WEIGHTS
        if not config_path.is_file() or not weights_path.is_file():
            raise AdapterError(f"{path}: not a PEFT adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
        self.config: dict[str, Any] = json.loads(config_path.read_text())
        _check_config(self.config, path)
        self.reader = SafetensorsReader(weights_path)
        #: Fully trained head tensors (``modules_to_save``): tensor name in the model (e.g. ``classifier.weight``)
        #: -> key in the adapter file.
        self.heads: dict[str, str] = {}
        self.modules = self._scan()
        if not self.modules:
            raise AdapterError(f"{path}: the adapter holds no LoRA weights")
        dtypes = {self.reader.tensors[m.a_key].dtype for m in self.modules.values()}
        self.dtype = next(iter(dtypes)) if len(dtypes) == 1 else "F32"

    def close(self) -> None:
        self.reader.close()

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def size_bytes(self) -> int:
        return sum(t.nbytes for t in self.reader.tensors.values())

    def _scan(self) -> dict[str, LoraModule]:
        parts: dict[str, dict[str, str]] = {}
        kinds: dict[str, str] = {}
        heads = tuple(self.config.get("modules_to_save") or ())
        for key in self.reader.tensors:
            match = _LINEAR_KEY.match(key) or _EMBEDDING_KEY.match(key)
            head = _head_tensor(key, heads)
            if head is not None:
                self.heads[head] = key
                continue
            if not match:
                raise AdapterError(
                    f"{self.path}: tensor {key!r} is not a plain LoRA A/B weight; DoRA magnitudes, LoRA biases, "
                    "modules_to_save and trainable tokens cannot be merged as updates"
                )
            module, part = match["module"], match["part"]
            parts.setdefault(module, {})[part[-1]] = key
            kinds[module] = "embedding" if part.startswith("lora_embedding") else "linear"
        cfg = self.config
        use_rslora = bool(cfg.get("use_rslora", False))
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        rank_pattern: dict[str, Any] = cfg.get("rank_pattern") or {}
        alpha_pattern: dict[str, Any] = cfg.get("alpha_pattern") or {}
        modules: dict[str, LoraModule] = {}
        for name in sorted(parts):
            keys = parts[name]
            if set(keys) != {"A", "B"}:
                raise AdapterError(f"{self.path}: module {name} lacks its lora_A or lora_B weight")
            a_info, b_info = self.reader.tensors[keys["A"]], self.reader.tensors[keys["B"]]
            if len(a_info.shape) != 2 or len(b_info.shape) != 2:
                raise AdapterError(f"{self.path}: module {name}: only 2-D (Linear, Embedding) LoRA can be merged")
            kind = kinds[name]
            if kind == "linear":
                rank, cols = a_info.shape
                rows, rank_b = b_info.shape
            else:  # lora_embedding_A: (r, num_embeddings), lora_embedding_B: (embedding_dim, r)
                rank, rows = a_info.shape
                cols, rank_b = b_info.shape
            if rank != rank_b:
                raise AdapterError(f"{self.path}: module {name}: lora_A has rank {rank}, lora_B {rank_b}")
            transposed = kind == "embedding" or fan_in_fan_out
            if fan_in_fan_out and kind == "linear":
                rows, cols = cols, rows
            declared = match_pattern(rank_pattern, name)
            declared_rank = int(declared) if declared is not None else int(cfg.get("r", rank))
            if declared_rank != rank:
                raise AdapterError(
                    f"{self.path}: module {name} has rank {rank} but the config says {declared_rank} (r / rank_pattern)"
                )
            alpha_value = match_pattern(alpha_pattern, name)
            alpha = float(alpha_value if alpha_value is not None else cfg.get("lora_alpha", rank))
            modules[name] = LoraModule(
                name=name,
                kind=kind,
                a_key=keys["A"],
                b_key=keys["B"],
                rank=rank,
                alpha=alpha,
                scale=lora_scale(alpha, rank, use_rslora),
                shape=(rows, cols),
                transposed=transposed,
            )
        return modules

    def update(self, module: str, weight: float, device: torch.device | str = "cpu") -> LoraUpdate:
        """The module's update in the base weight's orientation, as float32 factors on ``device``."""
        info = self.modules[module]
        A = self.reader.read(info.a_key).to(device=device, dtype=torch.float32)
        B = self.reader.read(info.b_key).to(device=device, dtype=torch.float32)
        if info.transposed:
            B, A = A.T, B.T
        return LoraUpdate(B=B, A=A, scale=info.scale, weight=weight, key=self.language)


def _check_config(cfg: dict[str, Any], path: Path) -> None:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{path}: peft_type {peft_type} is not LoRA")
    refused = {
        "use_dora": "DoRA",
        "lora_bias": "LoRA biases",
        "trainable_token_indices": "trainable tokens",
        "target_parameters": "target_parameters",
    }
    for key, what in refused.items():
        if cfg.get(key):
            raise AdapterError(f"{path}: adapters with {what} ({key}) cannot be merged as low-rank updates")
    others = sorted(set(cfg.get("modules_to_save") or ()) - set(HEAD_MODULES))
    if others:
        raise AdapterError(
            f"{path}: modules_to_save {others} cannot be merged: only classifier heads ({', '.join(HEAD_MODULES)}) "
            "are merged as full copies"
        )
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INIT):
        raise AdapterError(
            f"{path}: init_lora_weights={init!r} changes the base weights; convert the adapter to plain LoRA first "
            "(PEFT save_pretrained(path_initial_model_for_weight_conversion=...))"
        )


def _head_tensor(key: str, heads: tuple[str, ...]) -> str | None:
    """The model tensor name of a ``modules_to_save`` copy in an adapter file (``base_model.model.classifier.weight``
    -> ``classifier.weight``), or None if ``key`` is not one."""
    if not heads or not key.startswith(PREFIX):
        return None
    name = key[len(PREFIX) :]
    name = name.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
    return name if name.split(".")[0] in heads and ".lora_" not in name else None


def load_adapter(path: Path, language: str) -> LoraAdapter:
    return LoraAdapter(Path(path), language)
