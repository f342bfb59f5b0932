"""Kueue with the operator on the real API server and S3: training Jobs, TrainJobs and merge Jobs created suspended
with the queue-name label, shown as "Queued (Kueue)" while they wait (and not counted toward the operator's cap), a
preemption recorded and not a failed attempt, then the work resumed and finished.

Kueue itself does not run here: :func:`langmerge.dev.kueue.set_suspended` admits and preempts as Kueue does, and
:class:`Workloads`, a small stand-in for the Job controller (and Kubeflow Trainer), reports the status: running once
admitted; once preempted, not running and, for a Job, no ``startTime`` (Kueue resets it when it suspends a Job). It
writes what the trainer writes when the test lets a workload finish.
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
from langmerge.constants import (
    ANNOTATION_SUSPEND,
    COMPONENT_MERGE,
    COMPONENT_TRAINING,
    LABEL_COMPONENT,
    TRAINER_GROUP,
    TRAINER_VERSION,
    TRAINJOB_KIND,
    TRAINJOB_PLURAL,
)
from langmerge.dev.kueue import set_suspended
from langmerge.dev.trainjob_crd import trainjob_crd
from langmerge.kube import install_crds
from langmerge.store import ObjectStore
from langmerge.tasks import MergeTask, TrainTask
from operator_harness import (
    apply_expert,
    apply_merged,
    condition,
    events,
    get_expert,
    get_merged,
    now,
    put_jsonl,
    run_operator,
    seed_fake_base_model,
    status_of,
    wait_for,
    write_fake_adapter,
    write_fake_merge,
)

pytestmark = pytest.mark.integration

ROWS = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(10)]
QUEUE = "team-gpus"


def _spec(bucket: str, lang: str, runtime: str = "job") -> dict[str, Any]:
    return {
        "language": lang,
        "task": "dialog",
        "baseModel": {"uri": f"s3://{bucket}/base"},
        "dataset": {"uri": f"s3://{bucket}/data/{lang}"},
        "resources": {"gpus": 1, "memory": "8Gi", "cpu": "2"},
        "runtime": runtime,
        "schedule": {"pollIntervalSeconds": 5, "settleSeconds": 0},
        "retry": {"limit": 0, "backoffSeconds": 1},
    }


@pytest.fixture
def seeded(kube: Any, s3: ObjectStore, bucket: str) -> str:
    install_crds(kube, [trainjob_crd()])
    seed_fake_base_model(s3, f"s3://{bucket}/base")
    for lang in ("es", "it"):
        put_jsonl(s3, f"s3://{bucket}/data/{lang}/part-0.jsonl", ROWS)
    return bucket


def _task_json(args: list[str]) -> str:
    return args[args.index("--task") + 1] if "--task" in args else args[-1]


class Workloads(threading.Thread):
    """The Job controller and Kubeflow Trainer, for the Jobs and TrainJobs of one namespace: an admitted workload
    runs (a Job gets ``startTime`` and ``active``, a TrainJob ``Suspended=False``; a trainer writes progress at step
    3); a preempted one stops (a Job loses ``startTime`` as Kueue resets it; both get ``Suspended=True``).
    :meth:`finish` completes one (the trainer or merge engine commits). Training Jobs are admitted and finished at
    once when ``finish_training`` is set (a merge test needs Ready experts)."""

    def __init__(self, kube: Any, store: ObjectStore, namespace: str, *, finish_training: bool = False) -> None:
        super().__init__(daemon=True)
        self.kube = kube
        self.batch = client.BatchV1Api(kube)
        self.custom = client.CustomObjectsApi(kube)
        self.store, self.namespace, self.finish_training = store, namespace, finish_training
        self.running: set[str] = set()
        self.finished: set[str] = set()
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    # -- the API objects ---------------------------------------------------------------------------------------------
    def workloads(self, kind: str) -> list[dict[str, Any]]:
        """Jobs (as dicts) or TrainJobs of the namespace."""
        if kind == TRAINJOB_KIND:
            found = self.custom.list_namespaced_custom_object(
                TRAINER_GROUP, TRAINER_VERSION, self.namespace, TRAINJOB_PLURAL
            )
            return list(found["items"])
        items = self.batch.list_namespaced_job(self.namespace).items
        return [self.kube.sanitize_for_serialization(job) for job in items]

    def _status(self, kind: str, name: str, status: dict[str, Any]) -> None:
        with contextlib.suppress(ApiException):
            if kind == TRAINJOB_KIND:
                self.custom.patch_namespaced_custom_object_status(
                    TRAINER_GROUP, TRAINER_VERSION, self.namespace, TRAINJOB_PLURAL, name, {"status": status}
                )
            else:
                self.batch.patch_namespaced_job_status(name, self.namespace, {"status": status})

    @staticmethod
    def _argv(kind: str, obj: dict[str, Any]) -> list[str]:
        if kind == TRAINJOB_KIND:
            return list(obj["spec"]["trainer"]["args"])
        return list(obj["spec"]["template"]["spec"]["containers"][0]["args"])

    @staticmethod
    def _suspended(kind: str, obj: dict[str, Any]) -> bool:
        if kind == TRAINJOB_KIND:
            return bool(obj["spec"].get("suspend"))
        return (obj["metadata"].get("annotations") or {}).get(ANNOTATION_SUSPEND) == "true"  # 1.20 drops spec.suspend

    # -- the loop ----------------------------------------------------------------------------------------------------
    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for kind in ("Job", TRAINJOB_KIND):
                    for obj in self.workloads(kind):
                        self._step(kind, obj)
            except BaseException as err:
                self.errors.append(err)
            time.sleep(0.05)

    def _step(self, kind: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        training = obj["metadata"]["labels"].get(LABEL_COMPONENT) == COMPONENT_TRAINING
        if name in self.finished:
            return
        if self.finish_training and training:
            if self._suspended(kind, obj):
                set_suspended(self.kube, kind, self.namespace, name, False)
            self.finish(kind, name)
            return
        suspended = self._suspended(kind, obj)
        if not suspended and name not in self.running:
            self.running.add(name)
            if kind == TRAINJOB_KIND:
                cond = {"type": "Suspended", "status": "False", "reason": "Resumed", "lastTransitionTime": now()}
                self._status(kind, name, {"conditions": [cond]})
            else:
                cond = {"type": "Suspended", "status": "False", "reason": "JobResumed", "lastTransitionTime": now()}
                self._status(kind, name, {"startTime": now(), "active": 1, "conditions": [cond]})
            if training:
                task = TrainTask.model_validate_json(_task_json(self._argv(kind, obj)))
                progress = ProgressRecord(
                    fingerprint=task.fingerprint, stage="training", attempt=task.attempt, step=3, total_steps=9
                )
                self.store.put_json(artifacts.join(task.output_uri, artifacts.PROGRESS), progress)
        elif suspended and name in self.running:
            self.running.discard(name)
            cond = {"type": "Suspended", "status": "True", "reason": "JobSuspended", "lastTransitionTime": now()}
            status: dict[str, Any] = {"conditions": [cond]}
            if kind != TRAINJOB_KIND:
                status.update(active=None, startTime=None)
            self._status(kind, name, status)

    def finish(self, kind: str, name: str) -> None:
        obj = next(o for o in self.workloads(kind) if o["metadata"]["name"] == name)
        task_json = _task_json(self._argv(kind, obj))
        if obj["metadata"]["labels"].get(LABEL_COMPONENT) == COMPONENT_TRAINING:
            write_fake_adapter(self.store, TrainTask.model_validate_json(task_json))
        else:
            write_fake_merge(self.store, MergeTask.model_validate_json(task_json))
        self.finished.add(name)
        self.running.discard(name)
        cond = {"type": "Complete", "status": "True", "reason": "Completed", "lastTransitionTime": now()}
        if kind == TRAINJOB_KIND:
            self._status(kind, name, {"conditions": [cond]})
        else:
            self._status(kind, name, {"active": None, "succeeded": 1, "completionTime": now(), "conditions": [cond]})


@contextlib.contextmanager
def _workloads(kube: Any, s3: ObjectStore, namespace: str, **options: Any) -> Any:
    stand_in = Workloads(kube, s3, namespace, **options)
    stand_in.start()
    try:
        yield stand_in
    finally:
        stand_in.stop.set()
        stand_in.join(5)
    assert not stand_in.errors, stand_in.errors


def _phase(kube: Any, namespace: str, name: str, get: Any = get_expert) -> tuple[str | None, str]:
    status = status_of(get(kube, namespace, name))
    return status.get("phase"), status.get("message") or ""


@pytest.mark.parametrize("kind", ["Job", TRAINJOB_KIND])
def test_queued_preempted_and_resumed(kube: Any, s3: ObjectStore, seeded: str, namespace: str, kind: str) -> None:
    bucket = seeded
    runtime = "trainjob" if kind == TRAINJOB_KIND else "job"
    with (
        _workloads(kube, s3, namespace) as stand_in,
        run_operator(
            namespace,
            f"s3://{bucket}/artifacts",
            kueue_queue=QUEUE,
            max_training_jobs=1,
            resync_seconds=1,
            trainjobs=runtime == "trainjob",
        ),
    ):
        apply_expert(kube, namespace, "dialog-es", _spec(bucket, "es", runtime))
        apply_expert(kube, namespace, "dialog-it", _spec(bucket, "it", runtime))

        # Both exist at once although the operator's cap is 1: waiting for Kueue takes no slot.
        created = wait_for(
            lambda: len(w := stand_in.workloads(kind)) == 2 and w, 30, what=f"2 {kind}s created suspended"
        )
        for obj in created:
            assert obj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == QUEUE
            assert stand_in._suspended(kind, obj)
        for name in ("dialog-es", "dialog-it"):
            phase, message = wait_for(
                lambda name=name: (p := _phase(kube, namespace, name))[0] == "Queued" and p, 20, what="Queued"
            )
            assert message.startswith(f"Queued (Kueue): {kind} ") and f"waits for admission in {QUEUE}" in message
            training = condition(get_expert(kube, namespace, name), "Training")
            assert training is not None and (training["status"], training["reason"]) == ("False", "QueuedByKueue")
        es_job = next(o["metadata"]["name"] for o in created if o["metadata"]["name"].startswith("dialog-es"))

        # Admitted: training.
        set_suspended(kube, kind, namespace, es_job, False)
        wait_for(lambda: _phase(kube, namespace, "dialog-es")[0] == "Training", 20, what="Training")

        # Preempted by Kueue: recorded (Event, count), not a failed attempt, no failure record.
        set_suspended(kube, kind, namespace, es_job, True)
        phase, message = wait_for(
            lambda: (p := _phase(kube, namespace, "dialog-es"))[1].startswith("Preempted") and p,
            20,
            what="Preempted",
        )
        print(f"\n{kind} preempted: phase {phase}, message {message!r}")
        assert phase == "Queued"
        assert f"Preempted (Kueue): {kind} {es_job} (attempt 1) was suspended at step 3" in message
        assert "not a failed attempt" in message
        status = status_of(get_expert(kube, namespace, "dialog-es"))
        assert status["preemptions"] == 1 and status["attempts"] == 0
        assert condition(get_expert(kube, namespace, "dialog-es"), "Training")["reason"] == "PreemptedByKueue"
        preempted = [e for e in events(kube, namespace, "dialog-es") if e.reason == "Preempted"]
        assert len(preempted) == 1 and preempted[0].type == "Warning"
        assert not [o for o in s3.iter_objects(f"s3://{bucket}/artifacts") if "/failures/" in o.key]

        # Admitted again, the same workload (same attempt) finishes: Ready, no failed attempt, one preemption only.
        set_suspended(kube, kind, namespace, es_job, False)
        wait_for(lambda: _phase(kube, namespace, "dialog-es")[0] == "Training", 20, what="Training again")
        stand_in.finish(kind, es_job)
        wait_for(lambda: _phase(kube, namespace, "dialog-es")[0] == "Ready", 30, what="Ready")
        ready = status_of(get_expert(kube, namespace, "dialog-es"))
        assert ready["attempts"] == 0 and ready["history"][-1]["job"] == es_job
        assert len([e for e in events(kube, namespace, "dialog-es") if e.reason == "Preempted"]) == 1
        assert len(stand_in.workloads(kind)) == 2  # no second workload for es


def test_merge_job_queued_preempted_and_resumed(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    """The merge Job: "Queued (Kueue)" while it waits, a preemption recorded (Event, not a failed attempt, with
    ``retry.limit: 0``), then it runs again and publishes revision 1."""
    bucket = seeded
    merged = {
        "baseModel": {"uri": f"s3://{bucket}/base"},
        "experts": {"selector": {"matchLabels": {"task": "dialog"}}},
        "method": "ties",
        "parameters": {"density": 1.0},
        "output": {"uri": f"s3://{bucket}/merged/dialog"},
        "evaluation": {"maxRegression": 0.1},
        "settleSeconds": 0,
        "retry": {"limit": 0, "backoffSeconds": 1},
    }
    with (
        _workloads(kube, s3, namespace, finish_training=True) as stand_in,
        run_operator(namespace, f"s3://{bucket}/artifacts", kueue_queue=QUEUE, resync_seconds=1),
    ):
        apply_expert(kube, namespace, "dialog-es", _spec(bucket, "es"), labels={"task": "dialog"})
        apply_merged(kube, namespace, "mm", merged)

        def merge_job() -> dict[str, Any] | None:
            found = [
                j for j in stand_in.workloads("Job") if j["metadata"]["labels"].get(LABEL_COMPONENT) == COMPONENT_MERGE
            ]
            return found[0] if found else None

        job = wait_for(merge_job, 40, what="the merge Job")
        name = job["metadata"]["name"]
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == QUEUE and stand_in._suspended("Job", job)
        phase, message = wait_for(
            lambda: (p := _phase(kube, namespace, "mm", get_merged))[0] == "Queued" and p, 20, what="Queued"
        )
        assert message == f"Queued (Kueue): Job {name} (attempt 1) waits for admission in {QUEUE}"
        assert condition(get_merged(kube, namespace, "mm"), "Merging")["reason"] == "QueuedByKueue"

        set_suspended(kube, "Job", namespace, name, False)
        wait_for(lambda: _phase(kube, namespace, "mm", get_merged)[0] == "Merging", 20, what="Merging")

        set_suspended(kube, "Job", namespace, name, True)
        phase, message = wait_for(
            lambda: (p := _phase(kube, namespace, "mm", get_merged))[1].startswith("Preempted") and p,
            20,
            what="Preempted",
        )
        print(f"\nmerge Job preempted: phase {phase}, message {message!r}")
        assert phase == "Queued" and f"Preempted (Kueue): Job {name} (attempt 1) was suspended" in message
        assert "not a failed attempt" in message
        assert condition(get_merged(kube, namespace, "mm"), "Merging")["reason"] == "PreemptedByKueue"
        assert status_of(get_merged(kube, namespace, "mm")).get("attempts", 0) == 0
        preempted = [e for e in events(kube, namespace, "mm") if e.reason == "Preempted"]
        assert len(preempted) == 1 and preempted[0].type == "Warning"

        set_suspended(kube, "Job", namespace, name, False)
        wait_for(lambda: _phase(kube, namespace, "mm", get_merged)[0] == "Merging", 20, what="Merging again")
        stand_in.finish("Job", name)
        ready = wait_for(
            lambda: (o := get_merged(kube, namespace, "mm")) and status_of(o).get("phase") == "Ready" and o,
            30,
            what="revision 1",
        )
        assert status_of(ready)["revision"] == 1 and status_of(ready).get("attempts", 0) == 0
        assert len([e for e in events(kube, namespace, "mm") if e.reason == "Preempted"]) == 1
        assert not [o for o in s3.iter_objects(f"s3://{bucket}/merged/dialog") if "/failures/" in o.key]
        assert (
            len(
                [
                    j
                    for j in stand_in.workloads("Job")
                    if j["metadata"]["labels"].get(LABEL_COMPONENT) == COMPONENT_MERGE
                ]
            )
            == 1
        )
