"""Re-factorising a merged update into LoRA factors: exactly from factors, or by a randomized range finder.

A weighted sum of N rank-r updates ``sum_i c_i B_i A_i = [c_1 B_1 ... c_n B_n] [A_1; ...; A_n] = B A`` has rank at most
``R = N r``. Its SVD comes from the factors alone: ``B = Q_b R_b``, ``A^T = Q_a R_a`` (thin QR), then the small
``R x R`` core ``R_b R_a^T = U_c S V_c^T`` gives ``B A = (Q_b U_c) S (Q_a V_c)^T``. That costs ``O((m + n) R^2)``, never
forms the ``m x n`` matrix, and the truncation error to any rank is exact (from the singular values).

Updates that are not low rank (TIES, DARE, magnitude pruning) are re-factorised by a randomized range finder with power
iterations (Halko, Martinsson & Tropp, 2011), and the relative Frobenius error of the result is measured, not assumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Extra sampled directions of the randomized range finder.
OVERSAMPLE = 16
#: Power iterations of the randomized range finder.
POWER_ITERATIONS = 2


@dataclass(frozen=True)
class Factors:
    """``B @ A`` approximates (or equals) an update; ``rel_error`` = ||B A - M||_F / ||M||_F."""

    B: torch.Tensor
    A: torch.Tensor
    rel_error: float
    exact: bool

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


def svd_from_factors(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U, S, Vh`` of ``B @ A`` (B: m x R, A: R x n) computed from the factors.

    ``S`` is float64 (the core's SVD runs in double precision; it is only ``R x R``); ``U`` and ``Vh`` have B's dtype.
    """
    q_b, r_b = torch.linalg.qr(B)
    q_a, r_a = torch.linalg.qr(A.T)
    core = r_b.double() @ r_a.double().T
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)
    return q_b @ u_c.to(B.dtype), s, vh_c.to(A.dtype) @ q_a.T


def _pad_rank(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    have = A.shape[0]
    if have >= rank:
        return B, A
    B = torch.cat([B, B.new_zeros(B.shape[0], rank - have)], dim=1)
    A = torch.cat([A, A.new_zeros(rank - have, A.shape[1])], dim=0)
    return B, A


def _split_singular(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors ``(U sqrt(S), sqrt(S) Vh)`` of the leading ``rank`` triplets."""
    root = S[:rank].sqrt().to(U.dtype)
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


def refactor_lowrank(B: torch.Tensor, A: torch.Tensor, rank: int) -> Factors:
    """Factors of ``B @ A`` with exactly ``rank`` columns/rows.

    When ``rank`` is at least B's width the factors are kept as they are (zero-padded): exact, no arithmetic. Otherwise
    the best rank-``rank`` approximation is taken from the exact SVD and its error is exact too.
    """
    if rank >= A.shape[0]:
        B, A = _pad_rank(B, A, rank)
        return Factors(B, A, 0.0, True)
    U, S, Vh = svd_from_factors(B, A)
    total = float((S * S).sum())
    tail = float((S[rank:] * S[rank:]).sum())
    error = math.sqrt(tail / total) if total > 0 else 0.0
    out_B, out_A = _split_singular(U, S, Vh, rank)
    out_B, out_A = _pad_rank(out_B, out_A, rank)
    return Factors(out_B.contiguous(), out_A.contiguous(), error, tail == 0.0)


def _sketch_svd(
    M: torch.Tensor, width: int, generator: torch.Generator, power_iterations: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A randomized range finder of ``width`` columns (with power iterations) and the SVD of ``M`` projected on it:
    ``(q, u_s, s, vh)`` with ``q @ u_s @ diag(s) @ vh`` the projection of ``M`` on the sketched range."""
    n = M.shape[1]
    omega = torch.randn(n, width, generator=generator, dtype=torch.float32).to(device=M.device, dtype=M.dtype)
    q, _ = torch.linalg.qr(M @ omega)
    del omega
    for _ in range(power_iterations):
        z, _ = torch.linalg.qr(M.T @ q)
        q, _ = torch.linalg.qr(M @ z)
        del z
    small = q.T @ M  # width x n
    u_s, s, vh = torch.linalg.svd(small, full_matrices=False)
    return q, u_s, s, vh


def randomized_lowrank(
    M: torch.Tensor,
    rank: int,
    *,
    oversample: int = OVERSAMPLE,
    power_iterations: int = POWER_ITERATIONS,
    seed: int = 0,
) -> Factors:
    """Rank-``rank`` factors of a dense ``M`` by a randomized range finder; the error is measured on ``M``."""
    m, n = M.shape
    generator = torch.Generator().manual_seed(seed & 0x7FFFFFFFFFFFFFFF)
    q, u_s, s, vh = _sketch_svd(M, min(rank + oversample, m, n), generator, power_iterations)
    keep = min(rank, s.shape[0])
    out_B, out_A = _split_singular(q @ u_s, s, vh, keep)
    out_B, out_A = _pad_rank(out_B.contiguous(), out_A.contiguous(), rank)
    norm = float(torch.linalg.vector_norm(M))
    residual = torch.addmm(M, out_B, out_A, alpha=-1.0)
    error = float(torch.linalg.vector_norm(residual)) / norm if norm > 0 else 0.0
    return Factors(out_B, out_A, error, error == 0.0)


#: Width of the first sketch of :func:`adaptive_lowrank` (doubled until the error bound is met or the cap reached).
ADAPTIVE_START = 32


def breakeven_rank(rows: int, cols: int) -> int:
    """The rank at which LoRA factors ``(rows + cols) * r`` hold as many numbers as the dense ``rows x cols`` update."""
    return max(1, (rows * cols) // (rows + cols))


def smallest_rank(singular_values: torch.Tensor, total: float, max_relative_error: float, cap: int) -> int | None:
    """The smallest k <= cap whose rank-k truncation has relative Frobenius error <= the bound, from the singular
    values of (a projection of) a matrix whose squared Frobenius norm is ``total``; None when no k <= cap does."""
    if total <= 0:
        return 0
    captured = torch.cumsum(singular_values.double().square(), dim=0)
    residual = (total - captured).clamp_(min=0.0) / total
    bound = max_relative_error**2
    if bound >= 1.0:
        return 0
    ok = torch.nonzero(residual[:cap] <= bound)
    return int(ok[0]) + 1 if ok.numel() else None


def auto_lowrank_factors(B: torch.Tensor, A: torch.Tensor, max_relative_error: float, cap: int | None) -> Factors:
    """Factors of the exactly low-rank ``B @ A`` (B: m x R): kept as they are when ``cap`` is None or at least R
    (exact), else the smallest truncation of the exact SVD meeting the bound, at most ``cap`` (the error is exact)."""
    R = int(A.shape[0])
    if cap is None or cap >= R:
        return Factors(B, A, 0.0, True)
    _, S, _ = svd_from_factors(B, A)
    k = smallest_rank(S, float((S * S).sum()), max_relative_error, cap)
    return refactor_lowrank(B, A, max(1, k if k is not None else cap))


def adaptive_lowrank(
    M: torch.Tensor,
    max_relative_error: float,
    cap: int,
    *,
    oversample: int = OVERSAMPLE,
    power_iterations: int = POWER_ITERATIONS,
    seed: int = 0,
) -> Factors:
    """The smallest-rank factors of a dense ``M`` whose relative error is at most the bound, up to ``cap``.

    A randomized range finder sketches ``M`` with a growing width (32, 64, ... up to ``cap`` plus oversampling);
    the singular values of the projection give the error of every truncation of that sketch exactly
    (``||M||^2 - sum s_i^2``: the truncation is an orthogonal projection of ``M``), so the first width whose sketch
    holds a rank meeting the bound gives the rank. The returned error is measured on ``M`` itself. When no rank up
    to ``cap`` meets the bound the factors have rank ``cap`` and their (larger) error says so.
    """
    m, n = M.shape
    cap = max(1, min(cap, m, n))
    total = float(torch.linalg.vector_norm(M.double()) ** 2) if M.dtype != torch.float64 else float(M.norm() ** 2)
    if total == 0.0:
        return Factors(M.new_zeros(m, 1), M.new_zeros(1, n), 0.0, True)
    width = min(ADAPTIVE_START, cap)
    generator = torch.Generator().manual_seed(seed & 0x7FFFFFFFFFFFFFFF)
    while True:
        sketch = min(width + oversample, m, n)
        q, u_s, s, vh = _sketch_svd(M, sketch, generator, power_iterations)
        complete = sketch >= min(m, n)  # the sketch spans the whole range: s is the exact spectrum
        k = smallest_rank(s, total, max_relative_error, cap if complete else min(width, cap))
        if k is not None or width >= cap or complete:
            rank = max(1, k if k is not None else min(cap, int(s.shape[0])))
            out_B, out_A = _split_singular(q @ u_s, s, vh, rank)
            out_B, out_A = out_B.contiguous(), out_A.contiguous()
            residual = torch.addmm(M, out_B, out_A, alpha=-1.0)
            error = float(torch.linalg.vector_norm(residual)) / math.sqrt(total)
            return Factors(out_B, out_A, error, error == 0.0)
        width = min(2 * width, cap)
