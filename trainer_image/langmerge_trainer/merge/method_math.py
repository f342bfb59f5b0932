"""The merge methods: a registry of small units, each with a declared parameter schema. Pure tensor math, no I/O.

Every method combines, for one module, the updates ``Delta_i = scale_i * B_i @ A_i`` of the adapters that target it
(each with its language's weight ``w_i``) into one merged update:

* :class:`TaskArithmetic` is the general method; ``linear``, ``task_arithmetic``, ``cat``, ``ties``, ``dare_linear``,
  ``dare_ties`` and ``magnitude_prune`` are configured instances of it (sparsify by magnitude or at random, elect
  signs or not, normalise by the weights or not, scale by lambda or not). Without sparsification or sign election
  the result is exactly low rank and is returned as factors (``B = [c_1 B_1 ... c_n B_n]``, ``A = [A_1; ...; A_n]``):
  no dense matrix is formed. Otherwise the dense updates are computed block of rows by block of rows and folded into
  four running sums, so the working space is about two float32 copies of the module whatever the number of adapters.
* :class:`Knots` (KnOTS, Stoica et al. 2024, arXiv 2410.19735) aligns the updates in the SVD basis of their
  concatenation ``[Delta_1 ... Delta_n] = U S [V_1^T ... V_n^T]`` (taken exactly from the factors), merges the
  coordinates ``X_i = S V_i^T`` with TIES or a weighted average, and maps back: ``Delta = U X``. The result has rank
  at most ``sum r_i`` and is returned as factors.
* :class:`Tsv` (TSV-Merge, Gargiulo et al., CVPR 2025), :class:`IsoC` and :class:`IsoCts` (Marczak et al. 2025,
  arXiv 2502.04959) work on singular vectors, all taken exactly from the factors in float64
  (:func:`spectral_parts`); their results have rank at most ``sum r_i`` and are returned as factors.

Definitions (weights ``w_i >= 0``, ``lam`` = ``lambda_``)::

    linear           sum w_i D_i / sum w_i
    task_arithmetic  lam * sum w_i D_i
    cat              sum w_i D_i, as stacked factors (exact)
    magnitude_prune  lam * sum w_i trim(D_i)
    dare_linear      lam * sum w_i drop(D_i)
    ties             lam * sum_i w_i T_i [sign T_i = s] / sum_i w_i [sign T_i = s],  T_i = trim(D_i), s = sign(sum w_i T_i)
    dare_ties        the same with T_i = drop(D_i)
    knots            U * merge_{ties|linear}(X_i) * lam
    tsv              lam * P(U) diag(S) P(V)^T,  [U, S, V] the top components of every w_i D_i side by side
    iso_c            lam * mean(s) * U V^T,  U diag(s) V^T = sum w_i D_i (its non-zero spectrum)
    iso_cts          lam * mean(S) * P(U) P(V)^T,  [U, S, V] the common and the task-specific components

``P(M)`` is the orthogonal Procrustes (polar) factor of ``M``: ``P Q^T`` from ``M = P Sigma Q^T``.

``trim`` keeps exactly the top ``int(density * numel)`` entries by magnitude; ``drop`` keeps each entry with
probability ``density`` (a hash of (seed, module, language, index): reproducible on any device and in any order) and
rescales by ``1 / density``. Where the weighted sum is exactly zero the elected sign is positive (as PEFT).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, TypeVar, overload

import torch

from langmerge.merge_catalogue import COMMON_PARAMETERS, METHODS, RESCALE_CHOICES, KnotsMerge
from langmerge_trainer.merge.lowrank import svd_from_factors
from langmerge_trainer.merge.sparsify import (
    MagnitudeSelector,
    dare_keep_mask,
    derive_seed,
    keep_count,
    outlier_counts,
    probability_keep_mask,
    rank_keep_probability,
    topk_keep_mask,
)

# -- inputs and results ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraUpdate:
    """One adapter's update of one module, in the orientation of the base weight: ``Delta = scale * B @ A``."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float
    weight: float = 1.0
    #: Names the adapter (its language): keys DARE's random mask.
    key: str = ""

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.B.shape[0]), int(self.A.shape[1])

    def dense(self) -> torch.Tensor:
        """The update as a dense float32 matrix."""
        return (self.B.float() @ self.A.float()).mul_(self.scale)


@dataclass(frozen=True)
class LowRankDelta:
    """A merged update given exactly by factors: ``Delta = B @ A``."""

    B: torch.Tensor
    A: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def dense(self) -> torch.Tensor:
        return self.B @ self.A

    def add_to(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight += Delta`` in place, without materialising Delta: float32 arithmetic, one block of rows at a time."""
        for r0, r1 in row_blocks(weight.shape[0], weight.shape[1], weight.device):
            if weight.dtype == torch.float32:
                weight[r0:r1].addmm_(self.B[r0:r1], self.A)
            else:
                weight[r0:r1] = torch.addmm(weight[r0:r1].float(), self.B[r0:r1], self.A).to(weight.dtype)
        return weight


@dataclass(frozen=True)
class DenseDelta:
    """A merged update that is not low rank."""

    delta: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.delta

    def add_to(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight += Delta`` in place: float32 arithmetic, one block of rows at a time."""
        for r0, r1 in row_blocks(weight.shape[0], weight.shape[1], weight.device):
            if weight.dtype == torch.float32:
                weight[r0:r1].add_(self.delta[r0:r1])
            else:
                weight[r0:r1] = (weight[r0:r1].float() + self.delta[r0:r1]).to(weight.dtype)
        return weight


MergedDelta = LowRankDelta | DenseDelta


# -- parameter schema ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One declared method parameter: its name (the Python name of ``MergeParameters``), default and check."""

    name: str
    default: Any
    check: Callable[[Any], bool]
    requirement: str
    convert: Callable[[Any], Any] = float

    def resolve(self, value: Any) -> Any:
        if value is None:
            return self.default
        try:
            value = self.convert(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"parameter {self.name}: {value!r} is not {self.requirement}") from err
        if not self.check(value):
            raise ValueError(f"parameter {self.name}: {value!r} is not {self.requirement}")
        return value


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"{value!r} is not a boolean")


def _to_str(value: Any) -> str:
    return str(value.value if isinstance(value, StrEnum) else value)


#: Check, requirement text and conversion of every method parameter; defaults come from the operator's catalogue.
PARAMETER_CHECKS: dict[str, tuple[Callable[[Any], bool], str, Callable[[Any], Any]]] = {
    "density": (lambda v: 0.0 < v <= 1.0, "a number in (0, 1]", float),
    "lambda_": (lambda v: 0.0 < v <= 100.0, "a number in (0, 100]", float),
    "seed": (lambda v: 0 <= v <= 2**31 - 1, "an integer in [0, 2**31-1]", int),
    "knots_merge": (lambda v: v in tuple(KnotsMerge), " or ".join(repr(k.value) for k in KnotsMerge), _to_str),
    "normalize": (lambda v: isinstance(v, bool), "true or false", _to_bool),
    "rescale": (lambda v: v in RESCALE_CHOICES, " or ".join(RESCALE_CHOICES), _to_str),
    "gamma": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)", float),
    "epsilon": (lambda v: 0.0 < v < 0.5, "a number in (0, 0.5)", float),
    "select_topk": (lambda v: 0.0 < v <= 1.0, "a number in (0, 1]", float),
    "filter_wise": (lambda v: isinstance(v, bool), "true or false", _to_bool),
    "sv_fraction": (lambda v: 0.0 < v <= 1.0, "a number in (0, 1]", float),
    "common_space_fraction": (lambda v: 0.0 < v <= 1.0, "a number in (0, 1]", float),
}


def catalogue_schema(method: str) -> dict[str, Param]:
    """The declared parameters of a catalogued method (``langmerge.merge_catalogue.METHODS``), with its defaults."""
    out = {}
    for name, default in METHODS[method].defaults.items():
        check, requirement, convert = PARAMETER_CHECKS[name]
        out[name] = Param(name, default, check, requirement, convert)
    return out


class MergeMethod(ABC):
    """A registered merge method. Subclasses declare ``name`` and ``low_rank_exact``; ``schema`` and the summary are the
    catalogue's."""

    name: str
    low_rank_exact: bool

    @property
    def summary(self) -> str:
        return METHODS[self.name].summary

    @property
    def schema(self) -> Mapping[str, Param]:
        """Parameters beyond the common ones (weights, include_modules, exclude_modules): the catalogue's, unless a
        method says otherwise."""
        return catalogue_schema(self.name)

    @property
    def parameters(self) -> frozenset[str]:
        return frozenset(self.schema)

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Validate the method's own parameters (common ones are ignored here) and fill in defaults."""
        unknown = sorted(set(given) - set(self.schema) - COMMON_PARAMETERS)
        if unknown:
            raise ValueError(
                f"parameters {', '.join(unknown)} do not apply to method {self.name!r} "
                f"(it accepts: {', '.join(sorted(set(self.schema) | COMMON_PARAMETERS))})"
            )
        resolved = {name: param.resolve(given.get(name)) for name, param in sorted(self.schema.items())}
        if (
            "epsilon" in resolved
            and not 0.0 < resolved["density"] - resolved["epsilon"] < resolved["density"] + (resolved["epsilon"]) < 1.0
        ):
            raise ValueError(
                f"{self.name}: density +- epsilon must lie in (0, 1) "
                f"(density {resolved['density']}, epsilon {resolved['epsilon']})"
            )
        return resolved

    @abstractmethod
    def merge(self, module: str, updates: Sequence[LoraUpdate], params: Mapping[str, Any]) -> MergedDelta:
        """Merge one module's updates. ``params`` is the output of :meth:`resolve`."""


REGISTRY: dict[str, MergeMethod] = {}

_M = TypeVar("_M", bound=MergeMethod)


@overload
def register(method: type[_M]) -> type[_M]: ...


@overload
def register(method: _M) -> _M: ...


def register(method: type[_M] | _M) -> type[_M] | _M:
    """Add a method to :data:`REGISTRY`: a method instance, or (as a class decorator) a class built without arguments."""
    instance = method() if isinstance(method, type) else method
    if instance.name in REGISTRY:
        raise ValueError(f"merge method {instance.name!r} is registered twice")
    REGISTRY[instance.name] = instance
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(REGISTRY)}") from None


# -- combining dense updates -----------------------------------------------------------------------------------------


def combine_dense(items: Iterable[tuple[float, torch.Tensor]], *, consensus: bool, normalize: bool) -> torch.Tensor:
    """Combine dense (already sparsified) updates ``T_i`` with weights ``w_i >= 0``, one at a time (consumes them).

    Without ``consensus``: ``sum w_i T_i`` (divided by ``sum w_i`` when ``normalize``). With ``consensus`` (TIES'
    elect + disjoint mean; without ``normalize`` the disjoint sum ``(S + e A) / 2``), four running sums replace the stack of N tensors: ``S = sum w T``, ``A = sum w |T|``,
    ``Z = sum w sign(T)``, ``C = sum w |sign(T)|``. The positive mass is ``(A + S) / 2``, the negative ``(S - A) / 2``,
    the weight behind each sign ``(C +- Z) / 2``; with the elected sign ``e = sign(S)`` (+1 where S = 0) the disjoint
    weighted mean is ``(S + e A) / (C + e Z)`` (0 where nothing agrees). Every operation is a plain float one.
    """
    iterator: Iterator[tuple[float, torch.Tensor]] = iter(items)
    total_weight = 0.0
    acc: torch.Tensor | None = None
    sums: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    for weight, tensor in iterator:
        total_weight += weight
        if consensus:
            if sums is None:
                sums = tuple(torch.zeros_like(tensor) for _ in range(4))  # type: ignore[assignment]
            assert sums is not None
            signed, magnitude, sign_sum, count = sums
            signed.add_(tensor, alpha=weight)
            sign = tensor.sign()
            sign_sum.add_(sign, alpha=weight)
            count.add_(sign.abs_(), alpha=weight)
            del sign
            magnitude.add_(tensor.abs_(), alpha=weight)
        elif acc is None:
            acc = tensor.mul_(weight)
        else:
            acc.add_(tensor, alpha=weight)
        del tensor
    if consensus:
        if sums is None:
            raise ValueError("no updates to merge")
        signed, magnitude, sign_sum, count = sums
        del sums
        elected = torch.where(signed >= 0, 1.0, -1.0).to(signed.dtype)
        numerator = signed.addcmul_(elected, magnitude)
        del magnitude
        if not normalize:  # the sum of the agreeing entries
            return numerator.mul_(0.5)
        denominator = count.addcmul_(elected, sign_sum)
        del sign_sum, elected
        return numerator.div_(denominator.masked_fill_(denominator <= 0, 1.0))
    if acc is None:
        raise ValueError("no updates to merge")
    if normalize:
        if total_weight <= 0:
            raise ValueError("the weights sum to zero: nothing to average")
        acc.div_(total_weight)
    return acc


class Sparsify(StrEnum):
    NONE = "none"
    #: Exactly the top int(density * n) magnitudes (TIES, magnitude pruning).
    MAGNITUDE = "magnitude"
    #: Each entry kept with probability density (DARE).
    RANDOM = "random"
    #: The int(density * n) magnitudes below the int(gamma * n) largest (Model Breadcrumbs).
    OUTLIERS = "outliers"
    #: Each entry kept with a probability that grows with its magnitude rank in its row (DELLA).
    RANK_SAMPLED = "rank-sampled"


def trim_(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly the top ``int(density * numel)`` entries by magnitude (in place)."""
    k = keep_count(tensor.numel(), density)
    if k >= tensor.numel():
        return tensor
    keep = topk_keep_mask(tensor.abs(), k)
    return tensor.mul_(keep)


def stack_factors(updates: Sequence[LoraUpdate], coefficients: Sequence[float]) -> LowRankDelta:
    """``sum c_i scale_i B_i A_i`` as exact stacked factors (float32)."""
    B = torch.cat([u.B.float() * (c * u.scale) for u, c in zip(updates, coefficients, strict=True)], dim=1)
    A = torch.cat([u.A.float() for u in updates], dim=0)
    return LowRankDelta(B, A)


#: Below this L1 norm (before or after dropping) a tensor is not rescaled to keep its norm (as mergekit).
L1_RESCALE_EPS = 1e-7


# -- the methods -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskArithmetic(MergeMethod):
    """Generalised task arithmetic: optional sparsification, optional sign consensus, optional normalisation.

    ``normalize`` is the default of methods without a ``normalize`` parameter; the others read it from their
    parameters (defaults in the catalogue). The declared parameters are the catalogue's (``langmerge.merge_catalogue``).
    """

    name: str
    sparsify: Sparsify = Sparsify.NONE
    consensus: bool = False
    normalize: bool = False
    scaled: bool = True
    _schema: dict[str, Param] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_schema", catalogue_schema(self.name))
        if "normalize" in self._schema:  # parameters that leave it out get the catalogue's default
            object.__setattr__(self, "normalize", bool(self._schema["normalize"].default))

    @property
    def schema(self) -> Mapping[str, Param]:
        return self._schema

    @property
    def low_rank_exact(self) -> bool:  # type: ignore[override]
        return self.sparsify is Sparsify.NONE and not self.consensus

    def merge(self, module: str, updates: Sequence[LoraUpdate], params: Mapping[str, Any]) -> MergedDelta:
        if not updates:
            raise ValueError(f"{module}: no updates to merge")
        lam = float(params.get("lambda_", 1.0)) if self.scaled else 1.0
        if self.low_rank_exact:
            total = sum(u.weight for u in updates) if self.normalize else 1.0
            if total <= 0:
                raise ValueError(f"{module}: the weights sum to zero: nothing to average")
            return stack_factors(updates, [lam * u.weight / total for u in updates])
        merged = self._merge_dense(module, updates, params)
        return DenseDelta(merged.mul_(lam) if lam != 1.0 else merged)

    def _merge_dense(self, module: str, updates: Sequence[LoraUpdate], params: Mapping[str, Any]) -> torch.Tensor:
        """Two passes over row blocks: fit each update's selection on the whole update, then combine block by block.

        Holding N dense updates (or even the method's four accumulators) for a whole module is what makes TIES
        memory-hungry; here the first pass holds one update's magnitudes at a time and the second pass only a block
        of rows of everything, so the working space is about twice one module in float32 whatever N is. Each block
        of an update is computed the same way in both passes (``s * B[rows] @ A``), so the selection fitted in the
        first pass applies exactly in the second.
        """
        density = float(params.get("density", 1.0))
        seed = int(params.get("seed", 0))
        normalize = bool(params.get("normalize", self.normalize))
        rescale = str(params.get("rescale", "none"))
        epsilon = float(params.get("epsilon", 0.0))
        sparsify = self.sparsify if density < 1.0 else Sparsify.NONE
        random = sparsify in (Sparsify.RANDOM, Sparsify.RANK_SAMPLED)
        active = [u for u in updates if not (self.consensus and u.weight == 0)]
        if not active:
            raise ValueError(f"{module}: every adapter has weight 0")
        rows, cols = active[0].shape
        device = active[0].B.device
        blocks = row_blocks(rows, cols, device)
        # the scale folded into B once: each block is then one matrix product
        active = [LoraUpdate(u.B.float() * u.scale, u.A.float(), 1.0, u.weight, u.key) for u in active]
        keys = [derive_seed(seed, module, u.key) for u in active]

        def random_keep(block: torch.Tensor, key: int, r0: int) -> tuple[torch.Tensor, torch.Tensor | float]:
            """(mask, keep probability) of a block of rows of one update."""
            if sparsify is Sparsify.RANDOM:
                return dare_keep_mask(block.shape, density, key, device, offset=r0 * cols), density
            probability = rank_keep_probability(block, density, epsilon)
            return probability_keep_mask(probability, key, offset=r0 * cols), probability

        selectors: list[tuple[MagnitudeSelector, MagnitudeSelector | None] | None] = []
        factors: list[float] = []
        for u, key in zip(active, keys, strict=True):
            selector = None
            factor = 1.0
            if sparsify in (Sparsify.MAGNITUDE, Sparsify.OUTLIERS):
                magnitude = torch.empty(rows, cols, device=device)
                for r0, r1 in blocks:
                    magnitude[r0:r1] = dense_rows(u, r0, r1).abs_()
                if sparsify is Sparsify.MAGNITUDE:
                    selector = (MagnitudeSelector(magnitude, density), None)
                else:
                    outer, top = outlier_counts(rows * cols, density, float(params.get("gamma", 0.0)))
                    selector = (MagnitudeSelector(magnitude, k=outer), MagnitudeSelector(magnitude, k=top))
                del magnitude
            elif random and rescale == "l1":
                before = after = 0.0
                for r0, r1 in blocks:
                    block = dense_rows(u, r0, r1).abs_()
                    keep, _ = random_keep(block, key, r0)
                    before += float(block.sum())
                    after += float(block.masked_fill_(~keep, 0.0).sum())
                if before >= L1_RESCALE_EPS and after >= L1_RESCALE_EPS:
                    factor = before / after
            selectors.append(selector)
            factors.append(factor)
        out = torch.empty(rows, cols, device=device)

        def block_items(r0: int, r1: int) -> Iterator[tuple[float, torch.Tensor]]:
            for u, selector, key, factor in zip(active, selectors, keys, factors, strict=True):
                block = dense_rows(u, r0, r1)
                if selector is not None:
                    keep = selector[0].mask(block)
                    if selector[1] is not None:
                        keep &= ~selector[1].mask(block)
                    block = block.masked_fill_(~keep, 0.0)
                elif random:
                    keep, probability = random_keep(block, key, r0)
                    block = block.masked_fill_(~keep, 0.0)
                    if rescale == "inverse-density":
                        block = block.div_(probability)
                    elif factor != 1.0:
                        block = block.mul_(factor)
                yield u.weight, block

        for r0, r1 in blocks:
            out[r0:r1] = combine_dense(block_items(r0, r1), consensus=self.consensus, normalize=normalize)
        return out


#: Entries per row block of the dense methods' passes on the CPU (small blocks stay in cache and bound memory);
#: elsewhere (GPUs) blocks are large so that a module takes few kernel launches.
CPU_BLOCK_ELEMENTS: int = 1 << 16
DEVICE_BLOCK_ELEMENTS: int = 1 << 26


def row_blocks(rows: int, cols: int, device: torch.device) -> list[tuple[int, int]]:
    budget = CPU_BLOCK_ELEMENTS if device.type == "cpu" else DEVICE_BLOCK_ELEMENTS
    step = max(1, budget // max(cols, 1))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def dense_rows(update: LoraUpdate, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of an update as float32: ``scale * B[r0:r1] @ A``."""
    block = update.B[r0:r1].float() @ update.A.float()
    return block if update.scale == 1.0 else block.mul_(update.scale)


register(TaskArithmetic("linear", normalize=True, scaled=False))
register(TaskArithmetic("task_arithmetic"))
register(TaskArithmetic("ties", sparsify=Sparsify.MAGNITUDE, consensus=True))
register(TaskArithmetic("dare_linear", sparsify=Sparsify.RANDOM))
register(TaskArithmetic("dare_ties", sparsify=Sparsify.RANDOM, consensus=True))
register(TaskArithmetic("magnitude_prune", sparsify=Sparsify.MAGNITUDE))
register(TaskArithmetic("cat", scaled=False))
register(TaskArithmetic("breadcrumbs", sparsify=Sparsify.OUTLIERS))
register(TaskArithmetic("breadcrumbs_ties", sparsify=Sparsify.OUTLIERS, consensus=True))
register(TaskArithmetic("della", sparsify=Sparsify.RANK_SAMPLED, consensus=True))
register(TaskArithmetic("della_linear", sparsify=Sparsify.RANK_SAMPLED))


@register
class Knots(MergeMethod):
    """KnOTS: merge the updates' coordinates in the SVD basis of their concatenation, then map back."""

    name = "knots"
    low_rank_exact = True
    #: Singular values below this fraction of the largest are dropped (no support).
    relative_cutoff: ClassVar[float] = 1e-7

    def merge(self, module: str, updates: Sequence[LoraUpdate], params: Mapping[str, Any]) -> MergedDelta:
        if not updates:
            raise ValueError(f"{module}: no updates to merge")
        lam = float(params["lambda_"])
        density = float(params["density"])
        ties = params["knots_merge"] == KnotsMerge.TIES.value
        basis, coordinates = knots_align(updates, self.relative_cutoff)
        items = (
            (u.weight, trim_(x, density) if ties else x)
            for u, x in zip(updates, coordinates, strict=True)
            if not (ties and u.weight == 0)
        )
        merged = combine_dense(items, consensus=ties, normalize=True)  # TIES' disjoint mean, or the average
        return LowRankDelta(basis, merged.mul_(lam) if lam != 1.0 else merged)


def knots_align(
    updates: Sequence[LoraUpdate], relative_cutoff: float = 1e-7
) -> tuple[torch.Tensor, Iterator[torch.Tensor]]:
    """The shared basis ``U`` (m x R') and, lazily, each update's coordinates ``X_i`` (R' x n): ``Delta_i = U X_i``.

    ``[Delta_1 ... Delta_n] = [s_1 B_1 ... s_n B_n] blockdiag(A_1 ... A_n)``: the thin QR of the stacked B's and of
    each ``A_i^T`` reduces the SVD of the concatenation to that of a small core.
    """
    stacked_B = torch.cat([u.B.float() * u.scale for u in updates], dim=1)
    q_b, r_b = torch.linalg.qr(stacked_B)
    del stacked_B
    q_as: list[torch.Tensor] = []
    r_as: list[torch.Tensor] = []
    for u in updates:
        q_a, r_a = torch.linalg.qr(u.A.float().T)
        q_as.append(q_a)
        r_as.append(r_a)
    core = r_b.double() @ torch.block_diag(*[r.double().T for r in r_as])  # type: ignore[no-untyped-call]
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)
    support = s > s[0] * relative_cutoff if s.numel() and float(s[0]) > 0 else s > 0
    u_c, s, vh_c = u_c[:, support], s[support], vh_c[support]
    basis = q_b @ u_c.float()
    scaled = (s[:, None] * vh_c).float()  # R' x sum(rank of A_i)
    widths = [int(r.shape[0]) for r in r_as]

    def coordinates() -> Iterator[torch.Tensor]:
        start = 0
        for q_a, width in zip(q_as, widths, strict=True):
            yield scaled[:, start : start + width] @ q_a.T
            start += width

    return basis, coordinates()


@register
class Sce(MergeMethod):
    """SCE (Wan et al. 2024, arXiv 2408.07990): select, calculate, erase.

    Per module: keep the ``select_topk`` share of entries whose values vary most across the updates (population
    variance; ``int(select_topk * nonzero variances)`` entries), weight each update by its mean squared (kept) entry
    normalised to sum 1, elect each entry's sign by the plain sum, and average the agreeing entries with those
    weights. Language weights multiply the calculated ones (all 1: exactly mergekit's ``sce``); an update with
    weight 0 takes no part. Three passes over row blocks keep the working space near two float32 copies of a module.
    """

    name = "sce"
    low_rank_exact = False

    def merge(self, module: str, updates: Sequence[LoraUpdate], params: Mapping[str, Any]) -> MergedDelta:
        active = [LoraUpdate(u.B.float() * u.scale, u.A.float(), 1.0, u.weight, u.key) for u in updates if u.weight]
        if not active:
            raise ValueError(f"{module}: every adapter has weight 0")
        lam = float(params.get("lambda_", 1.0))
        topk = float(params.get("select_topk", 1.0))
        rows, cols = active[0].shape
        device = active[0].B.device
        blocks = row_blocks(rows, cols, device)
        keep: torch.Tensor | None = None
        if topk < 1.0:
            variance = torch.empty(rows, cols, device=device)
            for r0, r1 in blocks:
                variance[r0:r1] = torch.stack([dense_rows(u, r0, r1) for u in active]).var(dim=0, unbiased=False)
            keep = topk_keep_mask(variance, int(int(torch.count_nonzero(variance)) * topk))
            del variance

        def selected(r0: int, r1: int) -> list[torch.Tensor]:
            out = [dense_rows(u, r0, r1) for u in active]
            if keep is not None:
                out = [t.masked_fill_(~keep[r0:r1], 0.0) for t in out]
            return out

        squares = [0.0] * len(active)
        for r0, r1 in blocks:
            for i, t in enumerate(selected(r0, r1)):
                squares[i] += float(t.double().square().sum())
        means = [sq / (rows * cols) for sq in squares]
        total = sum(means)
        calculated = [m / total for m in means] if abs(total) >= 1e-6 else [1.0 / len(active)] * len(active)
        weights = [c * u.weight for c, u in zip(calculated, active, strict=True)]
        out = torch.empty(rows, cols, device=device)
        for r0, r1 in blocks:
            tensors = selected(r0, r1)
            elected = torch.where(torch.stack(tensors).sum(0) >= 0, 1.0, -1.0)
            numerator = torch.zeros_like(elected)
            denominator = torch.zeros_like(elected)
            for w, t in zip(weights, tensors, strict=True):
                agree = (t.sign() == elected).float()
                numerator.addcmul_(t, agree, value=w)
                denominator.add_(agree, alpha=w)
            out[r0:r1] = numerator.div_(denominator.clamp_(min=1e-6))
        return DenseDelta(out.mul_(lam) if lam != 1.0 else out)


@register
class ModelStock(MergeMethod):
    """Model Stock (Jang et al. 2024, arXiv 2403.19522) on the updates: ``t * mean(D_i)`` with
    ``t = N cos / (1 + (N - 1) cos)``, ``cos`` the mean pairwise cosine of the updates over the whole tensor (per
    row with ``filter_wise``; 0 where the denominator vanishes, as mergekit). The result is the weighted mean scaled
    by t, exactly low rank; the cosines come from the factors (``<B_a A_a, B_b A_b> = sum((B_a^T B_b) * (A_a A_b^T))``)
    without forming any update. Language weights weight the mean (all 1: mergekit's ``model_stock``)."""

    name = "model_stock"
    low_rank_exact = True

    def merge(self, module: str, updates: Sequence[LoraUpdate], params: Mapping[str, Any]) -> MergedDelta:
        active = [u for u in updates if u.weight]
        if len(active) < 2:
            raise ValueError(f"{module}: model_stock needs at least two updates with a weight above 0")
        filter_wise = bool(params.get("filter_wise", False))
        factors = [(u.B.double() * u.scale, u.A.double()) for u in active]

        def inner(a: int, b: int) -> torch.Tensor:
            (Ba, Aa), (Bb, Ab) = factors[a], factors[b]
            if filter_wise:  # row i: B_a[i] (A_a A_b^T) B_b[i]^T
                return ((Ba @ (Aa @ Ab.T)) * Bb).sum(dim=1)
            return ((Ba.T @ Bb) * (Aa @ Ab.T)).sum()

        norms = [inner(i, i).clamp(min=0).sqrt() for i in range(len(active))]
        cosines = [
            (inner(a, b) / (norms[a] * norms[b]).clamp(min=1e-6)).clamp(-1.0, 1.0)
            for a in range(len(active))
            for b in range(a + 1, len(active))
        ]
        cos = torch.stack(cosines).mean(dim=0)
        n = len(active)
        denominator = 1 + (n - 1) * cos
        singular = denominator.abs() < 1e-6
        t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denominator))
        total = sum(u.weight for u in active)
        merged = stack_factors(active, [u.weight / total for u in active])
        if filter_wise:
            return LowRankDelta(merged.B * t.float()[:, None], merged.A)
        return LowRankDelta(merged.B * float(t), merged.A)


# -- methods on singular vectors: TSV-Merge, Iso-C, Iso-CTS ----------------------------------------------------------

#: Singular values at or below this fraction of the largest one they are compared with count as zero. Their SVDs run
#: in float64, where an exactly rank-deficient update (a LoRA B with columns never trained, two updates that share
#: directions) leaves about 1e-16 of its scale: such directions have no support, and an isotropic spectrum would
#: otherwise raise them to the mean singular value.
SPECTRAL_CUTOFF: float = 1e-9


@dataclass(frozen=True)
class SpectralPart:
    """Singular triplets of (part of) an update: ``U diag(S) Vh`` (float64, ``U``: m x k, ``Vh``: k x n)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    def top(self, k: int) -> SpectralPart:
        return SpectralPart(self.U[:, :k], self.S[:k], self.Vh[:k])


def weighted_factors(update: LoraUpdate) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w s B, A)`` in float64: the factors of the weighted update ``w_i D_i``."""
    return update.B.double() * (update.weight * update.scale), update.A.double()


def spectral_parts(B: torch.Tensor, A: torch.Tensor, floor: float = 0.0) -> SpectralPart:
    """The SVD of ``B @ A`` from its factors (thin QR of both, SVD of the small core), with only the singular values
    above ``floor`` and above :data:`SPECTRAL_CUTOFF` times the largest."""
    left, values, right = svd_from_factors(B, A)
    whole = SpectralPart(left, values, right)
    if not values.numel() or float(values[0]) <= 0.0:
        return whole.top(0)
    zero = max(floor, float(values[0]) * SPECTRAL_CUTOFF)
    return whole.top(int((values > zero).sum()))


def procrustes(M: torch.Tensor) -> torch.Tensor:
    """The orthogonal Procrustes (polar) factor ``P Q^T`` of ``M = P Sigma Q^T`` (m x K): the matrix with
    orthonormal columns nearest to ``M`` (TSV-Merge's and Iso-CTS's orthogonalisation), from the thin QR of ``M`` and
    the SVD of its small triangle. Where ``M`` is rank-deficient (two updates with exactly the same directions) only
    its range counts (the partial isometry ``P_1 Q_1^T`` of its non-zero singular values): the directions a full
    polar factor would complete it with are arbitrary, outside every update."""
    q, r = torch.linalg.qr(M)
    p, sigma, qh = torch.linalg.svd(r, full_matrices=False)
    support = int((sigma > float(sigma[0]) * SPECTRAL_CUTOFF).sum()) if sigma.numel() else 0
    return (q @ p[:, :support]) @ qh[:support]


def _active(module: str, updates: Sequence[LoraUpdate]) -> list[LoraUpdate]:
    """The updates with a weight above 0 (an update of weight 0 takes no part, nor a share of the rank)."""
    active = [u for u in updates if u.weight > 0]
    if not active:
        raise ValueError(f"{module}: every adapter has weight 0" if updates else f"{module}: no updates to merge")
    return active


def _stacked(updates: Sequence[LoraUpdate]) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of ``sum w_i D_i`` (float64): ``[w_1 s_1 B_1 ... w_n s_n B_n]`` and ``[A_1; ...; A_n]``."""
    factors = [weighted_factors(u) for u in updates]
    return torch.cat([B for B, _ in factors], dim=1), torch.cat([A for _, A in factors], dim=0)


def _result(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, shape: tuple[int, int]) -> LowRankDelta:
    """``U diag(S) Vh`` as float32 factors; an all-zero update (nothing has support) as rank-1 zero factors."""
    if not S.numel():
        return LowRankDelta(
            U.new_zeros(shape[0], 1, dtype=torch.float32), Vh.new_zeros(1, shape[1], dtype=torch.float32)
        )
    return LowRankDelta((U * S).float().contiguous(), Vh.float().contiguous())


def tsv_ranks(ranks: Sequence[int], fraction: float, rows: int, cols: int) -> list[int]:
    """Components each update keeps in TSV-Merge: the top ``floor(fraction * rank_i)`` (at least 1), at most
    ``min(rows, cols) // N`` (the paper's share: the kept ranks sum to at most the module's dimension; at least 1)."""
    cap = max(1, min(rows, cols) // max(1, len(ranks)))
    return [min(cap, max(1, math.floor(fraction * r + 1e-9))) if r else 0 for r in ranks]


@register
class Tsv(MergeMethod):
    """TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025).

    Per module: the SVD of each weighted update ``w_i D_i = U_i S_i V_i^T``; each keeps its top components
    (:func:`tsv_ranks`: the paper keeps ``min(rows, cols) / N`` of a full-rank task matrix; a LoRA update of rank
    ``r_i`` keeps ``floor(sv_fraction * r_i)`` of its non-zero ones). The kept ``U_i``, ``S_i``, ``V_i`` are put side
    by side, ``U = [U_1 ... U_N]`` and ``V = [V_1 ... V_N]`` are orthogonalised by Procrustes (the paper's SVD-based
    whitening: ``U = P Sigma Q^T -> P Q^T``), removing the interference between the tasks' directions, and the
    merge is ``lambda * U_perp diag(S) V_perp^T``. Updates whose directions are already orthogonal come out as their
    weighted sum. Exactly low rank (``sum`` of the kept ranks), returned as factors.
    """

    name = "tsv"
    low_rank_exact = True

    def merge(self, module: str, updates: Sequence[LoraUpdate], params: Mapping[str, Any]) -> MergedDelta:
        active = _active(module, updates)
        lam = float(params["lambda_"])
        parts = [spectral_parts(*weighted_factors(u)) for u in active]
        rows, cols = active[0].shape
        ranks = tsv_ranks([p.rank for p in parts], float(params["sv_fraction"]), rows, cols)
        kept = [p.top(k) for p, k in zip(parts, ranks, strict=True)]
        U = torch.cat([p.U for p in kept], dim=1)
        S = torch.cat([p.S for p in kept])
        Vh = torch.cat([p.Vh for p in kept], dim=0)
        if not S.numel():
            return _result(U, S, Vh, (rows, cols))
        return _result(procrustes(U), S * lam, procrustes(Vh.T).T, (rows, cols))


@register
class IsoC(MergeMethod):
    """Iso-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces",
    arXiv 2502.04959): the task-arithmetic sum ``sum w_i D_i = U diag(s) V^T`` with a flat (isotropic) spectrum,
    ``lambda * mean(s) * U V^T``. Only the non-zero part of the spectrum counts: the sum of LoRA updates has rank at
    most ``sum r_i``, and the paper's full-rank task matrices have no zero singular values to average in (or to
    raise to the mean along arbitrary null directions). Exactly low rank, returned as factors."""

    name = "iso_c"
    low_rank_exact = True

    def merge(self, module: str, updates: Sequence[LoraUpdate], params: Mapping[str, Any]) -> MergedDelta:
        active = _active(module, updates)
        total = spectral_parts(*_stacked(active))
        flat = torch.full_like(total.S, float(total.S.mean()) * float(params["lambda_"])) if total.rank else total.S
        return _result(total.U, flat, total.Vh, active[0].shape)


def iso_cts_split(rank: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(common directions, task-specific directions per update) of Iso-CTS for a merged rank ``rank``: the paper's
    ``int(rank * fraction)`` common ones, adjusted so that the rest divides evenly between the ``tasks`` updates
    (``round((rank - common) / tasks)`` each), keeping at least one common direction."""
    if rank <= 0:
        return 0, 0
    common = int(rank * fraction)
    per_task = min(round((rank - common) / tasks), (rank - 1) // tasks)
    return rank - per_task * tasks, per_task


@register
class IsoCts(MergeMethod):
    """Iso-CTS (Marczak et al. 2025, arXiv 2502.04959): isotropic merging in the common and task-specific subspaces.

    ``sum w_i D_i = U diag(s) V^T`` (its non-zero part, rank ``R``, the paper's ``min(rows, cols)`` for full-rank task
    matrices); its top ``k`` directions are the common subspace (:func:`iso_cts_split`: ``k`` about
    ``common_space_fraction * R``, the remaining ``R - k`` split evenly between the N updates). Each weighted update
    projected off the common subspace, ``(I - U_k U_k^T) w_i D_i``, gives its top ``(R - k) / N`` directions (only
    those with support). The common and task-specific ``U``'s and ``V``'s are put side by side and orthogonalised by
    Procrustes, and the spectrum is isotropic: ``lambda * mean(S) * U_perp V_perp^T`` with ``S`` every kept singular
    value. ``common_space_fraction`` 1.0 is Iso-C; so is one update. Exactly low rank, returned as factors."""

    name = "iso_cts"
    low_rank_exact = True

    def merge(self, module: str, updates: Sequence[LoraUpdate], params: Mapping[str, Any]) -> MergedDelta:
        active = _active(module, updates)
        total = spectral_parts(*_stacked(active))
        if not total.rank:
            return _result(total.U, total.S, total.Vh, active[0].shape)
        common, per_task = iso_cts_split(total.rank, len(active), float(params["common_space_fraction"]))
        parts = [total.top(common)]
        basis = parts[0].U
        if per_task:
            for u in active:
                B, A = weighted_factors(u)
                # zero below the largest of this update's and the sum's scales: ||D||_F from the factors
                scale = max(float(total.S[0]), float(((B.T @ B) * (A @ A.T)).sum().clamp(min=0.0).sqrt()))
                outside = spectral_parts(B - basis @ (basis.T @ B), A, floor=scale * SPECTRAL_CUTOFF)
                parts.append(outside.top(per_task))
        U = torch.cat([p.U for p in parts], dim=1)
        S = torch.cat([p.S for p in parts])
        Vh = torch.cat([p.Vh for p in parts], dim=0)
        flat = torch.full_like(S, float(S.mean()) * float(params["lambda_"]))
        return _result(procrustes(U), flat, procrustes(Vh.T).T, active[0].shape)
