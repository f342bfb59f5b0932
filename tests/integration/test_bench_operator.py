"""``langmerge bench --via-operator`` in a lean form: the dialog workload's story (two languages, one seed) as
LanguageExperts and a MergedModel on a local control plane, the costs read from the operator's ledger."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_bench_via_operator(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "langmerge.cli",
        "bench",
        "--via-operator",
        "--quick",
        "--workloads",
        "dialog",
        "--output",
        str(tmp_path),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["run"]["via_operator"] is True
    (w,) = record["workloads"]
    assert w["methods"] == ["ties(density=1.0)"]
    (run,) = w["runs"]
    # initial: each expert, the joint model and the merge are the operator's Jobs, costed from their records
    assert set(run["cost"]["experts"]) == set(w["languages"])
    assert all(c["wall_seconds"] > 0 for c in run["cost"]["experts"].values())
    assert run["cost"]["joint"]["wall_seconds"] > 0 and run["cost"]["merges"]["ties(density=1.0)"]["wall_seconds"] > 0
    # maintenance: the updated expert and the joint model retrained (new data in their prefixes), then a re-merge
    m = run["maintenance"]["cost"]
    assert m["expert"]["wall_seconds"] > 0 and m["joint"]["wall_seconds"] > 0
    assert m["merges"]["ties(density=1.0)"]["wall_seconds"] > 0
    # the new language joined the merged model; the joint model retrained on all of them
    n = run["new_language"]["models"]
    merged = n["merged:ties(density=1.0)"]["languages"]
    assert set(merged) == {*w["languages"], w["new_language"]} and set(n["expert"]["languages"]) == {w["new_language"]}
    for lang, figures in run["models"]["merged:ties(density=1.0)"]["languages"].items():
        assert lang in w["languages"] and figures["eval_loss"] > 0
    # the joint model is evaluated by the benchmark itself, example by example
    assert all(run["models"]["joint"]["scores"][lang]["tokens"] for lang in w["languages"])
    report = (tmp_path / "report.md").read_text()
    assert "LanguageExperts and MergedModels on the local control plane" in report and "### Cost" in report
