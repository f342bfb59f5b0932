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

Definitions (weights ``w_i >= 0``, ``lam`` = ``lambda_``)::

    linear           sum w_i D_i / sum w_i
    task_arithmetic  lam * sum w_i D_i
    cat              sum w_i D_i, as stacked factors (exact)
    magnitude_prune  lam * sum w_i trim(D_i)
    dare_linear      lam * sum w_i drop(D_i)
    ties             lam * sum_i w_i T_i [sign T_i = s] / sum_i w_i [sign T_i = s],  T_i = trim(D_i), s = sign(sum w_i T_i)
    dare_ties        the same with T_i = drop(D_i)
    knots            U * merge_{ties|linear}(X_i) * lam

``trim`` keeps exactly the top ``int(density * numel)`` entries by magnitude; ``drop`` keeps each entry with
probability ``density`` (a hash of (seed, module, language, index): reproducible on any device and in any order) and
rescales by ``1 / density``. Where the weighted sum is exactly zero the elected sign is positive (as PEFT).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, TypeVar, overload

import torch

from langmerge.methods import COMMON_PARAMETERS
from langmerge_trainer.merge.sparsify import (
    MagnitudeSelector,
    dare_keep_mask,
    derive_seed,
    keep_count,
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


def _density(default: float) -> Param:
    return Param("density", default, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")


LAMBDA = Param("lambda_", 1.0, lambda v: 0.0 < v <= 100.0, "a number in (0, 100]")
SEED = Param("seed", 0, lambda v: 0 <= v <= 2**31 - 1, "an integer in [0, 2**31-1]", convert=int)


class MergeMethod(ABC):
    """A registered merge method. Subclasses declare ``name``, ``summary``, ``low_rank_exact`` and ``schema``."""

    name: str
    summary: str
    low_rank_exact: bool

    @property
    @abstractmethod
    def schema(self) -> Mapping[str, Param]:
        """Parameters beyond the common ones (weights, include_modules, exclude_modules)."""

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
        return {name: param.resolve(given.get(name)) for name, param in sorted(self.schema.items())}

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
    elect + disjoint mean), four running sums replace the stack of N tensors: ``S = sum w T``, ``A = sum w |T|``,
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
    MAGNITUDE = "magnitude"
    RANDOM = "random"


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


# -- the methods -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskArithmetic(MergeMethod):
    """Generalised task arithmetic: optional sparsification, optional sign consensus, optional normalisation."""

    name: str
    summary: str
    sparsify: Sparsify = Sparsify.NONE
    consensus: bool = False
    normalize: bool = False
    scaled: bool = True
    default_density: float = 1.0
    _schema: dict[str, Param] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        schema: dict[str, Param] = {}
        if self.sparsify is not Sparsify.NONE:
            schema["density"] = _density(self.default_density)
        if self.scaled:
            schema["lambda_"] = LAMBDA
        if self.sparsify is Sparsify.RANDOM:
            schema["seed"] = SEED
        object.__setattr__(self, "_schema", schema)

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
        merged = self._merge_dense(module, updates, float(params.get("density", 1.0)), int(params.get("seed", 0)))
        return DenseDelta(merged.mul_(lam) if lam != 1.0 else merged)

    def _merge_dense(self, module: str, updates: Sequence[LoraUpdate], density: float, seed: int) -> torch.Tensor:
        """Two passes over row blocks: fit each update's selection on the whole update, then combine block by block.

        Holding N dense updates (or even the method's four accumulators) for a whole module is what makes TIES
        memory-hungry; here the first pass holds one update's magnitudes at a time and the second pass only a block
        of rows of everything, so the working space is about twice one module in float32 whatever N is. Each block
        of an update is computed the same way in both passes (``s * B[rows] @ A``), so the selection fitted in the
        first pass applies exactly in the second.
        """
        active = [u for u in updates if not (self.consensus and u.weight == 0)]
        if not active:
            raise ValueError(f"{module}: every adapter has weight 0")
        rows, cols = active[0].shape
        device = active[0].B.device
        blocks = row_blocks(rows, cols, device)
        # the scale folded into B once: each block is then one matrix product
        active = [LoraUpdate(u.B.float() * u.scale, u.A.float(), 1.0, u.weight, u.key) for u in active]
        selectors: list[MagnitudeSelector | None] = []
        for u in active:
            if self.sparsify is Sparsify.MAGNITUDE and density < 1.0:
                magnitude = torch.empty(rows, cols, device=device)
                for r0, r1 in blocks:
                    magnitude[r0:r1] = dense_rows(u, r0, r1).abs_()
                selectors.append(MagnitudeSelector(magnitude, density))
                del magnitude
            else:
                selectors.append(None)
        keys = [derive_seed(seed, module, u.key) for u in active]
        out = torch.empty(rows, cols, device=device)

        def block_items(r0: int, r1: int) -> Iterator[tuple[float, torch.Tensor]]:
            for u, selector, key in zip(active, selectors, keys, strict=True):
                block = dense_rows(u, r0, r1)
                if selector is not None:
                    block = selector.apply_(block)
                elif self.sparsify is Sparsify.RANDOM and density < 1.0:
                    keep = dare_keep_mask(block.shape, density, key, device, offset=r0 * cols)
                    block = block.masked_fill_(~keep, 0.0).div_(density)
                yield u.weight, block

        for r0, r1 in blocks:
            out[r0:r1] = combine_dense(block_items(r0, r1), consensus=self.consensus, normalize=self.normalize)
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


register(
    TaskArithmetic(
        "linear", "Weighted average of the updates: sum(w_i * D_i) / sum(w_i).", normalize=True, scaled=False
    )
)
register(TaskArithmetic("task_arithmetic", "Scaled weighted sum of the updates: lambda * sum(w_i * D_i)."))
register(
    TaskArithmetic(
        "ties",
        "TIES: trim to the top-density magnitudes, elect signs by weighted mass, disjoint weighted mean.",
        sparsify=Sparsify.MAGNITUDE,
        consensus=True,
    )
)
register(
    TaskArithmetic(
        "dare_linear",
        "DARE: seeded random drop (keep = density), rescale by 1/density, weighted sum.",
        sparsify=Sparsify.RANDOM,
        default_density=0.5,
    )
)
register(
    TaskArithmetic(
        "dare_ties",
        "DARE drop-and-rescale, then TIES sign election and disjoint weighted mean.",
        sparsify=Sparsify.RANDOM,
        consensus=True,
        default_density=0.5,
    )
)
register(
    TaskArithmetic(
        "magnitude_prune", "Trim to the top-density magnitudes, then weighted sum.", sparsify=Sparsify.MAGNITUDE
    )
)
register(TaskArithmetic("cat", "Exact concatenation of the adapters' ranks: B A = sum(w_i * D_i).", scaled=False))


class KnotsMerge(StrEnum):
    TIES = "ties"
    LINEAR = "linear"


@register
class Knots(MergeMethod):
    """KnOTS: merge the updates' coordinates in the SVD basis of their concatenation, then map back."""

    name = "knots"
    summary = "KnOTS: align the updates in a shared SVD basis, merge coordinates with TIES or linear, map back."
    low_rank_exact = True
    #: Singular values below this fraction of the largest are dropped (no support).
    relative_cutoff: ClassVar[float] = 1e-7

    @property
    def schema(self) -> Mapping[str, Param]:
        return {
            "density": _density(1.0),
            "lambda_": LAMBDA,
            "knots_merge": Param(
                "knots_merge",
                KnotsMerge.TIES.value,
                lambda v: v in {m.value for m in KnotsMerge},
                "'ties' or 'linear'",
                convert=lambda v: str(v.value if isinstance(v, StrEnum) else v),
            ),
        }

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
        merged = combine_dense(items, consensus=ties, normalize=not ties)
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


def method_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def describe(name: str) -> dict[str, Any]:
    """A method's declared schema, for plans and docs."""
    method = get_method(name)
    return {
        "name": method.name,
        "summary": method.summary,
        "low_rank_exact": method.low_rank_exact,
        "parameters": {p.name: p.default for p in method.schema.values()},
    }
