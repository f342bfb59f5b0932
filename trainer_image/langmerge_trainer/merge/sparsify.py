"""Selecting the entries of an update that a method keeps: exact top-k by magnitude and seeded random drops.

Two selections, both exact and deterministic, neither needing a full sort:

* :func:`topk_keep_mask` keeps exactly ``k`` entries of largest magnitude (TIES, magnitude pruning). The k-th largest
  value is found by *bracketing*: a fixed-size random sample gives two quantiles that enclose the k-th value with
  overwhelming probability, one counting pass and one compaction keep only the entries inside the bracket (about 1% of
  them), and the selection recurses on that small set. Every pass is elementwise, so it runs at memory bandwidth on a
  GPU (where ``torch.kthvalue`` on one huge slice runs in a single thread block) and beats quickselect on a CPU. The
  sample only guides the search: when a bracket misses, it falls back to ``torch.kthvalue``, so the answer is always
  the exact k-th value. Entries equal to the threshold are kept in flat index order until exactly ``k`` are kept.
* :func:`dare_keep_mask` draws DARE's Bernoulli(density) keep mask from a counter-based hash of (key, flat index), in
  exact integer arithmetic: the same key gives the same mask on any device, in any processing order.
"""

from __future__ import annotations

import hashlib
import math

import torch

#: Below this many entries the selection calls ``torch.kthvalue`` directly.
SMALL_SELECTION = 1 << 16
#: Sample size that brackets the k-th value.
SAMPLE_SIZE = 1 << 15
#: Half-width of the bracket in standard deviations of the sample quantile.
BRACKET_SIGMAS = 6.0
#: Entries hashed per chunk by the DARE mask (bounds its temporaries).
HASH_CHUNK = 1 << 20

_M32 = 0xFFFFFFFF


def keep_count(numel: int, density: float) -> int:
    """Entries kept at ``density`` (as PEFT and mergekit count them: ``int(density * numel)``)."""
    return numel if density >= 1.0 else int(density * numel)


def topk_keep_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (same shape) of exactly ``k`` entries with the largest values of ``magnitude``.

    Entries equal to the k-th largest value are kept in increasing flat index order, so the mask is deterministic.
    """
    flat = magnitude.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    value, n_greater, n_equal = kth_largest(flat, k)
    need = k - n_greater
    if need == n_equal:
        return magnitude >= value
    equal = flat == value
    first = torch.cumsum(equal, dim=0, dtype=torch.int64) <= need
    return ((flat > value) | (equal & first)).reshape(magnitude.shape)


def kth_largest(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, int, int]:
    """The k-th largest value of a 1-D tensor (1 <= k <= numel), how many entries exceed it, how many equal it."""
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for {n} entries")
    if n > SMALL_SELECTION:
        found = _kth_largest_bracketed(flat, k)
        if found is not None:
            return found
    value = torch.kthvalue(flat, n - k + 1).values
    return value, int(torch.count_nonzero(flat > value)), int(torch.count_nonzero(flat == value))


def _kth_largest_bracketed(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, int, int] | None:
    n = flat.numel()
    generator = torch.Generator().manual_seed((n * 1_000_003 + k) & 0x7FFFFFFF)
    index = torch.randint(0, n, (SAMPLE_SIZE,), generator=generator).to(flat.device)
    sample = flat[index].float()
    q = 1.0 - k / n  # the k-th largest is the q-quantile
    margin = BRACKET_SIGMAS * math.sqrt(max(q * (1.0 - q), 1.0 / SAMPLE_SIZE) / SAMPLE_SIZE) + 2.0 / SAMPLE_SIZE
    bounds = torch.quantile(sample, torch.tensor([max(0.0, q - margin), min(1.0, q + margin)], device=sample.device))
    lo = bounds[0].to(flat.dtype) if q - margin > 0 else None
    hi = bounds[1].to(flat.dtype) if q + margin < 1 else None
    n_above = int(torch.count_nonzero(flat > hi)) if hi is not None else 0
    if n_above >= k:
        return None
    inside = torch.ones_like(flat, dtype=torch.bool) if lo is None else flat >= lo
    if hi is not None:
        inside &= flat <= hi
    candidates = flat[inside]
    del inside
    if n_above + candidates.numel() < k or candidates.numel() * 2 > n:
        return None
    value, greater, equal = kth_largest(candidates, k - n_above)
    return value, n_above + greater, equal


# -- DARE ----------------------------------------------------------------------------------------------------------


def derive_seed(seed: int, *parts: str) -> int:
    """A 64-bit key from a user seed and names (module, language): independent of processing order and device."""
    text = "\0".join([str(int(seed)), *parts])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


# Multipliers below 2**31: a product with a 32-bit value stays below 2**63, so int64 arithmetic never overflows.
_C1 = 0x7FEB352D
_C2 = 0x046CA68B
_C3 = 0x2C1B3C6D


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """An xorshift-multiply mixer of 32-bit values held in int64 (``lowbias32``'s structure), in place."""
    x.bitwise_xor_(x >> 16).mul_(_C1).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15).mul_(_C2).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 16)


def hash_uniform32(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """32-bit hashes (int64 in [0, 2**32)) of flat indices ``start .. start+count-1`` under a 64-bit ``key``."""
    offset = key & _M32
    multiplier = ((key >> 32) & 0x7FFFFFFF) | 1  # odd: a bijection of the index
    x = torch.arange(start, start + count, dtype=torch.int64, device=device).bitwise_and_(_M32)
    x.mul_(multiplier).bitwise_and_(_M32).add_(offset).bitwise_and_(_M32)
    _mix32(x)
    x.bitwise_xor_(offset ^ 0x9E3779B9).mul_(_C3).bitwise_and_(_M32)
    return _mix32(x)


def dare_keep_mask(
    shape: torch.Size | tuple[int, ...],
    density: float,
    key: int,
    device: torch.device | str = "cpu",
    *,
    offset: int = 0,
) -> torch.Tensor:
    """DARE's keep mask: each entry kept with probability ``density``, from a hash of (``key``, flat index).

    ``offset`` is the flat index of the first entry, so a block of rows gets exactly its part of the whole mask.
    """
    numel = math.prod(shape)
    if density >= 1.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    threshold = int(density * 2**32)
    out = torch.empty(numel, dtype=torch.bool, device=device)
    for start in range(0, numel, HASH_CHUNK):
        count = min(HASH_CHUNK, numel - start)
        out[start : start + count] = hash_uniform32(key, offset + start, count, device) < threshold
    return out.reshape(shape)


class MagnitudeSelector:
    """Exactly the top-k entries by magnitude of a whole matrix, applied block by block in row-major order.

    Fitted once on the magnitudes (:func:`kth_largest`); then each block keeps entries above the k-th value, and
    entries equal to it while the budget of ties lasts (in flat index order, as :func:`topk_keep_mask`). ``k`` is
    ``int(density * numel)`` unless given directly.
    """

    def __init__(self, magnitude: torch.Tensor, density: float = 1.0, *, k: int | None = None) -> None:
        n = magnitude.numel()
        self.k = keep_count(n, density) if k is None else max(0, min(int(k), n))
        self.keep_all = self.k >= n
        self.value = 0.0
        self.ties_left = 0
        self.all_ties = True
        if not self.keep_all and self.k > 0:
            value, greater, equal = kth_largest(magnitude.reshape(-1), self.k)
            self.value = float(value)
            self.ties_left = self.k - greater
            self.all_ties = self.ties_left == equal

    def mask(self, block: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the entries of ``block`` (the next rows, in order) that are kept."""
        if self.keep_all:
            return torch.ones_like(block, dtype=torch.bool)
        if self.k == 0:
            return torch.zeros_like(block, dtype=torch.bool)
        magnitude = block.abs()
        if self.all_ties:
            return magnitude >= self.value
        equal = (magnitude == self.value).reshape(-1)
        first = torch.cumsum(equal, dim=0, dtype=torch.int64) <= self.ties_left
        self.ties_left -= min(int(equal.sum()), self.ties_left)
        return ((magnitude.reshape(-1) > self.value) | (equal & first)).reshape(block.shape)

    def apply_(self, block: torch.Tensor) -> torch.Tensor:
        """Zero the entries of ``block`` (the next rows, in order) that are not kept; in place."""
        if self.keep_all:
            return block
        return block.masked_fill_(~self.mask(block), 0.0)


def outlier_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """Model Breadcrumbs' selection as two top-k counts ``(outer, top)``: keep the ``outer`` largest magnitudes but not
    the ``top`` largest. ``int(density * n)`` entries are kept; up to ``int(gamma * n)`` of the largest are dropped as
    outliers, fewer when the density leaves no room (then the smallest entries are all kept)."""
    target = keep_count(numel, density)
    n_top = int(gamma * numel)
    n_bottom = max(0, numel - target - n_top)
    outer = numel - n_bottom
    return outer, outer - target


def rank_keep_probability(block: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probability of each entry: ``density - epsilon`` for the smallest magnitude of its row rising
    linearly with the magnitude rank to ``density + epsilon`` for the largest (float32, the block's shape)."""
    rows = block.reshape(1, -1) if block.dim() < 2 else block
    cols = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.argsort(order, dim=1).to(torch.float32)
    normalised = ranks / (cols - 1) if cols > 1 else torch.zeros_like(ranks)
    return (normalised.mul_(2 * epsilon).add_(density - epsilon)).reshape(block.shape)


def probability_keep_mask(probability: torch.Tensor, key: int, *, offset: int = 0) -> torch.Tensor:
    """Each entry kept with its own probability, from the same hash of (``key``, flat index) as DARE's mask."""
    numel = probability.numel()
    flat = probability.reshape(-1)
    out = torch.empty(numel, dtype=torch.bool, device=probability.device)
    for start in range(0, numel, HASH_CHUNK):
        count = min(HASH_CHUNK, numel - start)
        hashes = hash_uniform32(key, offset + start, count, probability.device)
        out[start : start + count] = hashes.to(torch.float64) < flat[start : start + count].to(torch.float64) * 2**32
    return out.reshape(probability.shape)
