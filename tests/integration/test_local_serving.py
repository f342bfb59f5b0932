"""The local serving runner (what stands in for KServe) on the real local API server, with a tiny stand-in model
server instead of ``langmerge_trainer serve``: an InferenceService becomes Ready behind its router; a canary takes its
share; promotion moves all traffic and stops the old process; a revision that fails to load never takes traffic (no
request fails) and is reported as KServe does; a rollback reuses the running revision; deletion stops everything.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from test_jobrunner import wait_for

from langmerge.dev.serving import (
    REVISION_HEADER,
    STORAGE_URI_HEADER,
    LocalServingRunner,
    validate_inferenceservice,
)
from serving_helpers import (
    URI_A,
    URI_B,
    URI_BROKEN,
    RequestLoop,
    Services,
    alive,
    conditions,
    isvc_api,
    predict,
    stand_in_runner,
)

pytestmark = pytest.mark.integration

__all__ = ["isvc_api"]  # a fixture, shared


@pytest.fixture
def runner(
    kube: Any, isvc_api: client.CustomObjectsApi, namespace: str, tmp_path: Path
) -> Iterator[LocalServingRunner]:
    yield from stand_in_runner(kube, namespace, tmp_path)


def test_canary_promotion_failed_load_rollback_and_deletion(
    runner: LocalServingRunner, isvc_api: client.CustomObjectsApi, namespace: str
) -> None:
    t0 = time.monotonic()
    services = Services(isvc_api, namespace)
    rev1, rev2, rev3 = (f"dialog-predictor-0000{i}" for i in (1, 2, 3))

    # created -> Ready, the URL answers (with the predictor's env resolved from the Secret)
    services.create("dialog", URI_A)
    status = services.status_when("dialog", 1, "UpToDate")
    url = status["url"]
    assert url == runner.endpoint(namespace, "dialog") and url.startswith("http://127.0.0.1:")
    assert conditions(status) == {
        "Ready": "True",
        "PredictorReady": "True",
        "IngressReady": "True",
        "LatestDeploymentReady": "True",
    }
    predictor = status["components"]["predictor"]
    assert predictor["latestCreatedRevision"] == predictor["latestReadyRevision"] == rev1
    assert predictor["latestRolledoutRevision"] == rev1 and "previousRolledoutRevision" not in predictor
    assert predictor["traffic"] == [{"revisionName": rev1, "percent": 100, "latestRevision": True}]
    assert status["modelStatus"]["states"] == {"activeModelState": "Loaded", "targetModelState": "Loaded"}
    assert status["annotations"] == {f"serving.langmerge.dev/storage-uri.{rev1}": URI_A}
    code, body, headers = predict(url, "dialog")
    assert code == 200 and headers[REVISION_HEADER] == rev1 and headers[STORAGE_URI_HEADER] == URI_A
    env = body["predictions"][0]["env"]
    assert env["KEY_ID"] == os.environ.get("AWS_ACCESS_KEY_ID", "test")  # resolved from the namespace's Secret
    assert env["LANGMERGE_LIFELINE"] == os.environ.get("LANGMERGE_LIFELINE")  # an interrupted run still ends it
    assert validate_inferenceservice(services.get("dialog")) == []
    pid1 = runner.pids(namespace, "dialog")[rev1]

    # a canary: 25 % to the new revision, 75 % to the rolled-out one
    generation = services.patch_predictor("dialog", {"canaryTrafficPercent": 25, "model": {"storageUri": URI_B}})
    status = services.status_when("dialog", generation, "InProgress")  # while the new revision loads
    assert conditions(status) == {
        "Ready": "True",
        "PredictorReady": "True",
        "IngressReady": "True",
        "LatestDeploymentReady": "False",
    }
    assert status["modelStatus"]["states"] == {"activeModelState": "Loaded", "targetModelState": "Loading"}
    predictor = status["components"]["predictor"]
    assert predictor["latestCreatedRevision"] == rev2 and predictor["latestReadyRevision"] == rev1
    assert predictor["traffic"] == [{"revisionName": rev1, "percent": 100, "latestRevision": True}]
    assert predict(url, "dialog")[2][REVISION_HEADER] == rev1
    status = services.status_when("dialog", generation, "UpToDate")
    predictor = status["components"]["predictor"]
    assert predictor["latestReadyRevision"] == rev2 and predictor["latestRolledoutRevision"] == rev1
    assert predictor["traffic"] == [
        {"revisionName": rev2, "percent": 25, "latestRevision": True, "tag": "latest"},
        {"revisionName": rev1, "percent": 75, "latestRevision": False, "tag": "prev"},
    ]
    answers = [predict(url, "dialog") for _ in range(40)]
    assert all(code == 200 for code, _, _ in answers)
    split = Counter(headers[REVISION_HEADER] for _, _, headers in answers)
    assert split == {rev2: 10, rev1: 30}
    assert all(body["predictions"][0]["storage_uri"] == headers[STORAGE_URI_HEADER] for _, body, headers in answers)
    assert validate_inferenceservice(services.get("dialog")) == []

    # promotion: canaryTrafficPercent removed -> 100 % to the new revision, the old one drained and stopped
    with RequestLoop(url, "dialog") as loop:
        generation = services.patch_predictor("dialog", {"canaryTrafficPercent": None})
        status = services.status_when("dialog", generation, "UpToDate")
        wait_for(lambda: not alive(pid1), 10, "the old model server to stop")
    assert loop.codes.keys() == {200}, loop.codes
    predictor = status["components"]["predictor"]
    assert predictor["traffic"] == [{"revisionName": rev2, "percent": 100, "latestRevision": True}]
    assert predictor["latestRolledoutRevision"] == rev2 and predictor["previousRolledoutRevision"] == rev1
    assert wait_for(lambda: set(runner.revisions(namespace, "dialog")) == {rev2}, 10, "only rev2 kept")
    assert {predict(url, "dialog")[2][REVISION_HEADER] for _ in range(5)} == {rev2}
    pid2 = runner.pids(namespace, "dialog")[rev2]

    # a revision that fails to load: blocked, reported, and no request fails meanwhile
    with RequestLoop(url, "dialog") as loop:
        time.sleep(0.2)
        generation = services.patch_predictor("dialog", {"model": {"storageUri": URI_BROKEN}})
        status = services.status_when("dialog", generation, "BlockedByFailedLoad")
        time.sleep(0.3)
    assert loop.codes.keys() == {200} and loop.revisions.keys() == {rev2}, (loop.codes, loop.revisions)
    assert sum(loop.codes.values()) > 10
    assert conditions(status) == {
        "Ready": "True",
        "PredictorReady": "True",
        "IngressReady": "True",
        "LatestDeploymentReady": "False",
    }
    predictor = status["components"]["predictor"]
    assert predictor["latestCreatedRevision"] == rev3 and predictor["latestReadyRevision"] == rev2
    assert predictor["traffic"] == [{"revisionName": rev2, "percent": 100, "latestRevision": True}]
    assert status["modelStatus"]["states"] == {"activeModelState": "Loaded", "targetModelState": "FailedToLoad"}
    failure = status["modelStatus"]["lastFailureInfo"]
    assert failure["reason"] == "ModelLoadFailed" and failure["modelRevisionName"] == rev3 and failure["exitCode"] == 1
    assert f"cannot load {URI_BROKEN}" in failure["message"] and f"loading {URI_BROKEN}" in failure["message"]
    assert validate_inferenceservice(services.get("dialog")) == []

    # back to the running revision: reused at once, no new process
    generation = services.patch_predictor("dialog", {"model": {"storageUri": URI_B}})
    status = services.status_when("dialog", generation, "UpToDate", timeout=5.0)
    predictor = status["components"]["predictor"]
    assert predictor["latestCreatedRevision"] == predictor["latestReadyRevision"] == rev2
    assert conditions(status)["LatestDeploymentReady"] == "True"
    assert runner.pids(namespace, "dialog") == {rev2: pid2}

    # deletion stops everything
    services.delete("dialog")
    wait_for(lambda: not alive(pid2) and runner.endpoint(namespace, "dialog") is None, 15, "everything to stop")
    with pytest.raises(urllib.error.URLError):
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{url}/v2/health/ready", timeout=2)
    print(f"\nserving scenario took {time.monotonic() - t0:.1f}s")


def test_no_storage_uri_then_publish_crash_restart_and_stop(
    runner: LocalServingRunner, isvc_api: client.CustomObjectsApi, namespace: str
) -> None:
    services = Services(isvc_api, namespace)
    services.create("topic", "")
    status = services.status_when("topic", 1, "InvalidSpec")
    ready = next(c for c in status["conditions"] if c["type"] == "PredictorReady")
    assert ready["status"] == "False" and ready["reason"] == "NoStorageUri"
    assert conditions(status)["Ready"] == "False" and conditions(status)["IngressReady"] == "True"
    assert predict(status["url"], "topic")[0] == 503

    generation = services.patch_predictor("topic", {"model": {"storageUri": URI_A}})
    status = services.status_when("topic", generation, "UpToDate")
    assert predict(status["url"], "topic")[0] == 200
    (pid,) = runner.pids(namespace, "topic").values()

    # a ready model server that dies is restarted (out of the router meanwhile)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: runner.pids(namespace, "topic").get("topic-predictor-00001") not in (None, pid), 10, "a restart")
    wait_for(lambda: predict(status["url"], "topic")[0] == 200, 10, "the restarted server to answer")
    (pid,) = runner.pids(namespace, "topic").values()

    # a predictor whose environment cannot be built (a missing Secret) fails to load, as a pod would not start
    services.create("classify", URI_A)
    services.status_when("classify", 1, "UpToDate")
    generation = services.patch_predictor(
        "classify",
        {"model": {"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "x"}}}]}},
    )
    status = services.status_when("classify", generation, "BlockedByFailedLoad")
    assert status["modelStatus"]["lastFailureInfo"]["message"] == 'secrets "nope" not found'
    assert conditions(status)["Ready"] == "True"  # the first revision still serves

    runner.stop()
    assert not alive(pid)
    assert runner.served() == []
