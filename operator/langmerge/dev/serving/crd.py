"""An ``InferenceService`` CRD for the local API server (development and tests only).

KServe is not installed on the local control plane. So that InferenceServices can be created, patched, watched and
given a status there (the local serving runner serves them), this module installs an
``inferenceservices.serving.kserve.io`` CRD whose schema comes from the **``kserve`` package's models**
(``V1beta1InferenceServiceSpec`` / ``V1beta1InferenceServiceStatus``, openapi-generator classes with
``openapi_types`` and ``attribute_map``), walked into a structural schema:

* KServe's own types (``V1beta1*``, Knative's condition and addressable) get full schemas, with the fields their
  constructors insist on as ``required`` (as in KServe's published CRD: ``predictor``, ``modelFormat``...);
* the Kubernetes core types they reference (``V1Container``, ``V1Probe``, ``V1ResourceRequirements``...) are
  ``type: object`` with ``x-kubernetes-preserve-unknown-fields``, which keeps the CRD small enough for etcd;
* Knative's ``URL`` is a string on the wire (not the Go struct the generator describes), its ``VolatileTime`` and
  ``V1Time`` a ``date-time`` string, quantities int-or-string; Knative's traffic target (absent from the package)
  is written out by hand;
* ``dict(str, X)`` becomes ``additionalProperties``, ``object`` any value (``x-kubernetes-preserve-unknown-fields``).

:func:`validate_inferenceservice` checks a manifest (or a merge patch, ``partial=True``) against the same schema, with
unknown fields reported rather than pruned, then round-trips a full manifest through ``kserve.ApiClient``'s
deserialisation into ``V1beta1InferenceService`` (the constructors' own checks; Kubernetes core types pass through
unchecked there too). ``kserve`` is imported lazily: it is
a development dependency, not the operator's.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
import re
from collections.abc import Mapping
from typing import Any

from langmerge.constants import ISVC_KIND, ISVC_PLURAL, KSERVE_GROUP, KSERVE_VERSION
from langmerge.dev.crds import dev_crd, object_schema

#: A quantity in a structural schema.
INT_OR_STRING: dict[str, Any] = {
    "anyOf": [{"type": "integer"}, {"type": "string"}],
    "x-kubernetes-int-or-string": True,
}
#: Any JSON value.
ANY_VALUE: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}
#: An object whose fields are not checked (Kubernetes core types).
OPEN_OBJECT: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
DATE_TIME: dict[str, Any] = {"type": "string", "format": "date-time"}

#: Knative's ``TrafficTarget`` (``knative.dev/serving/pkg/apis/serving/v1``), which the kserve package names but lacks.
TRAFFIC_TARGET: dict[str, Any] = {
    "type": "object",
    "properties": {
        "tag": {"type": "string"},
        "revisionName": {"type": "string"},
        "configurationName": {"type": "string"},
        "latestRevision": {"type": "boolean"},
        "percent": {"type": "integer", "format": "int64"},
        "url": {"type": "string"},
    },
}

#: Type names with a fixed schema and the type kserve's deserialiser should read them as.
_SPECIAL: dict[str, tuple[dict[str, Any], str]] = {
    "KnativeURL": ({"type": "string"}, "str"),
    "KnativeVolatileTime": (DATE_TIME, "datetime"),
    "V1Time": (DATE_TIME, "datetime"),
    "ResourceQuantity": (INT_OR_STRING, "object"),
    "V1beta1MetricQuantity": (INT_OR_STRING, "object"),
    "KnativeDevServingPkgApisServingV1TrafficTarget": (TRAFFIC_TARGET, "object"),
}
_PRIMITIVES: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "long": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "datetime": DATE_TIME,
    "date": {"type": "string", "format": "date"},
    "object": ANY_VALUE,
}
#: Bounds KServe's admission webhook enforces (the local API server has no webhook).
_BOUNDS: dict[str, dict[str, Any]] = {"canaryTrafficPercent": {"minimum": 0, "maximum": 100}}

_LIST = re.compile(r"list\[(.*)\]")
_DICT = re.compile(r"dict\(([^,]*), (.*)\)")
_REQUIRED = re.compile(r"Invalid value for `(\w+)`, must not be `None`")


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def kserve_model(name: str) -> type[Any] | None:
    """The kserve model class named ``name``: exported by ``kserve.models``, or only in its own module there (the
    Knative types), or None."""
    models = importlib.import_module("kserve.models")
    found = getattr(models, name, None)
    if isinstance(found, type):
        return found
    try:
        module = importlib.import_module(f"kserve.models.{_snake(name)}")
    except ImportError:
        return None
    found = getattr(module, name, None)
    return found if isinstance(found, type) else None


def _required(cls: type[Any]) -> list[str]:
    """The JSON names of the fields the model's setters refuse to leave unset."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return []
    attrs: dict[str, str] = getattr(cls, "attribute_map", {})
    return sorted({attrs[a] for a in _REQUIRED.findall(source) if a in attrs})


def type_schema(type_name: str, stack: tuple[str, ...] = ()) -> dict[str, Any]:
    """The structural schema of one openapi-generator type string (``str``, ``list[X]``, ``dict(str, X)``, a model)."""
    type_name = type_name.strip()
    if type_name in _PRIMITIVES:
        return copy.deepcopy(_PRIMITIVES[type_name])
    match = _LIST.fullmatch(type_name)
    if match:
        return {"type": "array", "items": type_schema(match.group(1), stack)}
    match = _DICT.fullmatch(type_name)
    if match:
        return {"type": "object", "additionalProperties": type_schema(match.group(2), stack)}
    if type_name in _SPECIAL:
        return copy.deepcopy(_SPECIAL[type_name][0])
    cls = kserve_model(type_name)
    if cls is None or type_name in stack:  # a Kubernetes core type (or a cycle): not checked field by field
        return copy.deepcopy(OPEN_OBJECT)
    return model_schema(cls, (*stack, type_name))


def model_schema(cls: type[Any], stack: tuple[str, ...] = ()) -> dict[str, Any]:
    """The structural schema of a kserve model class (camelCase properties, required fields)."""
    types: dict[str, str] = getattr(cls, "openapi_types", {}) or {}
    attrs: dict[str, str] = getattr(cls, "attribute_map", {}) or {}
    if not types:
        return copy.deepcopy(OPEN_OBJECT)
    properties: dict[str, Any] = {}
    for attr, type_name in types.items():
        json_name = attrs.get(attr, attr)
        node = type_schema(type_name, stack or (cls.__name__,))
        node.update(_BOUNDS.get(json_name, {}))
        properties[json_name] = node
    out: dict[str, Any] = {"type": "object", "properties": properties}
    required = _required(cls)
    if required:
        out["required"] = required
    return out


@functools.cache
def _schemas() -> tuple[dict[str, Any], dict[str, Any]]:
    from kserve.models import (  # type: ignore[import-untyped]
        V1beta1InferenceServiceSpec,
        V1beta1InferenceServiceStatus,
    )

    return model_schema(V1beta1InferenceServiceSpec), model_schema(V1beta1InferenceServiceStatus)


def openapi_v3_schema() -> dict[str, Any]:
    """The whole object's structural schema (a fresh copy)."""
    spec, status = _schemas()
    return object_schema(
        "InferenceService is the Schema for the InferenceServices API (KServe), local development copy.",
        copy.deepcopy(spec),
        copy.deepcopy(status),
    )


def inferenceservice_crd() -> dict[str, Any]:
    """The InferenceService CRD (``serving.kserve.io/v1beta1``, namespaced, status subresource, KServe's columns)."""
    predictor = ".status.components.predictor"
    columns: list[dict[str, Any]] = [
        {"name": "URL", "type": "string", "jsonPath": ".status.url"},
        {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type=='Ready')].status"},
        {"name": "Prev", "type": "integer", "jsonPath": f"{predictor}.traffic[?(@.tag=='prev')].percent"},
        {"name": "Latest", "type": "integer", "jsonPath": f"{predictor}.traffic[?(@.latestRevision==true)].percent"},
        {
            "name": "PrevRolledoutRevision",
            "type": "string",
            "priority": 1,
            "jsonPath": f"{predictor}.traffic[?(@.tag=='prev')].revisionName",
        },
        {
            "name": "LatestReadyRevision",
            "type": "string",
            "priority": 1,
            "jsonPath": f"{predictor}.traffic[?(@.latestRevision==true)].revisionName",
        },
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return dev_crd(
        group=KSERVE_GROUP,
        version=KSERVE_VERSION,
        kind=ISVC_KIND,
        plural=ISVC_PLURAL,
        schema=openapi_v3_schema(),
        columns=columns,
        schema_source="kserve (PyPI) models, via langmerge.dev.serving.crd",
        short_names=["isvc"],
    )


# -- validation ------------------------------------------------------------------------------------------------------
def _closed(node: Any, *, required: bool) -> Any:
    """A copy of a structural schema for jsonschema: unknown fields are errors (the API server would prune them
    silently), ``required`` kept or dropped."""
    if isinstance(node, list):
        return [_closed(n, required=required) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _closed(v, required=required) for k, v in node.items() if required or k != "required"}
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _without_nulls(value: Any) -> Any:
    """A merge patch's deletions (``null``) removed, so the rest can be checked as a partial object."""
    if isinstance(value, Mapping):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: ``target`` with the JSON merge patch ``patch`` applied (neither is modified)."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(copy.deepcopy(target)) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


@functools.cache
def _validator(partial: bool) -> Any:
    import jsonschema

    schema = _closed(openapi_v3_schema(), required=not partial)
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


@functools.cache
def _deserializer() -> Any:
    """kserve's ApiClient, resolving the type names ``kserve.models`` does not export instead of failing on them:
    Knative's from their modules, Kubernetes' core types (not checked, as in the CRD) as plain values."""
    from kserve import ApiClient  # type: ignore[import-untyped]

    class _Deserializer(ApiClient):  # type: ignore[misc]
        def _ApiClient__deserialize(self, data: Any, klass: Any) -> Any:  # the private hook every level goes through
            if isinstance(klass, str) and not klass.startswith(("list[", "dict(")):
                if klass in _SPECIAL:
                    klass = _SPECIAL[klass][1]
                elif klass not in self.NATIVE_TYPES_MAPPING:
                    klass = kserve_model(klass) or "object"
            return super()._ApiClient__deserialize(data, klass)

    return _Deserializer()


class _Response:
    def __init__(self, data: Any) -> None:
        self.data = json.dumps(data)


def _dropped(original: Any, restored: Any, path: str = "") -> list[str]:
    """Paths present in ``original`` but lost on the way through the models."""
    if isinstance(original, Mapping):
        if not isinstance(restored, Mapping):
            return [path or "(root)"]
        out = []
        for key, value in original.items():
            sub = f"{path}.{key}" if path else str(key)
            out += [sub] if key not in restored else _dropped(value, restored[key], sub)
        return out
    if isinstance(original, list) and isinstance(restored, list) and len(original) == len(restored):
        return [
            p for i, (a, b) in enumerate(zip(original, restored, strict=True)) for p in _dropped(a, b, f"{path}[{i}]")
        ]
    return []


def validate_inferenceservice(manifest: Mapping[str, Any], *, partial: bool = False) -> list[str]:
    """What is wrong with an InferenceService manifest: schema errors (unknown fields included), then what kserve's
    models refuse or drop on deserialisation into ``V1beta1InferenceService``. Empty when it is valid.

    ``partial=True`` checks a JSON merge patch instead: ``null`` deletions are allowed, required fields are not
    enforced, and no round trip is made (the models need whole objects); or check ``merge_patch(current, patch)``.
    """
    errors: list[str] = []
    api_version = manifest.get("apiVersion")
    if api_version is not None and api_version != f"{KSERVE_GROUP}/{KSERVE_VERSION}":
        errors.append(f"apiVersion: expected {KSERVE_GROUP}/{KSERVE_VERSION}, got {api_version!r}")
    kind = manifest.get("kind")
    if kind is not None and kind != ISVC_KIND:
        errors.append(f"kind: expected {ISVC_KIND}, got {kind!r}")
    document = _without_nulls(manifest) if partial else manifest
    for err in sorted(_validator(partial).iter_errors(document), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in err.absolute_path) or "(root)"
        errors.append(f"{where}: {err.message}")
    if errors or partial:
        return errors
    client = _deserializer()
    try:
        isvc = client.deserialize(_Response(manifest), "V1beta1InferenceService")
        restored = client.sanitize_for_serialization(isvc)
    except (ValueError, TypeError, AttributeError) as err:
        return [f"kserve models: {err}"]
    errors += [f"{p}: dropped by kserve's V1beta1InferenceService" for p in _dropped(manifest, restored)]
    return errors
