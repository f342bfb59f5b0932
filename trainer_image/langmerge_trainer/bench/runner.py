"""Running the benchmark with the Jobs' own code.

Every training run is ``langmerge-trainer train --task <TrainTask>`` in its own process, exactly the command a
training Job runs, against a real S3 server (the local control plane's SeaweedFS): the base model and the data are
uploaded there and read back through the production paths (``from_pretrained`` on the model cache, the JSONL reader,
the stable split replaced by an explicit test prefix). Every merge is :func:`langmerge_trainer.merge.job.run_merge_task`
(the merge Job) through :func:`merge_step`, which takes the merge config as a ``MethodSpec``. Costs are the trainer's
and the merge Job's own records (the manifests' ``cost``). Quality is measured by :class:`Evaluator` on every language's
held-out test split, the same examples for every model.

The story per seed (all trainings start from the base, so they run in one pool, largest first):

1. one expert per language and one joint adapter on the union of the languages' data (same trainer, same
   hyper-parameters and epochs), every merge method over the experts;
2. maintenance: the updated language gets +25% data: that expert retrains and is re-merged, the joint model retrains
   on all updated data;
3. a new language: its expert is trained and merged in, the joint model retrains on all languages plus the new one.
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
from langmerge.tasks import MergeTask, MergeTaskInput, TrainTask
from langmerge_trainer.bench.workloads import LanguageData, Workload
from langmerge_trainer.data import Example

log = logging.getLogger(__name__)

NAMESPACE = "bench"
IMAGE = "langmerge-bench"
#: The language tag of the joint model (ISO 639-2 "multiple languages").
JOINT = "mul"
MODELS_BUCKET = "bench-models"
DATA_BUCKET = "bench-data"
ARTIFACTS_BUCKET = "bench-artifacts"


class BenchError(RuntimeError):
    pass


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
@dataclass
class TrainRun:
    """One committed training run."""

    name: str
    language: str
    manifest: AdapterManifest

    def cost(self) -> dict[str, Any]:
        c = self.manifest.cost
        return {
            "wall_seconds": round(c.wall_seconds, 3),
            "cpu_seconds": round(c.cpu_seconds, 3),
            "gpu_seconds": round(c.gpu_seconds, 3),
            "steps": self.manifest.steps,
            "tokens": self.manifest.tokens_trained,
            "examples": self.manifest.examples_train,
            "device": c.device,
        }


@dataclass
class MergeRun:
    method: MethodSpec
    manifest: MergeManifest

    def cost(self) -> dict[str, Any]:
        c = self.manifest.cost
        out: dict[str, Any] = {
            "wall_seconds": round(c.wall_seconds, 3),
            "cpu_seconds": round(c.cpu_seconds, 3),
            "gpu_seconds": round(c.gpu_seconds, 3),
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
        """(train prefix, test prefix) holding the given languages' files for a scenario (``initial``: initial data;
        ``updated``: with the updated language's extra data)."""
        store = self.ctx.store
        key = f"{scenario}-{'-'.join(languages)}"
        train, test = f"{self.data_root}/sets/{key}/train", f"{self.data_root}/sets/{key}/test"
        if not store.list_objects(train):
            for lang in languages:
                d: LanguageData = self.w.data[lang]
                upload_rows(store, d.train, f"{train}/{lang}-0.jsonl")
                if scenario == "updated" and d.update:
                    upload_rows(store, d.update, f"{train}/{lang}-1.jsonl")
                upload_rows(store, d.test, f"{test}/{lang}.jsonl")
        return train, test

    # .. tasks ..
    def train_task(self, name: str, language: str, languages: Sequence[str], scenario: str, seed: int) -> TrainTask:
        w = self.w
        train_uri, test_uri = self.dataset_prefix(scenario, languages)
        spec_doc: dict[str, Any] = {
            "language": language,
            "task": w.name,
            "taskType": w.task_type,
            "baseModel": {"uri": self.base_uri},
            "dataset": {"uri": train_uri, "evalUri": test_uri},
            "lora": w.lora,
            "training": {**w.training, "seed": seed, "checkpointEverySteps": 100000, "progressEverySteps": 50},
            "resources": {"gpus": 1 if self.ctx.device.startswith("cuda") else 0},
        }
        if w.labels:
            spec_doc["labels"] = list(w.labels)
        spec = LanguageExpertSpec.model_validate(spec_doc)
        store = self.ctx.store
        data_digest, _ = store.prefix_digest(train_uri)
        eval_digest, _ = store.prefix_digest(test_uri)
        fingerprint = training_fingerprint(
            spec, base_model_digest=self.base_digest, data_digest=data_digest, eval_data_digest=eval_digest, image=IMAGE
        )
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
        )

    def plan(self, seed: int) -> dict[str, TrainTask]:
        """Every training task of a seed, by role: ``expert:<lang>``, ``joint``, ``expert-update:<lang>``,
        ``joint-update``, ``expert-new:<lang>``, ``joint-new``."""
        w = self.w
        n = w.name
        tasks = {
            f"expert:{lang}": self.train_task(f"{n}-{lang}-s{seed}", lang, [lang], "initial", seed)
            for lang in w.languages
        }
        tasks["joint"] = self.train_task(f"{n}-joint-s{seed}", JOINT, w.languages, "initial", seed)
        up = w.updated_language
        tasks[f"expert-update:{up}"] = self.train_task(f"{n}-{up}-updated-s{seed}", up, [up], "updated", seed)
        tasks["joint-update"] = self.train_task(f"{n}-joint-updated-s{seed}", JOINT, w.languages, "updated", seed)
        if w.new_language:
            new = w.new_language
            tasks[f"expert-new:{new}"] = self.train_task(f"{n}-{new}-s{seed}", new, [new], "initial", seed)
            tasks["joint-new"] = self.train_task(f"{n}-joint-new-s{seed}", JOINT, w.all_languages, "initial", seed)
        return tasks

    # .. merging ..
    def merge_step(self, method: MethodSpec, experts: dict[str, TrainRun], *, name: str) -> MergeRun:
        """Merge the experts' adapters with one merge config, through the merge Job's code (no evaluation there:
        the benchmark evaluates every model on the same test examples itself)."""
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
        spec = MergedModelSpec(
            base_model=BaseModelRef(uri=self.base_uri),
            experts=ExpertSelection(names=[experts[lang].name for lang in languages]),
            # a search starts from the bench's primary configuration, TIES density 1.0
            method="ties" if searched else method.method,
            parameters=MergeParameters.model_validate({"density": 1.0} if searched else method.params()),
            output=Output(
                uri=f"s3://{MODELS_BUCKET}/{self.w.name}/merged/{name}",
                format="peft-adapter" if exact else "full-weights",
                rank=(self.ctx.merge_rank or sum(ranks)) if exact else "auto",
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
            )
            for lang in languages
        ]
        fingerprint = merge_fingerprint(
            spec,
            inputs=[(i.language, i.adapter_digest, i.weight) for i in inputs],
            base_model_digest=self.base_digest,
            image=IMAGE,
            validation=[(i.language, i.dataset.validation_uri) for i in inputs],
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
        )
        from langmerge_trainer.merge.job import run_merge_task

        manifest = run_merge_task(task, self.ctx.store, device=self.ctx.device, work_dir=self.ctx.work)
        return MergeRun(method, manifest)

    def discard(self, merge: MergeRun) -> None:
        """Delete a full-weights merge output once evaluated (the manifest stays): keeps the disk use bounded."""
        if merge.manifest.output_format == "full-weights":
            self.ctx.store.delete_prefix(merge.manifest.model_uri)


# -- training in worker processes (the training Job's command) -----------------------------------------------------
def run_training(ctx: Context, tasks: dict[str, TrainTask], on_done: Callable[[str], None]) -> dict[str, TrainRun]:
    """Run training tasks in ``ctx.parallel`` processes (largest first); returns role -> run."""
    order = sorted(tasks, key=lambda role: -_size_hint(tasks[role]))
    results: dict[str, TrainRun] = {}

    def one(role: str) -> tuple[str, TrainRun]:
        task = tasks[role]
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
        return role, TrainRun(task.name, task.spec.language, AdapterManifest.model_validate(raw))

    children: list[subprocess.Popen[bytes]] = []
    with ThreadPoolExecutor(max_workers=max(1, ctx.parallel)) as pool:
        futures = [pool.submit(one, role) for role in order]
        try:
            for future in as_completed(futures):
                role, run = future.result()
                results[role] = run
                on_done(role)
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


# -- evaluation ------------------------------------------------------------------------------------------------------------
def test_examples(workload: Workload, language: str) -> list[Example]:
    rows = workload.data[language].test
    if workload.labels:
        return [Example(prompt=r["text"], completion=r["label"]) for r in rows]
    return [Example(prompt=r["prompt"], completion=r["completion"]) for r in rows]


class Evaluator:
    """Quality of a model on languages' test splits: the base alone (a classifier: with its fresh, untrained head), an
    adapter (an expert, the joint model or a merged adapter) on the base."""

    def __init__(self, ctx: Context, workload: Workload, base_dir: Path) -> None:
        self.ctx = ctx
        self.w = workload
        self.base_dir = base_dir
        self.max_seq_length = int(workload.training.get("maxSeqLength", 128))

    def evaluate_merge(self, merge: MergeRun, languages: Sequence[str]) -> dict[str, Metrics]:
        return self.evaluate(merge.manifest.model_uri, languages, full=merge.manifest.output_format == "full-weights")

    def evaluate(self, uri: str | None, languages: Sequence[str], *, full: bool = False) -> dict[str, Metrics]:
        """Metrics per language of the base (``uri`` None), the base + the adapter under ``uri``, or (``full``) the
        full merged model under ``uri``."""
        import torch

        from langmerge_trainer.evaluate import pick_device

        device = pick_device(self.ctx.device)
        with tempfile.TemporaryDirectory(prefix="bench-eval-", dir=self.ctx.work) as tmp:
            adapter_dir = model_dir = None
            if uri:
                target = Path(tmp) / "model"
                if not self.ctx.store.download_prefix(uri, target):
                    raise BenchError(f"no model files under {uri}")
                adapter_dir, model_dir = (None, target) if full else (target, None)
            out: dict[str, Metrics] = {}
            if self.w.labels:
                from langmerge_trainer.classify import evaluate_labelled, load_classifier_for_eval

                model, tok = load_classifier_for_eval(
                    self.base_dir, self.w.labels, adapter_dir=adapter_dir, model_dir=model_dir, device=device
                )
                for lang in languages:
                    out[lang] = evaluate_labelled(
                        model, tok, test_examples(self.w, lang), self.w.labels, max_seq_length=self.max_seq_length
                    )
            else:
                from langmerge_trainer.evaluate import evaluate_examples, load_for_eval

                model, tok = load_for_eval(self.base_dir, adapter_dir=adapter_dir, model_dir=model_dir, device=device)
                for lang in languages:
                    out[lang] = evaluate_examples(
                        model, tok, test_examples(self.w, lang), max_seq_length=self.max_seq_length
                    )
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return out


def run_seed(
    wr: WorkloadRun, evaluator: Evaluator, seed: int, runs: dict[str, TrainRun], tick: Callable[[str], None]
) -> dict[str, Any]:
    """Merges and evaluations of one seed, once its trainings are done; returns the seed's JSON record."""
    w = wr.w
    experts = {lang: runs[f"expert:{lang}"] for lang in w.languages}
    merges: dict[str, MergeRun] = {}
    for method in wr.methods:
        merges[method.label] = wr.merge_step(method, experts, name=f"{w.name}-{_slug(method.label)}-s{seed}")
        tick(f"merged {method.label}")
    languages = w.languages
    base = evaluator.evaluate(None, languages)
    joint = evaluator.evaluate(runs["joint"].manifest.adapter_uri, languages)
    tick("evaluated base and joint")
    quality: dict[str, dict[str, Any]] = {
        lang: {"base": metrics_dict(base[lang]), "joint": metrics_dict(joint[lang]), "merged": {}} for lang in languages
    }
    for lang, run in experts.items():
        quality[lang]["expert"] = metrics_dict(evaluator.evaluate(run.manifest.adapter_uri, [lang])[lang])
    tick("evaluated experts")
    for label, merge in merges.items():
        merged = evaluator.evaluate_merge(merge, languages)
        wr.discard(merge)
        for lang in languages:
            quality[lang]["merged"][label] = metrics_dict(merged[lang])
        tick(f"evaluated {label}")

    primary = wr.methods[0]
    # Maintenance: the updated language's expert retrains on +25% data and is re-merged (with the first method).
    up = w.updated_language
    updated_experts = {**experts, up: runs[f"expert-update:{up}"]}
    remerge = wr.merge_step(primary, updated_experts, name=f"{w.name}-{_slug(primary.label)}-updated-s{seed}")
    upd_joint = evaluator.evaluate(runs["joint-update"].manifest.adapter_uri, languages)
    upd_merged = evaluator.evaluate_merge(remerge, languages)
    wr.discard(remerge)
    tick("maintenance")
    maintenance = {
        "language": up,
        "method": primary.label,
        "expert_retrain": runs[f"expert-update:{up}"].cost(),
        "joint_retrain": runs["joint-update"].cost(),
        "remerge": remerge.cost(),
        "quality": {
            lang: {"joint": metrics_dict(upd_joint[lang]), "merged": metrics_dict(upd_merged[lang])}
            for lang in languages
        },
    }
    record: dict[str, Any] = {
        "seed": seed,
        "quality": quality,
        "cost": {
            "experts": {lang: run.cost() for lang, run in experts.items()},
            "joint": runs["joint"].cost(),
            "merges": {label: m.cost() for label, m in merges.items()},
        },
        "maintenance": maintenance,
    }
    if w.new_language:
        new = w.new_language
        grown = {**experts, new: runs[f"expert-new:{new}"]}
        merge_new = wr.merge_step(primary, grown, name=f"{w.name}-{_slug(primary.label)}-new-s{seed}")
        every = w.all_languages
        new_joint = evaluator.evaluate(runs["joint-new"].manifest.adapter_uri, every)
        new_merged = evaluator.evaluate_merge(merge_new, every)
        wr.discard(merge_new)
        new_expert = evaluator.evaluate(runs[f"expert-new:{new}"].manifest.adapter_uri, [new])
        tick("new language")
        record["new_language"] = {
            "language": new,
            "method": primary.label,
            "expert": runs[f"expert-new:{new}"].cost(),
            "joint_retrain": runs["joint-new"].cost(),
            "remerge": merge_new.cost(),
            "quality": {
                lang: {
                    "joint": metrics_dict(new_joint[lang]),
                    "merged": metrics_dict(new_merged[lang]),
                    **({"expert": metrics_dict(new_expert[lang])} if lang == new else {}),
                }
                for lang in every
            },
        }
    return record


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


def wall_clock() -> float:
    return time.monotonic()
