"""``langmerge bench --quick`` (what CI runs): the report, the JSON record and the plots are produced and agree with
each other. The figures themselves are not asserted (a quick run is too small for conclusions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from langmerge_trainer.bench import report


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    readme = out / "README.md"
    readme.write_text(f"# x\n\n## Results\n\n{report.README_BEGIN}\nold\n{report.README_END}\n\nafter\n")
    cmd = [sys.executable, "-m", "langmerge.cli", "bench", "--quick", "--output", str(out), "--readme", str(readme)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out


def test_quick_run_writes_a_consistent_record_report_and_plots(quick_run: Path) -> None:
    record = json.loads((quick_run / "bench.json").read_text())
    assert record["schema"] == report.SCHEMA and record["run"]["quick"] is True
    assert {w["name"] for w in record["workloads"]} == {"topic", "dialog"}
    text = (quick_run / "report.md").read_text()
    assert record["run"]["command"] in text and record["run"]["device"] in text
    for w in record["workloads"]:
        assert w["runs"] and [r["seed"] for r in w["runs"]] == record["run"]["seeds"]
        methods = w["methods"]
        assert methods[0].startswith("ties") and methods[1].startswith("search") and len(methods) == 2
        for run in w["runs"]:
            assert set(run["quality"]) == set(w["languages"])
            for q in run["quality"].values():
                assert {"base", "joint", "expert", "merged"} <= set(q) and set(q["merged"]) == set(methods)
                for metric in w["metrics"]:
                    assert isinstance(q["joint"][metric], float) and isinstance(q["merged"][methods[0]][metric], float)
            assert set(run["cost"]["experts"]) == set(w["languages"])
            assert run["cost"]["joint"]["wall_seconds"] > 0 and run["maintenance"]["remerge"]["wall_seconds"] > 0
            assert run["new_language"]["language"] == w["new_language"]
            # the search chose on the validation split (never the test split) within its budget, and says what
            searched = run["cost"]["merges"][methods[1]]["search"]
            assert 1 <= searched["candidates"] <= 3 and all(n > 0 for n in searched["validation_examples"].values())
            assert set(searched["validation_examples"]) == set(w["languages"])
        # The report shows exactly the record's summary (recomputed from the runs, nothing typed in).
        assert w["summary"] == json.loads(json.dumps(report.summarize(w), default=str))
        assert report.quality_table(w, w["summary"], w["metric"]) in text
        assert report.cost_table(w, w["summary"]) in text
        for lang in w["languages"]:
            assert f"| {lang} |" in text
        for kind in ("quality", "cost"):
            png = quick_run / f"{w['name']}-{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "up to 50% less" in text and "more than 60% less" in text
    assert text.count("**Merge search.**") == 2 and "Chosen on the validation split: seed 0: " in text


def test_quick_run_refreshes_the_readme_block_only(quick_run: Path) -> None:
    readme = (quick_run / "README.md").read_text()
    assert readme.startswith("# x\n\n## Results\n\n") and readme.endswith("\n\nafter\n") and "old" not in readme
    block = readme[readme.index(report.README_BEGIN) : readme.index(report.README_END)]
    assert "langmerge bench --quick" in block and "topic-quality.png" in block


def test_report_only_rerenders_from_the_record(quick_run: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "langmerge_trainer",
        "bench",
        "--report-only",
        str(quick_run / "bench.json"),
        "--output",
        str(tmp_path),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "report.md").read_text() == (quick_run / "report.md").read_text()
