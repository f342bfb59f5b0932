"""Re-factorisation (exact from factors, randomized) and the exact top-k selection."""

from __future__ import annotations

import pytest
import torch

from langmerge_trainer.merge import sparsify
from langmerge_trainer.merge.lowrank import randomized_lowrank, refactor_lowrank, svd_from_factors
from langmerge_trainer.merge.sparsify import kth_largest, topk_keep_mask


def test_svd_from_factors_equals_dense_svd() -> None:
    g = torch.Generator().manual_seed(0)
    B = torch.randn(30, 9, generator=g, dtype=torch.float64)
    A = torch.randn(9, 20, generator=g, dtype=torch.float64)
    U, S, Vh = svd_from_factors(B, A)
    dense_S = torch.linalg.svdvals(B @ A)
    assert torch.allclose(S, dense_S[:9], atol=1e-10)
    assert torch.allclose((U * S) @ Vh, B @ A, atol=1e-10)
    assert torch.allclose(U.T @ U, torch.eye(9, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("rank", [3, 6])
def test_truncation_error_is_the_optimal_one(rank: int) -> None:
    g = torch.Generator().manual_seed(1)
    B = torch.randn(40, 10, generator=g)
    A = torch.randn(10, 25, generator=g)
    M = (B @ A).double()
    f = refactor_lowrank(B, A, rank)
    assert f.rank == rank and not f.exact
    S = torch.linalg.svdvals(M)
    optimal = float(S[rank:].norm() / S.norm())
    measured = float((f.B.double() @ f.A.double() - M).norm() / M.norm())
    assert f.rel_error == pytest.approx(optimal, rel=1e-4)
    assert measured == pytest.approx(optimal, rel=1e-3)


def test_enough_rank_is_exact_and_padded() -> None:
    B, A = torch.randn(8, 3), torch.randn(3, 5)
    f = refactor_lowrank(B, A, 4)
    assert f.exact and f.rel_error == 0.0 and f.B.shape == (8, 4) and f.A.shape == (4, 5)
    assert torch.allclose(f.B @ f.A, B @ A)


def test_randomized_error_is_reported_and_small_for_a_low_rank_ish_input() -> None:
    g = torch.Generator().manual_seed(2)
    low = torch.randn(120, 12, generator=g) @ torch.randn(12, 90, generator=g)
    M = low + 1e-3 * torch.randn(120, 90, generator=g) * low.std()
    f = randomized_lowrank(M, 12, seed=5)
    S = torch.linalg.svdvals(M.double())
    optimal = float(S[12:].norm() / S.norm())
    measured = float((f.B @ f.A - M).norm() / M.norm())
    assert f.rel_error == pytest.approx(measured, rel=1e-3)
    assert f.rel_error < 2e-3
    assert f.rel_error <= optimal * 1.05
    # a full-rank input: the reported error is the truncation's, close to the optimum
    N = torch.randn(80, 60, generator=g)
    f = randomized_lowrank(N, 10, seed=5)
    S = torch.linalg.svdvals(N.double())
    assert float(S[10:].norm() / S.norm()) <= f.rel_error <= float(S[10:].norm() / S.norm()) * 1.05


def _reference_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(values.flatten(), descending=True, stable=True).indices
    keep = torch.zeros(values.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.reshape(values.shape)


@pytest.mark.parametrize(
    "kind", ["normal", "duplicates", "zeros", "tiny"], ids=["normal", "duplicates", "mostly-zero", "small"]
)
@pytest.mark.parametrize("density", [0.2, 0.5, 0.97])
def test_topk_keeps_exactly_the_top_k_with_index_tie_breaking(kind: str, density: float) -> None:
    g = torch.Generator().manual_seed(3)
    n = 50 if kind == "tiny" else 300_000  # above SMALL_SELECTION: the bracketed path
    values = torch.randn(n, generator=g).abs()
    if kind == "duplicates":
        values = torch.round(values * 4) / 4  # a handful of distinct values: many ties at the threshold
    if kind == "zeros":
        values[torch.rand(n, generator=g) < 0.9] = 0.0
    k = int(density * n)
    mask = topk_keep_mask(values.reshape(-1, 50), k)
    assert int(mask.sum()) == k
    assert torch.equal(mask.flatten(), _reference_mask(values, k).flatten())


def test_kth_largest_agrees_with_kthvalue_and_falls_back() -> None:
    g = torch.Generator().manual_seed(4)
    flat = torch.randn(200_000, generator=g).abs()
    for k in (1, 7, 1000, 100_000, 199_999, 200_000):
        value, greater, equal = kth_largest(flat, k)
        assert float(value) == float(torch.kthvalue(flat, flat.numel() - k + 1).values)
        assert greater < k <= greater + equal


def test_bracket_miss_falls_back_to_the_exact_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    flat = torch.randn(100_000).abs()
    monkeypatch.setattr(sparsify, "BRACKET_SIGMAS", -50.0)  # an inverted bracket never contains the k-th value
    value, _, _ = kth_largest(flat, 30_000)
    assert float(value) == float(torch.kthvalue(flat, 70_001).values)
