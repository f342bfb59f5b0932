"""Scale-out, the pure parts: training shapes and fingerprints, the trainer's launcher arguments, Kueue in the Job
builders, the TrainJob builder (typed with kubeflow-trainer-api) and state, the Job index with TrainJobs and
suspended Jobs, settings, the launcher's exit statuses, rows per rank, and the GPU-seconds of a multi-node run."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from api_cases import expert
from langmerge.api.expert import LanguageExpertSpec, TrainingResources, TrainingShape
from langmerge.artifacts import BaseModelIdentity
from langmerge.controller.jobindex import JobIndex
from langmerge.controller.jobs import Owner, build_merge_job, build_training_job, job_state, train_args
from langmerge.controller.trainjobs import MAX_NAME, build_trainjob, trainjob_name, trainjob_state
from langmerge.fingerprint import training_fingerprint
from langmerge.settings import Settings, SettingsError
from langmerge.tasks import TrainTask
from langmerge_trainer.distributed import (
    World,
    exit_status,
    micro_batch_count,
    split_launch_args,
    split_rows,
)
from langmerge_trainer.train import allocated_gpus, plan_training

OWNER = Owner("LanguageExpert", "ns", "chat-es", "uid-1")


def _spec(**overrides: Any) -> LanguageExpertSpec:
    return LanguageExpertSpec.model_validate(expert(**overrides)["spec"])


def _task(spec: LanguageExpertSpec, attempt: int = 1) -> TrainTask:
    return TrainTask(
        fingerprint="0123456789abcdef",
        output_uri="s3://a/artifacts/experts/ns/chat-es/0123456789abcdef",
        namespace="ns",
        name="chat-es",
        spec=spec,
        base_model=BaseModelIdentity(uri="s3://models/base", digest="d"),
        data_digest="dd",
        attempt=attempt,
    )


def _fp(spec: LanguageExpertSpec) -> str:
    return training_fingerprint(spec, base_model_digest="b", data_digest="d", eval_data_digest=None, image="i:1")


# -- shapes and fingerprints --------------------------------------------------------------------------------------------
def test_training_shape_counts_processes_and_the_effective_batch() -> None:
    shape = TrainingShape.of(
        _spec(resources={"gpus": 4, "nodes": 2}, training={"batchSize": 8, "gradientAccumulationSteps": 2}), "trainjob"
    )
    assert (shape.nodes, shape.processes, shape.parallelism) == (2, 8, "ddp")
    assert (shape.per_device_batch_size, shape.gradient_accumulation_steps, shape.effective_batch_size) == (4, 2, 64)
    single = TrainingShape.of(_spec(resources={"gpus": 0}), "job")
    assert (single.processes, single.parallelism, single.effective_batch_size) == (1, None, 8)


def test_fingerprint_counts_processes_only_beyond_one() -> None:
    one = _fp(_spec(resources={"gpus": 1}))
    assert (
        one == _fp(_spec(resources={"gpus": 0})) == _fp(_spec(resources={"gpus": 1}, training={"parallelism": "fsdp"}))
    )
    two = _fp(_spec(resources={"gpus": 2}))
    assert two != one  # each step sees twice the examples
    assert two != _fp(_spec(resources={"gpus": 2}, training={"parallelism": "fsdp"}))
    assert two == _fp(_spec(resources={"gpus": 1, "nodes": 2}, runtime="trainjob"))  # 2 processes either way
    assert _fp(_spec(resources={"gpus": 2, "nodes": 2})) not in (one, two)


def test_plan_of_n_processes_is_the_plan_of_one_with_n_times_the_batch() -> None:
    training = _spec(training={"batchSize": 4}).training
    lengths = [5, 9, 3, 7, 2, 8, 6, 4, 1, 10, 11, 12]
    assert plan_training(lengths, training, 2) == plan_training(lengths, training.model_copy(update={"batch_size": 8}))


# -- the trainer's command line ---------------------------------------------------------------------------------------
def test_train_args_run_one_process_per_gpu() -> None:
    assert train_args(_task(_spec(resources={"gpus": 1})))[0] == "train"
    multi = train_args(_task(_spec(resources={"gpus": 4})))
    assert multi[:5] == ["distributed", "--standalone", "--nnodes=1", "--nproc-per-node=4", "train"]
    assert json.loads(multi[-1])["fingerprint"] == "0123456789abcdef"
    # A TrainJob's layout comes from Kubeflow's PET_* variables, as for torchrun.
    assert train_args(_task(_spec(resources={"gpus": 4, "nodes": 2})), layout_from_env=True)[:2] == [
        "distributed",
        "train",
    ]


def test_launcher_arguments_and_exit_statuses() -> None:
    assert split_launch_args(["--standalone", "--nproc-per-node=2", "train", "--task", "x"]) == (
        ["--standalone", "--nproc-per-node=2"],
        ["train", "--task", "x"],
    )
    with pytest.raises(ValueError, match="no verb"):
        split_launch_args(["--standalone"])
    assert exit_status([4, -15]) == 4  # a user error on one rank: the others were stopped because of it
    assert exit_status([2]) == 2
    assert exit_status([3, 3]) == 3 and exit_status([3, -15]) == 3  # preempted after a checkpoint
    assert exit_status([1, -15]) == 1 and exit_status([-9]) == 1 and exit_status([]) == 1


def test_rows_per_rank() -> None:
    rows = [[i] for i in range(7)]
    zero, one = World(rank=0, size=2), World(rank=1, size=2)
    count = micro_batch_count(len(rows), zero, accumulation=2)
    assert count == 2 == micro_batch_count(len(rows), one, accumulation=2)
    assert split_rows(rows, zero, count) == [[[0], [2]], [[4], [6]]]
    assert split_rows(rows, one, count) == [[[1], [3]], [[5]]]
    # Fewer rows than ranks x micro-batches: a rank gets an empty micro-batch (it runs a zero-weight one).
    assert micro_batch_count(1, zero, accumulation=4) == 1
    assert split_rows([[0]], one, 1) == [[]]


# -- Kueue in the Job builders ----------------------------------------------------------------------------------------
def test_jobs_with_a_kueue_queue_are_created_suspended() -> None:
    settings = Settings(kueue_queue="gpu-queue")
    job = build_training_job(OWNER, _task(_spec()), settings)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["annotations"]["langmerge.dev/suspend"] == "true"  # for API servers that drop the field
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert "kueue.x-k8s.io/queue-name" not in job["spec"]["template"]["metadata"]["labels"]  # Kueue manages the Job
    state = job_state(job)
    assert state.suspended and state.active and not state.running
    plain = build_training_job(OWNER, _task(_spec()), Settings())
    assert "suspend" not in plain["spec"] and "langmerge.dev/suspend" not in plain["metadata"]["annotations"]
    assert job_state(plain).running


def test_job_state_reads_suspension_from_the_spec_first() -> None:
    job = build_training_job(OWNER, _task(_spec()), Settings(kueue_queue="q"))
    admitted = {**job, "spec": {**job["spec"], "suspend": False}}  # Kueue admitted it; the annotation still says true
    assert not job_state(admitted).suspended
    dropped = {**job, "spec": {k: v for k, v in job["spec"].items() if k != "suspend"}}  # a 1.20 API server
    assert job_state(dropped).suspended
    merge = build_merge_job(
        Owner("MergedModel", "ns", "mm", "u"), _merge_task(), _spec().resources, Settings(kueue_queue="q")
    )
    assert merge["spec"]["suspend"] is True


def _merge_task() -> Any:
    from langmerge.api.expert import Dataset
    from langmerge.api.merged import Evaluation, Output
    from langmerge.tasks import MergeTask, MergeTaskInput

    return MergeTask(
        fingerprint="fedcba9876543210",
        output_uri="s3://a/merged",
        namespace="ns",
        name="mm",
        method="ties",
        parameters={},
        base_model=BaseModelIdentity(uri="s3://models/base", digest="d"),
        inputs=[
            MergeTaskInput(
                expert="chat-es",
                language="es",
                adapter_uri="s3://a/x",
                adapter_digest="x",
                dataset=Dataset(uri="s3://data/es"),
            )
        ],
        output=Output(uri="s3://aaa/merged"),
        evaluation=Evaluation(),
    )


# -- TrainJobs ----------------------------------------------------------------------------------------------------------
def test_trainjob_builder() -> None:
    spec = _spec(
        resources={
            "gpus": 2,
            "nodes": 3,
            "memory": "64Gi",
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "activeDeadlineSeconds": 3600,
        },
        runtime="trainjob",
    )
    settings = Settings(
        trainjobs=True, trainjob_runtime="torch-distributed", kueue_queue="gpu", job_service_account="sa"
    )
    tj = build_trainjob(OWNER, _task(spec, attempt=2), settings)
    assert (tj["apiVersion"], tj["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    meta, body = tj["metadata"], tj["spec"]
    assert meta["name"] == trainjob_name(OWNER, "0123456789abcdef", 2) and meta["namespace"] == "ns"
    assert meta["ownerReferences"][0]["uid"] == "uid-1" and meta["ownerReferences"][0]["controller"] is True
    assert (
        meta["labels"]["langmerge.dev/component"] == "training" and meta["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    )
    assert meta["annotations"]["langmerge.dev/attempt"] == "2"
    policy = json.loads(meta["annotations"]["langmerge.dev/pod-failure-policy"])
    assert policy["rules"][0]["onExitCodes"] == {"containerName": "node", "operator": "In", "values": [2, 4]}
    assert body["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    assert body["suspend"] is True and body["activeDeadlineSeconds"] == 3600
    trainer = body["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (3, 2)
    assert trainer["resourcesPerNode"]["limits"] == {"memory": "64Gi", "nvidia.com/gpu": "2"}
    assert trainer["command"] == ["langmerge-trainer"] and trainer["args"][:2] == ["distributed", "train"]
    env = {e["name"]: e for e in trainer["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "langmerge-s3"
    assert not any(name.startswith("PET_") for name in env)  # Kubeflow injects those (it refuses them in a spec)
    (patch,) = body["runtimePatches"]
    assert patch["manager"] == "langmerge.dev/operator"
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    pod = node["template"]["spec"]["template"]
    assert "kueue.x-k8s.io/queue-name" not in pod["metadata"]["labels"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["nodeSelector"] == {"pool": "gpu"} and pod["spec"]["serviceAccountName"] == "sa"
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["cache", "tmp", "shm"]
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert "suspend" not in build_trainjob(OWNER, _task(spec), Settings(trainjobs=True))["spec"]


@pytest.mark.parametrize("name", ["chat-es", "9lives", "a.b.c", "x" * 253])
def test_trainjob_names_are_short_rfc1035_labels(name: str) -> None:
    import re

    made = trainjob_name(Owner("LanguageExpert", "ns", name, "u"), "0123456789abcdef", 12)
    assert len(made) <= MAX_NAME and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", made), made
    other = trainjob_name(Owner("LanguageExpert", "ns", name, "u2"), "0123456789abcdef", 12)
    assert made != other  # another object (a new uid) never shares a name


def _tj(conditions: list[dict[str, Any]], *, suspend: bool | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"runtimeRef": {"name": "r"}}
    if suspend is not None:
        spec["suspend"] = suspend
    return {
        "kind": "TrainJob",
        "metadata": {
            "name": "tj",
            "namespace": "ns",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "resourceVersion": "5",
            "labels": {
                "langmerge.dev/fingerprint": "fp",
                "langmerge.dev/component": "training",
                "langmerge.dev/expert": "e",
            },
            "annotations": {"langmerge.dev/attempt": "2"},
        },
        "spec": spec,
        "status": {"conditions": conditions},
    }


def _cond(kind: str, status: str = "True", reason: str = "", at: str = "2026-01-01T00:10:00Z") -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": "m", "lastTransitionTime": at}


def test_trainjob_state_from_conditions() -> None:
    running = trainjob_state(_tj([]))
    assert running.running and running.started == "2026-01-01T00:00:00Z" and running.attempt == 2
    queued = trainjob_state(_tj([], suspend=True))
    assert queued.suspended and queued.active and queued.started is None  # never admitted
    preempted = trainjob_state(_tj([_cond("Suspended", "True", "Suspended")], suspend=True))
    assert preempted.suspended and not preempted.running
    resumed = trainjob_state(_tj([_cond("Suspended", "False", "Resumed")], suspend=False))
    assert resumed.running and resumed.started == "2026-01-01T00:10:00Z"
    done = trainjob_state(_tj([_cond("Complete", reason="JobsCompleted")]))
    assert done.succeeded and not done.active and done.wall_seconds() == 600.0
    failed = trainjob_state(_tj([_cond("Failed", reason="PodFailurePolicy")]))
    assert failed.failed and failed.reason == "PodFailurePolicy" and failed.kind == "TrainJob"


def test_job_index_holds_trainjobs_and_counts_only_admitted_ones() -> None:
    index = JobIndex()
    index.apply("ADDED", _tj([], suspend=True))
    assert index.active("training") == set()  # waiting for Kueue: no slot taken
    index.apply("MODIFIED", {**_tj([], suspend=False), "metadata": {**_tj([])["metadata"], "resourceVersion": "6"}})
    assert index.active("training") == {("ns", "tj")}
    assert index.owned("ns", "training", "e")[0].kind == "TrainJob"
    index.replace([], "7", kind="Job")  # a Job listing leaves TrainJobs alone
    assert index.get(("ns", "tj")) is not None
    index.replace([], "7", kind="TrainJob")
    assert index.get(("ns", "tj")) is None


# -- settings and cost --------------------------------------------------------------------------------------------------
def test_runtime_settings() -> None:
    assert Settings.from_env({"LANGMERGE_TRAINJOBS": "true", "LANGMERGE_TRAINING_RUNTIME": "trainjob"}).trainjobs
    with pytest.raises(SettingsError, match="needs LANGMERGE_TRAINJOBS"):
        Settings.from_env({"LANGMERGE_TRAINING_RUNTIME": "trainjob"})
    with pytest.raises(SettingsError, match="one of job, trainjob"):
        Settings.from_env({"LANGMERGE_TRAINING_RUNTIME": "slurm"})
    with pytest.raises(SettingsError, match="TRAINJOB_RUNTIME"):
        Settings.from_env({"LANGMERGE_TRAINJOB_RUNTIME": "Not A Name"})


def test_gpu_seconds_count_gpus_times_nodes() -> None:
    resources = TrainingResources(gpus=4, nodes=2)
    assert allocated_gpus(resources, torch.device("cuda")) == 8  # GPU-seconds = GPUs x nodes x wall
    assert allocated_gpus(resources, torch.device("cpu")) == 0
    assert allocated_gpus(TrainingResources(gpus=1), torch.device("cuda")) == 1
