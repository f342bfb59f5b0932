"""Collapsed attempts (issue 21, item 2): the seed of each attempt, the trainer's verdict on an adapter's figures, the
error class the operator recognises, and what the operator says when every attempt collapsed."""

from __future__ import annotations

import pytest

from langmerge import artifacts
from langmerge.api.expert import Metrics
from langmerge.artifacts import COLLAPSED, DATA_CHANGED, RESEED_STEP, FailureRecord, attempt_seed
from langmerge.controller.experts import gave_up_message
from langmerge_trainer.collapse import adapter_verdict, classifier_verdict


def _record(error_class: str, *, disruption: bool = False) -> FailureRecord:
    return FailureRecord(fingerprint="f", error_class=error_class, message="m", disruption=disruption)


@pytest.mark.parametrize(
    ("records", "attempt", "expected"),
    [
        ({}, 1, 42),
        ({1: _record(COLLAPSED)}, 2, 42 + RESEED_STEP),
        # only collapses count: a failure for another reason, a disruption or a data change keep the seed
        ({1: _record("ClientError")}, 2, 42),
        ({1: _record(artifacts.DISRUPTED, disruption=True)}, 2, 42),
        ({1: _record(DATA_CHANGED)}, 2, 42),
        ({1: _record(COLLAPSED), 2: _record("ClientError"), 3: _record(COLLAPSED)}, 4, 42 + 2 * RESEED_STEP),
        # only earlier attempts count: the attempt's own record (an earlier pod of its Job) and later ones do not
        ({1: _record(COLLAPSED), 2: _record(COLLAPSED)}, 2, 42 + RESEED_STEP),
        ({1: _record(COLLAPSED), 3: _record(COLLAPSED)}, 1, 42),
    ],
)
def test_an_attempt_trains_with_seed_plus_1000_per_earlier_collapsed_attempt(
    records: dict[int, FailureRecord], attempt: int, expected: int
) -> None:
    assert attempt_seed(42, records, attempt) == expected


def test_the_seed_is_the_same_from_the_same_records_in_any_order() -> None:
    records = {3: _record(COLLAPSED), 1: _record(COLLAPSED), 2: _record("JobFailed")}
    assert attempt_seed(0, records, 4) == attempt_seed(0, dict(sorted(records.items())), 4) == 2000


def test_the_trainers_error_is_the_class_the_operator_recognises() -> None:
    from langmerge_trainer.train import Collapsed, is_retryable

    err = Collapsed.of("predicts money for 72 of 72 inputs (100%)", seed=1042)
    assert type(err).__name__ == COLLAPSED and is_retryable(err)
    assert "seed 1042" in str(err) and "predicts money for 72 of 72" in str(err) and err.seed == 1042


def test_adapter_verdict_judges_a_classifier_on_its_predictions_and_a_causal_lm_against_its_base() -> None:
    collapsed = Metrics(eval_loss=0.7, predictions={"money": 0, "science": 72})
    healthy = Metrics(eval_loss=0.58, predictions={"money": 44, "science": 28})
    gold = {"money": 36, "science": 36}
    assert adapter_verdict(collapsed, None, classifier=True, gold=gold, prior=gold).collapsed
    assert not adapter_verdict(healthy, None, classifier=True, gold=gold, prior=gold).collapsed
    base = Metrics(eval_loss=7.6)
    assert adapter_verdict(Metrics(eval_loss=234.4), base, classifier=False).collapsed
    assert adapter_verdict(Metrics(eval_loss=float("nan")), base, classifier=False).collapsed
    assert not adapter_verdict(Metrics(eval_loss=6.1), base, classifier=False).collapsed


def test_an_expert_whose_data_has_one_label_is_not_collapsed_at_the_prior() -> None:
    """Its best is the prior (it learns that one label): the label-frequency baseline says nothing about it, and
    such an expert stays Ready with LabelsCovered=False."""
    one = {"money": 30, "science": 0}
    assert not classifier_verdict({"money": 30, "science": 0}, gold=one, eval_loss=0.2, prior=one).collapsed


def test_gave_up_message_says_when_every_attempt_collapsed() -> None:
    last = FailureRecord(fingerprint="f", error_class=COLLAPSED, message="the adapter collapsed with seed 1042: x")
    assert gave_up_message(last, attempts=2, collapsed=2).startswith(
        "training failed: every attempt collapsed (2 of 2)"
    )
    other = FailureRecord(fingerprint="f", error_class="DataError", message="line 3")
    assert gave_up_message(other, attempts=2, collapsed=1) == "training failed after 2 attempt(s): DataError: line 3"


def test_langmerge_history_shows_each_attempts_seed() -> None:
    from langmerge.reports import expert_history

    expert = {
        "metadata": {"name": "topic-it", "namespace": "default"},
        "status": {
            "history": [
                {
                    "fingerprint": "f" * 16,
                    "result": "Failed",
                    "attempt": 1,
                    "seed": 11,
                    "message": "the trained "
                    "adapter collapsed on its eval split with seed 11: predicts money for 10 of 10 inputs (100%)",
                },
                {"fingerprint": "f" * 16, "result": "Succeeded", "attempt": 2, "seed": 1011, "tokens": 5000},
            ]
        },
    }
    text = expert_history(expert)
    assert "SEED" in text.splitlines()[0]
    failed, succeeded = text.splitlines()[1:3]
    assert " 11 " in failed and "collapsed" in failed and " 1011 " in succeeded
