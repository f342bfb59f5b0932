"""LanguageExpert reconciliation on the real API server and S3, with the operator running in-process.

Job execution is simulated (SimulatedJobs writes what the trainer writes and patches Job status through /status);
the real trainer under the local Job runner is exercised by the end-to-end test.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from typing import Any

import pytest
from kubernetes import client

from langmerge import artifacts
from langmerge.store import ObjectStore
from operator_harness import (
    DIALOG_ROWS,
    SimulatedJobs,
    apply_expert,
    condition,
    dialog_expert,
    events,
    get_expert,
    jobs,
    put_jsonl,
    run_operator,
    seed_fake_base_model,
    status_of,
    wait_for,
)

pytestmark = pytest.mark.integration


def _spec(bucket: str, lang: str = "es", **overrides: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "training": {"epochs": 1},
        "resources": {"gpus": 1, "memory": "8Gi", "cpu": "2"},
        "schedule": {"pollIntervalSeconds": 5, "settleSeconds": 2},
        "retry": {"limit": 1, "backoffSeconds": 1},
    }
    return dialog_expert(bucket, lang, **{**defaults, **overrides})


@pytest.fixture
def seeded(s3: ObjectStore, bucket: str) -> str:
    seed_fake_base_model(s3, f"s3://{bucket}/base")
    for lang in ("es", "it", "pt", "de", "fr"):
        put_jsonl(s3, f"s3://{bucket}/data/{lang}/part-0.jsonl", DIALOG_ROWS)
    return bucket


def _ready(kube: Any, namespace: str, name: str) -> dict[str, Any] | None:
    obj = get_expert(kube, namespace, name)
    return obj if status_of(obj).get("phase") == "Ready" else None


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _metric(port: int, name: str) -> float:
    import urllib.error
    import urllib.request

    def scrape() -> str | None:
        try:
            return str(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
        except urllib.error.URLError:
            return None  # the operator is still starting

    text = wait_for(scrape, timeout=20, what="the metrics endpoint")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_expert_trains_once_and_becomes_ready(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    bucket = seeded
    port = _free_port()
    with (
        run_operator(namespace, f"s3://{bucket}/artifacts", metrics_port=port),
        SimulatedJobs(kube, s3, namespace, duration=1.0),
    ):
        launched = _metric(port, 'langmerge_jobs_launched_total{component="training"}')
        apply_expert(kube, namespace, "es", _spec(bucket))
        job = wait_for(lambda: jobs(kube, namespace), what="a training Job")[0]
        # The Job, as built by the pure builder and created by the operator.
        assert len(job.metadata.name) <= 63 and job.metadata.name.startswith("es-train-")
        assert job.metadata.owner_references[0].kind == "LanguageExpert"
        assert job.metadata.labels["langmerge.dev/component"] == "training"
        pod = job.spec.template.spec
        container = pod.containers[0]
        assert container.resources.limits["nvidia.com/gpu"] == "1"
        assert container.command == ["langmerge-trainer"] and container.args[:2] == ["train", "--task"]
        task = json.loads(container.args[2])
        assert task["output_uri"].startswith(f"s3://{bucket}/artifacts/experts/{namespace}/es/")
        secret_refs = [
            e.value_from.secret_key_ref.name for e in container.env if e.value_from and e.value_from.secret_key_ref
        ]
        assert secret_refs == ["langmerge-s3", "langmerge-s3"]
        assert pod.security_context.run_as_non_root is True
        assert job.spec.active_deadline_seconds == 86400 and job.spec.backoff_limit == 1

        training = wait_for(
            lambda: status_of(get_expert(kube, namespace, "es")).get("phase") == "Training", what="Training"
        )
        assert training
        obj = wait_for(lambda: _ready(kube, namespace, "es"), what="Ready")
        status = status_of(obj)
        assert status["adapter"]["digest"] and status["trainedFingerprint"] == task["fingerprint"]
        assert status["adapter"]["uri"] == artifacts.adapter_uri(task["output_uri"])
        assert status["adapter"]["metrics"]["evalLoss"] == 2.0
        assert condition(obj, "Ready")["status"] == "True"
        assert condition(obj, "Ready")["observedGeneration"] == obj["metadata"]["generation"]
        assert [h["result"] for h in status["history"]] == ["Succeeded"]
        assert status["history"][0]["tokens"] == 5000 and status["history"][0]["gpuSeconds"] == 0.0
        # Events are posted right after the status write that a reader may see first.
        wait_for(
            lambda: {"TrainingStarted", "AdapterReady"} <= {e.reason for e in events(kube, namespace, "es")},
            what="TrainingStarted and AdapterReady Events",
        )
        assert len(jobs(kube, namespace)) == 1
        # Prometheus metrics: the Job launched and the reconcile latency histogram.
        assert _metric(port, 'langmerge_jobs_launched_total{component="training"}') >= launched + 1
        assert _metric(port, 'langmerge_reconcile_seconds_count{kind="expert"}') > 0


def test_reapply_and_restart_start_no_jobs(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    bucket = seeded
    artifacts_uri = f"s3://{bucket}/artifacts"
    with run_operator(namespace, artifacts_uri), SimulatedJobs(kube, s3, namespace):
        apply_expert(kube, namespace, "es", _spec(bucket))
        wait_for(lambda: _ready(kube, namespace, "es"), what="Ready")
    assert len(jobs(kube, namespace)) == 1
    # Re-apply the same spec and restart the operator (twice): zero new Jobs.
    for _ in range(2):
        with run_operator(namespace, artifacts_uri):
            apply_expert(kube, namespace, "es", _spec(bucket))
            time.sleep(2.0)
            assert status_of(get_expert(kube, namespace, "es"))["phase"] == "Ready"
    assert len(jobs(kube, namespace)) == 1
    # Deleting every Job (e.g. TTL) and the status view changes nothing either: S3 is the record.
    for job in jobs(kube, namespace):
        client.BatchV1Api(kube).delete_namespaced_job(job.metadata.name, namespace)
    client.CustomObjectsApi(kube).patch_namespaced_custom_object_status(
        "langmerge.dev", "v1alpha1", namespace, "languageexperts", "es", {"status": None}
    )
    with run_operator(namespace, artifacts_uri):
        obj = wait_for(lambda: _ready(kube, namespace, "es"), what="Ready after a lost status")
        assert status_of(obj)["history"][-1]["result"] == "Adopted"
    assert jobs(kube, namespace) == [] or all(j.metadata.deletion_timestamp for j in jobs(kube, namespace))


def test_adopts_existing_adapter_of_recreated_expert(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    bucket = seeded
    with run_operator(namespace, f"s3://{bucket}/artifacts"), SimulatedJobs(kube, s3, namespace):
        apply_expert(kube, namespace, "it", _spec(bucket, "it"))
        digest = wait_for(lambda: _ready(kube, namespace, "it"), what="Ready")["status"]["adapter"]["digest"]
        client.CustomObjectsApi(kube).delete_namespaced_custom_object(
            "langmerge.dev", "v1alpha1", namespace, "languageexperts", "it"
        )
        wait_for(
            lambda: (
                not any(
                    o["metadata"]["name"] == "it"
                    for o in client.CustomObjectsApi(kube).list_namespaced_custom_object(
                        "langmerge.dev", "v1alpha1", namespace, "languageexperts"
                    )["items"]
                )
            )
        )
        started = len(jobs(kube, namespace))
        apply_expert(kube, namespace, "it", _spec(bucket, "it"))
        obj = wait_for(lambda: _ready(kube, namespace, "it"), what="Ready by adoption")
        assert obj["status"]["adapter"]["digest"] == digest
        assert obj["status"]["history"][-1]["result"] == "Adopted"
        time.sleep(1.0)
        assert len([j for j in jobs(kube, namespace) if not j.metadata.deletion_timestamp]) <= started


def test_data_change_gives_exactly_one_job_after_settle(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str
) -> None:
    bucket = seeded
    with run_operator(namespace, f"s3://{bucket}/artifacts"), SimulatedJobs(kube, s3, namespace) as sim:
        apply_expert(
            kube, namespace, "pt", _spec(bucket, "pt", schedule={"pollIntervalSeconds": 5, "settleSeconds": 3})
        )
        first = wait_for(lambda: _ready(kube, namespace, "pt"), what="Ready")["status"]["trainedFingerprint"]
        # A batch of three uploads, one second apart: one Job, after the data has been still for settleSeconds.
        for i in range(3):
            put_jsonl(s3, f"s3://{bucket}/data/pt/part-{i + 1}.jsonl", DIALOG_ROWS[: 5 + i])
            time.sleep(1.0)
        changed = wait_for(
            lambda: (c := condition(get_expert(kube, namespace, "pt"), "DataChanged")) and c["status"] == "True" and c,
            timeout=15,
            what="DataChanged",
        )
        assert changed["reason"] in ("Settling", "Retraining")
        obj = wait_for(
            lambda: (o := _ready(kube, namespace, "pt")) and o["status"]["trainedFingerprint"] != first and o,
            timeout=40,
            what="retrained",
        )
        assert len(sim.started) == 2, sim.started
        assert len(obj["status"]["history"]) == 2
        assert condition(obj, "DataChanged")["status"] == "False"
        time.sleep(2.0)
        assert len(sim.started) == 2


def test_data_changed_before_the_job_read_it_is_adopted_at_once(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str
) -> None:
    """Issue 12, item 9: the data changes after the operator listed it, before the Job reads it. The Job trains on
    what it read, under that data's fingerprint, and says so; the operator lists the data again at once and adopts
    that adapter: no second Job, and no wait for the next poll (300 s) or a settle window (60 s)."""
    bucket = seeded
    release = threading.Event()
    with (
        run_operator(namespace, f"s3://{bucket}/artifacts"),
        SimulatedJobs(
            kube, s3, namespace, behaviour=lambda job, fp: "succeed-on-read-data" if release.is_set() else "hang"
        ) as sim,
    ):
        apply_expert(
            kube, namespace, "it", _spec(bucket, "it", schedule={"pollIntervalSeconds": 300, "settleSeconds": 60})
        )
        job = wait_for(lambda: jobs(kube, namespace), what="Job")[0]
        listed = job.metadata.annotations["langmerge.dev/data-digest"]  # what the operator listed
        put_jsonl(s3, f"s3://{bucket}/data/it/part-1.jsonl", DIALOG_ROWS[:7])
        release.set()
        obj = wait_for(lambda: _ready(kube, namespace, "it"), timeout=20, what="Ready")
        status = status_of(obj)
        now, _count = s3.prefix_digest(f"s3://{bucket}/data/it", suffix=".jsonl")
        assert status["dataDigest"] == now != listed
        assert status["adapter"]["dataDigest"] == now
        assert status["trainedFingerprint"] != job.metadata.labels["langmerge.dev/fingerprint"]
        assert condition(obj, "DataChanged")["status"] == "False"
        assert (status["history"][-1]["job"], status["history"][-1]["result"]) == (job.metadata.name, "Succeeded")
        changed = [e for e in events(kube, namespace, "it") if e.reason == "DataChangedDuringTraining"]
        assert changed and f"{listed} when listed, {now} when read" in changed[0].message
        time.sleep(2.0)
        assert len(sim.started) == 1


def test_failed_job_retries_then_fails_with_message(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    bucket = seeded
    with (
        run_operator(namespace, f"s3://{bucket}/artifacts"),
        SimulatedJobs(kube, s3, namespace, behaviour=lambda job, fp: "fail") as sim,
    ):
        apply_expert(kube, namespace, "de", _spec(bucket, "de"))
        obj = wait_for(
            lambda: (
                status_of(get_expert(kube, namespace, "de")).get("phase") == "Failed"
                and get_expert(kube, namespace, "de")
            ),
            timeout=30,
            what="Failed",
        )
        status = status_of(obj)
        assert "line 3: missing 'completion'" in status["message"] and "2 attempt(s)" in status["message"]
        assert condition(obj, "Ready")["reason"] == "TrainingFailed"
        assert len(sim.started) == 2  # the first attempt and retry.limit=1 retry
        assert [j.metadata.name[-2:] for j in sorted(jobs(kube, namespace), key=lambda j: j.metadata.name)] == [
            "-1",
            "-2",
        ]
        assert "TrainingFailed" in {e.reason for e in events(kube, namespace, "de")}
        time.sleep(2.0)
        assert len(sim.started) == 2


def test_silent_job_failure_is_recorded_from_the_job_condition(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str
) -> None:
    bucket = seeded
    spec = _spec(bucket, "fr", retry={"limit": 0, "backoffSeconds": 1})
    with (
        run_operator(namespace, f"s3://{bucket}/artifacts"),
        SimulatedJobs(kube, s3, namespace, behaviour=lambda j, fp: "fail-silently"),
    ):
        apply_expert(kube, namespace, "fr", spec)
        obj = wait_for(
            lambda: (
                status_of(get_expert(kube, namespace, "fr")).get("phase") == "Failed"
                and get_expert(kube, namespace, "fr")
            ),
            what="Failed",
        )
        assert "BackoffLimitExceeded" in obj["status"]["message"]
        fp = obj["status"]["desiredFingerprint"]
        record = s3.get_json(
            artifacts.failure_uri(artifacts.expert_prefix(f"s3://{bucket}/artifacts", namespace, "fr", fp), 1)
        )
        assert record["error_class"] == "BackoffLimitExceeded"


def test_concurrency_cap_with_five_experts(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    bucket = seeded
    names = ["es", "it", "pt", "de", "fr"]
    with (
        run_operator(namespace, f"s3://{bucket}/artifacts", max_training_jobs=2),
        SimulatedJobs(kube, s3, namespace, duration=1.0) as sim,
    ):
        for name in names:
            apply_expert(kube, namespace, name, _spec(bucket, name))
        queued = wait_for(
            lambda: [
                n
                for n in names
                if condition(get_expert(kube, namespace, n), "Training")
                and condition(get_expert(kube, namespace, n), "Training")["reason"] == "QueueFull"
            ],
            what="an expert queued",
        )
        assert queued
        wait_for(lambda: all(_ready(kube, namespace, n) for n in names), timeout=60, what="all Ready")
        assert sim.max_active_seen <= 2
        assert len(sim.started) == 5


def test_deleting_expert_removes_its_job(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    bucket = seeded
    with (
        run_operator(namespace, f"s3://{bucket}/artifacts"),
        SimulatedJobs(kube, s3, namespace, behaviour=lambda j, fp: "hang"),
    ):
        apply_expert(kube, namespace, "es", _spec(bucket))
        wait_for(lambda: jobs(kube, namespace), what="Job")
        client.CustomObjectsApi(kube).delete_namespaced_custom_object(
            "langmerge.dev", "v1alpha1", namespace, "languageexperts", "es"
        )
        wait_for(
            lambda: not [j for j in jobs(kube, namespace) if not j.metadata.deletion_timestamp], what="Job deleted"
        )
    # The artifacts are data: nothing in S3 was deleted.
    assert s3.list_objects(f"s3://{bucket}/data/es")


def test_suspend_and_on_change_restart(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    bucket = seeded
    with (
        run_operator(namespace, f"s3://{bucket}/artifacts"),
        SimulatedJobs(kube, s3, namespace, behaviour=lambda j, fp: "hang") as sim,
    ):
        apply_expert(kube, namespace, "es", _spec(bucket, suspend=True))
        wait_for(lambda: status_of(get_expert(kube, namespace, "es")).get("phase") == "Suspended", what="Suspended")
        assert jobs(kube, namespace) == []
        apply_expert(kube, namespace, "es", _spec(bucket, onChange="restart"))
        first = wait_for(lambda: jobs(kube, namespace), what="Job")[0].metadata.name
        # A spec change while training: onChange=restart cancels the running Job and starts the new fingerprint.
        apply_expert(kube, namespace, "es", _spec(bucket, onChange="restart", lora={"rank": 8}))
        wait_for(
            lambda: [
                j for j in jobs(kube, namespace) if j.metadata.name != first and not j.metadata.deletion_timestamp
            ],
            what="new Job",
        )
        wait_for(
            lambda: first not in [j.metadata.name for j in jobs(kube, namespace) if not j.metadata.deletion_timestamp],
            what="old Job cancelled",
        )
        # The Event follows the pass's status write, right after the delete.
        wait_for(
            lambda: "TrainingCancelled" in {e.reason for e in events(kube, namespace, "es")}, what="TrainingCancelled"
        )
        assert len(sim.started) >= 1


def test_on_change_wait_supersedes_then_retrains(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    bucket = seeded
    with run_operator(namespace, f"s3://{bucket}/artifacts"), SimulatedJobs(kube, s3, namespace, duration=2.5) as sim:
        apply_expert(kube, namespace, "it", _spec(bucket, "it"))
        wait_for(lambda: jobs(kube, namespace), what="Job")
        apply_expert(kube, namespace, "it", _spec(bucket, "it", lora={"rank": 8}))
        wait_for(lambda: status_of(get_expert(kube, namespace, "it")).get("phase") == "Superseded", what="Superseded")
        obj = wait_for(
            lambda: (
                (o := _ready(kube, namespace, "it"))
                and o["status"]["trainedFingerprint"] == o["status"]["desiredFingerprint"]
                and len(sim.started) == 2
                and o
            ),
            timeout=30,
            what="retrained after the old Job",
        )
        assert obj["spec"]["lora"]["rank"] == 8


def test_invalid_spec_reported_in_status_and_event(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    bucket = seeded
    with run_operator(namespace, f"s3://{bucket}/artifacts"):
        apply_expert(kube, namespace, "es", _spec(bucket, dataset={"uri": f"s3://{bucket}/nothing-here"}))
        obj = wait_for(
            lambda: status_of(get_expert(kube, namespace, "es")).get("message") and get_expert(kube, namespace, "es"),
            what="message",
        )
        assert "no *.jsonl objects" in obj["status"]["message"]
        assert condition(obj, "Degraded")["reason"] == "DatasetEmpty"
        assert "DatasetEmpty" in {e.reason for e in events(kube, namespace, "es")}
        assert jobs(kube, namespace) == []


def test_spec_change_to_job_latency(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    """Measured, not asserted against a time limit: spec change -> Job created, over 20 changes."""
    bucket = seeded
    latencies = []
    with (
        run_operator(namespace, f"s3://{bucket}/artifacts", max_training_jobs=50),
        SimulatedJobs(kube, s3, namespace, behaviour=lambda j, fp: "hang"),
    ):
        apply_expert(kube, namespace, "es", _spec(bucket, onChange="restart"))
        wait_for(lambda: jobs(kube, namespace), what="first Job")
        for i in range(20):
            before = {j.metadata.name for j in jobs(kube, namespace)}
            t0 = time.monotonic()
            apply_expert(
                kube,
                namespace,
                "es",
                _spec(bucket, onChange="restart", dataset={"uri": f"s3://{bucket}/data/es", "revision": f"r{i}"}),
            )
            wait_for(
                lambda b=before: {j.metadata.name for j in jobs(kube, namespace)} - b, interval=0.01, what="new Job"
            )
            latencies.append(time.monotonic() - t0)
    q = statistics.quantiles(latencies, n=20)
    print(
        f"\nspec change -> Job created over {len(latencies)} changes: p50 {statistics.median(latencies) * 1000:.0f} ms, p95 {q[18] * 1000:.0f} ms"
    )
    assert len(latencies) == 20


def test_rejected_job_is_reported(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    """The API server refuses the Job (here a node selector value the CRD cannot check): the expert says so in its
    status and an Event instead of failing silently, and recovers once the spec is fixed."""
    bucket = seeded
    bad = _spec(bucket, resources={"gpus": 1, "nodeSelector": {"pool": "gpu nodes!"}})
    with run_operator(namespace, f"s3://{bucket}/artifacts"), SimulatedJobs(kube, s3, namespace):
        apply_expert(kube, namespace, "es", bad)
        obj = wait_for(
            lambda: (
                (c := condition(get_expert(kube, namespace, "es"), "Degraded"))
                and c["reason"] == "JobRejected"
                and get_expert(kube, namespace, "es")
            ),
            what="JobRejected",
        )
        assert "refused the training Job" in obj["status"]["message"] and "nodeSelector" in obj["status"]["message"]
        assert "JobRejected" in {e.reason for e in events(kube, namespace, "es")}
        assert jobs(kube, namespace) == []
        apply_expert(kube, namespace, "es", _spec(bucket, resources={"gpus": 1, "nodeSelector": {"pool": "gpu"}}))
        wait_for(lambda: _ready(kube, namespace, "es"), what="Ready after the fix")
