"""The generated CRDs on a real kube-apiserver: install, defaulting, validation, status subresource."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from api_cases import INVALID, expert, merged
from langmerge.constants import (
    EXPERT_PLURAL,
    GROUP,
    ISVC_KIND,
    ISVC_PLURAL,
    KSERVE_GROUP,
    KSERVE_VERSION,
    MERGED_PLURAL,
    VERSION,
)
from serving_helpers import isvc_api

pytestmark = pytest.mark.integration

__all__ = ["isvc_api"]  # a fixture, shared


def _plural(obj: dict[str, Any]) -> str:
    return EXPERT_PLURAL if obj["kind"] == "LanguageExpert" else MERGED_PLURAL


def _create(kube: Any, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
    api = client.CustomObjectsApi(kube)
    result: dict[str, Any] = api.create_namespaced_custom_object(GROUP, VERSION, namespace, _plural(obj), obj)
    return result


def test_crds_are_served_with_short_names_and_category(kube: Any) -> None:
    ext = client.ApiextensionsV1Api(kube)
    for plural, short in ((EXPERT_PLURAL, "lex"), (MERGED_PLURAL, "mm")):
        crd = ext.read_custom_resource_definition(f"{plural}.{GROUP}")
        assert short in crd.spec.names.short_names
        assert "langmerge" in crd.spec.names.categories
        conds = {c.type: c.status for c in crd.status.conditions}
        assert conds["Established"] == "True" and conds["NamesAccepted"] == "True"


def test_valid_expert_accepted_with_defaults(kube: Any, namespace: str) -> None:
    created = _create(kube, namespace, expert())
    spec = created["spec"]
    assert spec["lora"]["rank"] == 16 and spec["lora"]["targetModules"][0] == "q_proj"
    assert spec["training"]["seed"] == 42 and spec["training"]["batching"] == "length-grouped"
    assert spec["dataset"]["evalFraction"] == 0.1 and spec["dataset"]["format"] == "jsonl"
    assert spec["resources"]["gpus"] == 1 and spec["schedule"]["settleSeconds"] == 60
    assert spec["onChange"] == "wait" and spec["suspend"] is False


def test_valid_merged_accepted_with_defaults(kube: Any, namespace: str) -> None:
    created = _create(kube, namespace, merged())
    spec = created["spec"]
    assert spec["evaluation"] == {
        "enabled": True,
        "metric": "evalLoss",
        "maxRegression": 0.1,
        "maxExamples": 512,
        "floor": "base",
    }
    assert spec["publish"]["keepRevisions"] == 5 and spec["requireAllExperts"] is True
    assert spec["output"]["format"] == "peft-adapter" and spec["resources"]["gpus"] == 0


def test_samples_are_accepted(kube: Any, namespace: str, isvc_api: client.CustomObjectsApi) -> None:
    """Every sample manifest, the sample's InferenceService included (on the CRD generated from kserve's models)."""
    import yaml

    root = Path(__file__).resolve().parents[2]
    kinds = set()
    for path in sorted((root / "examples" / "sample").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kinds.add(doc["kind"])
            if doc["kind"] == ISVC_KIND:
                isvc_api.create_namespaced_custom_object(KSERVE_GROUP, KSERVE_VERSION, namespace, ISVC_PLURAL, doc)
            else:
                _create(kube, namespace, doc)
    assert kinds == {"LanguageExpert", "MergedModel", ISVC_KIND}


@pytest.mark.parametrize(("case", "obj", "fragment"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_specs_rejected(kube: Any, namespace: str, case: str, obj: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ApiException) as info:
        _create(kube, namespace, obj)
    assert info.value.status == 422
    body = info.value.body if isinstance(info.value.body, str) else info.value.body.decode()
    assert fragment in body, body
    print(f"{case}: {_message(body)}")


def _message(body: str) -> str:
    import json

    return str(json.loads(body).get("message", body))


def test_status_only_through_subresource(kube: Any, namespace: str) -> None:
    api = client.CustomObjectsApi(kube)
    obj = expert("st")
    obj["status"] = {"phase": "Ready"}
    created = api.create_namespaced_custom_object(GROUP, VERSION, namespace, EXPERT_PLURAL, obj)
    assert "status" not in created or not created["status"].get("phase"), "status must be ignored on create"
    patched = api.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, EXPERT_PLURAL, "st", {"status": {"phase": "Ready"}}
    )
    assert not (patched.get("status") or {}).get("phase"), "status must be ignored on the main resource"
    via_status = api.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, EXPERT_PLURAL, "st", {"status": {"phase": "Ready", "observedGeneration": 1}}
    )
    assert via_status["status"]["phase"] == "Ready"
    spec_change = api.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, EXPERT_PLURAL, "st", {"spec": {"suspend": True}}
    )
    assert spec_change["spec"]["suspend"] is False, "spec must be ignored on the status subresource"
    bad = {"status": {"phase": "Exploded"}}
    with pytest.raises(ApiException) as info:
        api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, EXPERT_PLURAL, "st", bad)
    assert info.value.status == 422
