"""The read-only views: status tables and the cost report."""

from __future__ import annotations

from typing import Any

import pytest

from langmerge.views import cost_report, cost_text, experts_table, merged_history, merged_table


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
