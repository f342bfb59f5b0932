"""The catalogue of merge methods: names and the parameters each accepts.

This is the light half of the merge-method registry. The operator validates ``MergedModel`` specs against it and the
CRD's enum is generated from it; the trainer's registry (``langmerge_trainer.merge.methods``) implements exactly these
methods (a test checks the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Parameters every method accepts.
COMMON_PARAMETERS = frozenset({"weights", "include_modules", "exclude_modules"})


@dataclass(frozen=True)
class MethodInfo:
    """One merge method as the API sees it."""

    name: str
    summary: str
    #: Parameters beyond :data:`COMMON_PARAMETERS`.
    parameters: frozenset[str]
    #: Whether the merged update of N rank-r adapters is exactly low-rank (rank <= N*r), so that a PEFT adapter output
    #: can be exact rather than a truncated approximation.
    low_rank_exact: bool


METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo(
            "linear",
            "Weighted average of the updates: sum(w_i * D_i) / sum(w_i).",
            frozenset(),
            low_rank_exact=True,
        ),
        MethodInfo(
            "task_arithmetic",
            "Scaled weighted sum of the updates: lambda * sum(w_i * D_i).",
            frozenset({"lambda_"}),
            low_rank_exact=True,
        ),
        MethodInfo(
            "ties",
            "TIES: trim each update to its top-density magnitudes, elect each entry's sign by total mass, then "
            "average the agreeing entries (density 1.0 keeps everything).",
            frozenset({"density", "lambda_"}),
            low_rank_exact=False,
        ),
        MethodInfo(
            "dare_linear",
            "DARE: drop entries at random with probability 1-density, rescale by 1/density, weighted sum (seeded).",
            frozenset({"density", "lambda_", "seed"}),
            low_rank_exact=False,
        ),
        MethodInfo(
            "dare_ties",
            "DARE drop-and-rescale followed by TIES sign election and disjoint mean (seeded).",
            frozenset({"density", "lambda_", "seed"}),
            low_rank_exact=False,
        ),
        MethodInfo(
            "magnitude_prune",
            "Trim each update to its top-density magnitudes, then weighted sum.",
            frozenset({"density", "lambda_"}),
            low_rank_exact=False,
        ),
        MethodInfo(
            "cat",
            "Exact concatenation: stack the adapters' ranks so that B A = sum(w_i * D_i) with no approximation.",
            frozenset(),
            low_rank_exact=True,
        ),
        MethodInfo(
            "knots",
            "KnOTS: align the updates in a shared SVD basis, merge their coordinates there with TIES or linear, and "
            "map back.",
            frozenset({"density", "lambda_", "knots_merge"}),
            low_rank_exact=True,
        ),
    )
}

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def allowed_parameters(method: str) -> frozenset[str]:
    """Parameter field names (Python names) the method accepts."""
    return COMMON_PARAMETERS | METHODS[method].parameters
