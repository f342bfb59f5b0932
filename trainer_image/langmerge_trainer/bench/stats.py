"""Paired comparisons with confidence intervals: a bootstrap over seeds and test examples.

Every model of a seed is evaluated on the same test examples, and every evaluation keeps its per-example figures
(:class:`langmerge_trainer.classify.LabelScores`, :class:`langmerge_trainer.evaluate.CompletionScores`). The
difference between two models (e.g. merged - joint) is therefore *paired*: per seed, the same examples are drawn for
both. One bootstrap replicate draws the seeds with replacement and, for every drawn seed and language, the test
examples with replacement, and computes the metric of both models on the drawn examples; the difference is averaged
over the drawn seeds (and, for the mean over languages, over the languages). The 95% interval is the 2.5th and
97.5th percentile of :data:`REPLICATES` replicates; the generator is seeded, so a report renders the same interval
from the same record every time.

Metrics as functions of per-example figures (:func:`example_values`):

* ``accuracy``: the mean of 1 (right) / 0 (wrong);
* ``eval_loss`` of a classifier: the mean loss per example;
* ``eval_loss`` of a causal LM: summed loss over summed completion tokens (a ratio: numerator and denominator are
  drawn together);
* ``token_accuracy``: right tokens over tokens, the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Bootstrap replicates per interval.
REPLICATES = 2000
#: The interval's coverage.
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate (the plain difference of the means) and its bootstrap interval."""

    estimate: float
    low: float
    high: float
    #: Seeds that entered (those where both models are clean).
    seeds: int

    def as_dict(self) -> dict[str, float | int]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "seeds": self.seeds}


def example_values(scores: Mapping[str, Any], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(numerator, denominator) per example of ``metric`` from a scores record (see :func:`scores_record`): the
    metric over a set of examples is ``sum(numerator) / sum(denominator)``."""
    if "predicted" in scores:  # a classifier
        gold = np.asarray(scores["gold"], dtype=np.int64)
        if metric == "accuracy":
            num = (np.asarray(scores["predicted"], dtype=np.int64) == gold).astype(np.float64)
        elif metric == "eval_loss":
            num = np.asarray(scores["losses"], dtype=np.float64)
        else:
            raise KeyError(f"no per-example form of {metric} for a classifier")
        return num, np.ones_like(num)
    tokens = np.asarray(scores["tokens"], dtype=np.float64)
    if metric == "eval_loss":
        return np.asarray(scores["loss_sums"], dtype=np.float64), tokens
    if metric == "token_accuracy":
        return np.asarray(scores["correct"], dtype=np.float64), tokens
    raise KeyError(f"no per-example form of {metric} for a causal LM")


def scores_record(scores: Any) -> dict[str, list[Any]]:
    """A JSON-able record of per-example scores (LabelScores or CompletionScores), losses rounded to 1e-6."""
    if hasattr(scores, "predicted"):
        return {
            "gold": list(scores.gold),
            "predicted": list(scores.predicted),
            "losses": [round(x, 6) for x in scores.losses],
        }
    return {
        "loss_sums": [round(x, 6) for x in scores.loss_sums],
        "tokens": list(scores.tokens),
        "correct": list(scores.correct),
    }


def metric_value(scores: Mapping[str, Any], metric: str) -> float:
    num, den = example_values(scores, metric)
    return float(num.sum() / den.sum()) if den.sum() else float("nan")


#: One comparison's data: per seed, per language, the per-example (numerator, denominator) of model A and model B.
Pairs = Sequence[Mapping[str, tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]]]


def paired_difference(
    pairs: Pairs, languages: Sequence[str], *, replicates: int = REPLICATES, seed: int = 0
) -> Interval | None:
    """The difference A - B of a metric, averaged over ``languages`` and over seeds, with its bootstrap interval.

    ``pairs[s][language] = ((numA, denA), (numB, denB))``: the per-example figures of both models on the same examples
    of one seed. Seeds missing a language are left out. None when no seed has every language.
    """
    usable = [p for p in pairs if all(lang in p for lang in languages)]
    if not usable or not languages:
        return None
    rng = np.random.default_rng(seed)
    n_seeds = len(usable)
    for pair in usable:
        for lang in languages:
            (num_a, _), (num_b, _) = pair[lang]
            if len(num_a) == 0 or len(num_a) != len(num_b):
                raise ValueError(f"language {lang}: models scored on different examples ({len(num_a)}, {len(num_b)})")

    def seed_difference(pair: Mapping[str, Any], idx: dict[str, np.ndarray] | None) -> np.ndarray:
        """Mean over languages of A - B on the drawn examples (all examples when ``idx`` is None)."""
        total: np.ndarray = np.zeros(1 if idx is None else len(next(iter(idx.values()))))
        for lang in languages:
            (num_a, den_a), (num_b, den_b) = pair[lang]
            if idx is None:
                sums = [np.array([arr.sum()]) for arr in (num_a, den_a, num_b, den_b)]
            else:
                sums = [arr[idx[lang]].sum(axis=1) for arr in (num_a, den_a, num_b, den_b)]
            with np.errstate(divide="ignore", invalid="ignore"):
                total = total + (sums[0] / sums[1] - sums[2] / sums[3]) / len(languages)
        return total

    point = float(np.mean([seed_difference(pair, None)[0] for pair in usable]))
    # The seeds share their test examples (a crossed design): a replicate draws the examples of each language once,
    # used for every seed, and the seeds with replacement.
    examples = {lang: len(usable[0][lang][0][0]) for lang in languages}
    for pair in usable:
        if any(len(pair[lang][0][0]) != n for lang, n in examples.items()):
            raise ValueError("seeds scored on different test examples")
    idx = {lang: rng.integers(0, n, size=(replicates, n)) for lang, n in examples.items()}
    per_seed = np.stack([seed_difference(pair, idx) for pair in usable])  # [seed, replicate]
    drawn = rng.integers(0, n_seeds, size=(replicates, n_seeds))
    replicate_means = np.take_along_axis(per_seed.T, drawn, axis=1).mean(axis=1)
    tail = (1.0 - CONFIDENCE) / 2.0
    low, high = np.nanquantile(replicate_means, [tail, 1.0 - tail])
    return Interval(estimate=point, low=float(low), high=float(high), seeds=n_seeds)
