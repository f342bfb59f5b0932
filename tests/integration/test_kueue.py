"""Kueue with the operator on the real API server and S3: Jobs created suspended with the queue-name label, shown as
"Queued (Kueue)" while they wait (and not counted toward the operator's cap), a preemption recorded and not a failed
attempt, then training resumed and finished.

Kueue itself does not run here: :func:`langmerge.dev.kueue.set_suspended` admits and preempts as Kueue does, and a
small stand-in for the Job controller reports the Job's status (started once admitted, ``Suspended`` once
preempted; it writes what the trainer writes when the test lets the Job finish).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from langmerge import artifacts
from langmerge.artifacts import ProgressRecord
from langmerge.dev.kueue import set_suspended
from langmerge.store import ObjectStore
from langmerge.tasks import TrainTask
from operator_harness import (
    apply_expert,
    condition,
    events,
    get_expert,
    jobs,
    now,
    put_jsonl,
    run_operator,
    seed_fake_base_model,
    status_of,
    wait_for,
    write_fake_adapter,
)

pytestmark = pytest.mark.integration

ROWS = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(10)]


def _spec(bucket: str, lang: str) -> dict[str, Any]:
    return {
        "language": lang,
        "task": "dialog",
        "baseModel": {"uri": f"s3://{bucket}/base"},
        "dataset": {"uri": f"s3://{bucket}/data/{lang}"},
        "resources": {"gpus": 1, "memory": "8Gi", "cpu": "2"},
        "schedule": {"pollIntervalSeconds": 5, "settleSeconds": 0},
        "retry": {"limit": 0, "backoffSeconds": 1},
    }


class JobController(threading.Thread):
    """What the Job controller and a trainer do with suspended Jobs, in one namespace: an admitted Job gets
    ``startTime`` and ``active`` (its trainer writes progress); a suspended one that ran gets the ``Suspended``
    condition (the trainer checkpointed); :meth:`finish` completes one (the trainer commits its adapter)."""

    def __init__(self, kube: Any, store: ObjectStore, namespace: str) -> None:
        super().__init__(daemon=True)
        self.batch = client.BatchV1Api(kube)
        self.store = store
        self.namespace = namespace
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    def _patch(self, name: str, status: dict[str, Any]) -> None:
        with contextlib.suppress(ApiException):
            self.batch.patch_namespaced_job_status(name, self.namespace, {"status": status})

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for job in self.batch.list_namespaced_job(self.namespace).items:
                    status = job.status
                    done = any(c.type in ("Complete", "Failed") for c in status.conditions or [])
                    suspended = (job.metadata.annotations or {}).get("langmerge.dev/suspend") == "true"
                    if done:
                        continue
                    if not suspended and not status.active:
                        self._patch(
                            job.metadata.name,
                            {
                                "startTime": now(),
                                "active": 1,
                                "conditions": [{"type": "Suspended", "status": "False", "reason": "JobResumed"}],
                            },
                        )
                        task = TrainTask.model_validate_json(job.spec.template.spec.containers[0].args[-1])
                        progress = ProgressRecord(
                            fingerprint=task.fingerprint, stage="training", attempt=task.attempt, step=3, total_steps=9
                        )
                        self.store.put_json(artifacts.join(task.output_uri, artifacts.PROGRESS), progress)
                    elif suspended and status.active:
                        self._patch(
                            job.metadata.name,
                            {
                                "active": None,
                                "conditions": [{"type": "Suspended", "status": "True", "reason": "JobSuspended"}],
                            },
                        )
            except BaseException as err:
                self.errors.append(err)
            time.sleep(0.05)

    def finish(self, name: str) -> None:
        job = self.batch.read_namespaced_job(name, self.namespace)
        write_fake_adapter(self.store, TrainTask.model_validate_json(job.spec.template.spec.containers[0].args[-1]))
        cond = {"type": "Complete", "status": "True", "lastTransitionTime": now()}
        self._patch(name, {"active": None, "succeeded": 1, "completionTime": now(), "conditions": [cond]})


def _phase(kube: Any, namespace: str, name: str) -> tuple[str | None, str]:
    status = status_of(get_expert(kube, namespace, name))
    return status.get("phase"), status.get("message") or ""


def test_queued_preempted_and_resumed(kube: Any, s3: ObjectStore, bucket: str, namespace: str) -> None:
    seed_fake_base_model(s3, f"s3://{bucket}/base")
    for lang in ("es", "it"):
        put_jsonl(s3, f"s3://{bucket}/data/{lang}/part-0.jsonl", ROWS)
    controller = JobController(kube, s3, namespace)
    controller.start()
    try:
        with run_operator(
            namespace, f"s3://{bucket}/artifacts", kueue_queue="team-gpus", max_training_jobs=1, resync_seconds=1
        ):
            apply_expert(kube, namespace, "dialog-es", _spec(bucket, "es"))
            apply_expert(kube, namespace, "dialog-it", _spec(bucket, "it"))

            # Both Jobs exist at once although the operator's cap is 1: waiting for Kueue takes no slot.
            created = wait_for(lambda: len(jobs(kube, namespace)) == 2 and jobs(kube, namespace), 30, what="2 Jobs")
            for job in created:
                assert job.metadata.labels["kueue.x-k8s.io/queue-name"] == "team-gpus"
                assert job.metadata.annotations["langmerge.dev/suspend"] == "true"  # spec.suspend, as 1.20 keeps it
            for name in ("dialog-es", "dialog-it"):
                phase, message = wait_for(
                    lambda name=name: (p := _phase(kube, namespace, name))[0] == "Queued" and p, 20, what="Queued"
                )
                assert message.startswith("Queued (Kueue): Job ") and "waits for admission in team-gpus" in message
                training = condition(get_expert(kube, namespace, name), "Training")
                assert training is not None and (training["status"], training["reason"]) == ("False", "QueuedByKueue")
            es_job = next(j.metadata.name for j in created if j.metadata.name.startswith("dialog-es"))

            # Admitted: training.
            set_suspended(kube, "Job", namespace, es_job, False)
            wait_for(lambda: _phase(kube, namespace, "dialog-es")[0] == "Training", 20, what="Training")

            # Preempted by Kueue: recorded (Event, count), not a failed attempt, no failure record.
            set_suspended(kube, "Job", namespace, es_job, True)
            phase, message = wait_for(
                lambda: (p := _phase(kube, namespace, "dialog-es"))[1].startswith("Preempted") and p,
                20,
                what="Preempted",
            )
            assert phase == "Queued"
            assert f"Preempted (Kueue): Job {es_job} (attempt 1) was suspended at step 3" in message
            assert "not a failed attempt" in message
            status = status_of(get_expert(kube, namespace, "dialog-es"))
            assert status["preemptions"] == 1 and status["attempts"] == 0
            assert condition(get_expert(kube, namespace, "dialog-es"), "Training")["reason"] == "PreemptedByKueue"
            preempted = [e for e in events(kube, namespace, "dialog-es") if e.reason == "Preempted"]
            assert len(preempted) == 1 and preempted[0].type == "Warning"
            prefix = status["desiredFingerprint"]
            assert not [o for o in s3.iter_objects(f"s3://{bucket}/artifacts") if "/failures/" in o.key], prefix

            # Admitted again, the same Job (same attempt) finishes: Ready, no failed attempt, one preemption only.
            set_suspended(kube, "Job", namespace, es_job, False)
            wait_for(lambda: _phase(kube, namespace, "dialog-es")[0] == "Training", 20, what="Training again")
            controller.finish(es_job)
            wait_for(lambda: _phase(kube, namespace, "dialog-es")[0] == "Ready", 30, what="Ready")
            ready = status_of(get_expert(kube, namespace, "dialog-es"))
            assert ready["attempts"] == 0 and ready["history"][-1]["job"] == es_job
            assert len([e for e in events(kube, namespace, "dialog-es") if e.reason == "Preempted"]) == 1
            assert len(jobs(kube, namespace)) == 2  # no second Job for es
    finally:
        controller.stop.set()
        controller.join(5)
    assert not controller.errors, controller.errors
