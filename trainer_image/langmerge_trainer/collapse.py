"""Is a trained (or merged) model collapsed? Rules on its figures on a held-out split.

A collapsed classifier predicts (nearly) one label for every input: its encoder no longer separates the inputs, and
its loss sits at the level of a model that only knows the label frequencies. A collapsed causal LM has learnt
nothing (its loss is not below the base model's) or diverged. The rules:

* classifier: one label takes at least :data:`COLLAPSE_SHARE` of the predictions while no label is that frequent
  among the gold labels; or the loss is at least :data:`BASELINE_FRACTION` of the *prior baseline*, the cross-entropy
  of always predicting the training data's label frequencies (when the training data has two labels or more: with one,
  the prior is the best such an expert can do);
* causal LM: the loss is not finite, or not below the base model's on the same examples.

The trainer judges every adapter this way before committing it (:func:`adapter_verdict`, unless
``training.collapseCheck`` is false), and the benchmark judges its runs and merged models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from langmerge.api.expert import Metrics

#: Share of the predictions one label must reach for a classifier to count as collapsed.
COLLAPSE_SHARE = 0.8
#: A classifier whose loss is at least this share of the prior baseline has learnt (almost) nothing.
BASELINE_FRACTION = 0.98


@dataclass(frozen=True)
class Verdict:
    collapsed: bool
    reason: str | None = None


HEALTHY = Verdict(False)


def prior_baseline(gold: Mapping[str, int], prior: Mapping[str, int]) -> float | None:
    """Cross-entropy on examples with label counts ``gold`` of always predicting the frequencies ``prior`` (labels
    unseen in ``prior`` get one pseudo-count, so the baseline stays finite)."""
    labels = set(gold) | set(prior)
    total_prior = sum(prior.get(label, 0) + 1 for label in labels)
    total_gold = sum(gold.values())
    if total_gold == 0 or total_prior == 0:
        return None
    return -sum(n / total_gold * math.log((prior.get(label, 0) + 1) / total_prior) for label, n in gold.items() if n)


def classifier_verdict(
    predictions: Mapping[str, int] | None,
    *,
    gold: Mapping[str, int] | None = None,
    eval_loss: float | None = None,
    prior: Mapping[str, int] | None = None,
) -> Verdict:
    """The verdict on a classifier from how often it predicted each label (and, when known, the gold label counts of
    the same examples, its loss and the training label counts)."""
    if eval_loss is not None and not math.isfinite(eval_loss):
        return Verdict(True, f"the loss is {eval_loss}")
    if predictions:
        total = sum(predictions.values())
        label, top = max(predictions.items(), key=lambda kv: (kv[1], kv[0]))
        gold_top = max(gold.values()) / max(1, sum(gold.values())) if gold else 0.0
        if total and top / total >= COLLAPSE_SHARE and gold_top < COLLAPSE_SHARE:
            return Verdict(True, f"predicts {label} for {top} of {total} inputs ({top / total:.0%})")
    if eval_loss is not None and gold and prior and sum(1 for n in prior.values() if n) > 1:
        baseline = prior_baseline(gold, prior)
        if baseline is not None and eval_loss >= BASELINE_FRACTION * baseline:
            return Verdict(
                True, f"loss {eval_loss:.3f} is at the label-frequency baseline {baseline:.3f} (learnt nothing)"
            )
    return HEALTHY


def causal_lm_verdict(eval_loss: float | None, base_eval_loss: float | None) -> Verdict:
    """The verdict on a causal LM from its loss and the base model's on the same examples."""
    if eval_loss is None:
        return HEALTHY
    if not math.isfinite(eval_loss):
        return Verdict(True, f"the loss is {eval_loss}")
    if base_eval_loss is not None and eval_loss >= base_eval_loss:
        return Verdict(True, f"loss {eval_loss:.3f} is not below the base model's {base_eval_loss:.3f}")
    return HEALTHY


def adapter_verdict(
    metrics: Metrics,
    base_metrics: Metrics | None,
    *,
    classifier: bool,
    gold: Mapping[str, int] | None = None,
    prior: Mapping[str, int] | None = None,
) -> Verdict:
    """The verdict on a trained adapter from its figures on its eval split: a classifier's predictions and loss,
    with the gold label counts of those examples and the training label counts (``prior``); a causal LM's loss
    against the base model's (``base_metrics``) on the same examples."""
    if classifier:
        return classifier_verdict(metrics.predictions, gold=gold, eval_loss=metrics.eval_loss, prior=prior)
    return causal_lm_verdict(metrics.eval_loss, base_metrics.eval_loss if base_metrics is not None else None)
