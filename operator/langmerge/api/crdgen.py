"""Generate the CustomResourceDefinitions from the pydantic models.

The models in :mod:`langmerge.api` are the single source of the API. This module turns their JSON schema into a
*structural* OpenAPI v3 schema as Kubernetes requires (no ``$ref``, every node typed, ``nullable`` instead of
``anyOf [X, null]``, OpenAPI 3.0 ``exclusiveMinimum`` booleans) and wraps it into ``apiextensions.k8s.io/v1`` CRDs.
``langmerge crds`` writes them to ``crds/``; a test fails when the committed files differ.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema, to_jsonable_python

from langmerge.api.expert import LanguageExpertSpec, LanguageExpertStatus
from langmerge.api.merged import MergedModelSpec, MergedModelStatus
from langmerge.constants import (
    CATEGORY,
    EXPERT_KIND,
    EXPERT_PLURAL,
    GROUP,
    MERGED_KIND,
    MERGED_PLURAL,
    VERSION,
)

_KEEP = {
    "type",
    "description",
    "default",
    "enum",
    "pattern",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "items",
    "properties",
    "required",
    "additionalProperties",
    "nullable",
    "format",
    "oneOf",
    "anyOf",
    "x-kubernetes-preserve-unknown-fields",
}


class _WithFactoryDefaults(GenerateJsonSchema):
    """Emit defaults produced by ``default_factory`` too, so the API server fills nested defaults."""

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            inner = dict(self.generate_inner(schema["schema"]))
            value = factory()  # type: ignore[call-arg]
            if isinstance(value, BaseModel):
                value = value.model_dump(mode="json", by_alias=True, exclude_none=True)
            inner["default"] = to_jsonable_python(value)
            return inner
        return super().default_schema(schema)


def _structural(node: Any, defs: dict[str, Any], *, keep_defaults: bool) -> dict[str, Any]:
    """Rewrite one JSON-schema node into a structural OpenAPI v3 node."""
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        merged = {**target, **node}
        return _structural(merged, defs, keep_defaults=keep_defaults)
    if "allOf" in node and len(node["allOf"]) == 1:
        inner = node.pop("allOf")[0]
        return _structural({**_resolve(inner, defs), **node}, defs, keep_defaults=keep_defaults)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if sorted(str(_resolve(b, defs).get("type")) for b in branches) == ["integer", "string"]:
            # an integer or a keyword (e.g. output.rank: 64 | auto): the structural int-or-string form; the operator's
            # models check the bounds and the keyword
            out_node: dict[str, Any] = {
                "x-kubernetes-int-or-string": True,
                "anyOf": [{"type": "integer"}, {"type": "string"}],
            }
            if "description" in node:
                out_node["description"] = node["description"]
            if keep_defaults and node.get("default") is not None:
                out_node["default"] = node["default"]
            return out_node
        if len(branches) == 1:
            node.pop("anyOf")
            inner = _resolve(branches[0], defs)
            node = {**inner, **{k: v for k, v in node.items() if k != "default" or v is not None}}
            if node.get("default", "x") is None:
                node.pop("default")
            return _structural(node, defs, keep_defaults=keep_defaults)
    if "patternProperties" in node:
        # Structural schemas have no patternProperties: keep the value schema; the operator validates the keys.
        values = list(node.pop("patternProperties").values())
        if len(values) == 1:
            node["additionalProperties"] = values[0]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if node.get("default", "x") is None:
        node.pop("default")
    if not keep_defaults:
        node.pop("default", None)

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in _KEEP:
            continue
        if key == "properties":
            out[key] = {name: _structural(sub, defs, keep_defaults=keep_defaults) for name, sub in value.items()}
        elif key == "items":
            out[key] = _structural(value, defs, keep_defaults=keep_defaults)
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out[key] = _structural(value, defs, keep_defaults=keep_defaults)
        elif key == "exclusiveMinimum":
            out["minimum"] = value
            out["exclusiveMinimum"] = True
        elif key == "exclusiveMaximum":
            out["maximum"] = value
            out["exclusiveMaximum"] = True
        else:
            out[key] = copy.deepcopy(value)
    if "properties" in out and "type" not in out:
        out["type"] = "object"
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        return {**defs[node["$ref"].split("/")[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def openapi_schema(model: type[BaseModel], *, keep_defaults: bool = True) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a pydantic model, camelCase field names."""
    raw = model.model_json_schema(by_alias=True, mode="validation", schema_generator=_WithFactoryDefaults)
    defs = raw.pop("$defs", {})
    return _structural(raw, defs, keep_defaults=keep_defaults)


def _expert_selection_one_of(spec_schema: dict[str, Any]) -> None:
    """experts: exactly one of selector / names (a structural value validation the 1.20 API server enforces)."""
    experts = spec_schema["properties"]["experts"]
    experts["oneOf"] = [{"required": ["selector"]}, {"required": ["names"]}]


def _crd(
    *,
    kind: str,
    plural: str,
    short_names: list[str],
    description: str,
    spec_model: type[BaseModel],
    status_model: type[BaseModel],
    columns: list[dict[str, Any]],
    tweak: Any = None,
) -> dict[str, Any]:
    spec_schema = openapi_schema(spec_model)
    spec_schema["description"] = (spec_model.__doc__ or "").strip()
    if tweak is not None:
        tweak(spec_schema)
    status_schema = openapi_schema(status_model, keep_defaults=False)
    status_schema["description"] = (status_model.__doc__ or "").strip()
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "langmerge", "app.kubernetes.io/part-of": "langmerge"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "API version of the object."},
                                "kind": {"type": "string", "description": "Kind of the object."},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def expert_crd() -> dict[str, Any]:
    return _crd(
        kind=EXPERT_KIND,
        plural=EXPERT_PLURAL,
        short_names=["lex"],
        description="A LoRA expert for one (task, language): the operator trains it whenever its data or spec changes "
        "and commits the adapter to S3.",
        spec_model=LanguageExpertSpec,
        status_model=LanguageExpertStatus,
        columns=[
            {"name": "Language", "type": "string", "jsonPath": ".spec.language"},
            {"name": "Task", "type": "string", "jsonPath": ".spec.task"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step", "priority": 1},
            {"name": "Adapter", "type": "string", "jsonPath": ".status.adapter.digest"},
            {"name": "Health", "type": "string", "jsonPath": ".status.health"},
            {"name": "Job", "type": "string", "jsonPath": ".status.activeJob", "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )


def merged_crd() -> dict[str, Any]:
    return _crd(
        kind=MERGED_KIND,
        plural=MERGED_PLURAL,
        short_names=["mm"],
        description="A multilingual model merged from LanguageExperts: re-merged, evaluated per language and "
        "published to S3 whenever an input adapter changes.",
        spec_model=MergedModelSpec,
        status_model=MergedModelStatus,
        columns=[
            {"name": "Method", "type": "string", "jsonPath": ".spec.method"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Revision", "type": "integer", "jsonPath": ".status.revision"},
            {"name": "Serving", "type": "string", "jsonPath": ".status.servingSummary"},
            {"name": "Health", "type": "string", "jsonPath": ".status.health"},
            {"name": "Fingerprint", "type": "string", "jsonPath": ".status.fingerprint", "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        tweak=_expert_selection_one_of,
    )


def all_crds() -> dict[str, dict[str, Any]]:
    """File name -> CRD object."""
    return {
        f"{GROUP}_{EXPERT_PLURAL}.yaml": expert_crd(),
        f"{GROUP}_{MERGED_PLURAL}.yaml": merged_crd(),
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str_presenter)


def render(crd: dict[str, Any]) -> str:
    header = "# Generated by `langmerge crds` from the pydantic models in operator/langmerge/api. Do not edit.\n"
    return header + yaml.dump(crd, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def write_crds(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, crd in all_crds().items():
        path = directory / name
        path.write_text(render(crd), encoding="utf-8")
        written.append(path)
    return written
