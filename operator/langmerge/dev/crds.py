"""The envelope of the CRDs the local control plane installs for what it stands in for (Kubeflow Trainer's TrainJob,
:mod:`langmerge.dev.trainjob_crd`; KServe's InferenceService, :mod:`langmerge.dev.serving.crd`): one namespaced kind,
one served and stored version with a status subresource, labelled as part of ``langmerge-dev``. Development only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def object_schema(description: str, spec: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    """The structural schema of a whole object with this ``spec`` and ``status``."""
    return {
        "type": "object",
        "description": description,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def dev_crd(
    *,
    group: str,
    version: str,
    kind: str,
    plural: str,
    schema: dict[str, Any],
    columns: list[dict[str, Any]],
    schema_source: str,
    short_names: Sequence[str] = (),
) -> dict[str, Any]:
    """The CRD of ``kind`` (``<plural>.<group>``, namespaced, status subresource, ``columns`` as printer columns);
    ``schema_source`` says where ``schema`` (the ``openAPIV3Schema``) comes from."""
    names: dict[str, Any] = {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower()}
    if short_names:
        names["shortNames"] = list(short_names)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{group}",
            "labels": {"app.kubernetes.io/part-of": "langmerge-dev"},
            "annotations": {"langmerge.dev/schema-source": schema_source},
        },
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": names,
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }
