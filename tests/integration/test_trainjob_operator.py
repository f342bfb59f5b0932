"""The operator with the trainjob runtime on the real API server and S3 (Kubeflow Trainer simulated): the same failure
semantics as for Jobs. A trainer error no retry can fix stops the TrainJob at once (no second TrainJob, the expert
Failed after 1 attempt); a TrainJob that fails with a retryable error is retried with a new TrainJob; a TrainJob
that fails after its trainer was preempted (SIGTERM, checkpoint, exit 3) is a disruption: the next TrainJob starts
without spending ``retry.limit``; the spec is refused when it asks for nodes without the trainjob runtime, or for
TrainJobs the operator does not create.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from langmerge import artifacts
from langmerge.artifacts import FailureRecord, PreemptionRecord
from langmerge.dev.trainjob_crd import trainjob_crd
from langmerge.kube import install_crds
from langmerge.store import ObjectStore
from langmerge.tasks import TrainTask
from operator_harness import (
    apply_expert,
    condition,
    events,
    get_expert,
    now,
    put_jsonl,
    run_operator,
    seed_fake_base_model,
    status_of,
    wait_for,
    write_fake_adapter,
)

pytestmark = pytest.mark.integration
GROUP = ("trainer.kubeflow.org", "v1alpha1")
ROWS = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(10)]


class SimulatedTrainer(threading.Thread):
    """Kubeflow Trainer and the trainer's rank 0 for the TrainJobs of one namespace: ``behaviour(attempt)`` is
    ``"succeed"`` (commit, Complete), ``"user-error"`` (a non-retryable failure record while the nodes keep
    running: a runtime would restart them), ``"fail"`` (a retryable record, then the Failed condition) or
    ``"disrupted"`` (a node preempted: rank 0's preemption record, as the trainer writes it when it exits 3 after a
    checkpoint, then the Failed condition of a JobSet that does not restart nodes)."""

    def __init__(self, kube: Any, store: ObjectStore, namespace: str, behaviour: Callable[[int], str]) -> None:
        super().__init__(daemon=True)
        self.api = client.CustomObjectsApi(kube)
        self.store, self.namespace, self.behaviour = store, namespace, behaviour
        self.seen: list[str] = []
        self.tasks: list[TrainTask] = []
        self.stop = threading.Event()

    def _condition(self, name: str, kind: str, reason: str) -> None:
        cond = {"type": kind, "status": "True", "reason": reason, "message": reason, "lastTransitionTime": now()}
        with contextlib.suppress(ApiException):
            self.api.patch_namespaced_custom_object_status(
                *GROUP, self.namespace, "trainjobs", name, {"status": {"conditions": [cond]}}
            )

    def run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(ApiException):
                for item in self.api.list_namespaced_custom_object(*GROUP, self.namespace, "trainjobs")["items"]:
                    name = item["metadata"]["name"]
                    if name in self.seen or item["metadata"].get("deletionTimestamp"):
                        continue
                    self.seen.append(name)
                    task = TrainTask.model_validate_json(item["spec"]["trainer"]["args"][-1])
                    self.tasks.append(task)
                    mode = self.behaviour(task.attempt)
                    if mode == "disrupted":
                        marker = PreemptionRecord(fingerprint=task.fingerprint, attempt=task.attempt, step=3)
                        self.store.put_json(artifacts.preemption_uri(task.output_uri, task.attempt), marker)
                        self._condition(name, "Failed", "BackoffLimitExceeded")
                        continue
                    if mode == "succeed":
                        write_fake_adapter(self.store, task)
                        self._condition(name, "Complete", "JobsCompleted")
                        continue
                    record = FailureRecord(
                        fingerprint=task.fingerprint,
                        error_class="DataError" if mode == "user-error" else "OSError",
                        message="data.jsonl line 3: missing 'completion'" if mode == "user-error" else "node lost",
                        retryable=mode != "user-error",
                        attempt=task.attempt,
                    )
                    self.store.put_json(artifacts.failure_uri(task.output_uri, task.attempt), record)
                    if mode == "fail":
                        self._condition(name, "Failed", "BackoffLimitExceeded")
            time.sleep(0.05)


def _spec(bucket: str, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "language": "es",
        "task": "dialog",
        "baseModel": {"uri": f"s3://{bucket}/base"},
        "dataset": {"uri": f"s3://{bucket}/data/es"},
        "resources": {"gpus": 2, "nodes": 2},
        "runtime": "trainjob",
        "schedule": {"pollIntervalSeconds": 5, "settleSeconds": 0},
        "retry": {"limit": 2, "backoffSeconds": 0},
    }
    spec.update(overrides)
    return spec


@pytest.fixture
def seeded(kube: Any, s3: ObjectStore, bucket: str) -> str:
    install_crds(kube, [trainjob_crd()])
    seed_fake_base_model(s3, f"s3://{bucket}/base")
    put_jsonl(s3, f"s3://{bucket}/data/es/part-0.jsonl", ROWS)
    return bucket


def _trainjobs(kube: Any, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = client.CustomObjectsApi(kube).list_namespaced_custom_object(
        *GROUP, namespace, "trainjobs"
    )["items"]
    return items


def test_user_error_stops_the_trainjob_and_retryable_failures_retry(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str, make_namespace: Callable[[], str]
) -> None:
    bucket = seeded
    other = make_namespace()
    user_error = SimulatedTrainer(kube, s3, namespace, lambda attempt: "user-error")
    flaky = SimulatedTrainer(kube, s3, other, lambda attempt: "fail" if attempt == 1 else "succeed")
    user_error.start()
    flaky.start()
    try:
        with run_operator(
            namespace,
            f"s3://{bucket}/artifacts",
            also_watch=(other,),
            namespaces=f"{namespace},{other}",
            trainjobs=True,
        ):
            apply_expert(kube, namespace, "dialog-es", _spec(bucket))
            apply_expert(kube, other, "dialog-es", _spec(bucket))

            failed = wait_for(
                lambda: (o := get_expert(kube, namespace, "dialog-es")) and status_of(o).get("phase") == "Failed" and o,
                30,
                what="Failed",
            )
            assert "training failed after 1 attempt(s): DataError" in status_of(failed)["message"]
            stopped = [e for e in events(kube, namespace, "dialog-es") if e.reason == "TrainingStopped"]
            assert len(stopped) == 1 and "no retry can fix" in stopped[0].message
            wait_for(lambda: not _trainjobs(kube, namespace), 20, what="the TrainJob deleted")
            assert user_error.seen and len(user_error.seen) == 1  # no second TrainJob

            ready = wait_for(
                lambda: (o := get_expert(kube, other, "dialog-es")) and status_of(o).get("phase") == "Ready" and o,
                40,
                what="Ready after a retry",
            )
            assert len(flaky.seen) == 2 and flaky.seen[0].endswith("-1") and flaky.seen[1].endswith("-2")
            assert status_of(ready)["history"][-1]["job"] == flaky.seen[1]
            assert status_of(ready)["training"] == {
                "runtime": "trainjob",
                "nodes": 2,
                "processes": 4,
                "parallelism": "ddp",
                "perDeviceBatchSize": 8,
                "gradientAccumulationSteps": 1,
                "effectiveBatchSize": 32,
            }
    finally:
        for thread in (user_error, flaky):
            thread.stop.set()
            thread.join(5)


def test_a_disrupted_trainjob_does_not_spend_the_retry_limit(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str
) -> None:
    """retry.limit 0: a failed attempt would end the expert as Failed, a disrupted one must not."""
    bucket = seeded
    trainer = SimulatedTrainer(kube, s3, namespace, lambda attempt: "disrupted" if attempt == 1 else "succeed")
    trainer.start()
    try:
        with run_operator(namespace, f"s3://{bucket}/artifacts", trainjobs=True):
            apply_expert(kube, namespace, "dialog-es", _spec(bucket, retry={"limit": 0, "backoffSeconds": 60}))
            ready = wait_for(
                lambda: (
                    (o := get_expert(kube, namespace, "dialog-es"))
                    and status_of(o).get("phase") in ("Ready", "Failed")
                    and o
                ),
                30,
                what="Ready or Failed",
            )
            status = status_of(ready)
            assert status["phase"] == "Ready", status.get("message")
            assert status["attempts"] == 0
            assert len(trainer.seen) == 2 and trainer.seen[0].endswith("-1") and trainer.seen[1].endswith("-2")
            disrupted = [e for e in events(kube, namespace, "dialog-es") if e.reason == "Disrupted"]
            assert len(disrupted) == 1 and "not a failed attempt" in disrupted[0].message
            assert "step 3" in disrupted[0].message and trainer.seen[0] in disrupted[0].message
            assert not [e for e in events(kube, namespace, "dialog-es") if e.reason == "TrainingFailed"]
            record = s3.get_record(artifacts.failure_uri(trainer.tasks[0].output_uri, 1), FailureRecord)
            assert record is not None and record.disruption and record.error_class == artifacts.DISRUPTED
    finally:
        trainer.stop.set()
        trainer.join(5)


def test_runtime_refusals(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    bucket = seeded
    with run_operator(namespace, f"s3://{bucket}/artifacts"):  # trainjobs off
        apply_expert(kube, namespace, "wants-trainjob", _spec(bucket))
        apply_expert(kube, namespace, "wants-nodes", _spec(bucket, runtime="job"))
        for name, reason, text in (
            ("wants-trainjob", "TrainJobsDisabled", "does not create Kubeflow Trainer TrainJobs"),
            ("wants-nodes", "NodesNeedTrainJob", "spec.resources.nodes is 2: training on several nodes"),
        ):
            obj = wait_for(
                lambda n=name: (o := get_expert(kube, namespace, n)) and condition(o, "Degraded") and o,
                20,
                what=reason,
            )
            degraded = condition(obj, "Degraded")
            assert degraded is not None and degraded["reason"] == reason and text in degraded["message"]
            assert status_of(obj)["phase"] == "Failed"
            assert [e.reason for e in events(kube, namespace, name) if e.type == "Warning"] == [reason]
        assert not client.BatchV1Api(kube).list_namespaced_job(namespace).items
