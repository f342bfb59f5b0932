"""Merge quality on the operator side: auto rank and error bound in the API, the search's fingerprint, and what
status and Events say about a published adapter's fidelity and a search's choice."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from api_cases import expert, merged
from langmerge.api import LanguageExpertSpec, MergedModelSpec
from langmerge.api.merged import Search
from langmerge.artifacts import RefactorSummary, SearchCandidate, SearchRecord, refactor_summary
from langmerge.controller.merged import _search_status, refactor_note, search_note
from langmerge.fingerprint import merge_fingerprint

INPUTS = [("es", "aaaa", 1.0), ("it", "bbbb", 1.0)]


def _spec(**overrides: Any) -> MergedModelSpec:
    return MergedModelSpec.model_validate(merged(**overrides)["spec"])


def _fp(spec: MergedModelSpec, validation: list[tuple[str, str | None]] | None = None) -> str:
    return merge_fingerprint(spec, inputs=INPUTS, base_model_digest="d", image="i", validation=validation or [])


def test_output_rank_is_auto_by_default_and_takes_a_number() -> None:
    spec = _spec()
    assert spec.output.rank == "auto" and spec.output.max_relative_error == 0.01 and spec.output.max_rank is None
    assert _spec(output={"uri": "s3://models/merged/x", "rank": 16}).output.rank == 16
    with pytest.raises(ValidationError):
        _spec(output={"uri": "s3://models/merged/x", "rank": "big"})
    with pytest.raises(ValidationError):
        _spec(output={"uri": "s3://models/merged/x", "maxRelativeError": 1.5})


def test_parameters_added_later_enter_the_fingerprint_only_when_set() -> None:
    plain = _spec()
    assert "normalize" not in plain.effective_parameters()  # an existing ties merge keeps its fingerprint
    explicit = _spec(parameters={"density": 1.0, "normalize": False})
    assert explicit.effective_parameters()["normalize"] is False
    assert _fp(plain) != _fp(explicit)
    dare = _spec(method="dare_ties", parameters={"rescale": "l1"})
    assert dare.effective_parameters()["rescale"] == "l1"
    with pytest.raises(ValidationError, match="do not apply to method 'ties'"):
        _spec(parameters={"rescale": "l1"})
    with pytest.raises(ValidationError, match="density \\+- epsilon"):
        _spec(method="della", parameters={"density": 0.9, "epsilon": 0.2})


def test_the_search_space_and_validation_data_are_part_of_the_fingerprint() -> None:
    plain = _spec()
    searched = _spec(search={})
    # without a search, validation locations do not matter
    assert _fp(plain) == _fp(plain, [("es", "s3://data/val/es"), ("it", None)])
    assert _fp(searched) != _fp(plain)
    assert _fp(_spec(search={"maxCandidates": 10})) != _fp(searched)
    assert _fp(_spec(search={"objective": "mean"})) != _fp(searched)
    assert _fp(searched, [("es", "s3://data/val/es")]) != _fp(searched, [("es", "s3://data/val2/es")])
    assert _fp(_spec(search={})) == _fp(searched)  # deterministic


def test_search_spec_rejects_unknown_methods() -> None:
    with pytest.raises(ValidationError, match="unknown method"):
        _spec(search={"methods": ["ties", "slerp"]})


def test_tsv_and_iso_parameters_are_part_of_the_fingerprint_and_the_search_may_try_them() -> None:
    tsv = _spec(method="tsv", parameters={})
    assert _fp(tsv) == _fp(_spec(method="tsv", parameters={"svFraction": 1.0, "lambda": 1.0}))  # the defaults
    assert _fp(tsv) != _fp(_spec(method="tsv", parameters={"svFraction": 0.5}))
    assert _fp(tsv) != _fp(_spec(method="iso_c", parameters={}))
    iso_cts = _spec(method="iso_cts", parameters={})
    assert _fp(iso_cts) != _fp(_spec(method="iso_cts", parameters={"commonSpaceFraction": 0.9}))
    # offered to a search when listed, not in its default list (which is part of every searched spec's fingerprint)
    assert _spec(search={"methods": ["tsv", "iso_c", "iso_cts"]}).search is not None
    assert not {"tsv", "iso_c", "iso_cts"} & set(Search().methods)
    assert _spec(search={"methods": ["ties", "ties", "linear"]}).search.methods == ["ties", "linear"]  # type: ignore[union-attr]


def test_refactor_summary_and_the_published_event_note() -> None:
    assert refactor_summary({"a": 0.0}, {}) is None  # full weights: nothing re-factorised
    summary = refactor_summary({"q": 0.008, "k": 0.0, "v": 0.004}, {"q": 40, "k": 8, "v": 24})
    assert summary == RefactorSummary(
        max_relative_error=0.008, mean_relative_error=0.004, worst_module="q", min_rank=8, max_rank=40, mean_rank=24.0
    )
    note = refactor_note(summary)
    assert "ranks 8-40 (mean 24)" in note and "relative error max 0.008" in note and "worst module q" in note


def test_search_status_and_event_note() -> None:
    chosen = SearchCandidate(
        method="linear", parameters={"weights": {"es": 1.5, "it": 1.0}}, objective=-0.01, relative={"es": -0.01}
    )
    default = SearchCandidate(method="ties", parameters={"density": 1.0}, objective=-0.05)
    record = SearchRecord(
        objective="worst",
        metric="accuracy",
        candidates=12,
        seconds=30.0,
        stopped="maxCandidates",
        chosen=chosen,
        default=default,
        top=[chosen, default],
    )
    note = search_note(record)
    assert "12 candidates, maxCandidates) chose linear(weights={'es': 1.5, 'it': 1.0}): -0.01" in note
    assert "the spec's own ties: -0.05" in note
    status = _search_status(record)
    assert status.chosen.method == "linear" and status.default is not None and len(status.top) == 2
    dumped = status.model_dump(by_alias=True, exclude_none=True)
    assert (
        dumped["chosen"]["parameters"] == {"weights": {"es": 1.5, "it": 1.0}} and dumped["stopped"] == "maxCandidates"
    )


def test_the_documented_search_example_is_valid_and_states_the_defaults() -> None:
    """docs/merge-methods.md's spec.search example: both manifests are valid, and the values it calls defaults are."""
    text = (Path(__file__).parents[2] / "docs" / "merge-methods.md").read_text(encoding="utf-8")
    section = text.split("## Choosing the merge automatically", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None
    expert, merged_model = yaml.safe_load_all(block.group(1))
    expert_spec = LanguageExpertSpec.model_validate(expert["spec"])
    assert expert_spec.dataset.validation_uri is not None
    assert not expert_spec.dataset.validation_uri.startswith(expert_spec.dataset.uri.rstrip("/") + "/")
    spec = MergedModelSpec.model_validate(merged_model["spec"])
    assert spec.search == Search()


@pytest.mark.parametrize(
    ("uri", "validation", "ok"),
    [
        ("s3://data/de/train", "s3://data/de/validation", True),
        ("s3://data/de", "s3://data/de2/validation", True),
        ("s3://data/de", "s3://data/de/validation", False),  # under the training data: it would be trained on
        ("s3://data/de/train", "s3://data/de/train/", False),
        ("s3://data/de/train", "s3://data/de", False),  # the training data is under the validation prefix
    ],
)
def test_a_validation_uri_must_lie_outside_the_training_data(uri: str, validation: str, ok: bool) -> None:
    spec = expert(dataset={"uri": uri, "validationUri": validation})["spec"]
    if ok:
        assert LanguageExpertSpec.model_validate(spec).dataset.validation_uri == validation
    else:
        with pytest.raises(ValidationError, match=r"overlaps uri .*use a prefix outside"):
            LanguageExpertSpec.model_validate(spec)
