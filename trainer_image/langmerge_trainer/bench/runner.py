"""Running the benchmark with the Jobs' own code.

Every training run is ``langmerge-trainer train --task <TrainTask>`` in its own process, exactly the command a
training Job runs, against a real S3 server (the local control plane's SeaweedFS): the base model and the data are
uploaded there and read back through the production paths (``from_pretrained`` on the model cache, the JSONL reader;
the trainer's own evaluation runs on the validation split, never the test split). Every merge is
:func:`langmerge_trainer.merge.job.run_merge_task` (the merge Job) through :meth:`WorkloadRun.merge_step`, which takes
the merge config as a ``MethodSpec``. Quality is measured by :class:`Evaluator` on every language's held-out test
split, the same examples for every model, keeping every example's figures (for paired intervals).

The story per seed (all trainings start from the base, so they run in one pool, largest first):

1. one expert per language and one joint adapter on the union of the languages' data (same trainer, same
   hyper-parameters and epochs), every merge method over the experts;
2. maintenance: the updated language gets +25% data: that expert retrains and is re-merged with every method, the
   joint model retrains on all updated data;
3. a new language: its expert is trained and merged in with every method, the joint model retrains on all languages
   plus the new one.

**Collapsed runs.** After training, every run is checked on its validation split (:mod:`langmerge_trainer.collapse`):
a classifier predicting one label for nearly every input, or a loss at the label-frequency baseline (causal LM: not
below the base). A collapsed run is trained again with the next seed (``seed + 1000``, then ``+ 2000``); its cost
stays counted. A run still collapsed after :data:`MAX_ATTEMPTS` keeps its seed's figures out of the means (shown as
collapsed). Merged models are checked the same way on the test split and reported; they are what the method made
of healthy experts, so they stay in the means.

**Costs** count everything producing each reported model costs: every training attempt (with the trainer's own
evaluation), the merge Job (with its search, if any) and the evaluation the operator's merge Job runs before
publishing: the merged model on every language, and each expert on its own language and the base model on each
language the first time a MergedModel (one seed's story with one method) meets them, as the Job's evaluation cache
spends it; measured here, where the benchmark runs those same evaluations.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langmerge import artifacts
from langmerge.api.common import BaseModelRef
from langmerge.api.expert import Dataset, LanguageExpertSpec, Metrics
from langmerge.api.merged import (
    Evaluation,
    ExpertSelection,
    GateMetric,
    MergedModelSpec,
    MergeParameters,
    Output,
    Search,
)
from langmerge.artifacts import AdapterManifest, BaseModelIdentity, MergeManifest
from langmerge.fingerprint import merge_fingerprint, training_fingerprint
from langmerge.merge_catalogue import METHOD_NAMES, METHODS
from langmerge.store import ObjectStore
from langmerge.tasks import AdapterSource, MergeTask, MergeTaskInput, TrainTask
from langmerge_trainer.bench.errors import BenchError
from langmerge_trainer.bench.stats import scores_record
from langmerge_trainer.bench.workloads import LanguageData, Workload, cap_rows
from langmerge_trainer.collapse import HEALTHY, Verdict, causal_lm_verdict, classifier_verdict
from langmerge_trainer.data import Example

log = logging.getLogger(__name__)

NAMESPACE = "bench"
IMAGE = "langmerge-bench"
#: The language tag of the joint model (ISO 639-2 "multiple languages").
JOINT = "mul"
MODELS_BUCKET = "bench-models"
DATA_BUCKET = "bench-data"
ARTIFACTS_BUCKET = "bench-artifacts"


# -- merge configs ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """One merge configuration: a method of the registry and its parameters (the MergedModel's ``parameters``,
    camelCase or snake_case). ``label`` names it in reports, e.g. ``ties(density=1.0)``."""

    method: str
    parameters: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        if not self.parameters:
            return self.method
        return f"{self.method}({','.join(f'{k}={v}' for k, v in self.parameters)})"

    def params(self) -> dict[str, Any]:
        return dict(self.parameters)


_METHOD_RE = re.compile(r"^(?P<name>[a-z_]+)(\((?P<params>[^)]*)\))?$")


#: The merge search as a bench "method": ``search`` or ``search(maxCandidates=24;objective=mean)`` (spec.search's
#: fields); it starts from TIES density 1.0 and selects on each language's validation split.
SEARCH = "search"
#: The bench's search budget unless given: sized so that a seed's search takes minutes on a 2-core CPU.
SEARCH_DEFAULTS: dict[str, Any] = {"maxCandidates": 24, "validationExamples": 128}


def parse_methods(text: str) -> list[MethodSpec]:
    """``ties(density=1.0),linear,search`` -> method specs; ``all`` = TIES density 1.0 first, then every other method
    with its defaults, then the merge search."""
    if text.strip() == "all":
        return (
            [MethodSpec("ties", (("density", 1.0),))]
            + [MethodSpec(m) for m in METHOD_NAMES if m != "ties"]
            + [MethodSpec(SEARCH)]
        )
    out = []
    names = [*METHOD_NAMES, SEARCH]
    for raw in re.split(r",(?![^()]*\))", text):
        raw = raw.strip()
        match = _METHOD_RE.match(raw)
        if not match or match["name"] not in names:
            raise BenchError(f"bad method {raw!r}: expected NAME or NAME(k=v;k=v) with NAME one of {', '.join(names)}")
        params: list[tuple[str, Any]] = []
        for item in filter(None, (p.strip() for p in (match["params"] or "").split(";"))):
            key, _, value = item.partition("=")
            params.append((key.strip(), json.loads(value) if value.strip() else None))
        spec = MethodSpec(match["name"], tuple(params))
        try:  # fail early on a bad parameter
            if spec.method == SEARCH:
                Search.model_validate({**SEARCH_DEFAULTS, **spec.params()})
            else:
                MergeParameters.model_validate(spec.params())
        except ValueError as err:
            raise BenchError(f"bad method {raw!r}: {err}") from None
        out.append(spec)
    return out


# -- records ------------------------------------------------------------------------------------------------------------
def _cost_fields(wall: float, cpu: float, gpu: float) -> dict[str, float]:
    return {"wall_seconds": round(wall, 3), "cpu_seconds": round(cpu, 3), "gpu_seconds": round(gpu, 3)}


def add_costs(*costs: dict[str, Any]) -> dict[str, float]:
    """The sum of cost records (their wall, CPU and GPU seconds)."""
    return {
        k: round(sum(float(c.get(k, 0.0)) for c in costs), 3) for k in ("wall_seconds", "cpu_seconds", "gpu_seconds")
    }


@dataclass
class TrainRun:
    """One committed training run."""

    name: str
    language: str
    manifest: AdapterManifest
    #: The training seed it ran with.
    seed: int = 0

    def cost(self) -> dict[str, Any]:
        c = self.manifest.cost
        return {
            **_cost_fields(c.wall_seconds, c.cpu_seconds, c.gpu_seconds),
            "steps": self.manifest.steps,
            "tokens": self.manifest.tokens_trained,
            "examples": self.manifest.examples_train,
            "device": c.device,
        }


@dataclass
class Trained:
    """Every attempt at one training role of one seed: the first, and reruns with the next seeds while collapsed."""

    role: str
    attempts: list[tuple[TrainRun, Verdict]] = field(default_factory=list)

    @property
    def run(self) -> TrainRun:
        """The clean run (the last attempt when every attempt collapsed)."""
        return self.attempts[-1][0]

    @property
    def collapsed(self) -> Verdict:
        return self.attempts[-1][1]

    def cost(self) -> dict[str, Any]:
        """What the role cost: every attempt, collapsed ones included."""
        out: dict[str, Any] = {**self.run.cost(), **add_costs(*(r.cost() for r, _ in self.attempts))}
        out["attempts"] = len(self.attempts)
        return out

    def record(self) -> dict[str, Any]:
        return {
            "attempts": [
                {"seed": r.seed, "name": r.name, "collapsed": v.collapsed, "reason": v.reason, **r.cost()}
                for r, v in self.attempts
            ],
            "validation_metrics": metrics_dict(self.run.manifest.metrics),
        }


@dataclass
class MergeRun:
    method: MethodSpec
    manifest: MergeManifest
    #: The evaluation the operator's merge Job runs before publishing (merged model on every language, each expert
    #: on its own), measured by the benchmark (filled in after it evaluates).
    evaluation: dict[str, float] = field(default_factory=dict)

    def cost(self) -> dict[str, Any]:
        c = self.manifest.cost
        merge = _cost_fields(c.wall_seconds, c.cpu_seconds, c.gpu_seconds)
        out: dict[str, Any] = {
            **add_costs(merge, self.evaluation),
            "merge": merge,
            "evaluation": self.evaluation,
            "max_refactor_error": round(max(self.manifest.module_errors.values(), default=0.0), 6),
        }
        if self.manifest.search is not None:
            record = self.manifest.search
            out["search"] = {
                "chosen": {"method": self.manifest.method, "parameters": self.manifest.parameters},
                "objective": record.chosen.objective,
                "default_objective": record.default.objective if record.default else None,
                "candidates": record.candidates,
                "seconds": record.seconds,
                "stopped": record.stopped,
                "validation_examples": {k: v.get("examples") for k, v in record.validation.items()},
            }
        return out


def metrics_dict(m: Metrics) -> dict[str, Any]:
    return m.model_dump(mode="json", exclude_none=True)


# -- the run ---------------------------------------------------------------------------------------------------------------
@dataclass
class Context:
    """Where a benchmark run works: the S3 store, its environment for the trainer processes, local folders."""

    store: ObjectStore
    env: dict[str, str]
    work: Path
    device: str
    parallel: int
    threads: int
    merge_rank: int | None = None
    progress: Callable[[str, int], None] = lambda _desc, _n: None
    logs: Path = field(init=False)

    def __post_init__(self) -> None:
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        for bucket in (MODELS_BUCKET, DATA_BUCKET, ARTIFACTS_BUCKET):
            self.store.ensure_bucket(bucket)

    @property
    def model_cache(self) -> Path:
        return self.work / "models"


def upload_rows(store: ObjectStore, rows: Sequence[dict[str, str]], uri: str) -> str:
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    store.put_bytes(uri, body)
    return uri


_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
#: Longest object name the benchmark makes (a Kubernetes label value's limit: names also go into selectors).
MAX_NAME = 63


def object_name(*parts: object) -> str:
    """A Kubernetes object name from parts (``topic``, ``zh-Hant``, ``s3`` -> ``topic-zh-hant-s3``); BenchError
    when it cannot be one."""
    name = re.sub(r"[^a-z0-9]+", "-", "-".join(str(p) for p in parts).lower()).strip("-")
    if not _NAME.match(name) or len(name) > MAX_NAME:
        raise BenchError(f"{'-'.join(str(p) for p in parts)!r} gives no valid object name ({name!r})")
    return name


#: Attempts per training role: the first and two reruns with the next seeds when it collapsed.
MAX_ATTEMPTS = 3
#: A rerun's seed: the seed plus this times the attempt number.
RERUN_SEED_STEP = 1000


@dataclass(frozen=True)
class Role:
    """One training role of a seed: who trains on which languages' data in which scenario."""

    key: str
    language: str
    languages: tuple[str, ...]
    scenario: str
    label: str
    #: The role whose adapter this one starts from (the trunk), if any.
    init: str | None = None


#: The trunk role of the trunk recipe: one adapter on every initial language's data, the experts' starting point.
TRUNK = "trunk"


class WorkloadRun:
    """Everything about one workload: uploads, tasks, runs, quality and cost, for every seed."""

    def __init__(self, ctx: Context, workload: Workload, base_dir: Path, methods: Sequence[MethodSpec]) -> None:
        self.ctx = ctx
        self.w = workload
        self.base_dir = base_dir
        self.methods = list(methods)
        self.base_uri = f"s3://{MODELS_BUCKET}/{workload.name}/base"
        self.data_root = f"s3://{DATA_BUCKET}/{workload.name}"
        self.base_digest = ""

    # .. data ..
    def upload(self) -> None:
        store = self.ctx.store
        files = [p for p in sorted(self.base_dir.iterdir()) if p.is_file() and not p.name.startswith(".")]
        for path in files:
            store.upload_file(path, f"{self.base_uri}/{path.name}")
        self.base_digest, _ = store.prefix_digest(self.base_uri)
        w = self.w
        for lang in w.all_languages:
            d = w.data[lang]
            upload_rows(store, d.train, f"{self.data_root}/initial/{lang}/part-0.jsonl")
            upload_rows(store, d.test, f"{self.data_root}/test/{lang}/part-0.jsonl")
            if d.validation:
                upload_rows(store, d.validation, f"{self.data_root}/validation/{lang}/part-0.jsonl")
            if d.update:
                upload_rows(store, d.update, f"{self.data_root}/update/{lang}/part-1.jsonl")

    def dataset_prefix(self, scenario: str, languages: Sequence[str]) -> tuple[str, str]:
        """(train prefix, validation prefix) holding the given languages' files for a scenario (``initial``: initial
        data; ``updated``: with the updated language's extra data). The trainer evaluates on the validation split."""
        store = self.ctx.store
        key = f"{scenario}-{'-'.join(languages)}"
        train, validation = f"{self.data_root}/sets/{key}/train", f"{self.data_root}/sets/{key}/validation"
        if not store.list_objects(train):
            for lang in languages:
                d: LanguageData = self.w.data[lang]
                upload_rows(store, self.rows_of(lang, scenario), f"{train}/{lang}-0.jsonl")
                if scenario == "updated" and d.update:
                    upload_rows(store, d.update, f"{train}/{lang}-1.jsonl")
                upload_rows(store, d.validation or d.test, f"{validation}/{lang}.jsonl")
        return train, validation

    def rows_of(self, language: str, scenario: str) -> list[dict[str, str]]:
        """A language's initial training rows in a scenario: all of them, or the trunk's share."""
        d = self.w.data[language]
        if scenario != TRUNK or self.w.trunk_share >= 1.0:
            return d.train
        return cap_rows(d.train, max(1, round(self.w.trunk_share * len(d.train))))

    def training_rows(self, role: Role) -> list[dict[str, str]]:
        rows: list[dict[str, str]] = []
        for lang in role.languages:
            d = self.w.data[lang]
            rows += self.rows_of(lang, role.scenario) + (d.update if role.scenario == "updated" else [])
        return rows

    # .. tasks ..
    def roles(self) -> list[Role]:
        """Every training role of a seed: ``trunk`` (the trunk recipe), ``expert:<lang>``, ``joint``,
        ``expert-update:<lang>``, ``joint-update``, ``expert-new:<lang>``, ``joint-new``; the experts of the trunk recipe
        start from the trunk (also the updated and the new language's)."""
        w = self.w
        init = TRUNK if w.recipe == TRUNK else None
        out = [Role(TRUNK, JOINT, tuple(w.languages), TRUNK, TRUNK)] if init else []
        out += [Role(f"expert:{lang}", lang, (lang,), "initial", lang, init) for lang in w.languages]
        out.append(Role("joint", JOINT, tuple(w.languages), "initial", "joint"))
        up = w.updated_language
        out.append(Role(f"expert-update:{up}", up, (up,), "updated", f"{up}-updated", init))
        out.append(Role("joint-update", JOINT, tuple(w.languages), "updated", "joint-updated"))
        if w.new_language:
            new = w.new_language
            out.append(Role(f"expert-new:{new}", new, (new,), "initial", new, init))
            out.append(Role("joint-new", JOINT, tuple(w.all_languages), "initial", "joint-new"))
        return out

    def task_name(self, role: Role, seed: int) -> str:
        return object_name(self.w.name, role.label, f"s{seed}")

    def train_task(self, role: Role, seed: int, init: TrainRun | None = None) -> TrainTask:
        """The training Job's task of a role; ``init``: the trunk run it starts from."""
        w = self.w
        train_uri, validation_uri = self.dataset_prefix(role.scenario, role.languages)
        training = dict(w.training)
        if role.scenario == TRUNK:
            training["epochs"] = w.trunk_epochs
        elif role.init is not None:
            training["epochs"] = w.branch_epochs
        spec_doc: dict[str, Any] = {
            "language": role.language,
            "task": w.name,
            "taskType": w.task_type,
            "baseModel": {"uri": self.base_uri},
            "dataset": {"uri": train_uri, "evalUri": validation_uri},
            "lora": w.lora,
            # The trainer's own collapse check is off: the benchmark applies the same rules (collapse.py) to every run
            # itself, so that a collapsed run's figures and cost are recorded before it is trained again.
            "training": {
                **training,
                "seed": seed,
                "checkpointEverySteps": 100000,
                "progressEverySteps": 50,
                "collapseCheck": False,
            },
            "resources": {"gpus": 1 if self.ctx.device.startswith("cuda") else 0},
        }
        if w.labels:
            spec_doc["labels"] = list(w.labels)
        spec = LanguageExpertSpec.model_validate(spec_doc)
        store = self.ctx.store
        data_digest, _ = store.prefix_digest(train_uri)
        eval_digest, _ = store.prefix_digest(validation_uri)
        source = None
        if init is not None:
            manifest = init.manifest
            source = AdapterSource(
                uri=manifest.adapter_uri, digest=manifest.adapter_digest, source=f"trunk {init.name}"
            )
        fingerprint = training_fingerprint(
            spec,
            base_model_digest=self.base_digest,
            data_digest=data_digest,
            eval_data_digest=eval_digest,
            image=IMAGE,
            init_adapter_digest=source.digest if source else None,
        )
        name = self.task_name(role, seed)
        return TrainTask(
            fingerprint=fingerprint,
            output_uri=artifacts.expert_prefix(f"s3://{ARTIFACTS_BUCKET}/artifacts", NAMESPACE, name, fingerprint),
            namespace=NAMESPACE,
            name=name,
            spec=spec,
            base_model=BaseModelIdentity(uri=self.base_uri, digest=self.base_digest),
            data_digest=data_digest,
            eval_data_digest=eval_digest,
            image=IMAGE,
            init_adapter=source,
        )

    def verdict(self, role: Role, run: TrainRun) -> Verdict:
        """Is the run collapsed? Judged on its validation figures (the trainer's own evaluation)."""
        m = run.manifest.metrics
        if self.w.labels:
            gold = Counter(r["label"] for lang in role.languages for r in self.w.data[lang].validation)
            prior = Counter(r["label"] for r in self.training_rows(role))
            return classifier_verdict(m.predictions, gold=gold, eval_loss=m.eval_loss, prior=prior)
        base = run.manifest.base_metrics
        return causal_lm_verdict(m.eval_loss, base.eval_loss if base else None)

    # .. merging ..
    def merge_step(
        self, method: MethodSpec, experts: dict[str, TrainRun], *, name: str, reference: TrainRun | None = None
    ) -> MergeRun:
        """Merge the experts' adapters with one merge config, through the merge Job's code (its evaluation off: the
        benchmark evaluates every model on the same test examples itself and counts that as the Job's)."""
        languages = sorted(experts)
        ranks = [int(r.manifest.lora.get("rank", 8)) for r in experts.values()]
        searched = method.method == SEARCH
        if searched and not all(self.w.data[lang].validation for lang in languages):
            empty = [lang for lang in languages if not self.w.data[lang].validation]
            # without its own validation data the search would halve the test split: selection on test examples
            raise BenchError(f"search: no validation examples for {', '.join(empty)} (too little data)")
        # A method whose result is exactly low rank is published as an exact adapter (rank = sum of the inputs');
        # the others (TIES, DARE, magnitude pruning act entry by entry) and a search (whatever it chooses) as full
        # weights, so that what is measured is the method itself, not a low-rank approximation of it.
        exact = not searched and METHODS[method.method].low_rank_exact
        # Exactly low rank: the inputs' ranks add up; relative to a reference (the trunk) each input's update is its
        # adapter minus the reference (rank up to r_i + r_ref), and the reference is added back once.
        exact_rank = sum(ranks)
        if reference is not None:
            ref_rank = int(reference.manifest.lora.get("rank", 8))
            exact_rank += (len(ranks) + 1) * ref_rank
        spec = MergedModelSpec(
            base_model=BaseModelRef(uri=self.base_uri),
            experts=ExpertSelection(names=[experts[lang].name for lang in languages]),
            # a search starts from the bench's primary configuration, TIES density 1.0
            method="ties" if searched else method.method,
            parameters=MergeParameters.model_validate({"density": 1.0} if searched else method.params()),
            output=Output(
                uri=f"s3://{MODELS_BUCKET}/{self.w.name}/merged/{name}",
                format="peft-adapter" if exact else "full-weights",
                rank=(self.ctx.merge_rank or exact_rank) if exact else "auto",
            ),
            # no gate here (the bench evaluates every model itself on the test split); a search's objective uses the
            # workload's headline metric
            evaluation=Evaluation(
                enabled=False,
                metric=GateMetric.ACCURACY if self.w.metric == "accuracy" else GateMetric.EVAL_LOSS,
            ),
            search=Search.model_validate({**SEARCH_DEFAULTS, **method.params()}) if searched else None,
        )
        inputs = [
            MergeTaskInput(
                expert=experts[lang].name,
                language=lang,
                adapter_uri=experts[lang].manifest.adapter_uri,
                adapter_digest=experts[lang].manifest.adapter_digest,
                dataset=Dataset(
                    uri=f"{self.data_root}/initial/{lang}",
                    eval_uri=f"{self.data_root}/test/{lang}",
                    validation_uri=f"{self.data_root}/validation/{lang}" if self.w.data[lang].validation else None,
                ),
                max_seq_length=int(self.w.training.get("maxSeqLength", 1024)),
                task_type=self.w.task_type,
                labels=self.w.labels,
                **_label_counts(experts[lang].manifest),
            )
            for lang in languages
        ]
        fingerprint = merge_fingerprint(
            spec,
            inputs=[(i.language, i.adapter_digest, i.weight) for i in inputs],
            base_model_digest=self.base_digest,
            image=IMAGE,
            validation=[(i.language, i.dataset.validation_uri) for i in inputs],
            label_counts=[(i.language, i.label_counts) for i in inputs],
            reference_digest=reference.manifest.adapter_digest if reference is not None else None,
        )
        task = MergeTask(
            fingerprint=fingerprint,
            output_uri=artifacts.merge_prefix(spec.output.uri, fingerprint),
            namespace=NAMESPACE,
            name=name,
            method=spec.method,
            parameters=spec.effective_parameters(),
            base_model=BaseModelIdentity(uri=self.base_uri, digest=self.base_digest),
            inputs=inputs,
            output=spec.output,
            evaluation=spec.evaluation,
            image=IMAGE,
            search=spec.search,
            reference=AdapterSource(
                uri=reference.manifest.adapter_uri, digest=reference.manifest.adapter_digest, source="trunk"
            )
            if reference is not None
            else None,
        )
        from langmerge_trainer.merge.job import run_merge_task

        manifest = run_merge_task(task, self.ctx.store, device=self.ctx.device, work_dir=self.ctx.work)
        return MergeRun(method, manifest)

    def discard(self, merge: MergeRun) -> None:
        """Delete a full-weights merge output once evaluated (the manifest stays): keeps the disk use bounded."""
        if merge.manifest.output_format == "full-weights":
            self.ctx.store.delete_prefix(merge.manifest.model_uri)


def _label_counts(manifest: AdapterManifest) -> dict[str, Any]:
    """The expert's label coverage for the merge input, where the manifest records it."""
    return {"label_counts": manifest.label_counts} if manifest.label_counts is not None else {}


# -- training in worker processes (the training Job's command) -----------------------------------------------------
def run_training(ctx: Context, tasks: dict[str, TrainTask], on_done: Callable[[str], None]) -> dict[str, TrainRun]:
    """Run training tasks in ``ctx.parallel`` processes (largest first); returns key -> run."""
    order = sorted(tasks, key=lambda key: -_size_hint(tasks[key]))
    results: dict[str, TrainRun] = {}

    def one(key: str) -> tuple[str, TrainRun]:
        task = tasks[key]
        task_file = ctx.work / "tasks" / f"{task.name}.json"
        task_file.parent.mkdir(parents=True, exist_ok=True)
        task_file.write_text(task.to_json())
        cmd = [sys.executable, "-m", "langmerge_trainer", "train", "--task", f"@{task_file}", "--device", ctx.device]
        log_path = ctx.logs / f"{task.name}.log"
        with log_path.open("w") as out:
            proc = subprocess.Popen(cmd, env=ctx.env, stdout=out, stderr=subprocess.STDOUT)
            children.append(proc)
            rc = proc.wait()
        if rc != 0:
            tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-30:])
            raise BenchError(f"training {task.name} failed (exit {rc}); log {log_path}:\n{tail}")
        raw = ctx.store.get_json(artifacts.join(task.output_uri, artifacts.MANIFEST))
        manifest = AdapterManifest.model_validate(raw)
        return key, TrainRun(task.name, task.spec.language, manifest, seed=task.spec.training.seed)

    children: list[subprocess.Popen[bytes]] = []
    with ThreadPoolExecutor(max_workers=max(1, ctx.parallel)) as pool:
        futures = [pool.submit(one, key) for key in order]
        try:
            for future in as_completed(futures):
                key, run = future.result()
                results[key] = run
                on_done(key)
        except BaseException:
            for future in futures:
                future.cancel()
            for proc in children:  # a failed or interrupted benchmark leaves no trainer behind
                if proc.poll() is None:
                    proc.terminate()
            raise
    return results


def _size_hint(task: TrainTask) -> int:
    """Training examples (bigger tasks first keeps the pool busy to the end)."""
    return len(task.spec.dataset.uri) if task.spec.language != JOINT else 10**6 + len(task.spec.dataset.uri)


def train_all(
    wr: WorkloadRun,
    seeds: Sequence[int],
    on_done: Callable[[str], None],
    *,
    max_attempts: int = MAX_ATTEMPTS,
    train: Callable[[Context, dict[str, TrainTask], Callable[[str], None]], dict[str, TrainRun]] | None = None,
) -> dict[int, dict[str, Trained]]:
    """Every role of every seed, in pools of the roles that can start (a branch once its trunk is settled); a
    collapsed run is trained again with the next seed, up to ``max_attempts`` attempts. Returns seed -> role key ->
    its attempts. ``train`` runs a pool of tasks (:func:`run_training`)."""
    train = train or run_training
    roles = {role.key: role for role in wr.roles()}
    trained: dict[int, dict[str, Trained]] = {seed: {key: Trained(key) for key in roles} for seed in seeds}
    pending = {(seed, key) for seed in seeds for key in roles}

    def settled(seed: int, key: str) -> bool:
        t = trained[seed][key]
        return (seed, key) not in pending and bool(t.attempts)

    while pending:
        ready = sorted(
            (seed, key) for seed, key in pending if roles[key].init is None or settled(seed, roles[key].init or "")
        )
        if not ready:
            raise BenchError(f"training roles wait for each other: {sorted(pending)}")
        tasks = {}
        for seed, key in ready:
            role = roles[key]
            attempt = len(trained[seed][key].attempts)
            init = trained[seed][role.init].run if role.init is not None else None
            tasks[f"{seed}|{key}"] = wr.train_task(role, seed + RERUN_SEED_STEP * attempt, init)
        done = train(wr.ctx, tasks, lambda k: on_done(k.split("|", 1)[1]))
        for flat, run in done.items():
            seed_text, key = flat.split("|", 1)
            seed = int(seed_text)
            verdict = wr.verdict(roles[key], run)
            trained[seed][key].attempts.append((run, verdict))
            again = verdict.collapsed and len(trained[seed][key].attempts) < max_attempts
            if verdict.collapsed:
                log.warning("%s collapsed (%s)%s", run.name, verdict.reason, "; rerun" if again else "")
            if not again:
                pending.discard((seed, key))
    return trained


# -- evaluation ------------------------------------------------------------------------------------------------------------
def test_examples(workload: Workload, language: str) -> list[Example]:
    rows = workload.data[language].test
    if workload.labels:
        return [Example(prompt=r["text"], completion=r["label"]) for r in rows]
    return [Example(prompt=r["prompt"], completion=r["completion"]) for r in rows]


@dataclass
class Evaluated:
    """One model on some languages' test splits: figures, every example's figures, and what evaluating cost."""

    metrics: dict[str, Metrics]
    scores: dict[str, dict[str, list[Any]]]
    cost: dict[str, float]

    def record(self, languages: Sequence[str] | None = None) -> dict[str, Any]:
        chosen = list(self.metrics) if languages is None else list(languages)
        return {
            "languages": {lang: metrics_dict(self.metrics[lang]) for lang in chosen},
            "scores": {lang: self.scores[lang] for lang in chosen},
        }


class Evaluator:
    """Quality of a model on languages' test splits: the base alone (a classifier: with its fresh, untrained head), an
    adapter (an expert, the joint model or a merged adapter) on the base, or full merged weights."""

    def __init__(self, ctx: Context, workload: Workload, base_dir: Path) -> None:
        self.ctx = ctx
        self.w = workload
        self.base_dir = base_dir
        self.max_seq_length = int(workload.training.get("maxSeqLength", 128))

    def evaluate_merge(self, merge: MergeRun, languages: Sequence[str]) -> Evaluated:
        return self.evaluate(merge.manifest.model_uri, languages, full=merge.manifest.output_format == "full-weights")

    def evaluate(self, uri: str | None, languages: Sequence[str], *, full: bool = False) -> Evaluated:
        """The base (``uri`` None), the base + the adapter under ``uri``, or (``full``) the full merged model under
        ``uri``, on each language's test examples."""
        import torch

        from langmerge_trainer.evaluate import pick_device

        wall0, cpu0 = time.monotonic(), time.process_time()
        device = pick_device(self.ctx.device)
        metrics: dict[str, Metrics] = {}
        scores: dict[str, dict[str, list[Any]]] = {}
        with tempfile.TemporaryDirectory(prefix="bench-eval-", dir=self.ctx.work) as tmp:
            adapter_dir = model_dir = None
            if uri:
                target = Path(tmp) / "model"
                if not self.ctx.store.download_prefix(uri, target):
                    raise BenchError(f"no model files under {uri}")
                adapter_dir, model_dir = (None, target) if full else (target, None)
            if self.w.labels:
                from langmerge_trainer.classify import load_classifier_for_eval, score_labelled

                model, tok = load_classifier_for_eval(
                    self.base_dir, self.w.labels, adapter_dir=adapter_dir, model_dir=model_dir, device=device
                )
                for lang in languages:
                    found = score_labelled(
                        model, tok, test_examples(self.w, lang), self.w.labels, max_seq_length=self.max_seq_length
                    )
                    metrics[lang], scores[lang] = found.metrics(self.w.labels), scores_record(found)
            else:
                from langmerge_trainer.evaluate import load_for_eval, score_examples

                model, tok = load_for_eval(self.base_dir, adapter_dir=adapter_dir, model_dir=model_dir, device=device)
                for lang in languages:
                    got = score_examples(model, tok, test_examples(self.w, lang), max_seq_length=self.max_seq_length)
                    metrics[lang], scores[lang] = got.metrics(), scores_record(got)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        wall = time.monotonic() - wall0
        gpus = 1 if device.type == "cuda" else 0
        return Evaluated(metrics, scores, _cost_fields(wall, time.process_time() - cpu0, gpus * wall))


def merged_verdict(w: Workload, merged: Evaluated, base: Evaluated) -> Verdict:
    """Is a merged model collapsed? Judged on the test split of every language it serves, pooled."""
    languages = list(merged.metrics)
    if w.labels:
        predictions: Counter[str] = Counter()
        gold: Counter[str] = Counter()
        for lang in languages:
            predictions.update(merged.metrics[lang].predictions or {})
            gold.update(w.labels[g] for g in merged.scores[lang]["gold"])
        return classifier_verdict(predictions, gold=gold)
    mean = sum(merged.metrics[lang].eval_loss or 0.0 for lang in languages) / len(languages)
    base_mean = sum(base.metrics[lang].eval_loss or 0.0 for lang in languages) / len(languages)
    return causal_lm_verdict(mean, base_mean)


def _model(
    evaluated: Evaluated, *, languages: Sequence[str] | None = None, verdict: Verdict = HEALTHY, **extra: Any
) -> dict[str, Any]:
    return {
        **evaluated.record(languages),
        "collapsed": verdict.reason if verdict.collapsed else None,
        **{k: v for k, v in extra.items() if v is not None},
    }


class SeedRun:
    """Merges and evaluations of one seed, once its trainings are done (:meth:`record` is the seed's JSON record)."""

    def __init__(
        self,
        wr: WorkloadRun,
        evaluator: Evaluator,
        base: Evaluated,
        seed: int,
        trained: dict[str, Trained],
        tick: Callable[[str], None],
    ) -> None:
        self.wr, self.w, self.evaluator, self.base = wr, wr.w, evaluator, base
        self.seed, self.trained, self.tick = seed, trained, tick
        self.expert_evals: dict[str, Evaluated] = {}
        #: per merge method (each its own MergedModel): the models the merge Job's gate has figures of already
        #: (its evaluation cache: an expert adapter on its language, the base on a language), paid for once
        self.gate_known: dict[str, set[str]] = {}

    def base_cost(self, language: str) -> dict[str, float]:
        """The base model's evaluation on one language: its share of the base's evaluation by examples."""
        examples = {lang: m.examples or 0 for lang, m in self.base.metrics.items()}
        share = examples.get(language, 0) / max(1, sum(examples.values()))
        return {k: float(v) * share for k, v in self.base.cost.items()}

    def gate_cost(self, method: str, merged: Evaluated, experts: dict[str, tuple[str, Evaluated]]) -> dict[str, float]:
        """What the merge Job's gate evaluates before publishing (``merge/job.py``): the merged model on every
        language, and each expert alone and the base on each language unless their figures on the same examples are
        known from an earlier merge of the same MergedModel. ``experts``: language -> (role key, its evaluation)."""
        known = self.gate_known.setdefault(method, set())
        costs = [merged.cost]
        for lang, (key, evaluated) in experts.items():
            for model, cost in ((f"expert:{key}", evaluated.cost), (f"base:{lang}", self.base_cost(lang))):
                if model not in known:
                    known.add(model)
                    costs.append(cost)
        return add_costs(*costs)

    def expert(self, key: str) -> tuple[TrainRun, Evaluated, dict[str, Any]]:
        """An expert role's clean run, its evaluation on its own language (once) and its model record."""
        t = self.trained[key]
        lang = t.run.language
        if key not in self.expert_evals:
            self.expert_evals[key] = self.evaluator.evaluate(t.run.manifest.adapter_uri, [lang])
        ev = self.expert_evals[key]
        return t.run, ev, _model(ev, verdict=t.collapsed, seed=t.run.seed)

    def joint(self, key: str, languages: Sequence[str]) -> dict[str, Any]:
        t = self.trained[key]
        ev = self.evaluator.evaluate(t.run.manifest.adapter_uri, languages)
        self.tick(f"evaluated {key}")
        return _model(ev, verdict=t.collapsed, seed=t.run.seed)

    def merges(self, scenario: str, expert_keys: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Every method over the experts of ``expert_keys`` (language -> role key): model records and costs."""
        w, wr = self.w, self.wr
        experts = {lang: self.expert(key) for lang, key in expert_keys.items()}
        runs = {lang: e[0] for lang, e in experts.items()}
        collapsed_inputs = [lang for lang, key in expert_keys.items() if self.trained[key].collapsed.collapsed]
        languages = list(expert_keys)
        models: dict[str, Any] = {}
        costs: dict[str, Any] = {}
        suffix = "" if scenario == "initial" else f"-{scenario}"
        for method in wr.methods:
            merge = wr.merge_step(
                method,
                runs,
                name=object_name(w.name, _slug(method.label) + suffix, f"s{self.seed}"),
                reference=self.trained[TRUNK].run if TRUNK in self.trained else None,
            )
            ev = self.evaluator.evaluate_merge(merge, languages)
            wr.discard(merge)
            # what the operator's merge Job evaluates before publishing: the merged model, each expert alone and the
            # base (the floor), the last two once per MergedModel (the Job's evaluation cache)
            merge.evaluation = self.gate_cost(
                method.label, ev, {lang: (expert_keys[lang], experts[lang][1]) for lang in languages}
            )
            verdict = merged_verdict(w, ev, self.base)
            models[f"merged:{method.label}"] = _model(
                ev,
                verdict=verdict,
                excluded=f"input expert(s) {', '.join(collapsed_inputs)} collapsed" if collapsed_inputs else None,
            )
            costs[method.label] = merge.cost()
            self.tick(f"{scenario}: merged {method.label}")
        return models, costs

    def scenario(self, name: str, language: str, experts: dict[str, str], expert: str, joint: str) -> dict[str, Any]:
        """A later scenario: one expert trained (``expert``) and merged in with the others, the joint model retrained
        (``joint``) on every language of ``experts``."""
        models = {"joint": self.joint(joint, list(experts)), "expert": self.expert(expert)[2]}
        merged, remerge = self.merges(name, experts)
        models.update(merged)
        cost = {"expert": self.trained[expert].cost(), "joint": self.trained[joint].cost(), "merges": remerge}
        return {"language": language, "models": models, "cost": cost}

    def record(self) -> dict[str, Any]:
        w = self.w
        languages = w.languages
        models: dict[str, Any] = {"joint": self.joint("joint", languages)}
        models["expert"] = _combine([self.expert(f"expert:{lang}")[2] for lang in languages])
        merged, merge_costs = self.merges("initial", {lang: f"expert:{lang}" for lang in languages})
        models.update(merged)
        record: dict[str, Any] = {
            "seed": self.seed,
            "trained": {key: t.record() for key, t in self.trained.items()},
            "models": models,
            "cost": {
                "experts": {lang: self.trained[f"expert:{lang}"].cost() for lang in languages},
                "joint": self.trained["joint"].cost(),
                "merges": merge_costs,
                **({"trunk": self.trained[TRUNK].cost()} if TRUNK in self.trained else {}),
            },
        }
        # maintenance: the updated language's expert retrains on +25% data; re-merged with every method
        up = w.updated_language
        keys = {lang: (f"expert-update:{up}" if lang == up else f"expert:{lang}") for lang in languages}
        record["maintenance"] = self.scenario("updated", up, keys, f"expert-update:{up}", "joint-update")
        if w.new_language:
            new = w.new_language
            keys = {lang: f"expert:{lang}" for lang in languages} | {new: f"expert-new:{new}"}
            record["new_language"] = self.scenario("new", new, keys, f"expert-new:{new}", "joint-new")
        return record


def _combine(models: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The "own expert" column: each language's expert on its own language, as one model record."""
    out: dict[str, Any] = {"languages": {}, "scores": {}, "collapsed": {}, "seeds": {}}
    for m in models:
        (lang,) = m["languages"]
        out["languages"][lang] = m["languages"][lang]
        out["scores"][lang] = m["scores"][lang]
        out["seeds"][lang] = m.get("seed")
        if m.get("collapsed"):
            out["collapsed"][lang] = m["collapsed"]
    return out


def evaluate_base(evaluator: Evaluator, languages: Sequence[str]) -> Evaluated:
    """The base model before fine-tuning (the same for every seed: a classifier's fresh head is seeded by its
    labels)."""
    return evaluator.evaluate(None, languages)


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def trainer_env(base: dict[str, str], threads: int, model_cache: Path) -> dict[str, str]:
    env = dict(base)
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
            "LANGMERGE_MODEL_CACHE": str(model_cache),
            "LANGMERGE_LOG_LEVEL": os.environ.get("LANGMERGE_LOG_LEVEL", "INFO"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env
