"""A ``TrainJob`` CRD for the local API server (development and tests only).

Kubeflow Trainer is not installed on the local control plane. So that the operator's TrainJobs can be created,
listed, watched and given a status there (the local Job runner runs them), this module installs a
``trainjobs.trainer.kubeflow.org`` CRD whose schema comes from the **``kubeflow-trainer-api`` package's models**
(the same ``TrainerV1alpha1TrainJobSpec`` / ``TrainerV1alpha1TrainJobStatus`` the operator's builder is typed
with), turned into a structural schema by :func:`langmerge.api.crdgen.openapi_schema`. The package's
``Quantity`` (a string-or-number ``oneOf``) becomes ``x-kubernetes-int-or-string``, as in Kubernetes' own schemas.
Kubeflow's published CRD adds CEL rules (ignored by the 1.20 API server anyway) and defaults (left out here: the
builder sets what it means); unknown fields are pruned the same way.
"""

from __future__ import annotations

from typing import Any

from langmerge.constants import TRAINER_GROUP, TRAINER_VERSION, TRAINJOB_KIND, TRAINJOB_PLURAL
from langmerge.dev.crds import dev_crd, object_schema

#: A Quantity (or IntOrString) in a structural schema.
INT_OR_STRING: dict[str, Any] = {
    "anyOf": [{"type": "integer"}, {"type": "string"}],
    "x-kubernetes-int-or-string": True,
}


def _fix_quantities(node: Any) -> Any:
    """Replace the package's pydantic wrapper of a Quantity (``actual_instance``...) by int-or-string."""
    if isinstance(node, list):
        return [_fix_quantities(n) for n in node]
    if not isinstance(node, dict):
        return node
    props = node.get("properties")
    if isinstance(props, dict) and "actual_instance" in props:
        out = dict(INT_OR_STRING)
        if "description" in node:
            out["description"] = node["description"]
        return out
    return {key: _fix_quantities(value) for key, value in node.items()}


def trainjob_crd() -> dict[str, Any]:
    """The TrainJob CRD (``trainer.kubeflow.org/v1alpha1``, namespaced, status subresource)."""
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job_spec import TrainerV1alpha1TrainJobSpec
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job_status import TrainerV1alpha1TrainJobStatus

    from langmerge.api.crdgen import openapi_schema

    spec = _fix_quantities(openapi_schema(TrainerV1alpha1TrainJobSpec, keep_defaults=False))
    status = _fix_quantities(openapi_schema(TrainerV1alpha1TrainJobStatus, keep_defaults=False))
    return dev_crd(
        group=TRAINER_GROUP,
        version=TRAINER_VERSION,
        kind=TRAINJOB_KIND,
        plural=TRAINJOB_PLURAL,
        schema=object_schema("TrainJob represents configuration of a training job.", spec, status),
        columns=[
            {"name": "State", "type": "string", "jsonPath": ".status.conditions[-1:].type"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        schema_source="kubeflow-trainer-api (PyPI) models, via langmerge crdgen",
    )
