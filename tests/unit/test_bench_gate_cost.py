"""What the benchmark charges for the gate's evaluation (langmerge_trainer.bench.runner.SeedRun.merges): the
operator's merge Job evaluates the merged model on every language, each expert alone and the base model (the floor),
and keeps the figures of a model it evaluated already on the same examples (its evaluation cache), so within one
MergedModel's story (one seed and one method) each expert and the base on each language are paid for once."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from langmerge.api.expert import Metrics
from langmerge_trainer.bench.runner import Evaluated, MethodSpec, SeedRun, Trained, TrainRun
from langmerge_trainer.collapse import HEALTHY

LANGS = ["it", "ja"]
#: CPU seconds of one evaluation: the merged model on its languages, an expert on its own, the base per language
MERGED, EXPERT, BASE = 5.0, 2.0, 1.5


def _evaluated(languages: list[str], cpu: float) -> Evaluated:
    metrics = {lang: Metrics(eval_loss=1.0, examples=4) for lang in languages}
    scores = {lang: {"losses": [1.0] * 4} for lang in languages}
    return Evaluated(metrics, scores, {"wall_seconds": cpu, "cpu_seconds": cpu, "gpu_seconds": 0.0})


class _Evaluator:
    def evaluate(self, uri: str | None, languages: list[str], *, full: bool = False) -> Evaluated:
        return _evaluated(languages, EXPERT)

    def evaluate_merge(self, merge: Any, languages: list[str]) -> Evaluated:
        return _evaluated(languages, MERGED)


class _Workload:
    """The parts of a WorkloadRun SeedRun.merges uses: merges cost nothing themselves here."""

    def __init__(self) -> None:
        self.w = SimpleNamespace(name="dialog", labels=None)
        self.methods = [MethodSpec("ties"), MethodSpec("linear")]

    def merge_step(self, method: MethodSpec, runs: Any, *, name: str, reference: Any) -> Any:
        from langmerge_trainer.bench.runner import MergeRun

        cost = SimpleNamespace(wall_seconds=0.0, cpu_seconds=0.0, gpu_seconds=0.0)
        return MergeRun(method, SimpleNamespace(cost=cost, module_errors={}, search=None))  # type: ignore[arg-type]

    def discard(self, merge: Any) -> None:
        pass


def _trained(key: str, lang: str) -> Trained:
    manifest = SimpleNamespace(adapter_uri=f"s3://b/{key}", adapter_digest=f"sha256:{key}")
    return Trained(key, [(TrainRun(key, lang, manifest, seed=0), HEALTHY)])  # type: ignore[arg-type]


def _seed_run() -> SeedRun:
    trained = {f"expert:{lang}": _trained(f"expert:{lang}", lang) for lang in LANGS}
    trained["expert-update:it"] = _trained("expert-update:it", "it")
    trained["expert-new:ko"] = _trained("expert-new:ko", "ko")
    base = _evaluated([*LANGS, "ko"], BASE * 3)
    return SeedRun(_Workload(), _Evaluator(), base, 0, trained, lambda _: None)  # type: ignore[arg-type]


def _cpu(costs: dict[str, Any], method: str) -> float:
    return float(costs[method]["evaluation"]["cpu_seconds"])


def test_the_gate_pays_for_the_base_and_each_expert_once_per_story_and_method() -> None:
    run = _seed_run()
    _, initial = run.merges("initial", {lang: f"expert:{lang}" for lang in LANGS})
    for method in ("ties", "linear"):  # each method is its own MergedModel: each pays for its first gate in full
        assert _cpu(initial, method) == pytest.approx(MERGED + 2 * EXPERT + 2 * BASE)
    # maintenance: only the retrained expert is new; the base's figures on these examples are known
    _, updated = run.merges("updated", {"it": "expert-update:it", "ja": "expert:ja"})
    assert _cpu(updated, "ties") == pytest.approx(MERGED + EXPERT)
    # a new language: its expert, and the base on its examples
    _, added = run.merges("new", {"it": "expert:it", "ja": "expert:ja", "ko": "expert-new:ko"})
    assert _cpu(added, "linear") == pytest.approx(MERGED + EXPERT + BASE)
