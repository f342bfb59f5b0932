"""The collapse rules (langmerge_trainer.collapse) on the figures of real failure shapes."""

from __future__ import annotations

import math

from langmerge_trainer.collapse import causal_lm_verdict, classifier_verdict, prior_baseline


def test_one_label_for_nearly_every_input_is_a_collapse() -> None:
    verdict = classifier_verdict(
        {"emotion": 41, "money": 1, "science": 0}, gold={"emotion": 12, "money": 15, "science": 15}
    )
    assert verdict.collapsed and "emotion for 41 of 42" in (verdict.reason or "")


def test_a_healthy_spread_of_predictions_is_not() -> None:
    assert not classifier_verdict(
        {"emotion": 14, "money": 13, "science": 15}, gold={"emotion": 12, "money": 15, "science": 15}
    ).collapsed


def test_a_gold_split_dominated_by_one_label_does_not_count_as_a_collapse() -> None:
    assert not classifier_verdict({"emotion": 90, "money": 10}, gold={"emotion": 88, "money": 12}).collapsed


def test_a_loss_at_the_label_frequency_baseline_is_a_collapse_even_with_spread_predictions() -> None:
    gold = {"a": 10, "b": 10, "c": 10}
    prior = {"a": 100, "b": 100, "c": 100}
    baseline = prior_baseline(gold, prior)
    assert baseline is not None and math.isclose(baseline, math.log(3), rel_tol=1e-9)
    flat = classifier_verdict({"a": 10, "b": 9, "c": 11}, gold=gold, eval_loss=baseline * 0.99, prior=prior)
    assert flat.collapsed and "baseline" in (flat.reason or "")
    assert not classifier_verdict({"a": 10, "b": 9, "c": 11}, gold=gold, eval_loss=0.5, prior=prior).collapsed


def test_a_causal_lm_that_does_not_beat_its_base_or_diverges_is_collapsed() -> None:
    assert causal_lm_verdict(5.9, 5.7).collapsed
    assert causal_lm_verdict(float("nan"), 5.7).collapsed
    assert not causal_lm_verdict(4.8, 5.7).collapsed
    assert not causal_lm_verdict(None, 5.7).collapsed
