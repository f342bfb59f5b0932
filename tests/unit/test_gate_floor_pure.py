"""The quality gate's floor (controller.publish.quality_gate with the base model's figures)."""

from __future__ import annotations

from langmerge.api.expert import Metrics
from langmerge.api.merged import Evaluation, GateFloor
from langmerge.controller.publish import quality_gate


def test_worse_than_the_base_fails_even_within_max_regression() -> None:
    evaluation = Evaluation(max_regression=0.5)
    merged = {"nl": Metrics(eval_loss=5.82), "es": Metrics(eval_loss=2.0)}
    experts = {"nl": Metrics(eval_loss=4.84), "es": Metrics(eval_loss=1.9)}
    base = {"nl": Metrics(eval_loss=5.71), "es": Metrics(eval_loss=3.0)}
    ok, figures, failures = quality_gate(evaluation, merged, experts, base)
    # the sample's Dutch: +20% over its expert passes maxRegression 0.5, but it is worse than no fine-tuning at all
    assert not ok and len(failures) == 1 and failures[0].startswith("nl: evalLoss 5.8200 is worse than the base")
    assert figures["nl"].base == base["nl"]
    assert quality_gate(Evaluation(max_regression=0.5, floor=GateFloor.NONE), merged, experts, base)[0]


def test_the_floor_in_accuracy_points_and_without_base_figures() -> None:
    evaluation = Evaluation(metric="accuracy", max_regression=1.0)
    merged, experts = {"it": Metrics(accuracy=0.30)}, {"it": Metrics(accuracy=0.70)}
    assert not quality_gate(evaluation, merged, experts, {"it": Metrics(accuracy=0.35)})[0]
    assert quality_gate(evaluation, merged, experts, {"it": Metrics(accuracy=0.30)})[0]  # equal to the base: passes
    assert quality_gate(evaluation, merged, experts)[0]  # no base figures (an older merge Job): no floor
