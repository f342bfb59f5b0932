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
        up = w["data"][w["updated_language"]]
        assert up["update"] == round(0.25 * up["train"]) and w["update"]["actual_share"] == round(
            up["update"] / up["train"], 4
        )
        assert all("removed_translations" in d for d in w["data"].values())
        assert set(w["base"]["languages"]) == {*w["languages"], w["new_language"]}
        for run in w["runs"]:
            # every training role: its attempts, each with its verdict and cost
            assert {"joint", "joint-update", "joint-new"} <= set(run["trained"])
            for t in run["trained"].values():
                assert t["attempts"] and all(
                    isinstance(a["collapsed"], bool) and a["cpu_seconds"] > 0 for a in t["attempts"]
                )
            models = run["models"]
            assert {"joint", "expert", *(f"merged:{m}" for m in methods)} <= set(models)
            for key in ("joint", *(f"merged:{m}" for m in methods)):
                assert set(models[key]["languages"]) == set(w["languages"])
                for lang, scores in models[key]["scores"].items():
                    # every test example's own figures, for the paired intervals
                    n = len(scores.get("gold") or scores["tokens"])
                    assert n == w["data"][lang]["test"] == models[key]["languages"][lang]["examples"]
            for scenario in ("maintenance", "new_language"):
                part = run[scenario]
                assert {f"merged:{m}" for m in methods} <= set(part["models"]) and set(part["cost"]["merges"]) == set(
                    methods
                )
            for cost in (run["cost"]["merges"], run["maintenance"]["cost"]["merges"]):
                for c in cost.values():
                    # the merge Job and the evaluation it runs before publishing, both counted
                    assert c["cpu_seconds"] == pytest.approx(
                        c["merge"]["cpu_seconds"] + c["evaluation"]["cpu_seconds"], abs=0.01
                    )
                    assert c["evaluation"]["cpu_seconds"] > 0
            # the search chose on the validation split (never the test split) within its budget, and says what
            searched = run["cost"]["merges"][methods[1]]["search"]
            assert 1 <= searched["candidates"] <= 3 and all(n > 0 for n in searched["validation_examples"].values())
            assert set(searched["validation_examples"]) == set(w["languages"])
        # The report shows exactly the record's summary (recomputed from the runs, nothing typed in).
        assert w["summary"] == json.loads(report.dump_json(report.summarize(w)))
        assert report.quality_table(w, w["summary"], w["metric"]) in text
        assert report.difference_table(w, w["summary"], w["metric"]) in text
        assert report.cost_table(w, w["summary"]) in text
        assert report.collapse_statement(w, w["summary"]) in text
        for lang in w["languages"]:
            assert f"| {lang} |" in text
        for kind in ("quality", "cost"):
            png = quick_run / f"{w['name']}-{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # the dialog runs of a quick run learn: their differences carry intervals
    dialog = next(w for w in record["workloads"] if w["name"] == "dialog")
    assert "mean" in dialog["summary"]["differences"]["initial"]["eval_loss"][f"merged:{dialog['methods'][0]} - joint"]
    assert "up to 50% less" in text and "more than 60% less" in text
    assert text.count("**Merge search.**") == 2 and "Merge search, chosen on the validation split" in text


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
