"""Paired bootstrap intervals of the benchmark (langmerge_trainer.bench.stats): a difference of zero, a known shift,
a ratio metric, the crossed design of seeds and examples, and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from langmerge_trainer.bench.stats import example_values, metric_value, paired_difference


def _acc(values: list[int]) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(values, dtype=np.float64)
    return arr, np.ones_like(arr)


def test_identical_models_differ_by_exactly_zero() -> None:
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(4):
        right = _acc(list((rng.random(50) < 0.6).astype(int)))
        pairs.append({"it": (right, right), "ja": (right, right)})
    interval = paired_difference(pairs, ["it", "ja"])
    assert interval is not None
    assert interval.estimate == 0.0 and interval.low == 0.0 and interval.high == 0.0 and interval.seeds == 4


def test_a_shift_is_estimated_and_covered_and_the_interval_is_reproducible() -> None:
    rng = np.random.default_rng(1)
    pairs = []
    for _ in range(5):
        b = (rng.random(200) < 0.5).astype(int)
        a = b.copy()
        a[:20] = 1  # A is right on 20 examples where B may be wrong
        pairs.append({"x": (_acc(list(a)), _acc(list(b)))})
    first = paired_difference(pairs, ["x"])
    again = paired_difference(pairs, ["x"])
    assert first is not None and first == again
    expected = np.mean([(p["x"][0][0].sum() - p["x"][1][0].sum()) / 200 for p in pairs])
    assert first.estimate == pytest.approx(expected)
    assert first.low <= first.estimate <= first.high
    assert first.low > 0.0  # A is never worse on any example: the whole interval is above zero


def test_disagreeing_seeds_widen_the_interval() -> None:
    rng = np.random.default_rng(2)
    base = (rng.random(100) < 0.5).astype(int)
    same = [{"x": (_acc(list(np.maximum(base, np.arange(100) < 10))), _acc(list(base)))} for _ in range(5)]
    varied = []
    for s in range(5):
        better = np.maximum(base, np.arange(100) < 2 * 10 * (s % 2))  # seeds alternate between +0 and +20 examples
        varied.append({"x": (_acc(list(better)), _acc(list(base)))})
    tight, wide = paired_difference(same, ["x"]), paired_difference(varied, ["x"])
    assert tight is not None and wide is not None
    assert (wide.high - wide.low) > (tight.high - tight.low)


def test_a_loss_per_token_is_a_ratio_drawn_with_its_tokens() -> None:
    scores = {"loss_sums": [2.0, 6.0], "tokens": [1, 3], "correct": [1, 0]}
    assert metric_value(scores, "eval_loss") == pytest.approx(8.0 / 4.0)
    assert metric_value(scores, "token_accuracy") == pytest.approx(1 / 4)
    classifier = {"gold": [0, 1, 2], "predicted": [0, 1, 1], "losses": [0.1, 0.2, 0.9]}
    assert metric_value(classifier, "accuracy") == pytest.approx(2 / 3)
    assert metric_value(classifier, "eval_loss") == pytest.approx(0.4)
    with pytest.raises(KeyError):
        example_values(classifier, "token_accuracy")


def test_seeds_missing_a_language_are_left_out_and_mismatched_examples_refused() -> None:
    a = _acc([1, 0, 1])
    pairs = [{"it": (a, a)}, {"it": (a, a), "ja": (a, a)}]
    interval = paired_difference(pairs, ["it", "ja"])
    assert interval is not None and interval.seeds == 1
    assert paired_difference([{"it": (a, a)}], ["ja"]) is None
    with pytest.raises(ValueError, match="different examples"):
        paired_difference([{"it": (a, _acc([1, 0]))}], ["it"])
