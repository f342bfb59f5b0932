"""Merging relative to a reference adapter (a trunk the experts started from).

Experts branched from a shared trunk adapter each carry the trunk's update plus their own: ``Delta_i = Delta_t +
tau_i``. A method that acts entry by entry or sums (TIES, DARE, magnitude pruning, task arithmetic) must see the
branches' own updates ``tau_i``, not the trunk counted n times and trimmed or sign-elected with them. So the updates
are made relative first, merged, and the trunk's update is added once:

    merged = Delta_t + M(Delta_1 - Delta_t, ..., Delta_n - Delta_t)

Both steps are exact in factor space: ``s_i B_i A_i - s_t B_t A_t`` is the low-rank update with factors
``[s_i B_i, -s_t B_t]`` and ``[A_i; A_t]``, and adding the trunk to a low-rank merge stacks its factors the same way
(a dense merge adds it block by block). A weighted average with weights that sum to 1 is unchanged by the reference
(``Delta_t + sum w_i tau_i = sum w_i Delta_i``); a plain sum is not.
"""

from __future__ import annotations

import torch

from langmerge_trainer.merge.method_math import DenseDelta, LoraUpdate, LowRankDelta, MergedDelta


def relative(update: LoraUpdate, reference: LoraUpdate) -> LoraUpdate:
    """``update - reference`` as one low-rank update (scale 1, rank the sum of both), keeping weight and key."""
    if update.shape != reference.shape:
        raise ValueError(f"the update ({update.shape}) and the reference ({reference.shape}) differ in shape")
    B = torch.cat([update.B.float() * update.scale, reference.B.float() * -reference.scale], dim=1)
    A = torch.cat([update.A.float(), reference.A.float()], dim=0)
    return LoraUpdate(B=B, A=A, scale=1.0, weight=update.weight, key=update.key)


def add_reference(merged: MergedDelta, reference: LoraUpdate) -> MergedDelta:
    """``merged + reference``: stacked factors for a low-rank merge, an in-place sum for a dense one."""
    if isinstance(merged, LowRankDelta):
        B = torch.cat([merged.B, reference.B.float() * reference.scale], dim=1)
        A = torch.cat([merged.A, reference.A.float()], dim=0)
        return LowRankDelta(B, A)
    return DenseDelta(merged.delta.add_(reference.dense()))
