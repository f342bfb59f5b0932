"""Content fingerprints: the desired state of an expert or a merge, as one short hash.

Same fingerprint, same S3 prefix, no second Job. Only what changes the *result* goes in: operational settings (poll
interval, progress cadence, gradient checkpointing, the runtime, the collapse check) do not, so changing them never
retrains. The number of training processes does when it is more than one (each optimiser step then sees processes x
batchSize examples), and so does the parallelism with it; one process (0 or 1 GPU on one node) keeps the fingerprints
it always had.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from langmerge.api.expert import LanguageExpertSpec
from langmerge.api.merged import MergedModelSpec, OutputFormat

#: Hex characters of the sha256 kept in names and paths (64 bits).
FINGERPRINT_LENGTH = 16
#: Bump when the meaning of a fingerprint changes (e.g. the trainer's algorithm changes in a way old adapters
#: should not be reused).
FINGERPRINT_VERSION = 1


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, floats in repr form."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def digest(value: Any, length: int = FINGERPRINT_LENGTH) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


def objects_digest(objects: Iterable[tuple[str, int, str]]) -> str:
    """Digest of a listing: (key relative to the prefix, size, ETag) of every object, order-independent."""
    rows = sorted(objects)
    h = hashlib.sha256()
    for key, size, etag in rows:
        h.update(f"{key}\0{size}\0{etag.strip(chr(34))}\n".encode())
    return h.hexdigest()[:FINGERPRINT_LENGTH]


def training_fingerprint(
    spec: LanguageExpertSpec,
    *,
    base_model_digest: str,
    data_digest: str,
    eval_data_digest: str | None,
    image: str,
    init_adapter_digest: str | None = None,
) -> str:
    """hash(base model identity, data digests, dataset reading options, LoRA + training settings, trainer image; the
    task type and label set for a sequence classifier; the digest of the trunk adapter training starts from, for an
    expert with spec.initFrom: a new trunk adapter is a new fingerprint)."""
    training = spec.training.model_dump(
        mode="json",
        exclude={
            "gradient_checkpointing",
            "checkpoint_every_steps",
            "progress_every_steps",
            "parallelism",
            "collapse_check",
        },
    )
    processes = spec.resources.processes()
    if processes > 1:
        training["processes"] = processes
        training["parallelism"] = str(spec.training.parallelism)
    value: dict[str, Any] = {
        "v": FINGERPRINT_VERSION,
        "base": {"uri": spec.base_model.uri, "revision": spec.base_model.revision, "digest": base_model_digest},
        "data": {
            "uri": spec.dataset.uri,
            "digest": data_digest,
            "format": spec.dataset.format,
            "evalFraction": None if spec.dataset.eval_uri else spec.dataset.eval_fraction,
            "evalUri": spec.dataset.eval_uri,
            "evalDigest": eval_data_digest,
            "revision": spec.dataset.revision,
            "skipInvalidLines": spec.dataset.skip_invalid_lines,
        },
        "lora": spec.lora.model_dump(mode="json"),
        "training": training,
        "image": image,
    }
    if spec.is_classifier:  # causal-lm fingerprints stay what they were before task types existed
        value["taskType"] = spec.task_type
        value["labels"] = list(spec.labels or [])
    if init_adapter_digest is not None:  # experts without a trunk keep their fingerprints
        value["init"] = init_adapter_digest
    return digest(value)


def merge_fingerprint(
    spec: MergedModelSpec,
    *,
    inputs: Iterable[tuple[str, str, float]],
    base_model_digest: str,
    image: str,
    validation: Iterable[tuple[str, str | None]] = (),
    label_counts: Iterable[tuple[str, dict[str, int] | None]] = (),
    reference_digest: str | None = None,
) -> str:
    """hash(method, parameters, sorted (language, adapter digest, weight), base model digest, output format, gate;
    with spec.search, the search space and each language's validation data location; for classifiers whose label
    counts are known, each language's counts).

    Label counts come with the adapter (its manifest), but an expert's status may show them only after the merge
    first ran without them (an adapter adopted by an older operator): a merge whose head rows were averaged by the
    language weights alone is then not taken for the one merged by label support.

    The evaluation settings are part of it: a merge Job also evaluates, and its manifest carries those figures. A
    search's chosen parameters are not: they are recorded in the manifest (and status), so the merge can be rerun
    without the search by copying them into method and parameters.
    """
    output: dict[str, Any] = {
        "format": spec.output.format,
        "rank": spec.output.rank,
        "shardSizeMb": spec.output.shard_size_mb,
    }
    if spec.output.format == OutputFormat.PEFT_ADAPTER:
        output["maxRelativeError"] = spec.output.max_relative_error
        output["maxRank"] = spec.output.max_rank
    value: dict[str, Any] = {
        "v": FINGERPRINT_VERSION,
        "method": spec.method,
        "parameters": spec.effective_parameters(),
        "inputs": sorted([lang, adapter, float(weight)] for lang, adapter, weight in inputs),
        "base": {"uri": spec.base_model.uri, "revision": spec.base_model.revision, "digest": base_model_digest},
        "output": output,
        "evaluation": spec.evaluation.model_dump(mode="json", include={"enabled", "max_examples"}),
        "image": image,
    }
    if spec.search is not None:
        value["search"] = spec.search.model_dump(mode="json")
        value["validation"] = sorted([lang, uri] for lang, uri in validation)
    counts = sorted([lang, dict(sorted(c.items()))] for lang, c in label_counts if c is not None)
    if counts:  # merges without label counts keep the fingerprints they always had
        value["labelCounts"] = counts
    if reference_digest is not None:  # merged relative to a trunk (spec.trunk): another result
        value["reference"] = reference_digest
    return digest(value)
