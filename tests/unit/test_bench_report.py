"""The benchmark report from a record (langmerge_trainer.bench.report): collapsed runs out of the means and counted,
every cost counted per merge method, paired differences with intervals, and the README block."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from langmerge_trainer.bench import report

LANGS = ["it", "ja"]
N = 20


def _cost(cpu: float, **extra: Any) -> dict[str, Any]:
    return {"wall_seconds": cpu, "cpu_seconds": cpu, "gpu_seconds": 0.0, **extra}


def _model(right: dict[str, int], *, collapsed: Any = None, **extra: Any) -> dict[str, Any]:
    """A classifier model scoring ``right[lang]`` of N examples right on each language."""
    languages, scores = {}, {}
    for lang, k in right.items():
        scores[lang] = {"gold": [0] * N, "predicted": [0] * k + [1] * (N - k), "losses": [0.5] * N}
        languages[lang] = {"accuracy": k / N, "macro_f1": k / N, "eval_loss": 0.5, "examples": N}
    return {"languages": languages, "scores": scores, "collapsed": collapsed, **extra}


def _run(seed: int, *, joint_right: int = 16, merged_right: int = 14, joint_collapsed: bool = False) -> dict[str, Any]:
    merge = {
        "ties": _cost(3.0, merge=_cost(1.0), evaluation=_cost(2.0)),
        "search": _cost(100.0, merge=_cost(95.0), evaluation=_cost(5.0)),
    }
    attempts = [
        {
            "seed": seed,
            "collapsed": joint_collapsed,
            "reason": "predicts a for 20 of 20 inputs (100%)" if joint_collapsed else None,
            **_cost(50.0),
        }
    ]
    return {
        "seed": seed,
        "trained": {
            "joint": {"attempts": attempts},
            "expert:it": {"attempts": [{"seed": seed, "collapsed": False, "reason": None, **_cost(20.0)}]},
        },
        "models": {
            "joint": _model(dict.fromkeys(LANGS, joint_right), collapsed="predicts a" if joint_collapsed else None),
            "expert": {**_model(dict.fromkeys(LANGS, 15)), "collapsed": {}},
            "merged:ties": _model(dict.fromkeys(LANGS, merged_right)),
            "merged:search": _model(dict.fromkeys(LANGS, merged_right + 1)),
        },
        "cost": {"experts": {lang: _cost(20.0) for lang in LANGS}, "joint": _cost(50.0), "merges": merge},
        "maintenance": {
            "language": "it",
            "models": {
                "joint": _model(dict.fromkeys(LANGS, joint_right)),
                "expert": _model({"it": 15}),
                "merged:ties": _model(dict.fromkeys(LANGS, merged_right)),
                "merged:search": _model(dict.fromkeys(LANGS, merged_right)),
            },
            "cost": {"expert": _cost(25.0, attempts=2), "joint": _cost(55.0), "merges": merge},
        },
    }


def _workload(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "topic",
        "description": "topic classification",
        "base_model": "e5",
        "languages": LANGS,
        "new_language": None,
        "updated_language": "it",
        "labels": ["a", "b"],
        "labels_note": None,
        "metric": "accuracy",
        "higher_is_better": True,
        "metrics": ["accuracy"],
        "methods": ["ties", "search"],
        "training_summary": "LoRA",
        "data": {
            lang: {
                "train": 100,
                "update": 25 if lang == "it" else 0,
                "test": N,
                "validation": 10,
                "removed_translations": 3,
            }
            for lang in LANGS
        },
        "update": {"share": 0.25, "initial_rows": 100, "update_rows": 25, "actual_share": 0.25},
        "split": {"link_margin": 1.02, "link_margin_same_topic": 1.0},
        "base": _model(dict.fromkeys(LANGS, 5)),
        "runs": runs,
    }


def test_a_collapsed_joint_run_is_out_of_the_means_and_counted() -> None:
    w = _workload([_run(0), _run(1, joint_right=2, joint_collapsed=True), _run(2)])
    s = report.summarize(w)
    joint = s["quality"]["initial"]["accuracy"]["it"]["joint"]
    assert joint["n"] == 2 and joint["excluded"] == 1 and joint["runs"] == 3 and joint["mean"] == pytest.approx(0.8)
    assert s["quality"]["initial"]["accuracy"]["mean"]["joint"]["n"] == 2
    assert "(2/3 clean)" in report.quality_table(w, s, "accuracy")
    # the paired difference only uses the seeds where both models are clean
    diff = s["differences"]["initial"]["accuracy"]["merged:ties - joint"]["mean"]
    assert diff["seeds"] == 2 and diff["estimate"] == pytest.approx(-0.1)
    collapsed = s["collapsed"]
    assert [(c["seed"], c["model"], c["rerun"]) for c in collapsed] == [(1, "joint", None)]
    assert "kept out of the means" in report.collapse_statement(w, s)


def test_a_collapsed_merge_of_healthy_experts_stays_in_the_means_and_is_counted() -> None:
    runs = [_run(0), _run(1)]
    runs[1]["models"]["merged:ties"]["collapsed"] = "predicts a for 40 of 40 inputs (100%)"
    w = _workload(runs)
    s = report.summarize(w)
    cell = s["quality"]["initial"]["accuracy"]["it"]["merged:ties"]
    assert cell["n"] == 2 and cell["collapsed"] == 1
    assert "1 collapsed" in report.quality_table(w, s, "accuracy")
    assert "the method's result from healthy experts" in report.collapse_statement(w, s)


def test_each_method_is_costed_with_its_search_and_evaluation_and_every_attempt() -> None:
    w = _workload([_run(0), _run(1)])
    s = report.summarize(w)
    initial = s["cost"]["initial"]
    ties, search = initial["methods"]["ties"]["cpu_seconds"], initial["methods"]["search"]["cpu_seconds"]
    assert ties["total"]["mean"] == pytest.approx(40 + 3) and search["total"]["mean"] == pytest.approx(40 + 100)
    assert ties["saving"]["mean"] == pytest.approx(1 - 43 / 50) and search["saving"]["mean"] == pytest.approx(
        1 - 140 / 50
    )
    maintenance = s["cost"]["maintenance"]["methods"]["search"]
    assert maintenance["cpu_seconds"]["total"]["mean"] == pytest.approx(125) and maintenance["attempts"] == 4
    table = report.cost_table(w, s)
    assert "maintenance: +25% data for it" in table and "1 rerun(s)" not in table.split("initial training")[0]
    assert "merged search: retrain one expert + re-merge; 2 rerun(s) of collapsed trainings counted" in table
    assert "180% more" in table  # the search's merge costs more than the joint training it replaces


def test_the_trunk_is_counted_in_the_initial_cost_and_in_its_wall_time() -> None:
    runs = [_run(0), _run(1)]
    for r in runs:
        r["cost"]["trunk"] = _cost(30.0, tokens=1000)
        r["cost"]["experts"] = {lang: _cost(20.0, tokens=400) for lang in LANGS}
        r["cost"]["joint"]["tokens"] = 2000
        r["maintenance"]["cost"]["expert"]["tokens"] = 250
        r["maintenance"]["cost"]["joint"]["tokens"] = 2200
    runs[1]["cost"]["trunk"]["attempts"] = 2  # a collapsed trunk trained again (its cost is in the 30)
    w = {**_workload(runs), "recipe": {"name": "trunk", "trunk_epochs": 1, "trunk_share": 1.0, "branch_epochs": 2}}
    s = report.summarize(w)
    ties = s["cost"]["initial"]["methods"]["ties"]["cpu_seconds"]
    # the trunk (30) + both experts (2 x 20) + the merge (3), against the joint model's 50
    assert ties["training"]["mean"] == pytest.approx(70) and ties["total"]["mean"] == pytest.approx(73)
    assert ties["saving"]["mean"] == pytest.approx(1 - 73 / 50)
    # the branches train in parallel after the trunk: the trunk + the slowest expert + the merge
    assert ties["parallel"]["mean"] == pytest.approx(30 + 20 + 3)
    assert s["cost"]["initial"]["methods"]["ties"]["trainings"] == 2 * 3
    table = report.cost_table(w, s)
    assert "merged ties: the trunk + every expert + the merge; 1 rerun(s) of collapsed trainings counted" in table
    assert "wall time (experts in parallel: the trunk, then the slowest expert + merge)" in table
    # the optimiser's work beside the CPU seconds: 1000 (trunk) + 2 x 400 against the joint model's 2000 tokens
    assert "1,800 against 2,000 initially (-10%)" in table and "250 against 2,200 for the maintenance update" in table


def test_differences_and_parity_are_stated_with_their_intervals() -> None:
    w = _workload([_run(seed) for seed in range(3)])
    s = report.summarize(w)
    text = report.difference_table(w, s, "accuracy")
    assert "| **mean** | -10.0 [" in text and "| it, after its update |" in text
    parity = report.parity_statement(w, s)
    assert (
        parity.startswith("Merged ties is 10.0 points worse than the joint model") and "outside the interval" in parity
    )
    # joint - expert + expert - merged = joint - merged (the decomposition adds up)
    d = s["differences"]["initial"]["accuracy"]
    total = d["joint - expert"]["mean"]["estimate"] + d["expert - merged:ties"]["mean"]["estimate"]
    assert total == pytest.approx(-d["merged:ties - joint"]["mean"]["estimate"])


def test_the_readme_block_and_report_render_from_the_record_only(tmp_path: Any) -> None:
    record = {
        "schema": report.SCHEMA,
        "run": {
            "started_at": "2026-12-07T00:00:00Z",
            "command": "langmerge bench",
            "duration_seconds": 60.0,
            "device": "cpu",
            "dtype": "float32",
            "parallel": 2,
            "machine": {"cpu": "x", "cores": 2, "load_start": "0", "load_end": "0"},
            "versions": {"python": "3.11"},
            "seeds": [0, 1],
        },
        "workloads": [_workload([_run(0), _run(1)])],
    }
    paths = report.write_outputs(copy.deepcopy(record), tmp_path)
    text = paths["report"].read_text()
    assert "### Differences" in text and "removed (translations of test conversations)" in text
    block = report.readme_block(
        {**record, "workloads": [dict(record["workloads"][0], summary=report.summarize(record["workloads"][0]))]},
        plot_path="p.png",
    )
    assert block.startswith(report.README_BEGIN) and block.endswith(report.README_END)
    bad = {**record, "schema": "langmerge-bench/1"}
    with pytest.raises(Exception, match="langmerge-bench/1"):
        report.write_outputs(bad, tmp_path)
