"""The merge search's staging and budgets (``run_search``) with a scripted evaluator and a fake clock: no model, no
data, milliseconds. The real evaluator (one loaded base model, the exact merged update) is exercised by
``tests/trainer/test_merge_job.py`` and ``tests/merge/test_cli.py``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

pytest.importorskip("torch")

from langmerge.api.expert import Metrics
from langmerge.api.merged import Search
from langmerge_trainer.merge.search import Candidate, SearchResult, run_search

LANGUAGES = ("es", "it")
#: Each method's eval loss per language at lambda 1 (the experts' own loss is 1.0 in both languages). By the worst
#: language ties is best (-0.3 each); by the mean linear is (-0.25 vs -0.3).
LOSS = {
    "linear": {"es": 1.0, "it": 1.5},
    "ties": {"es": 1.3, "it": 1.3},
    "task_arithmetic": {"es": 1.4, "it": 1.4},
    "dare_ties": {"es": 1.6, "it": 1.6},
}
SPEC = ("task_arithmetic", {"weights": {}, "include_modules": [], "exclude_modules": [], "lambda_": 3.0})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedEvaluator:
    """What ``run_search`` needs of a CandidateEvaluator: the losses come from :data:`LOSS` (worse the further lambda
    is from 1), and every evaluation advances the clock by ``seconds`` (the experts' by ``expert_seconds``)."""

    def __init__(self, clock: Clock, seconds: float, expert_seconds: float = 0.0) -> None:
        self.languages = list(LANGUAGES)
        self.clock = clock
        self.seconds = seconds
        self.expert_seconds = expert_seconds
        self.applied: list[Candidate] = []

    def expert_metrics(self) -> dict[str, Metrics]:
        self.clock.now += self.expert_seconds
        return {lang: Metrics(eval_loss=1.0) for lang in self.languages}

    def apply(self, candidate: Candidate) -> None:
        self.applied.append(candidate)

    def evaluate(self, languages: Sequence[str] | None = None) -> dict[str, Metrics]:
        self.clock.now += self.seconds
        candidate = self.applied[-1]
        penalty = 1 + abs(float(candidate.parameters.get("lambda_", 1.0)) - 1)
        return {lang: Metrics(eval_loss=LOSS[candidate.method][lang] * penalty) for lang in languages or LANGUAGES}


def _search(evaluator: ScriptedEvaluator, clock: Clock, **search: object) -> SearchResult:
    return run_search(evaluator, SPEC[0], SPEC[1], Search.model_validate(search), "evalLoss", clock=clock)  # type: ignore[arg-type]


def _assert_valid_choice(result: SearchResult, evaluator: ScriptedEvaluator) -> None:
    # the spec's own merge was evaluated first, as it is
    assert evaluator.applied[0].method == "task_arithmetic"
    assert result.default.candidate == evaluator.applied[0] and result.default.candidate.parameters["lambda_"] == 3.0
    # the choice is an evaluated candidate, the best of them, never worse than the spec's own
    assert any(result.chosen is s for s in result.evaluated)
    assert result.chosen.objective == max(s.objective for s in result.evaluated) >= result.default.objective
    assert set(result.chosen.candidate.parameters["weights"]) == set(LANGUAGES)
    record = result.record()
    assert record.candidates == len(result.evaluated) and record.chosen.method == result.chosen.candidate.method
    assert record.default is not None and record.default.parameters["lambda_"] == 3.0


def test_a_time_limited_search_stops_at_max_seconds_with_a_valid_choice() -> None:
    clock = Clock()
    evaluator = ScriptedEvaluator(clock, seconds=4.0)
    # 4 s per candidate, 10 s budget: the spec's own (0-4 s), linear (4-8 s), ties (8-12 s), then the budget is spent
    result = _search(evaluator, clock, methods=["linear", "ties", "dare_ties"], max_seconds=10)
    assert result.stopped == "maxSeconds"
    assert [s.candidate.method for s in result.evaluated] == ["task_arithmetic", "linear", "ties"]
    assert len(evaluator.applied) == 3  # nothing applied beyond the budget
    assert result.seconds == pytest.approx(12.0)
    assert result.chosen.candidate.method == "ties"  # the worst language's score: ties -0.3, linear -0.5
    assert result.chosen.relative == pytest.approx({"es": -0.3, "it": -0.3})
    assert result.record().stopped == "maxSeconds"
    _assert_valid_choice(result, evaluator)


def test_the_spec_s_own_merge_is_evaluated_even_when_the_budget_is_spent_before_it() -> None:
    clock = Clock()
    evaluator = ScriptedEvaluator(clock, seconds=4.0, expert_seconds=30.0)  # the experts alone take 30 s of 10
    result = _search(evaluator, clock, methods=["linear", "ties"], max_seconds=10)
    assert result.stopped == "maxSeconds"
    assert len(result.evaluated) == 1 and result.chosen is result.default
    _assert_valid_choice(result, evaluator)


def test_without_a_binding_budget_the_search_runs_to_exhaustion() -> None:
    clock = Clock()
    evaluator = ScriptedEvaluator(clock, seconds=4.0)
    result = _search(
        evaluator,
        clock,
        methods=["linear", "ties"],
        densities=[1.0],
        lambdas=[0.5, 1.0],
        weights=False,
        max_seconds=3600,
    )
    assert result.stopped == "exhausted"
    # the spec's own, linear and ties at their defaults, then ties (the best) at lambda 0.5 (1.0 is the default)
    assert [(s.candidate.method, s.candidate.parameters.get("lambda_")) for s in result.evaluated] == [
        ("task_arithmetic", 3.0),
        ("linear", None),
        ("ties", 1.0),
        ("ties", 0.5),
    ]
    _assert_valid_choice(result, evaluator)


def test_max_candidates_stops_the_search_before_the_clock_does() -> None:
    clock = Clock()
    evaluator = ScriptedEvaluator(clock, seconds=4.0)
    result = _search(evaluator, clock, methods=["linear", "ties", "dare_ties"], max_candidates=2, max_seconds=3600)
    assert result.stopped == "maxCandidates" and len(result.evaluated) == 2
    _assert_valid_choice(result, evaluator)


@pytest.mark.parametrize(("objective", "chosen"), [("worst", "ties"), ("mean", "linear")])
def test_the_objective_decides_between_the_worst_language_and_the_mean(objective: str, chosen: str) -> None:
    clock = Clock()
    evaluator = ScriptedEvaluator(clock, seconds=1.0)
    result = _search(evaluator, clock, methods=["linear", "ties"], lambdas=[1.0], weights=False, objective=objective)
    by_method: Mapping[str, float] = {s.candidate.method: s.objective for s in result.evaluated}
    assert by_method["linear"] == pytest.approx(-0.5 if objective == "worst" else -0.25)
    assert by_method["ties"] == pytest.approx(-0.3)
    assert result.chosen.candidate.method == chosen and result.record().objective == objective
    _assert_valid_choice(result, evaluator)


def test_a_rerun_makes_the_same_choice() -> None:
    first, second = (
        _search(ScriptedEvaluator(clock, seconds=2.0), clock, methods=["linear", "ties", "dare_ties"])
        for clock in (Clock(), Clock())
    )
    assert first.chosen.candidate == second.chosen.candidate
    assert [s.candidate for s in first.evaluated] == [s.candidate for s in second.evaluated]


class WeightSensitiveEvaluator(ScriptedEvaluator):
    """linear's losses depend on the weights: es improves with its share of the weight, it gets slightly worse."""

    def evaluate(self, languages: Sequence[str] | None = None) -> dict[str, Metrics]:
        candidate = self.applied[-1]
        if candidate.method != "linear":
            return super().evaluate(languages)
        self.clock.now += self.seconds
        weights = candidate.parameters["weights"]
        share = weights["es"] / (weights["es"] + weights["it"])
        loss = {"es": 1.0 + 0.4 * (1 - share), "it": 1.0 + 0.1 * share}
        return {lang: Metrics(eval_loss=loss[lang]) for lang in languages or LANGUAGES}


def test_the_weight_stage_raises_the_weight_of_the_language_furthest_below_its_expert() -> None:
    clock = Clock()
    evaluator = WeightSensitiveEvaluator(clock, seconds=1.0)
    result = _search(evaluator, clock, methods=["linear"])
    equal = next(
        s
        for s in result.evaluated
        if s.candidate.method == "linear" and set(s.candidate.parameters["weights"].values()) == {1.0}
    )
    assert equal.relative == pytest.approx({"es": -0.2, "it": -0.05})  # es is the worst language at equal weights
    chosen = result.chosen.candidate.parameters["weights"]
    # es x1.5 four times: then it is the worst language and no step improves the worst score any more
    assert chosen == {"es": pytest.approx(1.5**4, rel=1e-5), "it": 1.0}
    assert result.chosen.objective == pytest.approx(-0.1 * 1.5**4 / (1.5**4 + 1))  # Italian's score, now the worst
    assert result.chosen.objective > equal.objective
    assert result.stopped == "exhausted"
    _assert_valid_choice(result, evaluator)
