"""TrainJobs on the local API server: the CRD (schema from the ``kubeflow-trainer-api`` models) keeps what the
operator's builder writes, and the local Job runner runs a TrainJob as one process per node with the variables
Kubeflow Trainer's torch runtime injects, fails it on a node's user error, and follows Kueue's suspension (of
TrainJobs and of Jobs) without counting a failure.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from test_jobrunner import RULES, Jobs, job_manifest, wait_for

from langmerge.api.expert import LanguageExpertSpec
from langmerge.artifacts import BaseModelIdentity
from langmerge.constants import TRAINER_GROUP, TRAINER_VERSION, TRAINJOB_PLURAL
from langmerge.controller.jobs import Owner, job_state
from langmerge.controller.trainjobs import build_trainjob, trainjob_state
from langmerge.dev.jobrunner import HOST_IMAGE, LocalJobRunner, RunnerConfig
from langmerge.dev.kueue import set_suspended
from langmerge.dev.trainjob_crd import trainjob_crd
from langmerge.kube import install_crds
from langmerge.settings import Settings
from langmerge.tasks import TrainTask

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def trainjob_api(kube: Any) -> client.CustomObjectsApi:
    install_crds(kube, [trainjob_crd()])
    return client.CustomObjectsApi(kube)


class TrainJobs:
    def __init__(self, api: client.CustomObjectsApi, namespace: str) -> None:
        self.api = api
        self.namespace = namespace

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = self.api.create_namespaced_custom_object(
            TRAINER_GROUP, TRAINER_VERSION, self.namespace, TRAINJOB_PLURAL, manifest
        )
        return created

    def get(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.api.get_namespaced_custom_object(
            TRAINER_GROUP, TRAINER_VERSION, self.namespace, TRAINJOB_PLURAL, name
        )
        return obj

    def condition(self, name: str, kind: str, timeout: float = 30.0) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            conds = (self.get(name).get("status") or {}).get("conditions") or []
            return next((c for c in conds if c["type"] == kind and c["status"] == "True"), None)

        return wait_for(found, timeout, f"TrainJob {name} condition {kind}")


def trainjob(name: str, command: list[str], *, nodes: int = 2, suspend: bool | None = None) -> dict[str, Any]:
    policy = {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": "node", "operator": "In", "values": [2, 4]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }
    spec: dict[str, Any] = {
        "runtimeRef": {"name": "torch-distributed"},
        "trainer": {"image": HOST_IMAGE, "command": command, "numNodes": nodes, "numProcPerNode": 1},
    }
    if suspend is not None:
        spec["suspend"] = suspend
    return {
        "apiVersion": f"{TRAINER_GROUP}/{TRAINER_VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name, "annotations": {"langmerge.dev/pod-failure-policy": json.dumps(policy)}},
        "spec": spec,
    }


@pytest.fixture
def trainjobs(trainjob_api: client.CustomObjectsApi, namespace: str) -> TrainJobs:
    return TrainJobs(trainjob_api, namespace)


@pytest.fixture
def runner(kube: Any, namespace: str, tmp_path: Path, trainjob_api: Any) -> Iterator[LocalJobRunner]:
    config = RunnerConfig(
        work_root=tmp_path / "work",
        namespace=namespace,
        image_rules=RULES,
        retry_delay_seconds=0.0,
        kill_grace_seconds=2.0,
        poll_seconds=0.05,
        parallel=2,
    )
    made = LocalJobRunner(kube, config)
    made.start()
    assert made.synced.wait(15)
    yield made
    made.stop()


def test_crd_keeps_what_the_builder_writes(trainjobs: TrainJobs, namespace: str) -> None:
    spec = LanguageExpertSpec.model_validate(
        {
            "language": "es",
            "task": "chat",
            "baseModel": {"uri": "s3://models/base"},
            "dataset": {"uri": "s3://data/es"},
            "resources": {"gpus": 2, "nodes": 2, "tolerations": [{"key": "gpu", "operator": "Exists"}]},
        }
    )
    task = TrainTask(
        fingerprint="0123456789abcdef",
        output_uri="s3://a/experts/x/0123456789abcdef",
        namespace=namespace,
        name="chat-es",
        spec=spec,
        base_model=BaseModelIdentity(uri="s3://models/base", digest="d"),
        data_digest="dd",
    )
    manifest = build_trainjob(Owner("LanguageExpert", namespace, "chat-es", "uid-1"), task, Settings(kueue_queue="q"))
    manifest["metadata"].pop("ownerReferences")  # no such owner on this API server
    created = trainjobs.create(manifest)
    assert created["spec"] == manifest["spec"]  # nothing pruned: the schema knows every field the builder writes
    assert created["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "2"
    state = trainjob_state(created)
    assert state.suspended and state.active and not state.running and state.attempt == 1
    assert state.kind == "TrainJob" and state.fingerprint == "0123456789abcdef"


def test_nodes_run_with_torch_variables_and_complete(
    runner: LocalJobRunner, trainjobs: TrainJobs, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    script = f"env | grep ^PET_ | sort > {out}/node-$PET_NODE_RANK; echo $POD_NAME >> {out}/node-$PET_NODE_RANK"
    manifest = trainjob("two-nodes", ["sh", "-c", script])
    manifest["spec"]["trainer"]["env"] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    ]
    trainjobs.create(manifest)
    done = trainjobs.condition("two-nodes", "Complete")
    assert done["reason"] == "JobsCompleted"
    nodes = [(out / f"node-{rank}").read_text().split() for rank in (0, 1)]
    port = {line for lines in nodes for line in lines if line.startswith("PET_MASTER_PORT=")}
    assert len(port) == 1  # one rendezvous
    for rank, lines in enumerate(nodes):
        assert "PET_NNODES=2" in lines and "PET_NPROC_PER_NODE=1" in lines and "PET_MASTER_ADDR=127.0.0.1" in lines
        assert f"PET_NODE_RANK={rank}" in lines and lines[-1] == f"two-nodes-node-0-{rank}"
    assert trainjob_state(trainjobs.get("two-nodes")).succeeded


def test_a_user_error_on_one_node_fails_the_trainjob_at_once(
    runner: LocalJobRunner, trainjobs: TrainJobs, tmp_path: Path
) -> None:
    marker = tmp_path / "node0-stopped"
    # Node 1 fails with the trainer's user-error status; node 0 would run for a minute and is stopped.
    script = f'trap "touch {marker}; exit 143" TERM; [ "$PET_NODE_RANK" = 1 ] && exit 4; sleep 60 & wait'
    trainjobs.create(trainjob("user-error", ["sh", "-c", script]))
    failed = trainjobs.condition("user-error", "Failed")
    assert failed["reason"] == "PodFailurePolicy"
    assert "failed with exit code 4 matching FailJob rule" in failed["message"]
    assert marker.exists()
    state = trainjob_state(trainjobs.get("user-error"))
    assert state.failed and not state.active and state.reason == "PodFailurePolicy"


def test_kueue_suspension_of_trainjobs_and_jobs(
    runner: LocalJobRunner, trainjobs: TrainJobs, kube: Any, namespace: str, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    # Each run appends a line per node; it waits for a release file to finish.
    release = tmp_path / "release"
    script = f"echo $PET_NODE_RANK >> {runs}/trainjob; while [ ! -e {release} ]; do sleep 0.05; done"
    trainjobs.create(trainjob("queued", ["sh", "-c", script], suspend=True))
    time.sleep(1.0)
    assert not (runs / "trainjob").exists()  # waiting for admission: nothing runs
    assert trainjob_state(trainjobs.get("queued")).suspended

    set_suspended(kube, "TrainJob", namespace, "queued", False)  # admitted
    wait_for(lambda: (runs / "trainjob").exists() and len((runs / "trainjob").read_text().split()) == 2, 15, "2 nodes")
    set_suspended(kube, "TrainJob", namespace, "queued", True)  # preempted
    cond = trainjobs.condition("queued", "Suspended")
    assert cond["reason"] == "Suspended"
    state = trainjob_state(trainjobs.get("queued"))
    assert state.suspended and state.active and not state.failed
    set_suspended(kube, "TrainJob", namespace, "queued", False)  # admitted again: runs again
    wait_for(lambda: len((runs / "trainjob").read_text().split()) == 4, 15, "the second run")
    release.touch()
    trainjobs.condition("queued", "Complete")
    conds = {c["type"]: c for c in trainjobs.get("queued")["status"]["conditions"]}
    assert conds["Suspended"]["status"] == "False" and conds["Suspended"]["reason"] == "Resumed"
    assert "Failed" not in conds

    # A Job created suspended (the annotation copy: this API server drops spec.suspend), admitted, preempted.
    jobs = Jobs(kube, namespace)
    release.unlink()
    manifest = job_manifest(
        "queued-job", ["sh", "-c", f"echo x >> {runs}/job; while [ ! -e {release} ]; do sleep 0.05; done"]
    )
    manifest["metadata"]["annotations"] = {"langmerge.dev/suspend": "true"}
    manifest["spec"]["suspend"] = True
    jobs.create(manifest)
    time.sleep(1.0)
    assert not (runs / "job").exists()
    assert job_state(jobs.get("queued-job")).suspended
    set_suspended(kube, "Job", namespace, "queued-job", False)
    wait_for(lambda: (runs / "job").exists(), 15, "the Job to run")
    started = jobs.status("queued-job")["startTime"]
    set_suspended(kube, "Job", namespace, "queued-job", True)
    status = wait_for(
        lambda: (
            (s := jobs.status("queued-job"))
            and any(c["type"] == "Suspended" and c["status"] == "True" for c in s.get("conditions") or [])
            and s
        ),
        15,
        "the Job to be suspended",
    )
    assert "failed" not in status and "active" not in status and status["startTime"] == started
    state = job_state(jobs.get("queued-job"))
    assert state.suspended and state.started is not None  # preempted after it ran: the operator tells it from queued
    set_suspended(kube, "Job", namespace, "queued-job", False)
    wait_for(lambda: len((runs / "job").read_text().split()) == 2, 15, "the Job to run again")
    release.touch()
    final = jobs.finished("queued-job")
    assert final["succeeded"] == 1 and "failed" not in final
