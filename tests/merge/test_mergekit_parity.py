"""langmerge's merge methods against mergekit 0.1.5 itself, on identical task vectors (tiny full-weight models).

Deterministic methods agree to float32 rounding, tensor by tensor. Random ones (DARE, DELLA: mergekit draws its masks
with ``torch.bernoulli``, langmerge from a counter-based hash) are compared statistically over seeds: the share of
entries kept, the norm of the merged update relative to the plain weighted sum, and the direction of the mean merged
update. The mapping between the two is the table in ``docs/merge-methods.md``. The cases and the measurements are in
``mergekit_helpers.py``; ``pytest -s`` prints each case's figures, ``benchmarks/mergekit_parity.py`` prints them all as
the table in the docs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mergekit_helpers import (
    DETERMINISTIC,
    MODULES,
    RANDOM,
    SEEDS,
    WEIGHTS,
    TinyModels,
    build_tiny_models,
    case_id,
    measure_deterministic,
    measure_random,
)

from langmerge_trainer.merge.method_math import get_method

#: mergekit 0.1.5 imports numpy.core (deprecated by numpy 2) and passes transformers' deprecated torch_dtype: the
#: warnings come from inside mergekit, not from our code.
pytestmark = [
    pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return build_tiny_models(tmp_path_factory.mktemp("mergekit-models"))


@pytest.mark.parametrize("case", DETERMINISTIC, ids=[case_id(c) for c in DETERMINISTIC])
def test_deterministic_methods_match_mergekit(tiny: TinyModels, tmp_path: Path, case: tuple[Any, ...]) -> None:
    figures = measure_deterministic(tiny, tmp_path / "out", case)
    print(f"\n{case_id(case)}: max |langmerge - mergekit| / max(scale, 1) = {figures.worst_relative:.2e}")
    for module, scale in figures.scale.items():
        assert scale > 0, module
        # mergekit sees W + D stored in float32 and subtracts W again: one float32 rounding of the weights' size
        assert figures.max_abs_diff[module] <= 1e-6 * max(scale, 1.0), module


@pytest.mark.parametrize("case", RANDOM, ids=[case_id(c) for c in RANDOM])
def test_random_methods_match_mergekit_statistically(tiny: TinyModels, tmp_path: Path, case: tuple[Any, ...]) -> None:
    f = measure_random(tiny, tmp_path, case)
    print(
        f"\n{case_id(case)} over {SEEDS} seeds: kept {f.kept_ours:.4f} vs mergekit {f.kept_mergekit:.4f}, norm ratio "
        f"{f.ratio_ours:.4f} vs {f.ratio_mergekit:.4f}, min cosine of the mean updates {min(f.cosine.values()):.4f}"
    )
    assert abs(f.kept_ours - f.kept_mergekit) < 0.02, (f.kept_ours, f.kept_mergekit)
    assert abs(f.ratio_ours / f.ratio_mergekit - 1) < 0.03, (f.ratio_ours, f.ratio_mergekit)
    for module, cosine in f.cosine.items():
        assert cosine > 0.8, (module, cosine)


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
