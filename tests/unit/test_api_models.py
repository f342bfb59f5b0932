"""The pydantic models: defaults, validation messages, consistency with the CRD schema."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import ValidationError

from api_cases import INVALID, INVALID_OPERATOR_ONLY, expert, merged
from langmerge.api import LanguageExpertSpec, MergedModelSpec
from langmerge.api.common import LabelSelector
from langmerge.merge_catalogue import METHOD_NAMES


def _parse(obj: dict[str, Any]) -> Any:
    model = LanguageExpertSpec if obj["kind"] == "LanguageExpert" else MergedModelSpec
    return model.model_validate(obj["spec"])


def test_expert_defaults() -> None:
    spec = LanguageExpertSpec.model_validate(expert()["spec"])
    assert spec.lora.rank == 16 and spec.training.seed == 42 and spec.dataset.eval_fraction == 0.1
    assert spec.resources.gpus == 1 and spec.on_change == "wait" and not spec.suspend


def test_merged_defaults_and_effective_parameters() -> None:
    spec = MergedModelSpec.model_validate(merged()["spec"])
    assert spec.method == "ties" and spec.publish.keep_revisions == 5 and spec.require_all_experts
    assert spec.resources.gpus == 0
    assert spec.effective_parameters() == {
        "weights": {},
        "include_modules": [],
        "exclude_modules": [],
        "density": 1.0,
        "lambda_": 1.0,
    }
    dare = MergedModelSpec.model_validate(merged(method="dare_ties", parameters={})["spec"])
    assert dare.effective_parameters()["density"] == 0.5 and dare.effective_parameters()["seed"] == 0


@pytest.mark.parametrize(
    ("case", "obj", "fragment"), INVALID + INVALID_OPERATOR_ONLY, ids=lambda x: x if isinstance(x, str) else ""
)
def test_invalid_specs_rejected_by_models(case: str, obj: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError):
        _parse(obj)


def test_operator_only_messages_are_actionable() -> None:
    with pytest.raises(
        ValidationError, match=r"do not apply to method 'linear'.*accepts: excludeModules, includeModules, weights"
    ):
        _parse(INVALID_OPERATOR_ONLY[0][1])


@pytest.mark.parametrize(
    "language", ["en", "de", "pt-BR", "zh-Hant", "zh-Hant-TW", "es-419", "sr-Latn", "yue", "de-CH-1901"]
)
def test_valid_language_tags(language: str) -> None:
    assert LanguageExpertSpec.model_validate(expert(language=language)["spec"]).language == language


def test_every_method_accepts_its_defaults() -> None:
    for method in METHOD_NAMES:
        spec = MergedModelSpec.model_validate(merged(method=method, parameters={})["spec"])
        assert set(spec.effective_parameters()) >= {"weights", "include_modules", "exclude_modules"}


def test_tsv_and_iso_methods_take_their_parameters_on_the_wire_and_fill_in_the_papers_defaults() -> None:
    def effective(method: str, parameters: dict[str, Any]) -> dict[str, Any]:
        spec = MergedModelSpec.model_validate(merged(method=method, parameters=parameters)["spec"])
        return {k: v for k, v in spec.effective_parameters().items() if k not in ("include_modules", "exclude_modules")}

    assert effective("tsv", {}) == {"weights": {}, "sv_fraction": 1.0, "lambda_": 1.0}
    assert effective("tsv", {"svFraction": 0.25, "lambda": 1.4}) == {"weights": {}, "sv_fraction": 0.25, "lambda_": 1.4}
    assert effective("iso_c", {"weights": {"es": 2.0}}) == {"weights": {"es": 2.0}, "lambda_": 1.0}
    assert effective("iso_cts", {}) == {"weights": {}, "common_space_fraction": 0.8, "lambda_": 1.0}
    assert effective("iso_cts", {"commonSpaceFraction": 1.0})["common_space_fraction"] == 1.0
    spec = MergedModelSpec.model_validate(merged(method="iso_cts", parameters={"commonSpaceFraction": 0.6})["spec"])
    assert spec.to_api()["parameters"]["commonSpaceFraction"] == 0.6


@pytest.mark.parametrize(
    ("method", "parameters", "fragment"),
    [
        ("iso_c", {"commonSpaceFraction": 0.5}, "do not apply to method 'iso_c' (it accepts: excludeModules"),
        ("tsv", {"density": 0.5}, "do not apply to method 'tsv'"),
        ("ties", {"svFraction": 0.5}, "parameters svFraction do not apply to method 'ties'"),
        ("tsv", {"svFraction": 0}, "greater than 0"),
        ("iso_cts", {"commonSpaceFraction": 1.2}, "less than or equal to 1"),
    ],
)
def test_tsv_and_iso_parameters_are_checked(method: str, parameters: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(fragment)):
        MergedModelSpec.model_validate(merged(method=method, parameters=parameters)["spec"])


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"}, True),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {"a": "1"}, False),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {}, False),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {}, True),
    ],
)
def test_label_selector(selector: dict[str, Any], labels: dict[str, str], expected: bool) -> None:
    sel = LabelSelector.model_validate(selector)
    assert sel.matches(labels) is expected
    assert sel.to_query()
