"""A stand-in for Kueue's admission on the local control plane (development and tests only).

Kueue admits a Job or TrainJob created suspended with the ``kueue.x-k8s.io/queue-name`` label by setting
``spec.suspend: false``, and preempts it by setting ``spec.suspend: true`` again. :func:`set_suspended` does the same.
The local API server (1.20) drops a Job's ``spec.suspend``, so for Jobs it also sets the ``langmerge.dev/suspend``
annotation the Job builders write, which the local Job runner reads there (a current API server keeps the field, and
the field rules). A TrainJob (a custom resource) keeps ``spec.suspend`` everywhere.
"""

from __future__ import annotations

from typing import Any

from kubernetes import client

from langmerge.constants import (
    ANNOTATION_SUSPEND,
    LABEL_KUEUE_QUEUE,
    TRAINER_GROUP,
    TRAINER_VERSION,
    TRAINJOB_KIND,
    TRAINJOB_PLURAL,
)


def set_suspended(api: Any, kind: str, namespace: str, name: str, suspended: bool) -> None:
    """Admit (``suspended=False``) or preempt (``True``) one Job or TrainJob, as Kueue would."""
    if kind == TRAINJOB_KIND:
        client.CustomObjectsApi(api).patch_namespaced_custom_object(
            TRAINER_GROUP, TRAINER_VERSION, namespace, TRAINJOB_PLURAL, name, {"spec": {"suspend": suspended}}
        )
        return
    body = {
        "metadata": {"annotations": {ANNOTATION_SUSPEND: "true" if suspended else "false"}},
        "spec": {"suspend": suspended},
    }
    client.BatchV1Api(api).patch_namespaced_job(name, namespace, body)


def queued(api: Any, namespace: str) -> list[tuple[str, str]]:
    """(kind, name) of the Jobs and TrainJobs of ``namespace`` that carry a queue name, oldest first."""
    selector = LABEL_KUEUE_QUEUE
    out: list[tuple[str, str, str]] = []
    for job in client.BatchV1Api(api).list_namespaced_job(namespace, label_selector=selector).items:
        out.append((str(job.metadata.creation_timestamp), "Job", job.metadata.name))
    try:
        trainjobs = client.CustomObjectsApi(api).list_namespaced_custom_object(
            TRAINER_GROUP, TRAINER_VERSION, namespace, TRAINJOB_PLURAL, label_selector=selector
        )
    except client.exceptions.ApiException as err:
        if err.status != 404:
            raise
        trainjobs = {"items": []}
    for item in trainjobs.get("items") or []:
        meta = item["metadata"]
        out.append((str(meta.get("creationTimestamp")), TRAINJOB_KIND, meta["name"]))
    return [(kind, name) for _, kind, name in sorted(out)]
