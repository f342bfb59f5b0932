"""Valid and invalid custom resources, shared by the unit tests (pydantic) and the integration tests (API server)."""

from __future__ import annotations

import copy
from typing import Any

from langmerge.constants import API_VERSION


def expert(name: str = "de", **spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "language": "de",
        "task": "summarization",
        "baseModel": {"uri": "s3://models/tiny-llama"},
        "dataset": {"uri": "s3://data/summarization/de"},
    }
    spec.update(spec_overrides)
    return {"apiVersion": API_VERSION, "kind": "LanguageExpert", "metadata": {"name": name}, "spec": spec}


def merged(name: str = "mm", **spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "baseModel": {"uri": "s3://models/tiny-llama"},
        "experts": {"selector": {"matchLabels": {"task": "summarization"}}},
        "method": "ties",
        "parameters": {"density": 1.0},
        "output": {"uri": "s3://models/merged/summarization"},
    }
    spec.update(spec_overrides)
    return {"apiVersion": API_VERSION, "kind": "MergedModel", "metadata": {"name": name}, "spec": spec}


def _without(obj: dict[str, Any], *path: str) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    node = obj
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return obj


#: (id, object, a fragment the API server's message must contain). Each is rejected by the CRD schema.
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("bad-language-code", expert(language="Deutsch"), "spec.language"),
    ("lowercase-region", expert(language="pt-br"), "spec.language"),
    ("rank-zero", expert(lora={"rank": 0}), "spec.lora.rank"),
    ("dataset-not-s3", expert(dataset={"uri": "https://example.invalid/data"}), "spec.dataset.uri"),
    ("missing-dataset-uri", expert(dataset={"evalFraction": 0.1}), "spec.dataset.uri"),
    ("missing-base-model", _without(expert(), "spec", "baseModel"), "spec.baseModel"),
    ("eval-fraction-too-big", expert(dataset={"uri": "s3://data/x", "evalFraction": 0.9}), "spec.dataset.evalFraction"),
    ("learning-rate-zero", expert(training={"learningRate": 0}), "spec.training.learningRate"),
    ("bad-batching", expert(training={"batching": "random"}), "spec.training.batching"),
    ("unknown-task-type", expert(taskType="token-classification"), "spec.taskType"),
    ("one-label", expert(taskType="sequence-classification", labels=["only"]), "spec.labels"),
    ("bad-gate-metric", merged(evaluation={"metric": "f1"}), "spec.evaluation.metric"),
    ("bad-memory-quantity", expert(resources={"memory": "lots"}), "spec.resources.memory"),
    ("unknown-method", merged(method="average"), "spec.method"),
    ("negative-weight", merged(parameters={"weights": {"de": -1.0}}), "spec.parameters.weights.de"),
    ("density-above-one", merged(parameters={"density": 1.5}), "spec.parameters.density"),
    ("unknown-output-format", merged(output={"uri": "s3://models/x", "format": "gguf"}), "spec.output.format"),
    ("keep-one-revision", merged(publish={"keepRevisions": 1}), "spec.publish.keepRevisions"),
    # Accepted once, then failing inside a Job (issue 23): not a module name, and a step count beyond any run.
    ("target-module-not-a-name", expert(lora={"targetModules": ["q_proj", "🙂"]}), "spec.lora.targetModules"),
    ("target-module-with-spaces", expert(lora={"targetModules": ["q proj"]}), "spec.lora.targetModules"),
    (
        "checkpoint-steps-unbounded",
        expert(training={"checkpointEverySteps": 9223372036854775807}),
        "spec.training.checkpointEverySteps",
    ),
    ("progress-steps-unbounded", expert(training={"progressEverySteps": 10**12}), "spec.training.progressEverySteps"),
    (
        "selector-and-names",
        merged(experts={"selector": {"matchLabels": {"a": "b"}}, "names": ["de"]}),
        "spec.experts",
    ),
    # spec.serving (issue 22).
    (
        "canary-zero",
        merged(serving=[{"kserve": {"inferenceService": "dialog", "canaryTrafficPercent": 0}}]),
        "spec.serving",
    ),
    (
        "promote-after-not-a-duration",
        merged(serving=[{"kserve": {"inferenceService": "d", "promoteAfter": "soon"}}]),
        "spec.serving",
    ),
    ("isvc-name-not-a-label", merged(serving=[{"kserve": {"inferenceService": "Dialog_1"}}]), "spec.serving"),
    ("sink-not-a-url", merged(serving=[{"cloudEvents": {"sink": "broker.default"}}]), "spec.serving"),
    (
        "unknown-runtime",
        merged(serving=[{"kserve": {"inferenceService": "d", "runtime": "vllm-magic"}}]),
        "spec.serving",
    ),
]

#: Rejected by the operator's models only (rules a 1.20 API server cannot express; newer servers could use CEL).
INVALID_OPERATOR_ONLY: list[tuple[str, dict[str, Any], str]] = [
    ("density-for-linear", merged(method="linear", parameters={"density": 0.5}), "do not apply to method 'linear'"),
    ("weight-key-not-a-language", merged(parameters={"weights": {"German": 1.0}}), "weights"),
    ("classifier-without-labels", expert(taskType="sequence-classification"), "needs labels"),
    ("labels-on-a-causal-lm", expert(labels=["a", "b"]), "labels apply only to taskType sequence-classification"),
    (
        "repeated-labels",
        expert(taskType="sequence-classification", labels=["pos", "neg", "pos"]),
        "repeated: pos",
    ),
    (
        "serving-target-with-both",
        merged(serving=[{"kserve": {"inferenceService": "d"}, "cloudEvents": {"sink": "http://127.0.0.1:9/"}}]),
        "exactly one of kserve and cloudEvents",
    ),
    (
        "huggingface-runtime-with-an-adapter",
        merged(serving=[{"kserve": {"inferenceService": "d", "runtime": "huggingface"}}]),
        "the huggingface runtime cannot load peft-adapter output",
    ),
    (
        "one-inference-service-twice",
        merged(serving=[{"kserve": {"inferenceService": "d"}}, {"kserve": {"inferenceService": "d"}}]),
        "kserve/d is listed twice",
    ),
    (
        "ready-timeout-beyond-a-week",
        merged(serving=[{"kserve": {"inferenceService": "d", "readyTimeout": "200h"}}]),
        "longer than 7 days",
    ),
    (
        "packed-classifier",
        expert(taskType="sequence-classification", labels=["a", "b"], training={"batching": "packed"}),
        "causal-lm only",
    ),
]
