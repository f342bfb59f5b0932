"""The local InferenceService CRD (generated from the ``kserve`` package's models) is a structural schema the API
server accepts, keeps the fields langmerge writes, and :func:`validate_inferenceservice` tells good manifests from
bad ones."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from langmerge.dev.serving.crd import inferenceservice_crd, merge_patch, validate_inferenceservice
from langmerge.dev.serving.runner import merge_patch_diff

pytest.importorskip("kserve")


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = inferenceservice_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node (properties, items, additionalProperties, anyOf branches) with its path."""
    yield path or "(root)", node
    for name, sub in (node.get("properties") or {}).items():
        yield from _nodes(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")
    for i, branch in enumerate(node.get("anyOf") or []):
        yield from _nodes(branch, f"{path}|{i}")


def sample() -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "dialog", "namespace": "demo", "annotations": {"serving.langmerge.dev/revision": "3"}},
        "spec": {
            "predictor": {
                "canaryTrafficPercent": 25,
                "minReplicas": 1,
                "model": {
                    "modelFormat": {"name": "langmerge"},
                    "storageUri": "s3://bucket/dialog/merges/abc123",
                    "env": [{"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "id"}}}],
                    "resources": {"limits": {"cpu": 2, "memory": "4Gi"}},
                },
            }
        },
    }


def sample_status() -> dict[str, Any]:
    url = "http://127.0.0.1:40000"
    return {
        "observedGeneration": 2,
        "url": url,
        "address": {"url": url},
        "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {
                "type": "LatestDeploymentReady",
                "status": "False",
                "reason": "RevisionFailed",
                "message": "x",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            },
        ],
        "components": {
            "predictor": {
                "url": url,
                "latestCreatedRevision": "dialog-predictor-00002",
                "latestReadyRevision": "dialog-predictor-00001",
                "latestRolledoutRevision": "dialog-predictor-00001",
                "traffic": [{"revisionName": "dialog-predictor-00001", "percent": 100, "latestRevision": True}],
            }
        },
        "modelStatus": {
            "transitionStatus": "BlockedByFailedLoad",
            "states": {"activeModelState": "Loaded", "targetModelState": "FailedToLoad"},
            "lastFailureInfo": {
                "reason": "ModelLoadFailed",
                "message": "cannot load",
                "modelRevisionName": "dialog-predictor-00002",
                "exitCode": 1,
                "time": "2026-01-01T00:00:01Z",
            },
        },
        "annotations": {"serving.langmerge.dev/storage-uri.dialog-predictor-00001": "s3://bucket/x"},
    }


def test_crd_identity_and_columns() -> None:
    crd = inferenceservice_crd()
    assert crd["metadata"]["name"] == "inferenceservices.serving.kserve.io"
    spec = crd["spec"]
    assert spec["scope"] == "Namespaced" and spec["names"]["kind"] == "InferenceService"
    (version,) = spec["versions"]
    assert version["name"] == "v1beta1" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[:4] == ["URL", "Ready", "Prev", "Latest"]
    assert len(json.dumps(crd)) < 256 * 1024  # far below etcd's object limit


def test_schema_is_structural() -> None:
    for path, node in _nodes(_schema()):
        assert "$ref" not in node, path
        typed = (
            "type" in node or node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
        )
        assert typed or path.rsplit("|", 1)[-1].isdigit(), f"{path} has neither a type nor preserve-unknown-fields"
        if "properties" in node:
            assert node.get("type") == "object", path
            assert "additionalProperties" not in node, path
            assert set(node.get("required", [])) <= set(node["properties"]), path


def test_kserve_types_are_expanded_core_types_are_open() -> None:
    predictor = _schema()["properties"]["spec"]["properties"]["predictor"]
    assert predictor["properties"]["canaryTrafficPercent"] == {"type": "integer", "minimum": 0, "maximum": 100}
    model = predictor["properties"]["model"]
    assert model["properties"]["storageUri"] == {"type": "string"}
    assert "modelFormat" in model["required"]
    assert model["properties"]["env"]["items"] == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    status = _schema()["properties"]["status"]["properties"]
    assert status["url"] == {"type": "string"}  # Knative's URL is a string on the wire
    assert status["conditions"]["items"]["properties"]["lastTransitionTime"]["format"] == "date-time"
    traffic = status["components"]["additionalProperties"]["properties"]["traffic"]["items"]
    assert {"revisionName", "percent", "latestRevision", "tag"} <= set(traffic["properties"])
    failure = status["modelStatus"]["properties"]["lastFailureInfo"]["properties"]
    assert failure["exitCode"] == {"type": "integer"} and failure["time"]["format"] == "date-time"


def test_sample_with_canary_and_status_validates() -> None:
    assert validate_inferenceservice(sample()) == []
    assert validate_inferenceservice({**sample(), "status": sample_status()}) == []


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("spec", "predictor", "canaryTrafficPercent"), "25", "is not of type 'integer'"),
        (("spec", "predictor", "canaryTrafficPercent"), 150, "greater than the maximum"),
        (("spec", "predictor", "model", "storageUri"), 3, "is not of type 'string'"),
        (("spec", "predictor", "model", "storageURI"), "s3://x", "'storageURI' was unexpected"),
        (("spec", "predictor", "model", "modelFormat"), None, "'modelFormat' is a required property"),
        (("status", "modelStatus", "lastFailureInfo", "exitCode"), "1", "is not of type 'integer'"),
        (("status", "conditions"), [{"status": "True"}], "'type' is a required property"),
    ],
)
def test_wrong_manifests_fail(path: tuple[str, ...], value: Any, expected: str) -> None:
    manifest = {**sample(), "status": sample_status()}
    node = manifest
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    errors = validate_inferenceservice(manifest)
    assert any(expected in e and e.startswith(".".join(path[:-1])) for e in errors), errors


def test_wrong_identity_fails() -> None:
    assert validate_inferenceservice({**sample(), "kind": "Service"}) == [
        "kind: expected InferenceService, got 'Service'"
    ]


def test_merge_patches() -> None:
    promote = {"spec": {"predictor": {"canaryTrafficPercent": None, "model": {"storageUri": "s3://bucket/new"}}}}
    assert validate_inferenceservice(promote, partial=True) == []
    patched = merge_patch(sample(), promote)
    assert "canaryTrafficPercent" not in patched["spec"]["predictor"]
    assert patched["spec"]["predictor"]["model"]["modelFormat"] == {"name": "langmerge"}
    assert validate_inferenceservice(patched) == []
    typo = {"spec": {"predictor": {"canaryTraficPercent": 10}}}
    assert validate_inferenceservice(typo, partial=True) != []


def test_status_merge_patch_diff() -> None:
    old = sample_status()
    new = copy.deepcopy(old)
    assert merge_patch_diff(old, new) == {}
    del new["modelStatus"]["lastFailureInfo"]
    new["annotations"] = {"serving.langmerge.dev/storage-uri.dialog-predictor-00002": "s3://bucket/y"}
    patch = merge_patch_diff(old, new)
    assert patch == {
        "modelStatus": {"lastFailureInfo": None},
        "annotations": {
            "serving.langmerge.dev/storage-uri.dialog-predictor-00001": None,
            "serving.langmerge.dev/storage-uri.dialog-predictor-00002": "s3://bucket/y",
        },
    }
    assert merge_patch(old, patch) == new


def test_kserve_is_imported_lazily() -> None:
    code = "import sys, langmerge.dev.serving; assert 'kserve' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
