"""kopf registrations, and nothing else: watch events become work-queue keys for :class:`.manager.Controller`.

Run with ``langmerge run`` (or ``kopf run -m langmerge.controller.main --all-namespaces``).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from langmerge.constants import (
    EXPERT_PLURAL,
    GROUP,
    KOPF_ANNOTATION_PREFIX,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    MERGED_PLURAL,
    VERSION,
)
from langmerge.controller.manager import Controller

_controller: Controller | None = None


def controller() -> Controller:
    if _controller is None:
        raise kopf.TemporaryError("the controller is starting", delay=1)
    return _controller


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _controller
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=KOPF_ANNOTATION_PREFIX)
    settings.posting.level = logging.WARNING
    settings.peering.standalone = True  # one active replica is ensured by our own Lease (see manager.LeaderElection)
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    # kopf's own requests (its patches and listings) get a timeout too: a hung API server must not hang the operator.
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 10
    _controller = Controller.from_environment()
    if _controller.settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(_controller.settings.metrics_port)
    await _controller.start()


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: the ServiceAccount; elsewhere: the kubeconfig named by $KUBECONFIG *now* (not at import time)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    global _controller
    if _controller is not None:
        await _controller.stop()
        _controller = None


@kopf.on.probe(id="workqueue")
def workqueue_depth(**_: Any) -> int:
    return len(controller().queue)


@kopf.on.event(GROUP, VERSION, EXPERT_PLURAL)
def expert_event(event: kopf.RawEvent, **_: Any) -> None:
    controller().on_expert_event(event["type"] or "", dict(event["object"]))


@kopf.on.event(GROUP, VERSION, MERGED_PLURAL)
def merged_event(event: kopf.RawEvent, **_: Any) -> None:
    controller().on_merged_event(event["type"] or "", dict(event["object"]))


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY})
def job_event(event: kopf.RawEvent, **_: Any) -> None:
    controller().on_job_event(event["type"] or "", dict(event["object"]))
