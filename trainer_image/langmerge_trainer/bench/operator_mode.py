"""``langmerge bench --via-operator``: the same story as LanguageExperts and MergedModels on the local control plane.

The operator (``langmerge run``, a background process) and the local Job runner (in this process) do the work: every
training and merge is a Job the operator launched, and the costs are the operator's own ledger (the experts'
``status.history`` and the MergedModel's revision history). Per seed and workload:

1. one LanguageExpert per language, one *joint* LanguageExpert (language ``mul``) whose dataset prefix holds every
   language's folder, and a MergedModel selecting the experts (the first merge method; the merge Job evaluates the
   merged model and each expert on every language's test split);
2. maintenance: the updated language's extra data is uploaded into its folder: the operator retrains that expert
   *and* the joint model (its prefix changed too) and re-merges;
3. a new language: its folder and its LanguageExpert appear: the joint model retrains on everything, the new expert
   trains and the MergedModel merges it in.

The joint model and the base are evaluated by the benchmark itself (:class:`~.runner.Evaluator`), on the same test
examples the merge Job used.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from langmerge.api.expert import LanguageExpertStatus, Metrics
from langmerge.api.merged import MergedModelStatus
from langmerge.merge_catalogue import METHODS
from langmerge_trainer.bench.runner import (
    ARTIFACTS_BUCKET,
    DATA_BUCKET,
    JOINT,
    MODELS_BUCKET,
    NAMESPACE,
    BenchError,
    Context,
    Evaluator,
    MethodSpec,
    WorkloadRun,
    metrics_dict,
    upload_rows,
)

log = logging.getLogger(__name__)

ARTIFACTS_URI = f"s3://{ARTIFACTS_BUCKET}/artifacts"
#: Longest wait for one stage of the story.
STAGE_TIMEOUT = 3600.0


def _cost(record: Any) -> dict[str, Any]:
    return {
        "wall_seconds": round(record.wall_seconds or 0.0, 3),
        "cpu_seconds": round(record.cpu_seconds or 0.0, 3),
        "gpu_seconds": round(record.gpu_seconds or 0.0, 3),
        "steps": None,
        "tokens": getattr(record, "tokens", None),
        "attempts": 1,
        "examples": None,
        "device": "gpu" if (record.gpu_seconds or 0) > 0 else "cpu",
    }


class OperatorStory:
    """Drives one workload's seeds through the operator and reads the results back from the resources."""

    def __init__(self, ctx: Context, wr: WorkloadRun, evaluator: Evaluator, kube: Any, tick: Callable[[str], None]):
        self.ctx = ctx
        self.wr = wr
        self.w = wr.w
        self.evaluator = evaluator
        self.kube = kube
        self.tick = tick

    # .. resources ..
    def _api(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.kube.api)

    def apply(self, kind: str, name: str, spec: dict[str, Any], labels: dict[str, str]) -> None:
        from langmerge.constants import API_VERSION, EXPERT_PLURAL, GROUP, MERGED_PLURAL, VERSION

        plural = EXPERT_PLURAL if kind == "LanguageExpert" else MERGED_PLURAL
        body = {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name, "labels": labels}, "spec": spec}
        self._api().create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, plural, body)

    def expert_status(self, name: str) -> LanguageExpertStatus:
        from langmerge.kube import ObjectKey

        obj = self.kube.get_expert(ObjectKey(NAMESPACE, name)) or {}
        return LanguageExpertStatus.model_validate(obj.get("status") or {})

    def merged_status(self, name: str) -> MergedModelStatus:
        from langmerge.kube import ObjectKey

        obj = self.kube.get_merged(ObjectKey(NAMESPACE, name)) or {}
        return MergedModelStatus.model_validate(obj.get("status") or {})

    def wait(self, what: str, done: Callable[[], bool], names: list[str]) -> None:
        deadline = time.monotonic() + STAGE_TIMEOUT
        while not done():
            for name in names:
                status = self.expert_status(name)
                if status.phase == "Failed":
                    raise BenchError(f"{what}: LanguageExpert {name} failed: {status.message}")
            if time.monotonic() > deadline:
                raise BenchError(f"timed out waiting for {what}")
            time.sleep(2.0)

    def trained(self, name: str, runs: int) -> bool:
        status = self.expert_status(name)
        return status.phase == "Ready" and len([h for h in status.history if h.result == "Succeeded"]) >= runs

    def history(self, name: str) -> list[Any]:
        return [h for h in self.expert_status(name).history if h.result == "Succeeded"]

    # .. specs ..
    def expert_spec(self, language: str, data_uri: str, test_uri: str, seed: int) -> dict[str, Any]:
        w = self.w
        spec: dict[str, Any] = {
            "language": language,
            "task": w.name,
            "taskType": w.task_type,
            "baseModel": {"uri": self.wr.base_uri},
            "dataset": {"uri": data_uri, "evalUri": test_uri},
            "lora": w.lora,
            # as in the direct mode, the benchmark judges collapse itself (retry.limit 0 would fail a collapsed expert)
            "training": {
                **w.training,
                "seed": seed,
                "checkpointEverySteps": 100000,
                "progressEverySteps": 10,
                "collapseCheck": False,
            },
            "resources": {"gpus": 1 if self.ctx.device.startswith("cuda") else 0, "cpu": "1", "memory": "4Gi"},
            "schedule": {"pollIntervalSeconds": 5, "settleSeconds": 0},
            "retry": {"limit": 0},
        }
        if w.labels:
            spec["labels"] = list(w.labels)
        return spec

    def run_seed(self, seed: int, method: MethodSpec) -> dict[str, Any]:
        w, wr = self.w, self.wr
        live = f"{wr.data_root}/operator-s{seed}"
        test = f"{wr.data_root}/test"
        labels = {"bench.langmerge.dev/seed": str(seed), "bench.langmerge.dev/workload": w.name}
        names = {lang: f"{w.name}-{lang}-s{seed}" for lang in w.all_languages}
        joint = f"{w.name}-joint-s{seed}"
        merged = f"{w.name}-s{seed}"
        for lang in w.languages:
            upload_rows(self.ctx.store, w.data[lang].train, f"{live}/{lang}/part-0.jsonl")
        for lang in w.languages:
            self.apply(
                "LanguageExpert",
                names[lang],
                self.expert_spec(lang, f"{live}/{lang}", f"{test}/{lang}", seed),
                {**labels, "bench.langmerge.dev/role": "expert"},
            )
        self.apply(
            "LanguageExpert",
            joint,
            self.expert_spec(JOINT, live, self._joint_test(w.languages), seed),
            {**labels, "bench.langmerge.dev/role": "joint"},
        )
        exact = METHODS[method.method].low_rank_exact
        self.apply(
            "MergedModel",
            merged,
            {
                "baseModel": {"uri": wr.base_uri},
                "experts": {"selector": {"matchLabels": {**labels, "bench.langmerge.dev/role": "expert"}}},
                "method": method.method,
                "parameters": method.params(),
                "output": {
                    "uri": f"s3://{MODELS_BUCKET}/{w.name}/operator/{merged}",
                    "format": "peft-adapter" if exact else "full-weights",
                },
                "evaluation": {"metric": "accuracy" if w.labels else "evalLoss", "maxRegression": 100},
                "settleSeconds": 0,
                "publish": {"keepRevisions": 2},
            },
            {},
        )
        every = [names[lang] for lang in w.languages] + [joint]

        def revision(n: int, languages: list[str]) -> bool:
            status = self.merged_status(merged)
            return (status.revision or 0) >= n and sorted(i.language for i in status.inputs) == sorted(languages)

        self.wait(
            "the initial experts, the joint model and revision 1",
            lambda: all(self.trained(n, 1) for n in every) and revision(1, w.languages),
            every,
        )
        self.tick("initial (operator)")
        label = method.label
        mstatus = self.merged_status(merged)
        record: dict[str, Any] = {
            "seed": seed,
            "models": self._models(merged, joint, w.languages, label),
            "cost": {
                "experts": {lang: _cost(self.history(names[lang])[0]) for lang in w.languages},
                "joint": _cost(self.history(joint)[0]),
                "merges": {label: _cost(mstatus.history[0])},
            },
        }

        up = w.updated_language
        upload_rows(self.ctx.store, w.data[up].update, f"{live}/{up}/part-1.jsonl")
        self.wait(
            "the maintenance update",
            lambda: self.trained(names[up], 2) and self.trained(joint, 2) and revision(2, w.languages),
            every,
        )
        self.tick("maintenance (operator)")
        mstatus = self.merged_status(merged)
        models = self._models(merged, joint, w.languages, label)
        models["expert"] = _only(models["expert"], up)
        record["maintenance"] = {
            "language": up,
            "models": models,
            "cost": {
                "expert": _cost(self.history(names[up])[1]),
                "joint": _cost(self.history(joint)[1]),
                "merges": {label: _cost(mstatus.history[-1])},
            },
        }
        if w.new_language:
            new = w.new_language
            upload_rows(self.ctx.store, w.data[new].train, f"{live}/{new}/part-0.jsonl")
            self.apply(
                "LanguageExpert",
                names[new],
                self.expert_spec(new, f"{live}/{new}", f"{test}/{new}", seed),
                {**labels, "bench.langmerge.dev/role": "expert"},
            )
            every.append(names[new])
            self.wait(
                "the new language",
                lambda: self.trained(names[new], 1) and self.trained(joint, 3) and revision(3, w.all_languages),
                every,
            )
            self.tick("new language (operator)")
            mstatus = self.merged_status(merged)
            models = self._models(merged, joint, w.all_languages, label)
            models["expert"] = _only(models["expert"], new)
            record["new_language"] = {
                "language": new,
                "models": models,
                "cost": {
                    "expert": _cost(self.history(names[new])[0]),
                    "joint": _cost(self.history(joint)[2]),
                    "merges": {label: _cost(mstatus.history[-1])},
                },
            }
        return record

    def _joint_test(self, languages: list[str]) -> str:
        """A test prefix holding the given languages' test files (the joint expert's own evaluation)."""
        store = self.ctx.store
        test = f"{self.wr.data_root}/sets/operator-test-{'-'.join(languages)}"
        if not store.list_objects(test):
            for lang in languages:
                upload_rows(store, self.w.data[lang].test, f"{test}/{lang}.jsonl")
        return test

    def _models(self, merged: str, joint: str, languages: list[str], label: str) -> dict[str, Any]:
        """The model records of a stage: the merge Job's figures for the merged model and each expert (no
        per-example figures: the operator keeps none), the benchmark's own for the joint model."""
        status = self.merged_status(merged)
        joint_status = self.expert_status(joint)
        assert joint_status.adapter is not None
        evaluated = self.evaluator.evaluate(joint_status.adapter.uri, languages)
        merged_m: dict[str, Any] = {}
        expert_m: dict[str, Any] = {}
        for lang in languages:
            figures = status.metrics.get(lang)
            if figures is None or figures.merged is None or figures.expert is None:
                raise BenchError(f"the MergedModel {merged} has no evaluation for {lang}")
            merged_m[lang] = metrics_dict(Metrics.model_validate(figures.merged.model_dump()))
            expert_m[lang] = metrics_dict(Metrics.model_validate(figures.expert.model_dump()))
        return {
            "joint": {**evaluated.record(), "collapsed": None},
            "expert": {"languages": expert_m, "scores": {}, "collapsed": {}},
            f"merged:{label}": {"languages": merged_m, "scores": {}, "collapsed": None},
        }


def _only(model: dict[str, Any], language: str) -> dict[str, Any]:
    return {**model, "languages": {language: model["languages"][language]}}


def prepare_namespace(kube_api: Any, env: dict[str, str]) -> None:
    """The benchmark's namespace and the S3 credentials Secret its Jobs read (as ``langmerge up`` makes them)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from langmerge.dev.demo import SECRET

    core = client.CoreV1Api(kube_api)
    try:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
    except ApiException as err:
        if err.status != 409:
            raise
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET, "namespace": NAMESPACE},
        "stringData": {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
    }
    try:
        core.create_namespaced_secret(NAMESPACE, body)
    except ApiException as err:
        if err.status != 409:
            raise


def start_services(state: Path, env: dict[str, str], parallel: int) -> Any:
    """The operator as a background process (``langmerge run``), like ``langmerge up`` starts it."""
    from langmerge.dev.demo import Services

    services = Services(state)
    operator_env = {
        **env,
        "LANGMERGE_ARTIFACTS_URI": ARTIFACTS_URI,
        "LANGMERGE_METRICS_PORT": "0",
        "LANGMERGE_RESYNC_SECONDS": "5",
        "LANGMERGE_PROGRESS_SECONDS": "2",
        "LANGMERGE_MAX_TRAINING_JOBS": str(parallel),
        # The operator's URI policy: the benchmark's namespace reads the base models and data, writes merged models.
        "LANGMERGE_URI_GRANTS": json.dumps(
            {NAMESPACE: {"read": [f"s3://{DATA_BUCKET}/"], "readWrite": [f"s3://{MODELS_BUCKET}/"]}}
        ),
        "PYTHONUNBUFFERED": "1",
    }
    services.start("operator", [sys.executable, "-m", "langmerge.cli", "run", "--namespace", NAMESPACE], operator_env)
    return services


def job_runner(kube_api: Any, work: Path, env: dict[str, str], parallel: int) -> Any:
    from langmerge.dev.jobrunner import LocalJobRunner, RunnerConfig

    keep = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM", "LANGMERGE_MODEL_CACHE", "PYTHONUNBUFFERED")
    return LocalJobRunner(
        kube_api,
        RunnerConfig(
            work_root=work / "jobs",
            parallel=parallel,
            namespace=NAMESPACE,
            extra_env=(*tuple((k, env[k]) for k in keep if k in env), ("TMPDIR", str(work))),
        ),
    )
