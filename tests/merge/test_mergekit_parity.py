"""langmerge's merge methods against mergekit 0.1.5 itself, on identical task vectors (tiny full-weight models).

Deterministic methods agree to float32 rounding, tensor by tensor. Random ones (DARE, DELLA: mergekit draws its masks
with ``torch.bernoulli``, langmerge from a counter-based hash) are compared statistically over seeds: the share of
entries kept, the norm of the merged update relative to the plain weighted sum, and the direction of the mean merged
update. The mapping between the two is the table in ``docs/merge-methods.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from mergekit_helpers import LANGUAGES, MODULES, TinyModels, build_tiny_models, run_mergekit

from langmerge_trainer.merge.methods import get_method

#: mergekit 0.1.5 imports numpy.core (deprecated by numpy 2) and passes transformers' deprecated torch_dtype: the
#: warnings come from inside mergekit, not from our code.
pytestmark = [
    pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

WEIGHTS = (0.5, 1.0, 1.5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return build_tiny_models(tmp_path_factory.mktemp("mergekit-models"))


def _per_model(**params: Any) -> list[dict[str, Any]]:
    return [{"weight": w, **params} for w in WEIGHTS]


# (langmerge method, langmerge parameters, mergekit method, mergekit per-model parameters, mergekit shared parameters)
DETERMINISTIC = [
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


def _case_id(case: tuple[Any, ...]) -> str:
    return f"{case[0]}-{'-'.join(f'{k}={v}' for k, v in case[1].items()) or 'defaults'}"


def _weights(method: str) -> tuple[float, ...]:
    return (1.0, 1.0, 1.0) if method in UNWEIGHTED else WEIGHTS


@pytest.mark.parametrize("case", DETERMINISTIC, ids=[_case_id(c) for c in DETERMINISTIC])
def test_deterministic_methods_match_mergekit(tiny: TinyModels, tmp_path: Path, case: tuple[Any, ...]) -> None:
    method, params, mk_method, per_model, shared = case
    want = run_mergekit(tiny, tmp_path / "out", mk_method, per_model, shared)
    impl = get_method(method)
    resolved = impl.resolve(params)
    for module in MODULES:
        got = impl.merge(module, tiny.updates(module, _weights(method)), resolved).dense().double()
        scale = float(want[module].abs().max())
        assert scale > 0
        # mergekit sees W + D stored in float32 and subtracts W again: one float32 rounding of the weights' size
        assert float((got - want[module]).abs().max()) <= 1e-6 * max(scale, 1.0), module


RANDOM = [
    ("dare_linear", {"density": 0.5, "rescale": "l1"}, _per_model(density=0.5), {}),
    ("dare_ties", {"density": 0.4, "rescale": "l1", "normalize": False}, _per_model(density=0.4), {}),
    ("della", {"density": 0.5, "epsilon": 0.2}, _per_model(density=0.5, epsilon=0.2), {}),
    ("della_linear", {"density": 0.6, "epsilon": 0.1}, _per_model(density=0.6, epsilon=0.1), {}),
]
SEEDS = 8


@pytest.mark.parametrize("case", RANDOM, ids=[_case_id(c) for c in RANDOM])
def test_random_methods_match_mergekit_statistically(tiny: TinyModels, tmp_path: Path, case: tuple[Any, ...]) -> None:
    method, params, per_model, shared = case
    impl = get_method(method)
    kept: dict[str, list[float]] = {"ours": [], "mergekit": []}
    ratio: dict[str, list[float]] = {"ours": [], "mergekit": []}
    mean: dict[str, dict[str, torch.Tensor]] = {"ours": {}, "mergekit": {}}
    for seed in range(SEEDS):
        want = run_mergekit(tiny, tmp_path / f"out-{seed}", method, per_model, shared, seed=seed)
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
    kept_ours, kept_theirs = (sum(v) / len(v) for v in (kept["ours"], kept["mergekit"]))
    ratio_ours, ratio_theirs = (sum(v) / len(v) for v in (ratio["ours"], ratio["mergekit"]))
    assert abs(kept_ours - kept_theirs) < 0.02, (kept_ours, kept_theirs)
    assert abs(ratio_ours / ratio_theirs - 1) < 0.03, (ratio_ours, ratio_theirs)
    for module in MODULES:
        cosine = torch.nn.functional.cosine_similarity(
            mean["ours"][module].flatten(), mean["mergekit"][module].flatten(), dim=0
        )
        assert float(cosine) > 0.8, (module, float(cosine))


def test_langmerge_dare_defaults_differ_from_mergekit_as_documented(tiny: TinyModels, tmp_path: Path) -> None:
    """dare_ties' defaults: langmerge normalises and rescales by 1/density; mergekit sums and keeps the L1 norm.
    Both choices are available in langmerge; the defaults give a visibly different merge (norm ratio)."""
    impl = get_method("dare_ties")
    ours = [impl.merge(m, tiny.updates(m, WEIGHTS), impl.resolve({"density": 0.4})) for m in MODULES]
    matched = [
        impl.merge(m, tiny.updates(m, WEIGHTS), impl.resolve({"density": 0.4, "normalize": False, "rescale": "l1"}))
        for m in MODULES
    ]
    for a, b in zip(ours, matched, strict=True):
        assert float(a.dense().norm()) < 0.8 * float(b.dense().norm())
