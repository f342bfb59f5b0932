"""One expert trained as a 2-node Kubeflow Trainer TrainJob, end to end, on the real API server + S3 with the real
trainer: the operator (``runtime: trainjob``, ``resources.nodes: 2``) creates the TrainJob; the local Job runner runs
it as 2 "nodes" (2 launcher processes, 1 training process each, CPU/gloo) joined by torchrun's rendezvous on
127.0.0.1 with the variables Kubeflow's torch runtime injects; the adapter is committed, the expert goes Ready, and a
MergedModel merges it into revision 1.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from langmerge import artifacts
from langmerge.api.expert import LanguageExpertStatus
from langmerge.artifacts import AdapterManifest, MergeManifest, PublishedRevision
from langmerge.dev.demo import Demo, Layout, sample_expert, sample_merged
from langmerge.dev.jobrunner import LocalJobRunner, RunnerConfig
from langmerge.dev.trainjob_crd import trainjob_crd
from langmerge.kube import Kube, install_crds
from langmerge.store import ObjectStore
from operator_harness import run_operator

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def test_two_node_trainjob_to_ready_and_merged(
    control_plane: Any, kube: Any, s3: ObjectStore, namespace: str, tmp_path: Path
) -> None:
    install_crds(kube, [trainjob_crd()])
    uid = uuid.uuid4().hex[:8]
    layout = Layout(models_bucket=f"tj-models-{uid}", data_bucket=f"tj-data-{uid}", artifacts_bucket=f"tj-art-{uid}")
    demo = Demo(state=tmp_path, kube=Kube(kube), store=s3, env=dict(os.environ), namespace=namespace, layout=layout)
    demo.prepare_storage()
    demo.ensure_secret()
    demo.seed("--pretrain-steps", "40", "--hidden-size", "64")

    expert = sample_expert("es", layout, trunk=False)  # one expert: no trunk to start from
    expert["spec"]["runtime"] = "trainjob"
    expert["spec"]["resources"] = {"gpus": 0, "nodes": 2, "cpu": "1", "memory": "4Gi"}
    expert["spec"]["training"].update({"epochs": 2, "batchSize": 8})  # 2 processes x 8: each step sees 16
    merged = sample_merged(layout, serving=False)
    del merged["spec"]["trunk"]

    runner = LocalJobRunner(
        kube,
        RunnerConfig(
            work_root=tmp_path / "jobs",
            parallel=2,
            namespace=namespace,
            kill_grace_seconds=30.0,
            extra_env=(
                ("PYTHONUNBUFFERED", "1"),
                ("OMP_NUM_THREADS", "1"),
                ("TOKENIZERS_PARALLELISM", "false"),
                ("LANGMERGE_MODEL_CACHE", str(tmp_path / "models")),
                ("HOME", str(tmp_path / "home")),
                ("TMPDIR", str(tmp_path)),
            ),
        ),
    )
    with (
        run_operator(
            namespace,
            layout.artifacts_uri,
            trainjobs=True,
            training_runtime="job",  # the expert asks for trainjob itself
            resync_seconds=5,
            uri_grants=layout.uri_grants(namespace),
        ),
        runner,
    ):
        demo.apply(expert)
        demo.apply(merged)
        demo.watch(lambda: demo.revision() >= 1, "revision 1 from a 2-node TrainJob", timeout=900)

        assert demo.training_jobs() == []  # no batch/v1 Job: the training ran as a TrainJob
        (obj,) = demo.experts()
        status = LanguageExpertStatus.model_validate(obj["status"])
        assert status.phase == "Ready"
        assert status.training is not None
        assert (status.training.runtime, status.training.nodes, status.training.processes) == ("trainjob", 2, 2)
        assert status.training.effective_batch_size == 16
        (run,) = [h for h in status.history if h.result == "Succeeded"]
        trainjobs = demo.custom().list_namespaced_custom_object(
            "trainer.kubeflow.org", "v1alpha1", namespace, "trainjobs"
        )["items"]
        assert [t["metadata"]["name"] for t in trainjobs] == [run.job]
        conditions = {c["type"]: c["status"] for c in trainjobs[0]["status"]["conditions"]}
        assert conditions == {"Complete": "True"}

    # Two nodes ran, each with its own rank, and joined one rendezvous.
    logs = sorted((tmp_path / "jobs" / "_logs").glob(f"{namespace}_{run.job}-node-*"))
    assert [p.name.rsplit("_", 1)[0].rsplit("-", 1)[1] for p in logs] == ["0", "1"], logs
    text = [p.read_text() for p in logs]
    assert "[rank0]" in text[0] and "[rank1]" in text[1]
    assert "committed " in text[0] and "committed " not in text[1]  # rank 0 alone writes

    manifest_uri = artifacts.join(obj["status"]["adapter"]["uri"].rsplit("/attempts/", 1)[0], artifacts.MANIFEST)
    adapter = AdapterManifest.model_validate(s3.get_json(manifest_uri))
    assert adapter.cost.gpus == 0 and adapter.steps > 0  # CPU "nodes": no GPU-seconds
    current = PublishedRevision.model_validate(s3.get_json(artifacts.current_uri(layout.merged_uri)))
    assert current.revision == 1
    merge = MergeManifest.model_validate(s3.get_json(current.manifest_uri))
    assert [i.language for i in merge.inputs] == ["es"] and merge.inputs[0].adapter_digest == adapter.adapter_digest
