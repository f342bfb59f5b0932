"""Shared by the serving tests: a stand-in for ``langmerge_trainer serve`` (no torch, starts in a blink), the
InferenceService CRD on the local API server, a handle on InferenceServices, and a steady request loop.
"""

from __future__ import annotations

import json
import sys
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from langmerge.constants import ISVC_PLURAL, KSERVE_GROUP, KSERVE_VERSION
from langmerge.dev.serving import (
    REVISION_HEADER,
    SERVER_ARGS,
    LocalServingRunner,
    ServingConfig,
    inferenceservice_crd,
    validate_inferenceservice,
)
from langmerge.kube import install_crds
from operator_harness import wait_for

#: A stand-in for ``python -m langmerge_trainer serve``: KServe's ready and predict routes, answering with its storage
#: URI, process id and one variable of its environment; a storage URI containing "broken" fails to load, one
#: containing "slow" takes a second to load.
STAND_IN = r"""
import argparse, http.server, json, os, sys, time
p = argparse.ArgumentParser()
for flag in ("--model-name", "--storage-uri", "--http-port", "--grpc-port"):
    p.add_argument(flag, required=True)
a = p.parse_args()
rules = os.environ.get("STAND_IN_RULES")
lines = open(rules).read().split("\n") if rules and os.path.exists(rules) else []
fail = any(l.startswith("fail ") and l[5:] in a.storage_uri for l in lines) or any(
    l.startswith("fail-except ") and a.storage_uri != l[12:] for l in lines)
if "broken" in a.storage_uri or fail:
    print(f"loading {a.storage_uri}", file=sys.stderr)
    print(f"cannot load {a.storage_uri}: no manifest.json there", file=sys.stderr)
    sys.exit(1)
if "slow" in a.storage_uri:
    time.sleep(1.0)

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == f"/v2/models/{a.model_name}/ready":
            self.send(200, {"name": a.model_name, "ready": True})
        else:
            self.send(404, {"error": self.path})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path != f"/v1/models/{a.model_name}:predict":
            return self.send(404, {"error": self.path})
        env = {k: os.environ.get(k) for k in ("KEY_ID", "LANGMERGE_LIFELINE")}
        answer = {"storage_uri": a.storage_uri, "pid": os.getpid(), "env": env}
        self.send(200, {"predictions": [answer for _ in request.get("instances", [])], "model_version": a.storage_uri})

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(a.http_port)), Handler).serve_forever()
"""

URI_A = "s3://bucket/dialog/merges/aaaa"
URI_B = "s3://bucket/dialog/merges/bbbb-slow"
URI_BROKEN = "s3://bucket/dialog/merges/broken"


@pytest.fixture(scope="session")
def isvc_api(kube: Any) -> client.CustomObjectsApi:
    install_crds(kube, [inferenceservice_crd()])
    return client.CustomObjectsApi(kube)


class Services:
    def __init__(self, api: client.CustomObjectsApi, namespace: str) -> None:
        self.api = api
        self.namespace = namespace

    def create(self, name: str, storage_uri: str, model_format: str = "langmerge") -> None:
        manifest = {
            "apiVersion": f"{KSERVE_GROUP}/{KSERVE_VERSION}",
            "kind": "InferenceService",
            "metadata": {"name": name},
            "spec": {
                "predictor": {
                    "model": {
                        "modelFormat": {"name": model_format},
                        "storageUri": storage_uri,
                        "env": [
                            {
                                "name": "KEY_ID",
                                "valueFrom": {"secretKeyRef": {"name": "langmerge-s3", "key": "AWS_ACCESS_KEY_ID"}},
                            }
                        ],
                    }
                }
            },
        }
        if not storage_uri:  # absent until the first publish (the API client would send "" as null)
            del manifest["spec"]["predictor"]["model"]["storageUri"]
        assert validate_inferenceservice(manifest) == []
        self.api.create_namespaced_custom_object(KSERVE_GROUP, KSERVE_VERSION, self.namespace, ISVC_PLURAL, manifest)

    def get(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.api.get_namespaced_custom_object(
            KSERVE_GROUP, KSERVE_VERSION, self.namespace, ISVC_PLURAL, name
        )
        return obj

    def patch_predictor(self, name: str, predictor: dict[str, Any]) -> int:
        """Merge-patch spec.predictor (as the operator does); the new generation."""
        patch = {"spec": {"predictor": predictor}}
        assert validate_inferenceservice(patch, partial=True) == []
        obj = self.api.patch_namespaced_custom_object(
            KSERVE_GROUP,
            KSERVE_VERSION,
            self.namespace,
            ISVC_PLURAL,
            name,
            patch,
            _content_type="application/merge-patch+json",
        )
        return int(obj["metadata"]["generation"])

    def delete(self, name: str) -> None:
        self.api.delete_namespaced_custom_object(KSERVE_GROUP, KSERVE_VERSION, self.namespace, ISVC_PLURAL, name)

    def status_when(self, name: str, generation: int, transition: str, timeout: float = 20.0) -> dict[str, Any]:
        """The status once the runner acted on ``generation`` and reports ``transition``."""

        def done() -> dict[str, Any] | None:
            status: dict[str, Any] = self.get(name).get("status") or {}
            model = status.get("modelStatus") or {}
            if status.get("observedGeneration") == generation and model.get("transitionStatus") == transition:
                return status
            return None

        return wait_for(done, timeout, what=f"{name}: generation {generation} {transition}")


def conditions(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status.get("conditions") or []}


def predict(url: str, name: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    request = urllib.request.Request(
        f"{url}/v1/models/{name}:predict",
        data=json.dumps({"instances": ["hola"]}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read()), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}"), {k.lower(): v for k, v in err.headers.items()}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class RequestLoop:
    """Requests in a loop from a thread, counting answers by status and revision."""

    def __init__(self, url: str, name: str) -> None:
        self.url, self.name = url, name
        self.codes: Counter[int] = Counter()
        self.revisions: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            code, _, headers = predict(self.url, self.name)
            self.codes[code] += 1
            self.revisions[headers.get(REVISION_HEADER, "")] += 1

    def __enter__(self) -> RequestLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def stand_in_runner(kube: Any, namespace: str, tmp_path: Path) -> Iterator[LocalServingRunner]:
    """A local serving runner for ``namespace`` whose model servers are the stand-in (rules: ``tmp_path/rules``)."""
    script = tmp_path / "stand_in_server.py"
    script.write_text(STAND_IN)
    config = ServingConfig(
        work_root=tmp_path / "serving",
        namespace=namespace,
        command_template=(sys.executable, str(script), *SERVER_ARGS),
        ready_timeout_seconds=20.0,
        poll_seconds=0.05,
        kill_grace_seconds=2.0,
        drain_timeout_seconds=5.0,
        restart_delay_seconds=0.2,
        resync_seconds=10.0,
        extra_env=(("PYTHONUNBUFFERED", "1"), ("STAND_IN_RULES", str(tmp_path / "rules"))),
    )
    with LocalServingRunner(kube, config) as serving:
        assert serving.synced.wait(10)
        yield serving


class Sink:
    """A CloudEvents sink: records every request; answers the scripted statuses in turn, then ``default``."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.script: list[int] = []
        self.default = 200
        self.hold: threading.Event | None = None  # if set, a request waits for it before answering
        self.entered = threading.Event()
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with sink._lock:
                    sink.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    status = sink.script.pop(0) if sink.script else sink.default
                sink.entered.set()
                if sink.hold is not None:
                    sink.hold.wait(10)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def events(self) -> list[tuple[dict[str, str], dict[str, Any]]]:
        """(headers, JSON data) of every request received."""
        with self._lock:
            return [(headers, json.loads(body or b"null")) for headers, body in self.requests]

    def ids(self) -> list[str]:
        with self._lock:
            return [headers["ce-id"] for headers, _ in self.requests]

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
