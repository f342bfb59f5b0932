"""The CLI's read-only reports: status tables and the cost report."""

from __future__ import annotations

from typing import Any

import pytest

from langmerge.reports import cost_report, cost_text, experts_table, merged_history, merged_table


def _expert(name: str, lang: str, runs: list[tuple[str, float, int]]) -> dict[str, Any]:
    history = [
        {
            "fingerprint": f"{name}{i}",
            "result": "Succeeded",
            "finishedAt": at,
            "wallSeconds": wall,
            "gpuSeconds": wall,
            "cpuSeconds": wall,
            "tokens": tokens,
        }
        for i, (at, wall, tokens) in enumerate(runs)
    ]
    return {
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {"language": lang, "task": "t", "baseModel": {"uri": "s3://m/b"}, "dataset": {"uri": "s3://d/x"}},
        "status": {
            "phase": "Ready",
            "history": history,
            "adapter": {"uri": "s3://a", "digest": "abcdef0123456789", "fingerprint": "f"},
        },
    }


def test_cost_report_estimates_full_retrains_from_recorded_throughput() -> None:
    experts = [
        _expert("de", "de", [("2026-01-01T00:00:10Z", 100.0, 10_000)]),
        _expert("fr", "fr", [("2026-01-01T00:00:20Z", 200.0, 40_000), ("2026-01-02T00:00:00Z", 60.0, 12_000)]),
    ]
    report = cost_report(experts)
    assert len(report.initial) == 2 and len(report.updates) == 1
    assert report.update_seconds == 60.0
    # de at its recorded 100 tok/s (100 s) + fr's new data at its update's 200 tok/s (60 s).
    assert report.full_retrain_seconds == pytest.approx(160.0)
    assert report.saved_seconds == pytest.approx(100.0)
    assert report.gpu_seconds == 360.0
    assert "62% less" in cost_text(report)


def test_tables_render() -> None:
    text = experts_table([_expert("de", "de", [("2026-01-01T00:00:10Z", 1.0, 10)])])
    assert "de" in text and "abcdef012345" in text and "Ready" in text
    mm = {
        "metadata": {"name": "mm", "namespace": "ns"},
        "spec": {"method": "ties"},
        "status": {
            "phase": "Ready",
            "revision": 2,
            "fingerprint": "f" * 16,
            "history": [{"revision": 2, "fingerprint": "f" * 16, "uri": "s3://x", "changedInputs": ["de"]}],
        },
    }
    assert "ties" in merged_table([mm]) and " 2 " in merged_table([mm])
    assert "de" in merged_history(mm)


def test_cost_report_uses_a_measured_joint_retrain_when_recorded() -> None:
    from langmerge.artifacts import JointBaseline

    experts = [
        _expert("de", "de", [("2026-01-01T00:00:10Z", 100.0, 10_000)]),
        _expert("fr", "fr", [("2026-01-01T00:00:20Z", 200.0, 40_000), ("2026-01-02T00:00:00Z", 60.0, 12_000)]),
    ]
    baseline = JointBaseline(
        task="t",
        languages=["de", "fr"],
        wall_seconds=400.0,
        source="langmerge bench",
        measured_at="2026-01-03T00:00:00Z",
    )
    report = cost_report(experts, baselines={"t": baseline})
    assert report.full_retrain_seconds == 400.0 and report.all_measured
    text = cost_text(report)
    assert "85% less" in text and "measured: t joint retrain on de,fr 400.0 wall-s (langmerge bench" in text
    assert "estimate" not in text
    # another task's record does not apply: the figure stays an estimate, and says how it was estimated
    other = cost_text(cost_report(experts, baselines={"other": baseline}))
    assert "[estimate: each language's latest token count / its recorded throughput" in other


def test_read_baselines_reads_the_records_of_the_experts_tasks() -> None:
    from langmerge.artifacts import JointBaseline, baseline_uri
    from langmerge.reports import read_baselines

    record = JointBaseline(task="t", languages=["de"], wall_seconds=5.0, source="test")

    class Store:
        def __init__(self) -> None:
            self.asked: list[str] = []

        def get_json_or_none(self, uri: str) -> Any:
            self.asked.append(uri)
            return record.model_dump(mode="json") if uri == baseline_uri("s3://a/art", "ns", "t") else None

    store = Store()
    found = read_baselines(store, "s3://a/art", [_expert("de", "de", []), _expert("fr", "fr", [])])
    assert found["t"].wall_seconds == 5.0 and store.asked == ["s3://a/art/baselines/ns/t.json"]
