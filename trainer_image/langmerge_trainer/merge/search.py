"""Automatic merge search (``MergedModel.spec.search``): choose method, density, lambda and per-language weights on a
validation split of every language, then merge, gate and publish the choice as usual.

Merging takes seconds, evaluating a few hundred examples too, so the choice can be searched instead of guessed:

* :class:`CandidateEvaluator` loads the base model **once** (on the GPU when there is one) and keeps a copy of every
  weight the adapters touch. A candidate is applied by writing ``W0 + merged update`` into those weights (and the
  weighted average of the classifier heads), evaluated on each language's validation examples, and replaced by the
  next candidate: no files, no reloads. What is evaluated is the method's exact merged update (a PEFT adapter output
  is then written within ``output.maxRelativeError`` of it, and the quality gate evaluates that written output).
* :func:`run_search` is staged and deterministic: the spec's own method and parameters first (so the search never
  does worse than no search on validation), each method of ``search.methods`` at its defaults, then density x lambda
  around the best method, then per-language weights by coordinate steps (raise the weight of the language furthest
  below its expert, lower the one furthest above), until the space or the budget (``maxCandidates``,
  ``maxSeconds``) is exhausted.
* The score of a language is the quality gate's metric relative to that language's expert alone on the same
  validation examples (absolute points for accuracy and macro-F1; relative for losses and token accuracy: positive
  is better than the expert). The objective is the worst language's score (default) or the mean.

The validation examples are never the gate's (:func:`langmerge_trainer.data.search_splits`).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from langmerge.api.expert import Metrics
from langmerge.api.merged import ABSOLUTE_GATE_METRICS, GateMetric, Search, SearchObjective
from langmerge.artifacts import SearchCandidate, SearchRecord
from langmerge.fingerprint import canonical_json
from langmerge.merge_catalogue import METHODS
from langmerge_trainer.data import Example
from langmerge_trainer.merge.adapters import LoraAdapter, load_adapter
from langmerge_trainer.merge.engine import (
    PEFT_ADAPTER,
    AdapterInput,
    BaseCheckpoint,
    MergeError,
    merged_heads,
    plan_merge,
)
from langmerge_trainer.merge.method_math import LoraUpdate, get_method
from langmerge_trainer.merge.reference import add_reference, relative

log = logging.getLogger(__name__)

#: Metric name (evaluation.metric) -> (Metrics field, higher is better).
METRIC_FIELDS: dict[str, tuple[str, bool]] = {
    GateMetric.EVAL_LOSS.value: ("eval_loss", False),
    GateMetric.TOKEN_ACCURACY.value: ("token_accuracy", True),
    GateMetric.ACCURACY.value: ("accuracy", True),
    GateMetric.MACRO_F1.value: ("macro_f1", True),
}
#: Weight steps of the per-language stage: multiply one language's weight by these.
WEIGHT_STEPS = (1.5, 1 / 1.5)
#: An objective must beat the best so far by more than this to replace it (ties keep the earlier candidate).
IMPROVEMENT = 1e-9


def metric_value(metric: str, metrics: Metrics) -> float:
    name, _ = METRIC_FIELDS[metric]
    value = getattr(metrics, name)
    if value is None:
        raise MergeError(f"the evaluation gives no {metric} for this task type; choose another evaluation.metric")
    return float(value)


def relative_score(metric: str, merged: float, expert: float) -> float:
    """The merged model's score relative to the expert's, as the quality gate measures regressions (positive = better
    than the expert): absolute points for accuracy and macro-F1, relative otherwise."""
    _, higher = METRIC_FIELDS[metric]
    difference = merged - expert if higher else expert - merged
    if GateMetric(metric) in ABSOLUTE_GATE_METRICS:
        return difference
    return difference / abs(expert) if expert else difference


@dataclass(frozen=True)
class Candidate:
    """A merge configuration: a method and its effective parameters (weights listed for every language)."""

    method: str
    parameters: Mapping[str, Any]

    @property
    def key(self) -> str:
        return canonical_json([self.method, dict(self.parameters)])


@dataclass
class Scored:
    candidate: Candidate
    scores: dict[str, float]
    relative: dict[str, float]
    objective: float
    seconds: float

    def record(self) -> SearchCandidate:
        return SearchCandidate(
            method=self.candidate.method,
            parameters=dict(self.candidate.parameters),
            objective=round(self.objective, 6),
            relative={k: round(v, 6) for k, v in self.relative.items()},
            scores={k: round(v, 6) for k, v in self.scores.items()},
            seconds=round(self.seconds, 3),
        )


class CandidateEvaluator:
    """One base model in memory; each candidate's exact merged update is written into its weights and evaluated.

    ``validation`` maps each language to its validation examples; ``labels`` makes the model a sequence classifier.
    Memory: the model, plus a copy of every weight an adapter touches, plus the adapters' factors.
    """

    def __init__(
        self,
        base_dir: Path,
        inputs: Sequence[AdapterInput],
        validation: Mapping[str, Sequence[Example]],
        *,
        device: torch.device,
        labels: Sequence[str] | None = None,
        max_seq_length: Mapping[str, int] | None = None,
        include_modules: Sequence[str] = (),
        exclude_modules: Sequence[str] = (),
        reference: AdapterInput | None = None,
    ) -> None:
        from langmerge_trainer.evaluate import load_tokenizer
        from langmerge_trainer.merge.evaluation import load_model

        self.inputs = list(inputs)
        self.languages = [a.language for a in inputs]
        self.validation = validation
        self.labels = list(labels) if labels is not None else None
        self.max_seq_length = dict(max_seq_length or {})
        self.device = device
        self.opened: list[LoraAdapter] = [load_adapter(Path(a.path), a.language) for a in inputs]
        #: The trunk the inputs branched from: candidates merge relative to it, as the merge itself does.
        self.reference = load_adapter(Path(reference.path), reference.language) if reference is not None else None
        base = BaseCheckpoint(base_dir)
        common = {"weights": {}, "include_modules": list(include_modules), "exclude_modules": list(exclude_modules)}
        plan = plan_merge(
            self.opened, self.inputs, "linear", common, PEFT_ADAPTER, "auto", base=base, reference=self.reference
        )
        #: Head rows merge by label support in every candidate, as in the merge itself.
        self.head_support = plan.head_support
        self.model: Any = load_model(base_dir, device, self.labels)
        self.tokenizer = load_tokenizer(base_dir)
        parameters = dict(self.model.named_parameters())
        self.targets: dict[str, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        self.trunks: dict[str, LoraUpdate | None] = {}
        self.updates: dict[str, list[tuple[int, LoraUpdate]]] = {}
        for m in plan.modules:
            param = parameters.get(f"{m.name}.weight")
            if param is None:
                param = parameters.get(f"{m.checkpoint_name}.weight")
            if param is None:
                raise MergeError(f"module {m.name}: the loaded model has no weight {m.name}.weight")
            self.targets[m.name] = (param, param.detach().clone())
            trunk = self.reference.update(m.name, 1.0, device) if self.reference is not None else None
            self.trunks[m.name] = trunk
            own = [(i, self.opened[i].update(m.name, 1.0, device)) for i, _ in m.inputs]
            self.updates[m.name] = own if trunk is None else [(i, relative(u, trunk)) for i, u in own]
        self.heads = {name: parameters[name] for name in merged_heads(self.opened, [1.0] * len(self.opened))}

    def close(self) -> None:
        for adapter in (*self.opened, *([self.reference] if self.reference is not None else [])):
            adapter.close()
        self.model = None
        self.targets.clear()
        self.updates.clear()
        self.heads.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def weights(self, parameters: Mapping[str, Any]) -> list[float]:
        given = parameters.get("weights") or {}
        return [float(given.get(lang, 1.0)) for lang in self.languages]

    @torch.no_grad()
    def apply(self, candidate: Candidate) -> None:
        """Write ``W0 + merged update`` of the candidate into the model (and its merged classifier head)."""
        impl = get_method(candidate.method)
        resolved = impl.resolve(candidate.parameters)
        weights = self.weights(candidate.parameters)
        if all(w == 0 for w in weights):
            raise MergeError("every adapter has weight 0")
        for name, (param, original) in self.targets.items():
            updates = [replace(u, weight=weights[i]) for i, u in self.updates[name]]
            param.data.copy_(original)
            if any(u.weight for u in updates):
                merged = impl.merge(name, updates, resolved)
                trunk = self.trunks.get(name)
                (merged if trunk is None else add_reference(merged, trunk)).add_to(param.data)
        for name, tensor in merged_heads(self.opened, weights, self.head_support).items():
            self.heads[name].data.copy_(tensor.to(self.heads[name].dtype))

    @torch.no_grad()
    def evaluate(self, languages: Sequence[str] | None = None) -> dict[str, Metrics]:
        out: dict[str, Metrics] = {}
        for lang in languages or self.languages:
            examples = self.validation[lang]
            length = self.max_seq_length.get(lang, 1024)
            if self.labels is not None:
                from langmerge_trainer.classify import evaluate_labelled

                out[lang] = evaluate_labelled(self.model, self.tokenizer, examples, self.labels, max_seq_length=length)
            else:
                from langmerge_trainer.evaluate import evaluate_examples

                out[lang] = evaluate_examples(self.model, self.tokenizer, examples, max_seq_length=length)
        return out

    def expert_metrics(self) -> dict[str, Metrics]:
        """Each expert alone on its own language's validation examples (the same weights path as candidates)."""
        out = {}
        for index, lang in enumerate(self.languages):
            one_hot = {other: float(i == index) for i, other in enumerate(self.languages)}
            self.apply(Candidate("linear", {"weights": one_hot, "include_modules": [], "exclude_modules": []}))
            out[lang] = self.evaluate([lang])[lang]
        return out


@dataclass
class SearchResult:
    chosen: Scored
    default: Scored
    evaluated: list[Scored]
    expert_scores: dict[str, float]
    seconds: float
    stopped: str
    metric: str
    objective: str
    validation: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record(self, top: int = 5) -> SearchRecord:
        ranked = sorted(self.evaluated, key=lambda s: -s.objective)
        return SearchRecord(
            objective=self.objective,
            metric=self.metric,
            candidates=len(self.evaluated),
            seconds=round(self.seconds, 3),
            stopped=self.stopped,
            chosen=self.chosen.record(),
            default=self.default.record(),
            top=[s.record() for s in ranked[:top]],
            expert_scores={k: round(v, 6) for k, v in self.expert_scores.items()},
            validation=self.validation,
        )


class _Budget(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _with(parameters: Mapping[str, Any], method: str, **changes: Any) -> dict[str, Any]:
    """Effective parameters of ``method``: the common ones of ``parameters`` and the method's own (defaults, then
    ``changes``)."""
    out: dict[str, Any] = {
        "weights": dict(parameters.get("weights") or {}),
        "include_modules": list(parameters.get("include_modules") or []),
        "exclude_modules": list(parameters.get("exclude_modules") or []),
    }
    out.update({name: default for name, default in METHODS[method].defaults.items()})
    out.update({k: v for k, v in changes.items() if k in METHODS[method].defaults})
    return out


def run_search(
    evaluator: CandidateEvaluator,
    start_method: str,
    start_parameters: Mapping[str, Any],
    search: Search,
    metric: str,
    *,
    clock: Callable[[], float] = time.monotonic,
    on_candidate: Callable[[int, Scored], None] = lambda n, scored: None,
) -> SearchResult:
    """Search the space of ``search`` starting from the spec's own method and parameters; returns the best."""
    started = clock()
    languages = evaluator.languages
    experts = {lang: metric_value(metric, m) for lang, m in evaluator.expert_metrics().items()}
    weights = {lang: float((start_parameters.get("weights") or {}).get(lang, 1.0)) for lang in languages}
    evaluated: list[Scored] = []
    seen: dict[str, Scored] = {}

    def objective(relative: Mapping[str, float]) -> float:
        values = list(relative.values())
        return min(values) if search.objective == SearchObjective.WORST else sum(values) / len(values)

    def score(candidate: Candidate, *, always: bool = False) -> Scored | None:
        if candidate.key in seen:
            return seen[candidate.key]
        try:
            get_method(candidate.method).resolve(candidate.parameters)
        except ValueError:
            return None  # e.g. della's density +- epsilon outside (0, 1): not a candidate
        if not always and len(evaluated) >= search.max_candidates:
            raise _Budget("maxCandidates")
        if not always and clock() - started >= search.max_seconds:
            raise _Budget("maxSeconds")
        t0 = clock()
        evaluator.apply(candidate)
        metrics = evaluator.evaluate()
        scores = {lang: metric_value(metric, metrics[lang]) for lang in languages}
        relative = {lang: relative_score(metric, scores[lang], experts[lang]) for lang in languages}
        scored = Scored(candidate, scores, relative, objective(relative), clock() - t0)
        evaluated.append(scored)
        seen[candidate.key] = scored
        on_candidate(len(evaluated), scored)
        log.info(
            "candidate %d: %s %s -> %s %.4f",
            len(evaluated),
            candidate.method,
            canonical_json(
                {k: v for k, v in candidate.parameters.items() if k not in ("include_modules", "exclude_modules")}
            ),
            search.objective,
            scored.objective,
        )
        return scored

    start = Candidate(start_method, {**dict(start_parameters), "weights": dict(weights)})
    best: Scored | None = None

    def consider(candidate: Candidate, *, always: bool = False) -> Scored | None:
        nonlocal best
        scored = score(candidate, always=always)
        if scored is not None and (best is None or scored.objective > best.objective + IMPROVEMENT):
            best = scored
        return scored

    stopped = "exhausted"
    default: Scored | None = None
    try:
        default = consider(start, always=True)  # the spec's own merge is always scored
        # stage 1: every method at its defaults
        for method in search.methods:
            consider(Candidate(method, _with(start.parameters, method)))
        # stage 2: density x lambda around the best method
        assert best is not None
        method = best.candidate.method
        accepts = METHODS[method].defaults
        densities = list(search.densities) if "density" in accepts else [None]
        lambdas = list(search.lambdas) if "lambda_" in accepts else [None]
        base_params = dict(best.candidate.parameters)
        for density in densities:
            for lam in lambdas:
                changes = {k: v for k, v in (("density", density), ("lambda_", lam)) if v is not None}
                consider(Candidate(method, {**base_params, **changes}))
        # stage 3: per-language weights, one language at a time
        if search.weights and len(languages) > 1:
            improved = True
            while improved:
                improved = False
                current = best
                order = sorted(languages, key=lambda lang: current.relative[lang])
                for lang, step in [(order[0], WEIGHT_STEPS[0]), (order[-1], WEIGHT_STEPS[1])] + [
                    (lang, s) for lang in order[1:-1] for s in WEIGHT_STEPS
                ]:
                    w = dict(current.candidate.parameters.get("weights") or {})
                    w[lang] = round(float(w.get(lang, 1.0)) * step, 6)
                    if w[lang] > 1000 or all(v == 0 for v in w.values()):
                        continue
                    scored = consider(
                        Candidate(current.candidate.method, {**current.candidate.parameters, "weights": w})
                    )
                    if scored is not None and best is scored:
                        improved = True
                        break
    except _Budget as reason:
        stopped = reason.reason
    assert best is not None and default is not None
    return SearchResult(
        chosen=best,
        default=default,
        evaluated=evaluated,
        expert_scores=experts,
        seconds=clock() - started,
        stopped=stopped,
        metric=metric,
        objective=str(search.objective),
    )


def describe(result: SearchResult) -> str:
    c = result.chosen
    shown = {k: v for k, v in c.candidate.parameters.items() if k not in ("include_modules", "exclude_modules")}
    return (
        f"search: {len(result.evaluated)} candidates in {result.seconds:.1f} s ({result.stopped}); chose {c.candidate.method} "
        f"{canonical_json(shown)}: {result.objective} {c.objective:+.4f} (spec's own: {result.default.objective:+.4f})"
    )
