"""Running mergekit 0.1.5 itself on tiny full-weight models built from known LoRA-shaped deltas.

The same deltas go to langmerge's merge methods as factors; mergekit sees only full models (base + delta), exactly as
a mergekit user merges fine-tuned models. The cross-check cases and what is measured on each are here too: the tests
(``test_mergekit_parity.py``) assert bounds on the figures, ``benchmarks/mergekit_parity.py`` prints them as a table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from langmerge_trainer.merge.method_math import LoraUpdate, get_method

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


#: Per-model weights of the cross-checks (langmerge's ``weights``, mergekit's per-model ``weight``).
WEIGHTS = (0.5, 1.0, 1.5)


def _per_model(**params: Any) -> list[dict[str, Any]]:
    return [{"weight": w, **params} for w in WEIGHTS]


# (langmerge method, langmerge parameters, mergekit method, mergekit per-model parameters, mergekit shared parameters)
DETERMINISTIC: list[tuple[str, dict[str, Any], str, list[dict[str, Any]], dict[str, Any]]] = [
    ("linear", {}, "linear", _per_model(), {}),
    ("task_arithmetic", {"lambda_": 0.7}, "task_arithmetic", _per_model(), {"lambda": 0.7}),
    ("ties", {"density": 1.0}, "ties", _per_model(density=1.0), {}),
    ("ties", {"density": 0.5, "lambda_": 1.3}, "ties", _per_model(density=0.5), {"normalize": True, "lambda": 1.3}),
    ("ties", {"density": 0.5, "normalize": False}, "ties", _per_model(density=0.5), {"normalize": False}),
    ("magnitude_prune", {"density": 0.4}, "breadcrumbs", _per_model(density=0.4, gamma=0.0), {}),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.05}, "breadcrumbs", _per_model(density=0.6, gamma=0.05), {}),
    (
        "breadcrumbs_ties",
        {"density": 0.6, "gamma": 0.05, "normalize": True},
        "breadcrumbs_ties",
        _per_model(density=0.6, gamma=0.05),
        {"normalize": True},
    ),
    ("sce", {"select_topk": 0.5}, "sce", [{}] * 3, {"select_topk": 0.5}),
    ("sce", {}, "sce", [{}] * 3, {}),
    ("model_stock", {}, "model_stock", [{}] * 3, {}),
    ("model_stock", {"filter_wise": True}, "model_stock", [{}] * 3, {"filter_wise": True}),
]

#: mergekit's sce and model_stock take no per-model weights: langmerge's weights are all 1 there.
UNWEIGHTED = {"sce", "model_stock"}

# (langmerge method, langmerge parameters, mergekit per-model parameters, mergekit shared parameters); same names
RANDOM: list[tuple[str, dict[str, Any], list[dict[str, Any]], dict[str, Any]]] = [
    ("dare_linear", {"density": 0.5, "rescale": "l1"}, _per_model(density=0.5), {}),
    ("dare_ties", {"density": 0.4, "rescale": "l1", "normalize": False}, _per_model(density=0.4), {}),
    ("della", {"density": 0.5, "epsilon": 0.2}, _per_model(density=0.5, epsilon=0.2), {}),
    ("della_linear", {"density": 0.6, "epsilon": 0.1}, _per_model(density=0.6, epsilon=0.1), {}),
]
#: Seeds each random method is run with, on both sides.
SEEDS = 8


def case_id(case: tuple[Any, ...]) -> str:
    return f"{case[0]}-{'-'.join(f'{k}={v}' for k, v in case[1].items()) or 'defaults'}"


def case_weights(method: str) -> tuple[float, ...]:
    return (1.0, 1.0, 1.0) if method in UNWEIGHTED else WEIGHTS


@dataclass(frozen=True)
class DeterministicFigures:
    """One deterministic case: per module, the largest |langmerge - mergekit| entry and the largest |mergekit| entry."""

    max_abs_diff: dict[str, float]
    scale: dict[str, float]

    @property
    def worst_relative(self) -> float:
        """max over modules of max |difference| / max(scale, 1): what the test bounds by 1e-6 (one float32 rounding
        of ``W + D`` at the weights' scale)."""
        return max(self.max_abs_diff[m] / max(self.scale[m], 1.0) for m in MODULES)


def measure_deterministic(tiny: TinyModels, out: Path, case: tuple[Any, ...]) -> DeterministicFigures:
    method, params, mk_method, per_model, shared = case
    want = run_mergekit(tiny, out, mk_method, per_model, shared)
    impl = get_method(method)
    resolved = impl.resolve(params)
    diff, scale = {}, {}
    for module in MODULES:
        got = impl.merge(module, tiny.updates(module, case_weights(method)), resolved).dense().double()
        diff[module] = float((got - want[module]).abs().max())
        scale[module] = float(want[module].abs().max())
    return DeterministicFigures(diff, scale)


@dataclass(frozen=True)
class RandomFigures:
    """One random case over :data:`SEEDS` seeds, for langmerge and mergekit: the mean share of entries kept, the mean
    norm of the merged update relative to the plain weighted sum, and per module the cosine between the two mean
    merged updates."""

    kept_ours: float
    kept_mergekit: float
    ratio_ours: float
    ratio_mergekit: float
    cosine: dict[str, float]


def measure_random(tiny: TinyModels, out: Path, case: tuple[Any, ...]) -> RandomFigures:
    method, params, per_model, shared = case
    impl = get_method(method)
    kept: dict[str, list[float]] = {"ours": [], "mergekit": []}
    ratio: dict[str, list[float]] = {"ours": [], "mergekit": []}
    mean: dict[str, dict[str, torch.Tensor]] = {"ours": {}, "mergekit": {}}
    for seed in range(SEEDS):
        want = run_mergekit(tiny, out / f"seed-{seed}", method, per_model, shared, seed=seed)
        resolved = impl.resolve({**params, "seed": seed})
        for module in MODULES:
            got = impl.merge(module, tiny.updates(module, WEIGHTS), resolved).dense().double()
            plain = sum(
                w * (B.double() @ A.double())
                for w, (B, A) in zip(WEIGHTS, [tiny.factors[lang][module] for lang in LANGUAGES], strict=True)
            )
            for who, delta in (("ours", got), ("mergekit", want[module])):
                kept[who].append(float((delta != 0).double().mean()))
                ratio[who].append(float(delta.norm() / plain.norm()))
                mean[who][module] = mean[who].get(module, 0) + delta / SEEDS
    cosine = {
        m: float(torch.nn.functional.cosine_similarity(mean["ours"][m].flatten(), mean["mergekit"][m].flatten(), dim=0))
        for m in MODULES
    }
    return RandomFigures(
        kept_ours=sum(kept["ours"]) / len(kept["ours"]),
        kept_mergekit=sum(kept["mergekit"]) / len(kept["mergekit"]),
        ratio_ours=sum(ratio["ours"]) / len(ratio["ours"]),
        ratio_mergekit=sum(ratio["mergekit"]) / len(ratio["mergekit"]),
        cosine=cosine,
    )
