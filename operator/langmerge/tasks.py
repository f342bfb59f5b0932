"""Task documents: what the operator hands a Job's trainer process (``langmerge-trainer <verb> --task <json>``).

The operator builds them; the trainer parses them with the same models. They carry everything the Job needs to be
reproducible from its manifest alone: fingerprint, output prefix, and the digests the fingerprint was computed from.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from langmerge.api.expert import Dataset, LanguageExpertSpec, Metrics, TaskType
from langmerge.api.merged import Evaluation, Output, Search
from langmerge.artifacts import BaseModelIdentity


class Task(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=False, exclude_none=True)


class AdapterSource(Task):
    """A committed adapter a Job reads: where it is and the digest the operator selected it by (the Job checks it)."""

    uri: str
    digest: str
    #: What it is, for messages: e.g. "the trunk LanguageExpert default/dialog-trunk".
    source: str | None = None


class TrainTask(Task):
    """Train one expert's adapter and commit it under ``output_uri``."""

    fingerprint: str
    output_uri: str
    namespace: str
    name: str
    spec: LanguageExpertSpec
    base_model: BaseModelIdentity
    data_digest: str
    eval_data_digest: str | None = None
    image: str | None = None
    #: Attempt number (1 for the first Job of a fingerprint); failure records are kept per attempt.
    attempt: int = 1
    #: Keep the resumable checkpoints in S3 after the adapter is committed (default: delete them then).
    keep_checkpoints: bool = False
    #: spec.initFrom: the trunk's committed adapter that training starts from (its LoRA factors and head).
    init_adapter: AdapterSource | None = None


class MergeTaskInput(Task):
    expert: str
    language: str
    adapter_uri: str
    adapter_digest: str
    weight: float = 1.0
    #: The expert's held-out data, for the per-language evaluation of the merged model.
    dataset: Dataset
    #: The expert's own figures on that data (from its adapter manifest); the merge Job re-evaluates the expert on
    #: exactly the examples it evaluates the merged model on, so this is a fallback when evaluation is disabled.
    expert_metrics: Metrics | None = None
    #: The expert's training.maxSeqLength: evaluation truncates the same way training did.
    max_seq_length: int = 1024
    #: The expert's taskType and, for a sequence classifier, its label set (evaluation and head merging use them).
    task_type: TaskType = TaskType.CAUSAL_LM
    labels: list[str] | None = None
    #: A classifier's training examples per label (from its adapter manifest; 0: the expert never saw the label):
    #: the merge weighs each label's head row by them. None: unknown (an older adapter), heads average by weight.
    label_counts: dict[str, int] | None = None


class MergeTask(Task):
    """Merge adapters, evaluate the result per language and commit it under ``output_uri``."""

    fingerprint: str
    output_uri: str
    namespace: str
    name: str
    method: str
    parameters: dict[str, Any]
    base_model: BaseModelIdentity
    inputs: list[MergeTaskInput] = Field(min_length=1)
    output: Output
    evaluation: Evaluation
    image: str | None = None
    attempt: int = 1
    #: spec.search: choose method and parameters on each language's validation split first (method and parameters
    #: above are the starting point).
    search: Search | None = None
    #: spec.trunk: the adapter the inputs branched from; they merge relative to it (its update counted once).
    reference: AdapterSource | None = None
    #: Where the gate keeps the base's and each expert's figures between merges (artifacts.evaluation_cache_uri);
    #: None: evaluate everything every time.
    evaluation_cache_uri: str | None = None


#: Figures ``langmerge try`` shows beside the answers: eval loss for causal LMs, accuracy for classifiers.
EVAL_LOSS = "eval loss"
ACCURACY = "accuracy"


class TryLanguage(Task):
    """One language of ``langmerge try``: its expert's adapter and where its held-out inputs come from."""

    language: str
    #: The LanguageExpert's name (None when the revision's expert no longer exists and was not asked for).
    expert: str | None = None
    #: The expert's committed adapter folder (None: no expert column for this language).
    adapter_uri: str | None = None
    #: The expert's data: the held-out split gives the inputs (None: only ``TryTask.inputs`` can be shown).
    dataset: Dataset | None = None
    max_seq_length: int = 1024
    #: Why something is missing (shown above the language's rows), e.g. a deleted expert.
    note: str | None = None
    #: Held-out figures of ``TryTask.metric`` to show beside the outputs, e.g. {"expert": 2.21, "merged": 2.25}.
    figures: dict[str, float] = Field(default_factory=dict)


class TryTask(Task):
    """``langmerge-trainer try``: load the published merged model (and the base, and each language's expert) from S3
    the way a serving process would, and show their outputs side by side on a few inputs per language."""

    #: "MergedModel" or "LanguageExpert": what NAME named.
    kind: str
    namespace: str
    name: str
    #: The published revision shown (MergedModel only).
    revision: int | None = None
    #: The merge method and output format, for the heading (MergedModel only).
    method: str | None = None
    #: The base model's S3 folder, and the digest the merge used (None: its listing digest now keys the cache).
    base_uri: str
    base_digest: str | None = None
    #: The merged model's folder (a PEFT adapter, or full weights) and its format (MergedModel only).
    merged_uri: str | None = None
    merged_format: str | None = None
    languages: list[TryLanguage] = Field(min_length=1)
    #: A sequence classifier's label set (None: causal LMs, whose answers are generated text).
    labels: list[str] | None = None
    #: The figure in ``TryLanguage.figures``.
    metric: str = EVAL_LOSS
    #: The user's own inputs (``--input``); empty: each language's held-out inputs.
    inputs: list[str] = Field(default_factory=list)
    #: Held-out inputs per language.
    examples: int = Field(default=3, ge=1, le=100)
    max_new_tokens: int = Field(default=32, ge=1, le=1024)
    #: Which models to show, in this order: base, expert, merged.
    show: list[str] = Field(default_factory=lambda: ["base", "expert", "merged"])
