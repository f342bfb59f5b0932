"""Every manifest the operator and the chart produce, validated against the schemas of current Kubernetes.

The local API server is 1.20: it drops fields it does not know (Job ``suspend``, ``podFailurePolicy``...) instead of
checking them. So this test validates, with the ``kubernetes-validate`` package (it bundles Kubernetes' own OpenAPI
schemas), against Kubernetes 1.30 through 1.35 in *strict* mode (an unknown field is an error):

* the operator's Jobs (training with one and several GPUs, with Kueue, with every pod option; merge), built by the
  pure builders;
* the operator's TrainJobs: Kubernetes has no schema for them, so their Kubernetes parts (object metadata, env,
  resources, pod security context, volumes, tolerations, container security context and mounts) are validated
  against the Kubernetes types they are, and the whole object against the TrainJob schema generated from the
  ``kubeflow-trainer-api`` models (closed at every level);
* the chart rendered with default values, with every knob turned, and with TrainJobs enabled (Deployment,
  ServiceAccount, RBAC, Service; the ServiceMonitor is prometheus-operator's type, outside Kubernetes' schemas);
* the CRDs (``crds/``).
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml
from chart_helpers import ROOT, render
from kubernetes_validate.utils import schema_contents
from test_chart_render import EDGE

from langmerge.api.expert import LanguageExpertSpec
from langmerge.artifacts import BaseModelIdentity
from langmerge.controller.jobs import Owner, build_merge_job, build_training_job
from langmerge.controller.trainjobs import build_trainjob
from langmerge.dev.trainjob_crd import trainjob_crd
from langmerge.settings import Settings
from langmerge.tasks import TrainTask

VERSIONS = ["1.30", "1.31", "1.32", "1.33", "1.34", "1.35"]
#: Kinds that are not Kubernetes' own (no schema in Kubernetes' OpenAPI): checked elsewhere.
NOT_KUBERNETES = {"ServiceMonitor"}

OWNER = Owner("LanguageExpert", "team-a", "chat-es", "8f0c7a6e-0000-4000-8000-000000000001")


def _task(resources: dict[str, Any], **spec: Any) -> TrainTask:
    parsed = LanguageExpertSpec.model_validate(
        {
            "language": "es",
            "task": "chat",
            "baseModel": {"uri": "s3://models/base"},
            "dataset": {"uri": "s3://data/es"},
            "resources": resources,
            **spec,
        }
    )
    return TrainTask(
        fingerprint="0123456789abcdef",
        output_uri="s3://artifacts/experts/team-a/chat-es/0123456789abcdef",
        namespace="team-a",
        name="chat-es",
        spec=parsed,
        base_model=BaseModelIdentity(uri="s3://models/base", digest="d"),
        data_digest="dd",
    )


def _merge_task() -> Any:
    from langmerge.api.expert import Dataset
    from langmerge.api.merged import Evaluation, Output
    from langmerge.tasks import MergeTask, MergeTaskInput

    return MergeTask(
        fingerprint="fedcba9876543210",
        output_uri="s3://artifacts/merged/chat",
        namespace="team-a",
        name="chat",
        method="ties",
        parameters={},
        base_model=BaseModelIdentity(uri="s3://models/base", digest="d"),
        inputs=[
            MergeTaskInput(
                expert="chat-es",
                language="es",
                adapter_uri="s3://artifacts/x",
                adapter_digest="x",
                dataset=Dataset(uri="s3://data/es"),
            )
        ],
        output=Output(uri="s3://artifacts/merged/chat"),
        evaluation=Evaluation(),
    )


FULL_POD = {
    "gpus": 4,
    "cpu": "16",
    "memory": "128Gi",
    "nodeSelector": {"pool": "h100"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "priorityClassName": "training",
    "activeDeadlineSeconds": 7200,
}
SETTINGS = Settings(
    kueue_queue="gpu-queue",
    job_service_account="trainer",
    s3_endpoint="http://minio:9000",
    job_env=(("HF_HOME", "/cache/hf"),),
    trainjobs=True,
)


def operator_jobs() -> dict[str, dict[str, Any]]:
    return {
        "training Job, CPU": build_training_job(OWNER, _task({"gpus": 0}), Settings()),
        "training Job, 4 GPUs (torchrun), Kueue, every pod option": build_training_job(
            OWNER, _task(FULL_POD), SETTINGS
        ),
        "merge Job, Kueue": build_merge_job(
            Owner("MergedModel", "team-a", "chat", "8f0c7a6e-0000-4000-8000-000000000002"),
            _merge_task(),
            _task({"gpus": 1}).spec.resources,
            SETTINGS,
        ),
    }


def trainjob() -> dict[str, Any]:
    return build_trainjob(OWNER, _task({**FULL_POD, "nodes": 4}, runtime="trainjob"), SETTINGS)


def chart_objects() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    renders = {
        "default": render(namespace="langmerge-system"),
        "every knob": render(EDGE, namespace="ml-ops"),
        "TrainJobs": render({"trainJob": {"enabled": True}, "jobs": {"trainingRuntime": "trainjob"}}, namespace="ml"),
    }
    for values, objects in renders.items():
        for obj in objects:
            meta = obj["metadata"]
            out[f"{values}: {obj['kind']} {meta.get('namespace', '')}/{meta['name']}"] = obj
    return out


def crds() -> dict[str, dict[str, Any]]:
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted((ROOT / "crds").glob("*.yaml"))}


def _strict_schema(name: str, version: str) -> tuple[dict[str, Any], referencing.Registry]:
    """One type's strict schema of Kubernetes ``version`` (e.g. ``envvar-v1``), with the definitions it refers to."""
    folder = f"kubernetes-json-schema/v{version}.0-local-strict"
    schema = schema_contents(f"{folder}/{name}.json", version)
    definitions = schema_contents(f"{folder}/_definitions.json", version)
    registry = referencing.Resource.from_contents(definitions) @ (
        referencing.Resource.from_contents(schema) @ referencing.Registry()
    )
    return schema, registry


def validate_part(value: Any, type_file: str, version: str) -> None:
    schema, registry = _strict_schema(type_file, version)
    jsonschema.Draft202012Validator(schema, registry=registry).validate(value)


def closed(schema: Any) -> Any:
    """An OpenAPI structural schema with ``additionalProperties: false`` wherever it lists properties (strict)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", list(operator_jobs()))
def test_operator_jobs(name: str, version: str) -> None:
    job = operator_jobs()[name]
    assert kubernetes_validate.validate(job, version, strict=True) == version


@pytest.mark.parametrize("version", VERSIONS)
def test_operator_trainjob(version: str) -> None:
    tj = trainjob()
    validate_part(tj["metadata"], "objectmeta-meta-v1", version)
    trainer = tj["spec"]["trainer"]
    for env in trainer["env"]:
        validate_part(env, "envvar-v1", version)
    validate_part(trainer["resourcesPerNode"], "resourcerequirements-v1", version)
    (patch,) = tj["spec"]["runtimePatches"]
    pod = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    validate_part(pod["metadata"], "objectmeta-meta-v1", version)
    validate_part(pod["spec"]["securityContext"], "podsecuritycontext-v1", version)
    for volume in pod["spec"]["volumes"]:
        validate_part(volume, "volume-v1", version)
    for toleration in pod["spec"]["tolerations"]:
        validate_part(toleration, "toleration-v1", version)
    (container,) = pod["spec"]["containers"]
    validate_part(container["securityContext"], "securitycontext-v1", version)
    for mount in container["volumeMounts"]:
        validate_part(mount, "volumemount-v1", version)


def test_operator_trainjob_against_the_trainjob_schema() -> None:
    """The whole TrainJob against the schema from kubeflow-trainer-api's models, closed at every level."""
    schema = closed(copy.deepcopy(trainjob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]))
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: validated above with Kubernetes' type
    jsonschema.Draft7Validator(schema).validate(trainjob())
    broken = trainjob()
    broken["spec"]["trainer"]["numNode"] = 2  # a typo is caught
    with pytest.raises(jsonschema.ValidationError, match="numNode"):
        jsonschema.Draft7Validator(schema).validate(broken)


@pytest.mark.parametrize("version", VERSIONS)
def test_chart_objects(version: str) -> None:
    objects = chart_objects()
    checked = 0
    for name, obj in objects.items():
        if obj["kind"] in NOT_KUBERNETES:
            continue
        try:
            assert kubernetes_validate.validate(obj, version, strict=True) == version
        except kubernetes_validate.ValidationError as err:
            raise AssertionError(
                f"{name} is invalid in Kubernetes {version}: {err.message} at {list(err.path)}"
            ) from err
        checked += 1
    kinds = {obj["kind"] for obj in objects.values()}
    assert {"Deployment", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Service"} <= kinds
    assert {"ServiceAccount", "CustomResourceDefinition"} <= kinds
    assert checked >= 20


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", list(crds()))
def test_crds(name: str, version: str) -> None:
    assert kubernetes_validate.validate(crds()[name], version, strict=True) == version


def test_an_invalid_manifest_is_caught() -> None:
    """The validation can fail: a field Kubernetes does not have, and a wrong type."""
    job = build_training_job(OWNER, _task({"gpus": 0}), Settings())
    job["spec"]["backofLimit"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, "1.35", strict=True)
    job = build_training_job(OWNER, _task({"gpus": 0}), Settings())
    job["spec"]["podFailurePolicy"]["rules"][0]["action"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, "1.30", strict=True)
    with pytest.raises(jsonschema.ValidationError):
        validate_part({"name": "X", "valueFrom": {"secretKeyRef": {"key": 1}}}, "envvar-v1", "1.30")
