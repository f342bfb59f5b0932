"""The KServe runtime example (``examples/serving/clusterservingruntime.yaml``) is a ``ClusterServingRuntime`` kserve's
models read without dropping anything, for the ``langmerge`` model format, whose container runs the trainer image's
``serve`` verb on ``/mnt/models`` and the pod's address; the sample InferenceService it serves is valid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from langmerge.dev.serving import DEFAULT_MODEL_FORMATS, validate_inferenceservice

pytest.importorskip("kserve")

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "examples" / "serving" / "clusterservingruntime.yaml"
ISVC = ROOT / "examples" / "sample" / "inferenceservice.yaml"


class _Response:
    """What ``ApiClient.deserialize`` reads: a response whose ``data`` is the JSON body."""

    def __init__(self, data: Any) -> None:
        self.data = json.dumps(data)


def _deserialize(document: dict[str, Any], klass: str) -> tuple[Any, Any]:
    """``document`` as kserve's model ``klass`` (the Kubernetes types inside it, which ``kserve.models`` does not
    export, as the ``kubernetes`` client's models), and that object serialised back."""
    import kserve
    import kubernetes.client

    core = kubernetes.client.ApiClient()

    class Deserializer(kserve.ApiClient):  # type: ignore[misc]
        def _ApiClient__deserialize(self, data: Any, klass: Any) -> Any:  # the private hook every level goes through
            if (
                isinstance(klass, str)
                and not klass.startswith(("list[", "dict("))
                and klass not in self.NATIVE_TYPES_MAPPING
                and not hasattr(kserve.models, klass)
            ):
                return core._ApiClient__deserialize(data, klass)
            return super()._ApiClient__deserialize(data, klass)

    client = Deserializer()
    obj = client.deserialize(_Response(document), klass)
    return obj, client.sanitize_for_serialization(obj)


@pytest.fixture(scope="module")
def runtime() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(RUNTIME.read_text())
    return document


def test_the_runtime_is_a_cluster_serving_runtime_kserve_reads_whole(runtime: dict[str, Any]) -> None:
    from kserve.models import V1alpha1ClusterServingRuntime

    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["kind"] == "ClusterServingRuntime"
    obj, restored = _deserialize(runtime, "V1alpha1ClusterServingRuntime")
    assert isinstance(obj, V1alpha1ClusterServingRuntime)
    assert restored == runtime, "a field of the example is unknown to kserve's models (misspelt or misplaced)"

    assert obj.metadata.name == "langmerge"
    formats = obj.spec.supported_model_formats
    assert [(f.name, f.version, f.auto_select) for f in formats] == [("langmerge", "1", True)]
    assert formats[0].name in DEFAULT_MODEL_FORMATS  # what the local serving runner serves the same way
    assert set(obj.spec.protocol_versions) == {"v1", "v2"}
    [container] = obj.spec.containers
    assert container.name == "kserve-container"  # the container KServe's storage initializer mounts /mnt/models into
    assert container.image == "langmerge/trainer:0.1.0" and not container.command  # the image's ENTRYPOINT
    assert [(p.name, p.container_port) for p in container.ports] == [("http1", 8080)]  # Knative routes one port


def test_the_runtime_runs_the_serve_verb_on_mnt_models_and_the_pod_address(runtime: dict[str, Any]) -> None:
    from langmerge_trainer.__main__ import VERBS
    from langmerge_trainer.serve import build_parser, local_folder

    args = runtime["spec"]["containers"][0]["args"]
    assert "--storage-uri=/mnt/models" in args and "--host=0.0.0.0" in args
    assert args[0] == "serve" and args[0] in VERBS
    # the server's own command line takes them, KServe's {{.Name}} filled in
    parsed = build_parser().parse_args([arg.replace("{{.Name}}", "dialog") for arg in args[1:]])
    assert parsed.model_name == "dialog" and parsed.host == "0.0.0.0"
    assert local_folder(parsed.storage_uri) == Path("/mnt/models")
    ports = runtime["spec"]["containers"][0]["ports"]
    assert parsed.http_port == ports[0]["containerPort"] != parsed.grpc_port
    annotations = runtime["spec"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(parsed.http_port)  # kserve's REST server has /metrics


def test_the_sample_inferenceservice_is_valid_and_served_by_the_runtime(runtime: dict[str, Any]) -> None:
    isvc = yaml.safe_load(ISVC.read_text())
    assert validate_inferenceservice(isvc) == []
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == runtime["spec"]["supportedModelFormats"][0]["name"]
    # the S3 credentials a PEFT adapter's base model needs reach the container from a Secret
    env = {e["name"]: e for e in model["env"]}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
    assert all("secretKeyRef" in env[name]["valueFrom"] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
