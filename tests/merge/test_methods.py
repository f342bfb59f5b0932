"""Every merge method against a plain dense reference on small random tensors."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from merge_helpers import ref_merge, ref_ties

from langmerge.merge_catalogue import METHODS
from langmerge_trainer.merge.method_math import REGISTRY, LoraUpdate, LowRankDelta, get_method
from langmerge_trainer.merge.sparsify import dare_keep_mask, derive_seed

MODULE = "model.layers.0.self_attn.q_proj"


def make_updates(
    ranks: Sequence[int] = (2, 3, 4),
    weights: Sequence[float] = (0.5, 1.0, 2.0),
    shape: tuple[int, int] = (12, 10),
    seed: int = 0,
) -> list[LoraUpdate]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (r, w) in enumerate(zip(ranks, weights, strict=True)):
        B = torch.randn(shape[0], r, generator=g)
        A = torch.randn(r, shape[1], generator=g)
        out.append(LoraUpdate(B=B, A=A, scale=0.5 + 0.25 * i, weight=w, key=f"lang{i}"))
    return out


def ref_delta(u: LoraUpdate) -> torch.Tensor:
    return u.scale * (u.B.double() @ u.A.double())


def reference(method: str, updates: Sequence[LoraUpdate], p: dict[str, object]) -> torch.Tensor:
    return ref_merge(
        method, [ref_delta(u) for u in updates], [u.weight for u in updates], p, MODULE, [u.key for u in updates]
    )


CASES = [
    ("linear", {}),
    ("task_arithmetic", {"lambda_": 0.7}),
    ("cat", {}),
    ("ties", {"density": 1.0}),
    ("ties", {"density": 0.3, "lambda_": 1.5}),
    ("magnitude_prune", {"density": 0.5}),
    ("dare_linear", {"density": 0.5, "seed": 3}),
    ("dare_ties", {"density": 0.4, "seed": 7, "lambda_": 0.9}),
    ("knots", {"knots_merge": "ties", "density": 1.0}),
    ("knots", {"knots_merge": "ties", "density": 0.5, "lambda_": 1.3}),
    ("knots", {"knots_merge": "linear"}),
    ("tsv", {}),
    ("tsv", {"sv_fraction": 0.5, "lambda_": 1.3}),
    ("iso_c", {}),
    ("iso_c", {"lambda_": 1.5}),
    ("iso_cts", {}),
    ("iso_cts", {"common_space_fraction": 0.5, "lambda_": 0.8}),
]


def test_registry_matches_the_operator_catalogue() -> None:
    assert set(REGISTRY) == set(METHODS)
    for name, info in METHODS.items():
        assert REGISTRY[name].parameters == info.parameters, name
        assert REGISTRY[name].low_rank_exact == info.low_rank_exact, name


@pytest.mark.parametrize(("method", "given"), CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_method_matches_dense_reference(method: str, given: dict[str, object]) -> None:
    updates = make_updates()
    impl = get_method(method)
    params = impl.resolve(given)
    merged = impl.merge(MODULE, updates, params)
    want = reference(method, updates, params)
    got = merged.dense().double()
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())), (got - want).abs().max()
    if impl.low_rank_exact:
        assert isinstance(merged, LowRankDelta)
        assert merged.rank <= sum(u.rank for u in updates)


def test_resolve_fills_defaults_and_rejects_unknown() -> None:
    assert get_method("dare_ties").resolve({}) == {
        "density": 0.5,
        "lambda_": 1.0,
        "seed": 0,
        "normalize": True,
        "rescale": "inverse-density",
    }
    assert get_method("ties").resolve({"weights": {"es": 1.0}}) == {"density": 1.0, "lambda_": 1.0, "normalize": True}
    with pytest.raises(ValueError, match="do not apply"):
        get_method("linear").resolve({"density": 0.5})
    with pytest.raises(ValueError, match="density"):
        get_method("ties").resolve({"density": 1.5})
    with pytest.raises(ValueError, match="knots_merge"):
        get_method("knots").resolve({"knots_merge": "dare"})


def test_cat_is_exact_stacking() -> None:
    updates = make_updates()
    merged = get_method("cat").merge(MODULE, updates, {})
    assert isinstance(merged, LowRankDelta)
    assert merged.rank == 2 + 3 + 4
    want = sum(u.weight * ref_delta(u) for u in updates)
    assert torch.allclose(merged.dense().double(), want, atol=1e-5)  # type: ignore[arg-type]
    # B = [w_i s_i B_i], A = [A_1; A_2; A_3]
    assert torch.equal(merged.A[:2], updates[0].A)
    assert torch.allclose(merged.B[:, :2], updates[0].B * updates[0].weight * updates[0].scale)


def test_ties_with_unit_weights_equals_peft_ties() -> None:
    from peft.utils import merge_utils

    updates = make_updates(weights=(1.0, 1.0, 1.0))
    deltas = [u.dense() for u in updates]
    for density in (1.0, 0.4):
        ours = get_method("ties").merge(MODULE, updates, {"density": density, "lambda_": 1.0}).dense()
        if density >= 1.0:
            theirs = merge_utils.disjoint_merge(
                torch.stack(deltas), merge_utils.calculate_majority_sign_mask(torch.stack(deltas))
            )
        else:
            theirs = merge_utils.ties(deltas, torch.ones(3), density)
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_dare_is_reproducible_for_a_seed_and_order_independent() -> None:
    updates = make_updates(shape=(40, 30))
    method = get_method("dare_ties")
    one = method.merge(MODULE, updates, method.resolve({"seed": 1})).dense()
    again = method.merge(MODULE, list(reversed(updates)), method.resolve({"seed": 1})).dense()
    other = method.merge(MODULE, updates, method.resolve({"seed": 2})).dense()
    assert torch.allclose(one, again, atol=1e-6)  # same masks whatever the processing order
    assert not torch.allclose(one, other)
    # the mask really is Bernoulli(density): about half of 10k entries kept, and keys give independent masks
    m1 = dare_keep_mask((100, 100), 0.5, derive_seed(0, MODULE, "es"))
    m2 = dare_keep_mask((100, 100), 0.5, derive_seed(0, MODULE, "it"))
    assert 0.47 < float(m1.float().mean()) < 0.53
    assert 0.22 < float((m1 & m2).float().mean()) < 0.28


def test_weights_of_zero_leave_an_adapter_out_of_ties() -> None:
    updates = make_updates(weights=(1.0, 0.0, 1.0))
    got = get_method("ties").merge(MODULE, updates, {"density": 1.0, "lambda_": 1.0}).dense()
    want = ref_ties([ref_delta(updates[0]), ref_delta(updates[2])], [1.0, 1.0])
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_peft_linear_has_cross_terms_ours_is_the_true_average() -> None:
    """PEFT's non-SVD ``linear`` averages A's and B's separately; the true average of the updates differs."""
    import torch.nn as nn
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16, bias=False))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False)
    model = get_peft_model(base, config, adapter_name="es")
    model.add_adapter("it", config)
    torch.nn.init.normal_(model.base_model.model[0].lora_B["it"].weight)
    layer = model.base_model.model[0]
    updates = [
        LoraUpdate(
            B=layer.lora_B[name].weight.detach().clone(),
            A=layer.lora_A[name].weight.detach().clone(),
            scale=float(layer.scaling[name]),
            weight=0.5,
            key=name,
        )
        for name in ("es", "it")
    ]
    model.add_weighted_adapter(["es", "it"], [0.5, 0.5], "peft_linear", combination_type="linear")
    with torch.no_grad():
        truth = 0.5 * layer.get_delta_weight("es") + 0.5 * layer.get_delta_weight("it")
        peft_delta = layer.get_delta_weight("peft_linear")
    ours = get_method("linear").merge("0", updates, {}).dense()
    assert torch.allclose(ours, truth, atol=1e-5)
    rel = float((peft_delta - truth).norm() / truth.norm())
    assert rel > 0.3, rel  # the cross terms B_es A_it and B_it A_es


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_ties", "dare_linear"])
def test_dense_methods_give_the_same_result_in_row_blocks(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small integer factors make many exactly equal magnitudes: the tie budget must carry across blocks."""
    from langmerge_trainer.merge import method_math

    g = torch.Generator().manual_seed(5)
    updates = [
        LoraUpdate(
            B=torch.randint(-2, 3, (23, 2), generator=g).float(),
            A=torch.randint(-2, 3, (2, 17), generator=g).float(),
            scale=1.0,
            weight=w,
            key=f"l{i}",
        )
        for i, w in enumerate((1.0, 0.5, 2.0))
    ]
    impl = get_method(method)
    p = impl.resolve({"density": 0.3, **({"seed": 4} if "seed" in impl.parameters else {})})
    whole = impl.merge(MODULE, updates, p).dense()
    monkeypatch.setattr(method_math, "CPU_BLOCK_ELEMENTS", 40)  # blocks of 2 rows: 12 blocks, the last one short
    assert len(method_math.row_blocks(23, 17, torch.device("cpu"))) == 12
    blocked = impl.merge(MODULE, updates, p).dense()
    assert torch.equal(whole, blocked)
    assert torch.allclose(blocked.double(), reference(method, updates, p), atol=1e-6)


@pytest.mark.parametrize(
    ("method", "given"),
    [
        ("breadcrumbs", {"density": 0.4, "gamma": 0.1}),
        ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.1, "normalize": True}),
        ("della", {"density": 0.4, "epsilon": 0.2, "seed": 4}),
        ("della_linear", {"density": 0.5, "epsilon": 0.1, "seed": 4, "rescale": "inverse-density"}),
        ("dare_ties", {"density": 0.3, "seed": 4, "rescale": "l1", "normalize": False}),
        ("sce", {"select_topk": 0.3}),
    ],
)
def test_mergekit_family_methods_give_the_same_result_in_row_blocks(
    method: str, given: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Selections fitted on whole updates (top-k, outliers, L1 norms, SCE's variance) apply exactly block by block;
    DELLA's row-wise keep probabilities are the same in any block of rows. (Values: ``test_mergekit_parity.py``.)"""
    from langmerge_trainer.merge import method_math

    g = torch.Generator().manual_seed(5)
    updates = [
        LoraUpdate(
            B=torch.randint(-2, 3, (23, 2), generator=g).float(),
            A=torch.randint(-2, 3, (2, 17), generator=g).float(),
            scale=1.0,
            weight=w,
            key=f"l{i}",
        )
        for i, w in enumerate((1.0, 0.5, 2.0))
    ]
    impl = get_method(method)
    p = impl.resolve(given)
    whole = impl.merge(MODULE, updates, p).dense()
    monkeypatch.setattr(method_math, "CPU_BLOCK_ELEMENTS", 40)
    blocked = impl.merge(MODULE, updates, p).dense()
    assert torch.equal(whole, blocked)
    assert float(whole.abs().sum()) > 0


def test_della_keeps_large_entries_more_often() -> None:
    """DELLA's keep probability rises with the magnitude rank in the row: density - eps for the smallest entry,
    density + eps for the largest, and on average the density."""
    from langmerge_trainer.merge.sparsify import rank_keep_probability

    block = torch.tensor([[3.0, -1.0, 0.5, 2.0, -4.0]])
    p = rank_keep_probability(block, 0.5, 0.2)
    assert torch.allclose(p, torch.tensor([[0.6, 0.4, 0.3, 0.5, 0.7]]))
    assert abs(float(p.mean()) - 0.5) < 1e-6


def test_della_epsilon_must_keep_probabilities_in_range() -> None:
    with pytest.raises(ValueError, match=r"density \+- epsilon must lie in \(0, 1\)"):
        get_method("della").resolve({"density": 0.9, "epsilon": 0.2})


def test_model_stock_needs_two_updates() -> None:
    updates = make_updates(ranks=(2,), weights=(1.0,))
    with pytest.raises(ValueError, match="at least two updates"):
        get_method("model_stock").merge(MODULE, updates, get_method("model_stock").resolve({}))
