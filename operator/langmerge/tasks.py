"""Task documents: what the operator hands a Job's trainer process (``langmerge-trainer <verb> --task <json>``).

The operator builds them; the trainer parses them with the same models. They carry everything the Job needs to be
reproducible from its manifest alone: fingerprint, output prefix, and the digests the fingerprint was computed from.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from langmerge.api.expert import Dataset, LanguageExpertSpec, Metrics, TaskType
from langmerge.api.merged import Evaluation, Output
from langmerge.artifacts import BaseModelIdentity


class Task(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=False, exclude_none=True)


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
