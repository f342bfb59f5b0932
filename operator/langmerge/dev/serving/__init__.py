"""What stands in for KServe on the local control plane (development and tests only): an InferenceService CRD
generated from the ``kserve`` package's models (:mod:`.crd`), a traffic-splitting reverse proxy (:mod:`.router`) and
the runner that serves InferenceServices with local model-server processes and writes their status as KServe does
(:mod:`.runner`; ``python -m langmerge.dev.serving``).

The operator package never needs any of it; ``kserve`` is imported only by :mod:`.crd`, lazily.
"""

from __future__ import annotations

from langmerge.dev.serving.crd import inferenceservice_crd, merge_patch, validate_inferenceservice
from langmerge.dev.serving.router import REVISION_HEADER, STORAGE_URI_HEADER, Backend, Router
from langmerge.dev.serving.runner import (
    BLOCKED,
    DEFAULT_COMMAND,
    DEFAULT_MODEL_FORMATS,
    IN_PROGRESS,
    INVALID_SPEC,
    PASSTHROUGH_ENV,
    SERVER_ARGS,
    STORAGE_URI_ANNOTATION,
    UP_TO_DATE,
    LocalServingRunner,
    ServingConfig,
    ServingError,
    passthrough_env,
    revision_name,
)

__all__ = [
    "BLOCKED",
    "DEFAULT_COMMAND",
    "DEFAULT_MODEL_FORMATS",
    "INVALID_SPEC",
    "IN_PROGRESS",
    "PASSTHROUGH_ENV",
    "REVISION_HEADER",
    "SERVER_ARGS",
    "STORAGE_URI_ANNOTATION",
    "STORAGE_URI_HEADER",
    "UP_TO_DATE",
    "Backend",
    "LocalServingRunner",
    "Router",
    "ServingConfig",
    "ServingError",
    "inferenceservice_crd",
    "merge_patch",
    "passthrough_env",
    "revision_name",
    "validate_inferenceservice",
]
