"""Asking a served MergedModel: KServe's v1 protocol (``POST /v1/models/<name>:predict``) over plain HTTP.

Used by ``langmerge try NAME --served`` and the local walkthrough; no torch here (the model runs in the server).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from langmerge.api.merged import MergedModelStatus

#: The response headers by which the local router names the revision (and its storageUri) that answered.
REVISION_HEADER = "x-langmerge-revision"
STORAGE_URI_HEADER = "x-langmerge-storage-uri"


class ServedError(Exception):
    """The endpoint did not answer a prediction."""


@dataclass(frozen=True)
class Answer:
    predictions: list[Any]
    #: The merge fingerprint the server loaded (``model_version``).
    model_version: str | None
    #: What the serving stack says answered: the predictor revision and its storageUri (local router headers).
    revision: str | None
    storage_uri: str | None


def predict_url(base_url: str, model: str) -> str:
    return f"{base_url.rstrip('/')}/v1/models/{model}:predict"


def predict(
    base_url: str, model: str, texts: Sequence[str], *, max_new_tokens: int = 32, timeout: float = 60.0
) -> Answer:
    """One v1 prediction request for ``texts``. :class:`ServedError` on anything but a 200 with predictions."""
    body = json.dumps(
        {"instances": [{"text": t} for t in texts], "parameters": {"max_new_tokens": max_new_tokens}}
    ).encode()
    request = urllib.request.Request(
        predict_url(base_url, model), data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read() or b"{}")
            headers = response.headers
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:300]
        raise ServedError(f"{predict_url(base_url, model)} answered {err.code}: {detail}") from err
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise ServedError(f"{predict_url(base_url, model)}: {err}") from err
    predictions = payload.get("predictions")
    if not isinstance(predictions, list):
        raise ServedError(f"{predict_url(base_url, model)} answered without predictions: {str(payload)[:300]}")
    return Answer(
        predictions=predictions,
        model_version=payload.get("model_version"),
        revision=headers.get(REVISION_HEADER),
        storage_uri=headers.get(STORAGE_URI_HEADER),
    )


def endpoints(status: MergedModelStatus) -> list[tuple[str, str]]:
    """(InferenceService name, URL) of each kserve target that has a URL in status.serving."""
    return [
        (s.target.removeprefix("kserve/"), s.url) for s in status.serving if s.target.startswith("kserve/") and s.url
    ]


def describe(prediction: Any) -> str:
    """One line for a prediction: a classifier's label and probability, or a causal LM's text."""
    if isinstance(prediction, dict):
        if "label" in prediction:
            probability = prediction.get("probability")
            return (
                f"{prediction['label']} ({probability:.2f})"
                if isinstance(probability, float)
                else str(prediction["label"])
            )
        if "generated_text" in prediction:
            return " ".join(str(prediction["generated_text"]).split()) or "(empty answer)"
    return json.dumps(prediction)[:200]
