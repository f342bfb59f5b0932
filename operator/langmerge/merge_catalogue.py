"""The catalogue of merge methods: names, summaries, the parameters each accepts, their choices and defaults.

This is the light half of the merge-method registry, the one place a method is described. The operator validates
``MergedModel`` specs against it, fills in defaults from it (:func:`effective_method_parameters`), and the CRD's enum
is generated from it; the trainer's math (``langmerge_trainer.merge.method_math``) implements exactly these methods,
takes their summaries and defaults from here, and a test checks the two agree.

Parameters that methods gained after the first release (``normalize``, ``rescale`` of the older methods) enter the
effective parameters, and so the merge fingerprint, only when they are set: merges that do not use them keep their
fingerprints. Every parameter of a method added later is always filled in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

#: Parameters every method accepts.
COMMON_PARAMETERS = frozenset({"weights", "include_modules", "exclude_modules"})


#: How KnOTS merges the coordinates in the shared basis (``knots_merge``).
class KnotsMerge(StrEnum):
    TIES = "ties"
    LINEAR = "linear"


class Rescale(StrEnum):
    """How DARE and DELLA rescale the entries they keep."""

    #: Divide each kept entry by its keep probability (1/density for DARE): langmerge's DARE default.
    INVERSE_DENSITY = "inverse-density"
    #: Scale each tensor so that its L1 norm is what it was before dropping (mergekit's ``rescale: true``).
    L1 = "l1"
    #: Keep the entries as they are (mergekit's ``rescale: false``).
    NONE = "none"


#: The values of :class:`Rescale`.
RESCALE_CHOICES = tuple(r.value for r in Rescale)


@dataclass(frozen=True)
class MethodInfo:
    """One merge method as the API sees it."""

    name: str
    summary: str
    #: Parameters beyond :data:`COMMON_PARAMETERS`, with their defaults.
    defaults: Mapping[str, Any]
    #: Whether the merged update of N rank-r adapters is exactly low-rank (rank <= N*r), so that a PEFT adapter output
    #: can be exact rather than a truncated approximation.
    low_rank_exact: bool
    #: Parameters that enter the effective parameters only when set (added after the method's first release).
    only_when_set: frozenset[str] = field(default_factory=frozenset)

    @property
    def parameters(self) -> frozenset[str]:
        return frozenset(self.defaults)


_L = {"lambda_": 1.0}

METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo("linear", "Weighted average of the updates: sum(w_i * D_i) / sum(w_i).", {}, low_rank_exact=True),
        MethodInfo(
            "task_arithmetic", "Scaled weighted sum of the updates: lambda * sum(w_i * D_i).", _L, low_rank_exact=True
        ),
        MethodInfo(
            "ties",
            "TIES: trim each update to its top-density magnitudes, elect each entry's sign by total mass, then "
            "average the agreeing entries (density 1.0 keeps everything; normalize false sums them instead).",
            {"density": 1.0, **_L, "normalize": True},
            low_rank_exact=False,
            only_when_set=frozenset({"normalize"}),
        ),
        MethodInfo(
            "dare_linear",
            "DARE: drop entries at random with probability 1-density, rescale the kept ones (by 1/density, or to "
            "keep the L1 norm), weighted sum (seeded).",
            {"density": 0.5, **_L, "seed": 0, "normalize": False, "rescale": "inverse-density"},
            low_rank_exact=False,
            only_when_set=frozenset({"normalize", "rescale"}),
        ),
        MethodInfo(
            "dare_ties",
            "DARE drop-and-rescale followed by TIES sign election and disjoint mean (seeded).",
            {"density": 0.5, **_L, "seed": 0, "normalize": True, "rescale": "inverse-density"},
            low_rank_exact=False,
            only_when_set=frozenset({"normalize", "rescale"}),
        ),
        MethodInfo(
            "magnitude_prune",
            "Trim each update to its top-density magnitudes, then weighted sum.",
            {"density": 1.0, **_L},
            low_rank_exact=False,
        ),
        MethodInfo(
            "cat",
            "Exact concatenation: stack the adapters' ranks so that B A = sum(w_i * D_i) with no approximation.",
            {},
            low_rank_exact=True,
        ),
        MethodInfo(
            "knots",
            "KnOTS: align the updates in a shared SVD basis, merge their coordinates there with TIES or linear, and "
            "map back.",
            {"density": 1.0, **_L, "knots_merge": "ties"},
            low_rank_exact=True,
        ),
        MethodInfo(
            "breadcrumbs",
            "Model Breadcrumbs: drop the gamma share of largest magnitudes (outliers) and the smallest ones, keeping "
            "a density share of each update, then weighted sum.",
            {"density": 0.9, "gamma": 0.01, **_L, "normalize": False},
            low_rank_exact=False,
        ),
        MethodInfo(
            "breadcrumbs_ties",
            "Model Breadcrumbs sparsification followed by TIES sign election.",
            {"density": 0.9, "gamma": 0.01, **_L, "normalize": False},
            low_rank_exact=False,
        ),
        MethodInfo(
            "della",
            "DELLA: drop entries at random with a keep probability that grows with their magnitude rank in the row "
            "(density +- epsilon), rescale, TIES sign election (seeded).",
            {"density": 0.5, "epsilon": 0.15, **_L, "seed": 0, "normalize": True, "rescale": "l1"},
            low_rank_exact=False,
        ),
        MethodInfo(
            "della_linear",
            "DELLA sparsification, then weighted sum (seeded).",
            {"density": 0.5, "epsilon": 0.15, **_L, "seed": 0, "normalize": False, "rescale": "l1"},
            low_rank_exact=False,
        ),
        MethodInfo(
            "sce",
            "SCE: keep the select_topk share of entries that vary most across the updates, weight each update by "
            "its mean squared entry, elect signs, average the agreeing entries.",
            {"select_topk": 1.0, **_L},
            low_rank_exact=False,
        ),
        MethodInfo(
            "model_stock",
            "Model Stock: the average update scaled by t = N cos / (1 + (N-1) cos), cos the mean pairwise cosine "
            "of the updates (per tensor, or per row with filter_wise).",
            {"filter_wise": False},
            low_rank_exact=True,
        ),
        MethodInfo(
            "tsv",
            "TSV-Merge (Task Singular Vectors): per module, keep each update's top sv_fraction singular components "
            "(at most min(rows, cols)/N per update), concatenate them across updates, orthogonalise the "
            "concatenated singular vectors (Procrustes), lambda * U diag(S) V^T.",
            {"sv_fraction": 1.0, **_L},
            low_rank_exact=True,
        ),
        MethodInfo(
            "iso_c",
            "Iso-C (isotropic merging in the common subspace): the SVD of sum(w_i * D_i) with its non-zero singular "
            "values all replaced by their mean, times lambda.",
            dict(_L),
            low_rank_exact=True,
        ),
        MethodInfo(
            "iso_cts",
            "Iso-CTS: the top common_space_fraction of the directions of sum(w_i * D_i) (common subspace) plus each "
            "update's top directions outside it (task-specific), orthogonalised together, with an isotropic "
            "spectrum (their mean singular value), times lambda.",
            {"common_space_fraction": 0.8, **_L},
            low_rank_exact=True,
        ),
    )
}

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def allowed_parameters(method: str) -> frozenset[str]:
    """Parameter field names (Python names) the method accepts."""
    return COMMON_PARAMETERS | METHODS[method].parameters


def effective_method_parameters(method: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The method's own parameters with defaults filled in (``given``: the set ones, Python names, None = unset)."""
    info = METHODS[method]
    out: dict[str, Any] = {}
    for name, default in info.defaults.items():
        value = given.get(name)
        if value is None and name in info.only_when_set:
            continue
        out[name] = default if value is None else value
    return out
