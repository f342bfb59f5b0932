"""The artifact layout in S3 and the records written there, shared by the operator and the trainer.

S3 is the record of what was trained and merged; the custom resources' status is a view of it. Every artifact prefix is
content-addressed by a fingerprint and committed last: payload files first, then ``manifest.json`` with a conditional
put. A reader trusts only prefixes that have a manifest.

Layout::

    <artifacts>/experts/<namespace>/<name>/<fingerprint>/
        attempts/<n>-<run>/adapter/   the adapter files one run of attempt <n> uploaded (only that run writes there):
                                      adapter_model.safetensors, adapter_config.json
        checkpoints/step-<n>/...      resumable checkpoints; checkpoints/latest.json points at the newest (deleted
                                      once the adapter is committed, unless the operator keeps them)
        progress.json                 live progress (overwritten)
        failures/attempt-<n>.json     one record per failed attempt
        manifest.json                 the commit: written last, never overwritten; its ``adapter_uri`` and ``files``
                                      name exactly the committed files
    <artifacts>/experts/<namespace>/<name>/.langmerge-owner.json   the LanguageExpert owning the folder
    <merged output uri>/
        .langmerge-owner.json                 the MergedModel owning the prefix: kind, namespace, name, uid
        merges/<fingerprint>/attempts/<n>-<run>/model/...      a PEFT adapter or full safetensors weights
        merges/<fingerprint>/attempts/<n>-<run>/eval/<lang>.json  per-language evaluation of the merged model
        merges/<fingerprint>/manifest.json    the commit (``model_uri`` names the committed run's ``model/``)
        revisions/<revision:06d>.json         one record per published revision (never overwritten)
        current.json                          the published revision, moved by compare-and-swap
    <artifacts>/baselines/<namespace>/<task>.json   a measured joint retrain of the task (JointBaseline)

Each run of a Job uploads its payload under its own ``attempts/<n>-<run>/`` prefix, so two runs of one fingerprint
(a retry racing a slow attempt, a pod that outlived its node) never write the same key: whichever commits first wins,
and its files stay exactly as its manifest describes them. Readers follow the manifest's URIs. Manifests written
before this layout name the fixed ``adapter/`` and ``model/`` folders directly under the fingerprint; they stay
readable the same way.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from langmerge.api.expert import Metrics

SCHEMA_VERSION = 1

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
CURRENT = "current.json"
#: The ownership record of a prefix (:mod:`langmerge.ownership`).
OWNER = ".langmerge-owner.json"


def utcnow() -> str:
    """RFC 3339 UTC timestamp with seconds precision, as Kubernetes writes them."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def join(prefix: str, *parts: str) -> str:
    """Join an ``s3://`` prefix and relative parts with single slashes."""
    out = prefix.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def expert_prefix(artifacts_uri: str, namespace: str, name: str, fingerprint: str) -> str:
    return join(artifacts_uri, "experts", namespace, name, fingerprint)


def expert_root(artifacts_uri: str, namespace: str, name: str) -> str:
    return join(artifacts_uri, "experts", namespace, name)


def sibling_prefix(prefix: str, fingerprint: str) -> str:
    """The prefix of another fingerprint of the same expert (or merged model): ``<root>/<fingerprint>``."""
    return join(prefix.rstrip("/").rsplit("/", 1)[0], fingerprint)


#: The folder of the per-run upload prefixes under a fingerprint's prefix.
ATTEMPTS = "attempts"


def new_run_id() -> str:
    """A random tag that tells apart two runs of the same attempt (e.g. two pods of one Job)."""
    return secrets.token_hex(4)


def attempt_prefix(prefix: str, attempt: int, run_id: str) -> str:
    """Where one run of ``attempt`` uploads its payload: ``<prefix>/attempts/<attempt>-<run_id>``."""
    return join(prefix, ATTEMPTS, f"{attempt}-{run_id}")


def adapter_uri(prefix: str) -> str:
    return join(prefix, "adapter")


def checkpoints_uri(prefix: str) -> str:
    return join(prefix, "checkpoints")


def failure_uri(prefix: str, attempt: int) -> str:
    return join(prefix, "failures", f"attempt-{attempt}.json")


def preemption_uri(prefix: str, attempt: int) -> str:
    """The trainer's rank 0 writes a :class:`PreemptionRecord` here when ``attempt`` stopped on SIGTERM after a
    checkpoint, and deletes it when that attempt trains again (a restarted pod of the same Job or TrainJob)."""
    return join(prefix, "preemptions", f"attempt-{attempt}.json")


def merge_prefix(output_uri: str, fingerprint: str) -> str:
    return join(output_uri, "merges", fingerprint)


def merged_model_uri(prefix: str) -> str:
    return join(prefix, "model")


def merge_eval_uri(prefix: str, language: str) -> str:
    return join(prefix, "eval", f"{language}.json")


def evaluation_cache_uri(output_uri: str) -> str:
    """Where a MergedModel's merge Jobs keep figures of models that do not change between merges (the base, each
    expert alone), keyed by the model and the examples (``langmerge_trainer.merge.evalcache``)."""
    return join(output_uri, "evaluations")


def baseline_uri(artifacts_uri: str, namespace: str, task: str) -> str:
    """Where the measured joint-retrain record of a task lives (written by ``langmerge bench --record-baseline``)."""
    return join(artifacts_uri, "baselines", namespace, f"{task}.json")


def revision_uri(output_uri: str, revision: int) -> str:
    return join(output_uri, "revisions", f"{revision:06d}.json")


def current_uri(output_uri: str) -> str:
    return join(output_uri, CURRENT)


def owner_uri(prefix: str) -> str:
    return join(prefix, OWNER)


class Record(BaseModel):
    """Base of every JSON record in S3: snake_case on disk, unknown fields kept readable by older code."""

    model_config = ConfigDict(extra="ignore", frozen=False)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True)


class FileEntry(Record):
    size: int
    sha256: str


class BaseModelIdentity(Record):
    uri: str
    revision: str | None = None
    digest: str


class Versions(Record):
    """Library versions of the process that wrote a record."""

    langmerge: str | None = None
    python: str | None = None
    torch: str | None = None
    transformers: str | None = None
    peft: str | None = None
    cuda: str | None = None


class Cost(Record):
    """What a Job consumed."""

    wall_seconds: float
    cpu_seconds: float = 0.0
    gpus: int = 0
    gpu_seconds: float = 0.0
    device: str = "cpu"


class AdapterManifest(Record):
    """The commit record of a trained adapter."""

    kind: Literal["adapter"] = "adapter"
    schema_version: int = SCHEMA_VERSION
    fingerprint: str
    namespace: str
    name: str
    language: str
    task: str
    #: causal-lm or sequence-classification; a classifier's adapter carries its head (PEFT modules_to_save).
    task_type: str = "causal-lm"
    labels: list[str] | None = None
    #: A classifier's training examples per label (every label listed, 0 where the data has none); None for a causal
    #: LM and for adapters committed before manifests recorded it. The merge weighs each label's head row by it.
    label_counts: dict[str, int] | None = None
    base_model: BaseModelIdentity
    data_digest: str
    eval_data_digest: str | None = None
    adapter_uri: str
    adapter_digest: str
    files: dict[str, FileEntry]
    lora: dict[str, Any]
    training: dict[str, Any]
    metrics: Metrics
    base_metrics: Metrics | None = None
    examples_train: int
    examples_eval: int
    skipped_lines: int = 0
    tokens_trained: int
    steps: int
    cost: Cost
    versions: Versions
    image: str | None = None
    started_at: str
    finished_at: str
    resumed_from_step: int | None = None
    #: spec.initFrom: the trunk adapter training started from (``uri``, ``digest``); None for a fresh adapter.
    init_adapter: dict[str, str] | None = None
    #: The fingerprint the Job was started for, when the data it read differed from the operator's listing: it
    #: trained on what it read and committed under that data's fingerprint (this one) instead.
    requested_fingerprint: str | None = None
    #: The data digest the operator listed, when it differs from ``data_digest`` (what the trainer read) and the
    #: trainer could not compute the fingerprint of what it read (an operator of another version).
    listed_data_digest: str | None = None
    #: The seed the adapter was trained with (:func:`attempt_seed`: ``training.seed`` plus :data:`RESEED_STEP` per
    #: earlier attempt of this fingerprint that collapsed); None in manifests written before it was recorded.
    seed: int | None = None


class MergeInputRecord(Record):
    expert: str
    language: str
    adapter_uri: str
    adapter_digest: str
    weight: float = 1.0
    rank: int | None = None


class RefactorSummary(Record):
    """How exactly a PEFT adapter output holds the merged update: errors and ranks over its modules."""

    max_relative_error: float
    mean_relative_error: float
    worst_module: str | None = None
    min_rank: int | None = None
    max_rank: int | None = None
    mean_rank: float | None = None


def refactor_summary(module_errors: dict[str, float], module_ranks: dict[str, int]) -> RefactorSummary | None:
    """The summary of a PEFT adapter output (None for full weights: nothing is re-factorised)."""
    if not module_ranks or not module_errors:
        return None
    worst = max(module_errors, key=lambda name: module_errors[name])
    ranks = list(module_ranks.values())
    return RefactorSummary(
        max_relative_error=module_errors[worst],
        mean_relative_error=sum(module_errors.values()) / len(module_errors),
        worst_module=worst,
        min_rank=min(ranks),
        max_rank=max(ranks),
        mean_rank=round(sum(ranks) / len(ranks), 2),
    )


class SearchCandidate(Record):
    """One candidate of a merge search, scored on every language's validation split."""

    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    #: The search objective (higher is better).
    objective: float
    #: Per language: the score relative to the language's expert (absolute points for accuracy-like metrics,
    #: relative for losses; positive = better than the expert).
    relative: dict[str, float] = Field(default_factory=dict)
    #: Per language: the metric itself.
    scores: dict[str, float] = Field(default_factory=dict)
    seconds: float | None = None


class SearchRecord(Record):
    """What a merge search did: the chosen candidate (the one merged and gated), the spec's own, the best ones."""

    objective: str
    metric: str
    candidates: int
    seconds: float
    #: exhausted (the whole search space), maxCandidates or maxSeconds.
    stopped: str
    chosen: SearchCandidate
    default: SearchCandidate | None = None
    top: list[SearchCandidate] = Field(default_factory=list)
    #: Each expert alone on its language's validation split.
    expert_scores: dict[str, float] = Field(default_factory=dict)
    #: Per language: validation examples and where they came from; the gate's examples (disjoint from them).
    validation: dict[str, dict[str, Any]] = Field(default_factory=dict)


class MergeManifest(Record):
    """The commit record of a merge (and its per-language evaluation)."""

    kind: Literal["merge"] = "merge"
    schema_version: int = SCHEMA_VERSION
    fingerprint: str
    namespace: str
    name: str
    method: str
    parameters: dict[str, Any]
    inputs: list[MergeInputRecord]
    base_model: BaseModelIdentity
    output_format: str
    output_rank: int | None = None
    model_uri: str
    model_digest: str
    files: dict[str, FileEntry]
    #: Relative Frobenius error of the re-factorised update per module (0 where exact).
    module_errors: dict[str, float] = Field(default_factory=dict)
    #: Rank of each module of a PEFT adapter output (output.rank auto chooses them per module).
    module_ranks: dict[str, int] = Field(default_factory=dict)
    #: spec.search: what the search evaluated and chose (method and parameters above are the chosen ones).
    search: SearchRecord | None = None
    #: Classifier heads merged by label support: per label, the languages whose head rows went into that label's row,
    #: with their training examples of it (``{}``: no expert had one, so the row is the language-weighted average).
    #: None when the heads are the language-weighted average (no heads, or an expert without label counts).
    head_support: dict[str, dict[str, int]] | None = None
    #: The trunk adapter the inputs branched from and merged relative to (``uri``, ``digest``); None without one.
    reference: dict[str, str | None] | None = None
    #: Per-language evaluation of the merged model.
    evaluation: dict[str, Metrics] = Field(default_factory=dict)
    #: Each language's expert alone on the same data (from the expert's adapter manifest), for the quality gate.
    expert_metrics: dict[str, Metrics] = Field(default_factory=dict)
    #: The base model before fine-tuning on the same data: the gate's floor (empty in manifests written before it).
    base_metrics: dict[str, Metrics] = Field(default_factory=dict)
    #: Figures read from the MergedModel's evaluation cache instead of evaluated again (``base:<language>``,
    #: ``expert:<language>``): the same model on the same examples as in an earlier merge.
    evaluation_cached: list[str] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    cost: Cost
    versions: Versions
    image: str | None = None
    started_at: str
    finished_at: str


class ProgressRecord(Record):
    """Live progress of a Job, overwritten every few steps."""

    fingerprint: str
    stage: str = "training"
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    attempt: int | None = None
    updated_at: str = Field(default_factory=utcnow)


#: ``FailureRecord.error_class`` of an attempt that found other data than the operator listed and committed the
#: adapter of the data it read under that data's fingerprint: not a failure, a cue to list the data again.
DATA_CHANGED = "DataChanged"
#: ``FailureRecord.error_class`` of an attempt whose Job or TrainJob failed after its trainer stopped on SIGTERM with
#: a checkpoint (a preemption, a drained node): a disruption, not counted against ``retry.limit``.
DISRUPTED = "Disrupted"
#: ``FailureRecord.error_class`` of an attempt whose trained adapter collapsed (a classifier predicting one label for
#: nearly every input, a loss at the label-frequency baseline, a causal LM not below its base): nothing was committed,
#: and the next attempt trains with another seed (:func:`attempt_seed`). Counted against ``retry.limit``.
COLLAPSED = "Collapsed"
#: How much higher the seed of an attempt is per earlier attempt of its fingerprint that collapsed.
RESEED_STEP = 1000


class FailureRecord(Record):
    """Why a Job failed: the operator shows ``message`` in the custom resource's status."""

    fingerprint: str
    error_class: str
    message: str
    traceback_tail: str = ""
    #: False for errors that a retry cannot fix (bad data, bad spec).
    retryable: bool = True
    attempt: int | None = None
    at: str = Field(default_factory=utcnow)
    #: The attempt ended because its pods were disrupted (preempted, drained) after the trainer saved a checkpoint:
    #: the next attempt starts at once and resumes; it does not count against ``retry.limit``.
    disruption: bool = False
    #: The training seed the attempt used (recorded for a :data:`COLLAPSED` attempt).
    seed: int | None = None


def collapsed_attempts(records: Mapping[int, FailureRecord], before: int) -> int:
    """How many attempts numbered below ``before`` have a failure record saying their adapter collapsed."""
    return sum(1 for attempt, record in records.items() if attempt < before and record.error_class == COLLAPSED)


def attempt_seed(seed: int, records: Mapping[int, FailureRecord], attempt: int) -> int:
    """The training seed of ``attempt`` of a fingerprint: ``seed`` (``spec.training.seed``) plus
    :data:`RESEED_STEP` for every earlier attempt whose failure record (``records``: attempt -> record, as in S3)
    says :data:`COLLAPSED`. The same records give the same seed: the trainer, a restarted pod and the operator's
    history agree without anything else being stored."""
    return seed + RESEED_STEP * collapsed_attempts(records, attempt)


class PreemptionRecord(Record):
    """``preemptions/attempt-<n>.json``: attempt ``n`` stopped on SIGTERM after saving the checkpoint of ``step``.
    Rank 0 writes it as the trainer exits 3 and deletes it when the same attempt trains again, so it stands only
    while the attempt's last run ended that way."""

    fingerprint: str
    attempt: int
    step: int
    reason: str = "SIGTERM"
    at: str = Field(default_factory=utcnow)


class CheckpointPointer(Record):
    step: int
    uri: str
    at: str = Field(default_factory=utcnow)


class OwnerRecord(Record):
    """``.langmerge-owner.json``: the one custom resource that may write, pin and delete under a prefix."""

    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str
    created_at: str = Field(default_factory=utcnow)

    def same_object(self, other: OwnerRecord) -> bool:
        return (self.kind, self.namespace, self.name, self.uid) == (other.kind, other.namespace, other.name, other.uid)

    def describe(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name} (uid {self.uid or 'unknown'})"


class PublishedRevision(Record):
    """``current.json`` and each ``revisions/<n>.json``: a published revision of a merged model."""

    revision: int
    fingerprint: str
    model_uri: str
    manifest_uri: str
    output_format: str
    inputs: list[MergeInputRecord]
    metrics: dict[str, Metrics] = Field(default_factory=dict)
    published_at: str = Field(default_factory=utcnow)
    #: merged, adopted or rollback.
    reason: Annotated[str, Field(default="merged")] = "merged"
    #: For a rollback: the revision whose merge output is published again.
    rollback_of: int | None = None
    #: The revision ``current.json`` named when this one was published (0: none). Following it from
    #: ``current.json`` gives the published history; a claimed number no ``current.json`` ever named (a writer
    #: that crashed between claiming and publishing) is not on that chain.
    previous: int | None = None
    #: Each language's expert alone (the merge manifest's figures), so the quality-gate view needs no manifest read.
    expert_metrics: dict[str, Metrics] = Field(default_factory=dict)
    #: The base model before fine-tuning on the same data (the gate's floor); empty in older records.
    base_metrics: dict[str, Metrics] = Field(default_factory=dict)
    #: What the merge Job consumed, and its name (for the status history).
    cost: Cost | None = None
    job: str | None = None
    #: A PEFT adapter output's errors and ranks, and a merge search's record (from the merge manifest).
    refactorization: RefactorSummary | None = None
    search: SearchRecord | None = None

    def previous_revision(self) -> int | None:
        """:attr:`previous` (None for the first revision), or for records written before it existed, the number
        below."""
        if self.previous is not None:
            return self.previous or None
        return self.revision - 1 if self.revision > 1 else None


class JointBaseline(Record):
    """A measured retrain of ONE model jointly on every language of a task (the alternative langmerge avoids), so
    that cost views compare maintenance updates against a measurement instead of an estimate."""

    kind: Literal["joint-baseline"] = "joint-baseline"
    schema_version: int = SCHEMA_VERSION
    task: str
    languages: list[str]
    #: Mean over the measured runs.
    wall_seconds: float
    cpu_seconds: float = 0.0
    gpu_seconds: float = 0.0
    runs: int = 1
    tokens: int | None = None
    examples: int | None = None
    device: str = "cpu"
    #: Who measured it, e.g. "langmerge bench".
    source: str
    measured_at: str = Field(default_factory=utcnow)
