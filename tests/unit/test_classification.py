"""The sequence-classification task type, pure parts: spec, fingerprint, data validation, metrics, the quality gate,
and the merged reconciler's refusal of experts with different label sets."""

from __future__ import annotations

import json

import pytest

from api_cases import expert
from langmerge.api import LanguageExpertSpec
from langmerge.api.expert import LanguageExpertStatus, Metrics
from langmerge.api.merged import Evaluation
from langmerge.controller.merged import SelectedExpert, _task_type_mismatch
from langmerge.controller.publish import quality_gate
from langmerge.fingerprint import training_fingerprint
from langmerge_trainer.classify import head_seed, macro_f1
from langmerge_trainer.data import DataError, parse_jsonl

LABELS = ["ai", "food", "sports"]


def classifier_spec(**overrides: object) -> LanguageExpertSpec:
    obj = expert(taskType="sequence-classification", labels=list(LABELS), **overrides)
    return LanguageExpertSpec.model_validate(obj["spec"])


def test_task_type_defaults_to_causal_lm() -> None:
    spec = LanguageExpertSpec.model_validate(expert()["spec"])
    assert spec.task_type == "causal-lm" and spec.labels is None and not spec.is_classifier


def test_classifier_spec_round_trips() -> None:
    spec = classifier_spec()
    assert spec.is_classifier and spec.labels == LABELS
    assert spec.to_api()["taskType"] == "sequence-classification" and spec.to_api()["labels"] == LABELS


def test_fingerprint_covers_task_type_and_labels_but_not_for_causal_lms() -> None:
    kwargs = {"base_model_digest": "b", "data_digest": "d", "eval_data_digest": None, "image": "img"}
    causal = LanguageExpertSpec.model_validate(expert()["spec"])
    # A causal LM's fingerprint is computed exactly as before task types existed (no retraining on upgrade).
    assert training_fingerprint(causal, **kwargs) == training_fingerprint(
        causal.model_copy(update={"task_type": "causal-lm"}), **kwargs
    )
    a = training_fingerprint(classifier_spec(), **kwargs)
    b = training_fingerprint(classifier_spec().model_copy(update={"labels": ["ai", "sports", "food"]}), **kwargs)
    assert len({a, b, training_fingerprint(causal, **kwargs)}) == 3


def _jsonl(*rows: object) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


def test_labelled_rows_parse() -> None:
    body = _jsonl({"text": "Ciao", "label": "food", "id": 1}, "", {"text": "GOL", "label": "sports"})
    examples, skipped = parse_jsonl(body, source="s3://d/it/a.jsonl", labels=LABELS)
    assert [(e.text, e.label) for e in examples] == [("Ciao", "food"), ("GOL", "sports")] and skipped == 0
    assert [e.line for e in examples] == [1, 3]


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        ({"text": "x", "label": "music"}, 'label "music" is not one of the expert\'s labels: ai, food, sports'),
        ({"text": "x", "label": 1}, "label 1 is not one of"),
        ({"text": "x"}, 'expected "text" and "label"'),
        ({"prompt": "x", "completion": "y"}, "sequence classifier"),
        ({"text": "  ", "label": "ai"}, '"text" is empty'),
        ({"text": 3, "label": "ai"}, '"text" must be a string'),
    ],
)
def test_bad_labelled_rows_name_file_and_line(row: dict[str, object], fragment: str) -> None:
    body = _jsonl({"text": "ok", "label": "ai"}, row)
    with pytest.raises(DataError) as info:
        parse_jsonl(body, source="s3://d/it/part-1.jsonl", labels=LABELS)
    assert str(info.value).startswith("s3://d/it/part-1.jsonl, line 2: ") and fragment in str(info.value)
    assert info.value.line == 2 and info.value.source == "s3://d/it/part-1.jsonl"


def test_bad_labelled_rows_can_be_skipped() -> None:
    body = _jsonl({"text": "ok", "label": "ai"}, {"text": "?", "label": "nope"})
    examples, skipped = parse_jsonl(body, source="s", labels=LABELS, skip_invalid=True)
    assert len(examples) == 1 and skipped == 1


def test_macro_f1_against_hand_computed_values() -> None:
    # class 0: tp 2, fp 1, fn 0 -> 0.8; class 1: tp 1, fp 1, fn 1 -> 0.5; class 2: tp 0, fp 0, fn 1 -> 0
    gold = [0, 0, 1, 1, 2]
    predicted = [0, 0, 1, 0, 1]
    assert macro_f1(gold, predicted) == pytest.approx((0.8 + 0.5 + 0.0) / 3)
    assert macro_f1([1, 1], [1, 1]) == 1.0
    assert macro_f1([], []) == 0.0


def test_head_seed_depends_on_the_label_list_only() -> None:
    assert head_seed(LABELS) == head_seed(list(LABELS))
    assert head_seed(LABELS) != head_seed(["food", "ai", "sports"])


@pytest.mark.parametrize(
    ("metric", "merged_value", "expert_value", "max_regression", "passes", "shown"),
    [
        ("accuracy", 0.78, 0.80, 0.02, True, None),
        ("accuracy", 0.77, 0.80, 0.02, False, "+3.0 points worse; at most 2.0 points allowed"),
        ("macroF1", 0.50, 0.52, 0.0, False, "+2.0 points worse"),
        ("macroF1", 0.55, 0.52, 0.0, True, None),
        # absolute, not relative: 0.10 -> 0.06 is 4 points (40% relative) and passes a 5-point gate
        ("accuracy", 0.06, 0.10, 0.05, True, None),
    ],
)
def test_quality_gate_on_classification_metrics_in_absolute_points(
    metric: str, merged_value: float, expert_value: float, max_regression: float, passes: bool, shown: str | None
) -> None:
    field = "accuracy" if metric == "accuracy" else "macro_f1"
    evaluation = Evaluation(metric=metric, max_regression=max_regression)
    ok, figures, failures = quality_gate(
        evaluation, {"it": Metrics(**{field: merged_value})}, {"it": Metrics(**{field: expert_value})}
    )
    assert ok is passes
    assert figures["it"].regression == pytest.approx(expert_value - merged_value)
    if shown:
        assert failures and shown in failures[0] and failures[0].startswith(f"it: {metric} ")


def _selected(name: str, spec: LanguageExpertSpec) -> SelectedExpert:
    return SelectedExpert(name, spec, LanguageExpertStatus(), {})


def test_merging_refuses_different_label_sets_and_task_types() -> None:
    same = [_selected("a", classifier_spec()), _selected("b", classifier_spec(language="it"))]
    assert _task_type_mismatch(same) is None
    other = classifier_spec(language="it").model_copy(update={"labels": ["ai", "food"]})
    message = _task_type_mismatch([same[0], _selected("b", other)])
    assert message is not None and "same label list" in message and "b has labels ['ai', 'food']" in message
    causal = LanguageExpertSpec.model_validate(expert(language="it")["spec"])
    message = _task_type_mismatch([same[0], _selected("c", causal)])
    assert message is not None and "causal-lm" in message and "one task type" in message


def test_label_counts_list_every_label_and_older_records_still_parse() -> None:
    from langmerge.api.expert import AdapterRef
    from langmerge.artifacts import AdapterManifest
    from langmerge_trainer.data import Example, label_counts

    rows = [Example("a", "food"), Example("b", "ai"), Example("c", "food")]
    assert label_counts(rows, LABELS) == {"ai": 1, "food": 2, "sports": 0}
    assert list(label_counts([], LABELS)) == LABELS  # in the label list's order
    ref = AdapterRef(uri="s3://b/a", digest="d", fingerprint="f", label_counts={"ai": 0, "food": 3})
    assert ref.to_api()["labelCounts"] == {"ai": 0, "food": 3}
    assert AdapterRef.model_validate({"uri": "s3://b/a", "digest": "d", "fingerprint": "f"}).label_counts is None
    assert "label_counts" in AdapterManifest.model_fields
    assert AdapterManifest.model_fields["label_counts"].default is None  # manifests written before still parse


def test_label_counts_enter_the_merge_fingerprint_only_when_known() -> None:
    from api_cases import merged
    from langmerge.api import MergedModelSpec
    from langmerge.fingerprint import merge_fingerprint

    spec = MergedModelSpec.model_validate(merged()["spec"])
    inputs = [("en", "aaaa", 1.0), ("nl", "bbbb", 1.0)]

    def fp(counts: list[tuple[str, dict[str, int] | None]]) -> str:
        return merge_fingerprint(spec, inputs=inputs, base_model_digest="d", image="i", label_counts=counts)

    plain = merge_fingerprint(spec, inputs=inputs, base_model_digest="d", image="i")
    assert fp([]) == plain == fp([("en", None), ("nl", None)])  # causal LMs and older adapters: as before
    known = fp([("en", {"ai": 3, "food": 1}), ("nl", {"ai": 2, "food": 0})])
    assert known != plain
    assert known == fp([("nl", {"food": 0, "ai": 2}), ("en", {"food": 1, "ai": 3})])  # order does not matter
    assert known != fp([("en", {"ai": 3, "food": 1}), ("nl", {"ai": 2, "food": 1})])


def test_missing_labels_and_the_message_an_expert_shows() -> None:
    from langmerge.controller.experts import labels_missing_message
    from langmerge.controller.status import missing_labels

    assert missing_labels(LABELS, {"ai": 3, "food": 0}) == ["food", "sports"]
    assert missing_labels(LABELS, dict.fromkeys(LABELS, 1)) == []
    message = labels_missing_message(["food", "sports"], 3, "abc123")
    assert "'food', 'sports' (2 of 3 labels)" in message and "adapter abc123" in message
    assert "head rows from the experts that have examples of them" in message
