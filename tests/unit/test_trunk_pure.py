"""Trunks, pure parts: whether an expert can start from a trunk (controller.trunks), and `langmerge cost`'s estimate
of what a trunk change retrains (reports.trunk_estimates)."""

from __future__ import annotations

from typing import Any

from langmerge.api.expert import LanguageExpertSpec, LanguageExpertStatus
from langmerge.controller.trunks import TrunkProblem, mismatch, trunk_source
from langmerge.reports import cost_report, cost_text
from langmerge.tasks import AdapterSource


def _spec(**extra: Any) -> LanguageExpertSpec:
    doc = {
        "language": "es",
        "task": "dialog",
        "baseModel": {"uri": "s3://models/base"},
        "dataset": {"uri": "s3://data/es"},
        "lora": {"rank": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]},
        **extra,
    }
    return LanguageExpertSpec.model_validate(doc)


def test_a_trunk_must_share_base_lora_and_labels_and_not_branch_itself() -> None:
    branch = _spec(initFrom={"expert": "trunk"})
    assert mismatch(branch, "trunk", _spec(language="mul")) is None
    other = _spec(language="mul", lora={"rank": 4, "alpha": 16, "targetModules": ["q_proj"]}, initFrom={"expert": "x"})
    text = mismatch(branch, "trunk", other) or ""
    assert "starts from x itself" in text and "lora.rank is 4, this expert's 8" in text
    assert "lora.targetModules is ['q_proj'], this expert's ['q_proj', 'v_proj']" in text
    moved = _spec(language="mul", baseModel={"uri": "s3://models/other"})
    assert "its base model is s3://models/other" in (mismatch(branch, "trunk", moved) or "")


def test_the_trunk_adapter_or_why_there_is_none_yet() -> None:
    branch = _spec(initFrom={"expert": "trunk"})
    missing = trunk_source("ns", "trunk", branch, None, None)
    assert isinstance(missing, TrunkProblem) and missing.reason == "TrunkNotFound" and missing.waiting
    pending = trunk_source("ns", "trunk", branch, _spec(language="mul"), LanguageExpertStatus(phase="Training"))
    assert isinstance(pending, TrunkProblem) and pending.reason == "WaitingForTrunk" and pending.waiting
    adapter = {"uri": "s3://a/t", "digest": "d1", "fingerprint": "f1"}
    retraining = LanguageExpertStatus.model_validate(
        {"adapter": adapter, "trainedFingerprint": "f1", "desiredFingerprint": "f2"}
    )
    assert isinstance(trunk_source("ns", "trunk", branch, _spec(language="mul"), retraining), TrunkProblem)
    ready = LanguageExpertStatus.model_validate(
        {"adapter": adapter, "trainedFingerprint": "f1", "desiredFingerprint": "f1"}
    )
    found = trunk_source("ns", "trunk", branch, _spec(language="mul"), ready)
    assert found == AdapterSource(uri="s3://a/t", digest="d1", source="the trunk LanguageExpert ns/trunk")
    shaped = trunk_source("ns", "trunk", branch, _spec(language="mul", lora={"rank": 4}), ready)
    assert isinstance(shaped, TrunkProblem) and shaped.reason == "InitFromMismatch" and not shaped.waiting


def _expert(name: str, wall: float, init: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "language": "es",
        "task": "t",
        "baseModel": {"uri": "s3://m/b"},
        "dataset": {"uri": "s3://d"},
    }
    if init:
        spec["initFrom"] = {"expert": init}
    history = (
        [
            {
                "fingerprint": "f",
                "result": "Succeeded",
                "finishedAt": "2026-01-01T00:00:00Z",
                "wallSeconds": wall,
                "gpuSeconds": wall,
                "cpuSeconds": wall,
                "tokens": 10,
            }
        ]
        if wall
        else []
    )
    return {"metadata": {"name": name, "namespace": "ns"}, "spec": spec, "status": {"history": history}}


def test_langmerge_cost_estimates_what_a_trunk_change_retrains() -> None:
    experts = [
        _expert("trunk", 30.0),
        _expert("es", 10.0, "trunk"),
        _expert("it", 12.0, "trunk"),
        _expert("nl", 0.0, "trunk"),
    ]
    report = cost_report(experts)
    (estimate,) = report.trunks
    assert estimate.branches == ["es", "it", "nl"] and estimate.wall_seconds == 52.0 and estimate.unmeasured == ["nl"]
    assert "a change of trunk trunk (its spec or base model) retrains it and the 3 expert(s)" in cost_text(report)
