"""Running mergekit 0.1.5 itself on tiny full-weight models built from known LoRA-shaped deltas.

The same deltas go to langmerge's merge methods as factors; mergekit sees only full models (base + delta), exactly as
a mergekit user merges fine-tuned models. Used by the cross-check tests (``test_mergekit_parity.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from langmerge_trainer.merge.methods import LoraUpdate

#: Modules of the tiny Llama that get a delta, and the rank of each language's delta.
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj")
LANGUAGES = ("es", "it", "pt")
RANK = 4


@dataclass
class TinyModels:
    base: Path
    models: dict[str, Path]
    #: language -> module -> (B, A) with delta = B @ A (float32).
    factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]

    def updates(self, module: str, weights: Sequence[float]) -> list[LoraUpdate]:
        return [
            LoraUpdate(B=self.factors[lang][module][0], A=self.factors[lang][module][1], scale=1.0, weight=w, key=lang)
            for lang, w in zip(LANGUAGES, weights, strict=True)
        ]


def build_tiny_models(root: Path, seed: int = 0) -> TinyModels:
    """A 1-layer Llama (hidden 32) and three copies with a random rank-4 delta on each of :data:`MODULES`.

    Each language's delta shares a component with the others (so signs conflict and agree in a realistic mix) and
    the models are saved in float32, so mergekit's input is the delta up to float32 rounding of ``W + D``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    base_model = LlamaForCausalLM(config).float()
    base = root / "base"
    base_model.save_pretrained(base, safe_serialization=True)
    g = torch.Generator().manual_seed(seed + 1)
    weights = dict(base_model.named_parameters())
    shared = {
        m: (
            torch.randn(weights[f"{m}.weight"].shape[0], 2, generator=g),
            torch.randn(2, weights[f"{m}.weight"].shape[1], generator=g),
        )
        for m in MODULES
    }
    factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    models = {}
    for lang in LANGUAGES:
        factors[lang] = {}
        model = LlamaForCausalLM(config).float()
        model.load_state_dict(base_model.state_dict())
        own = dict(model.named_parameters())
        with torch.no_grad():
            for m in MODULES:
                rows, cols = own[f"{m}.weight"].shape
                B = torch.cat([shared[m][0], torch.randn(rows, RANK - 2, generator=g)], dim=1) * 0.05
                A = torch.cat([shared[m][1], torch.randn(RANK - 2, cols, generator=g)], dim=0)
                factors[lang][m] = (B, A)
                own[f"{m}.weight"].add_(B @ A)
        models[lang] = root / lang
        model.save_pretrained(models[lang], safe_serialization=True)
    return TinyModels(base=base, models=models, factors=factors)


def run_mergekit(
    tiny: TinyModels,
    out: Path,
    method: str,
    per_model: Sequence[dict[str, Any]],
    shared: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Merge the tiny models with mergekit; returns each module's merged delta (merged weight - base weight)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    logging.getLogger("mergekit").setLevel(logging.ERROR)
    config = MergeConfiguration.model_validate(
        {
            "merge_method": method,
            # mergekit's linear averages whole models; the others take task vectors against the base
            **({} if method == "linear" else {"base_model": str(tiny.base)}),
            "models": [
                {"model": str(tiny.models[lang]), "parameters": params}
                for lang, params in zip(LANGUAGES, per_model, strict=True)
            ],
            "parameters": shared or {},
            "dtype": "float32",
        }
    )
    run_merge(
        config,
        str(out),
        MergeOptions(random_seed=seed, copy_tokenizer=False, write_model_card=False, lazy_unpickle=False, quiet=True),
    )
    merged: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        merged.update(load_file(shard))
    base = load_file(tiny.base / "model.safetensors")
    return {m: merged[f"{m}.weight"].double() - base[f"{m}.weight"].double() for m in MODULES}
