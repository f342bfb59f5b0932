"""``LanguageExpert``: one LoRA adapter for one (task, language)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, model_validator

from langmerge.api.common import (
    IMAGE_PATTERN,
    NAME_PATTERN,
    S3_URI_PATTERN,
    ApiModel,
    BaseModelRef,
    Condition,
    Health,
    OnChange,
    Resources,
    StatusModel,
)

#: BCP-47 language tags in their canonical case: language (2-3 letters), optional script, region and variants,
#: e.g. ``en``, ``pt-BR``, ``zh-Hant-TW``, ``sr-Latn``, ``es-419``.
LANGUAGE_PATTERN = r"^[a-z]{2,3}(-[A-Z][a-z]{3})?(-([A-Z]{2}|[0-9]{3}))?(-([a-z0-9]{5,8}|[0-9][a-z0-9]{3}))*$"
#: A task label: lower-case words joined by dashes (it also appears in labels and object names).
TASK_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class DatasetFormat(StrEnum):
    JSONL = "jsonl"


class TaskType(StrEnum):
    """The kind of model an expert trains."""

    #: A causal language model: data lines are prompt/completion pairs or chats; loss on completion tokens.
    CAUSAL_LM = "causal-lm"
    #: A sequence classifier (encoder or decoder base through AutoModelForSequenceClassification): data lines are
    #: ``{"text": ..., "label": ...}`` with the label one of ``spec.labels``.
    SEQUENCE_CLASSIFICATION = "sequence-classification"


#: A class label of a sequence-classification expert.
LABEL_PATTERN = r"^[^\s](.*[^\s])?$"


class Dataset(ApiModel):
    """Where the language's training data lives."""

    uri: Annotated[
        str,
        Field(
            description="S3 prefix of the training data: every *.jsonl object under it is read. Each line is "
            '{"prompt": ..., "completion": ...} or {"messages": [{"role": ..., "content": ...}, ...]} (causal-lm), '
            'or {"text": ..., "label": ...} (sequence-classification).',
            pattern=S3_URI_PATTERN,
            max_length=1024,
        ),
    ]
    format: Annotated[DatasetFormat, Field(default=DatasetFormat.JSONL, description="File format of the data.")] = (
        DatasetFormat.JSONL
    )
    eval_fraction: Annotated[
        float,
        Field(
            default=0.1,
            gt=0,
            le=0.5,
            description="Share of examples held out for evaluation, chosen by a stable hash of each example so that "
            "appended data never moves old examples between the splits. Ignored when evalUri is set.",
        ),
    ] = 0.1
    eval_uri: Annotated[
        str | None,
        Field(default=None, description="Optional S3 prefix of a separate evaluation set.", pattern=S3_URI_PATTERN),
    ] = None
    validation_uri: Annotated[
        str | None,
        Field(
            default=None,
            description="Optional S3 prefix of validation data for a MergedModel's merge search (spec.search), "
            "outside uri (never trained on), and kept apart from the examples the quality gate uses. Without it, a "
            "merge search takes half of the held-out split (by a stable hash) for validation and gates on the other "
            "half.",
            pattern=S3_URI_PATTERN,
        ),
    ] = None
    revision: Annotated[
        str | None,
        Field(
            default=None,
            description="Optional revision label. Bumping it (e.g. from GitOps) retrains at once, without waiting "
            "for the poll interval and settle window.",
            max_length=128,
        ),
    ] = None
    skip_invalid_lines: Annotated[
        bool,
        Field(
            default=False,
            description="Skip and count lines that are not valid examples instead of failing the training run.",
        ),
    ] = False

    @model_validator(mode="after")
    def _validation_apart_from_training(self) -> Dataset:
        if self.validation_uri and _folders_overlap(self.validation_uri, self.uri):
            raise ValueError(
                f"validationUri {self.validation_uri} overlaps uri {self.uri}: every *.jsonl under uri is training "
                "data, so a merge search would validate on examples the expert was trained on; use a prefix outside "
                "uri (and uri outside it)"
            )
        return self


def _folders_overlap(a: str, b: str) -> bool:
    """Whether one S3 prefix is the other or lies under it, folder by folder (``s3://d/x`` and ``s3://d/x2`` do not)."""
    first, second = a.rstrip("/").split("/"), b.rstrip("/").split("/")
    shorter = min(len(first), len(second))
    return first[:shorter] == second[:shorter]


#: A module name or a dot-separated path of them, as torch names submodules (``model.layers.0.self_attn.q_proj``).
MODULE_NAME_PATTERN = r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$"
#: The most optimiser steps a training run can have between checkpoints or progress reports (far beyond any run).
MAX_STEP_INTERVAL = 1_000_000


class Lora(ApiModel):
    """LoRA adapter shape."""

    rank: Annotated[int, Field(default=16, ge=1, le=1024, description="Rank r of the update B A.")] = 16
    alpha: Annotated[
        float, Field(default=32.0, gt=0, le=4096, description="Scaling numerator: the update is (alpha/r) B A.")
    ] = 32.0
    dropout: Annotated[float, Field(default=0.05, ge=0, lt=1, description="Dropout on the adapter's input.")] = 0.05
    target_modules: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=256, pattern=MODULE_NAME_PATTERN)]],
        Field(
            default_factory=lambda: list(DEFAULT_TARGET_MODULES),
            min_length=1,
            max_length=64,
            description="Names (suffixes) of the linear modules that get adapters: module names such as q_proj or "
            "dot-separated paths such as self_attn.q_proj (letters, digits, underscores).",
        ),
    ]


class Parallelism(StrEnum):
    """How several training processes (``resources.gpus`` > 1, or several nodes) share the work."""

    DDP = "ddp"
    FSDP = "fsdp"


class Runtime(StrEnum):
    """What runs an expert's training: a ``batch/v1`` Job (one pod), or a Kubeflow Trainer ``TrainJob`` (one pod
    per node, joined by torchrun's rendezvous)."""

    JOB = "job"
    TRAINJOB = "trainjob"


class Batching(StrEnum):
    LENGTH_GROUPED = "length-grouped"
    PACKED = "packed"
    SHUFFLED = "shuffled"


class Training(ApiModel):
    """Optimisation settings."""

    epochs: Annotated[int, Field(default=2, ge=1, le=100, description="Passes over the training split.")] = 2
    learning_rate: Annotated[float, Field(default=2e-4, gt=0, le=1, description="Peak learning rate (AdamW).")] = 2e-4
    batch_size: Annotated[
        int,
        Field(
            default=8,
            ge=1,
            le=4096,
            description="Examples per optimiser step per training process (one process per GPU). With N processes "
            "an optimiser step sees N x batchSize examples (the effective batch, shown in status.training).",
        ),
    ] = 8
    gradient_accumulation_steps: Annotated[
        int,
        Field(
            default=1,
            ge=1,
            le=1024,
            description="Micro-batches each process splits its batchSize examples into (accumulated per optimiser "
            "step): saves memory without changing the result.",
        ),
    ] = 1
    max_seq_length: Annotated[
        int, Field(default=1024, ge=8, le=131072, description="Longer examples are truncated to this many tokens.")
    ] = 1024
    warmup_ratio: Annotated[
        float, Field(default=0.03, ge=0, le=1, description="Share of steps with linear warm-up.")
    ] = 0.03
    weight_decay: Annotated[float, Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")] = 0.0
    seed: Annotated[
        int, Field(default=42, ge=0, le=2**31 - 1, description="Random seed (data order, dropout, init).")
    ] = 42
    batching: Annotated[
        Batching,
        Field(
            default=Batching.LENGTH_GROUPED,
            description="length-grouped: batches of similar length (less padding); packed: examples concatenated into "
            "full sequences; shuffled: plain random batches.",
        ),
    ] = Batching.LENGTH_GROUPED
    gradient_checkpointing: Annotated[
        bool, Field(default=False, description="Trade compute for memory (does not change the result).")
    ] = False
    parallelism: Annotated[
        Parallelism,
        Field(
            default=Parallelism.DDP,
            description="With several training processes: ddp (data-parallel, every process holds the whole base "
            "model) or fsdp (fully sharded: the base model's blocks are split across the processes, for bases that "
            "do not fit one device). One process ignores it.",
        ),
    ] = Parallelism.DDP
    checkpoint_every_steps: Annotated[
        int,
        Field(
            default=200,
            ge=1,
            le=MAX_STEP_INTERVAL,
            description="Save a resumable checkpoint (adapter, optimiser, step) to S3 every this many steps.",
        ),
    ] = 200
    progress_every_steps: Annotated[
        int,
        Field(
            default=10, ge=1, le=MAX_STEP_INTERVAL, description="Write the progress object to S3 every this many steps."
        ),
    ] = 10
    collapse_check: Annotated[
        bool,
        Field(
            default=True,
            description="Judge the trained adapter on its held-out split before committing it: a collapsed one (a "
            "classifier predicting one label for at least 80% of the inputs while the gold labels are not that "
            "skewed, or with a loss at the label-frequency baseline; a causal LM whose loss is not finite or not "
            "below the base model's) is not committed, the attempt fails (error Collapsed, counted against "
            "retry.limit) and the next attempt trains with seed + 1000 per collapsed attempt. Not part of the "
            "fingerprint.",
        ),
    ] = True


class TrainingResources(Resources):
    """What each pod of the training asks the scheduler for; ``gpus`` > 1 runs one training process per GPU."""

    nodes: Annotated[
        int,
        Field(
            default=1,
            ge=1,
            le=64,
            description="Pods (nodes) the training runs on, each with these resources; > 1 needs runtime trainjob "
            "(Kubeflow Trainer). Processes = nodes x max(1, gpus).",
        ),
    ] = 1

    def processes_per_node(self) -> int:
        """Training processes in one pod: one per GPU, one on CPU."""
        return max(1, self.gpus)

    def processes(self) -> int:
        """Training processes in all: nodes x processes per node."""
        return self.nodes * self.processes_per_node()


class Schedule(ApiModel):
    """How the operator watches the data."""

    poll_interval_seconds: Annotated[
        int, Field(default=300, ge=5, le=86400, description="How often the dataset prefix is listed for changes.")
    ] = 300
    settle_seconds: Annotated[
        int,
        Field(
            default=60,
            ge=0,
            le=86400,
            description="A data change starts training only after the data has been unchanged this long, so a "
            "batch of uploads gives one training Job.",
        ),
    ] = 60
    follow_data: Annotated[
        bool,
        Field(
            default=True,
            description="false: keep the adapter trained on the data as first listed, and do not retrain when the "
            "data changes (a trunk other experts start from: a new trunk adapter retrains every one of them); the "
            "change shows as DataChanged. A spec change (e.g. dataset.revision) trains on the data as it is then.",
        ),
    ] = True


class InitFrom(ApiModel):
    """Another LanguageExpert whose committed adapter this expert starts training from: a trunk."""

    expert: Annotated[
        str,
        Field(
            pattern=NAME_PATTERN,
            max_length=253,
            description="A LanguageExpert in this namespace (typically trained on every language's data) with the same "
            "base model, LoRA shape (rank, alpha, target modules), task type and labels, that does not itself start "
            "from another expert.",
        ),
    ]


class Retry(ApiModel):
    """Retries of failed training Jobs."""

    limit: Annotated[
        int, Field(default=2, ge=0, le=20, description="New Jobs after a failed one, then phase Failed.")
    ] = 2
    backoff_seconds: Annotated[
        int, Field(default=60, ge=0, le=86400, description="Wait before the first retry; doubles each time.")
    ] = 60


class LanguageExpertSpec(ApiModel):
    """Desired state of one language's LoRA expert."""

    language: Annotated[
        str,
        Field(
            description="BCP-47 language tag in canonical case, e.g. en, de, pt-BR, zh-Hant.",
            pattern=LANGUAGE_PATTERN,
            max_length=35,
        ),
    ]
    task: Annotated[
        str,
        Field(description="Task this expert is trained for, e.g. summarization.", pattern=TASK_PATTERN, max_length=63),
    ]
    task_type: Annotated[
        TaskType,
        Field(
            default=TaskType.CAUSAL_LM,
            description="causal-lm (default): a generative model trained on completion tokens; "
            "sequence-classification: a classifier over `labels` (the classifier head is part of the expert).",
        ),
    ] = TaskType.CAUSAL_LM
    labels: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=128, pattern=LABEL_PATTERN)]] | None,
        Field(
            default=None,
            min_length=2,
            max_length=1000,
            description="sequence-classification: the label set, in order (label i is class i). Every data line's "
            "label must be one of them; experts merged together must have the same list.",
        ),
    ] = None
    base_model: Annotated[BaseModelRef, Field(description="The base model the adapter is trained on.")]
    dataset: Annotated[Dataset, Field(description="The language's training data.")]
    lora: Annotated[Lora, Field(default_factory=Lora, description="LoRA shape.")]
    init_from: Annotated[
        InitFrom | None,
        Field(
            default=None,
            description="Start training from another expert's adapter (a trunk) instead of a fresh one: its LoRA "
            "factors and classifier head. Its adapter digest is part of this expert's fingerprint: a new trunk "
            "adapter retrains this expert. Waits while the trunk has no adapter.",
        ),
    ] = None
    training: Annotated[Training, Field(default_factory=Training, description="Optimisation settings.")]
    resources: Annotated[
        TrainingResources,
        Field(default_factory=TrainingResources, description="Resources of the training Job (per node)."),
    ]
    runtime: Annotated[
        Runtime | None,
        Field(
            default=None,
            description="What runs the training: job (a batch/v1 Job) or trainjob (a Kubeflow Trainer TrainJob, "
            "needed for resources.nodes > 1). Default: the operator's setting.",
        ),
    ] = None
    image: Annotated[
        str | None,
        Field(default=None, description="Trainer image; defaults to the operator's setting.", pattern=IMAGE_PATTERN),
    ] = None
    schedule: Annotated[Schedule, Field(default_factory=Schedule, description="Data polling.")]
    retry: Annotated[Retry, Field(default_factory=Retry, description="Retries of failed training Jobs.")]
    on_change: Annotated[
        OnChange,
        Field(
            default=OnChange.WAIT,
            description="When data or spec change while a Job runs: wait (let it finish, then retrain if still "
            "stale) or restart (cancel it and start the new one).",
        ),
    ] = OnChange.WAIT
    suspend: Annotated[bool, Field(default=False, description="Start no new training Jobs while true.")] = False

    @model_validator(mode="after")
    def _labels_fit_task_type(self) -> LanguageExpertSpec:
        if self.task_type == TaskType.SEQUENCE_CLASSIFICATION:
            if not self.labels:
                raise ValueError("taskType sequence-classification needs labels: the list of class labels")
            duplicates = sorted({label for label in self.labels if self.labels.count(label) > 1})
            if duplicates:
                raise ValueError(f"labels must be unique; repeated: {', '.join(duplicates)}")
            if self.training.batching == Batching.PACKED:
                raise ValueError("training.batching packed applies to causal-lm only; use length-grouped or shuffled")
        elif self.labels is not None:
            raise ValueError(f"labels apply only to taskType sequence-classification (this expert is {self.task_type})")
        return self

    @property
    def is_classifier(self) -> bool:
        return self.task_type == TaskType.SEQUENCE_CLASSIFICATION


class ExpertPhase(StrEnum):
    PENDING = "Pending"
    #: The training Job waits for Kueue's admission (or was preempted by it).
    QUEUED = "Queued"
    TRAINING = "Training"
    READY = "Ready"
    FAILED = "Failed"
    SUPERSEDED = "Superseded"
    SUSPENDED = "Suspended"


class Metrics(StatusModel):
    """Evaluation figures on a language's held-out split."""

    eval_loss: Annotated[
        float | None,
        Field(default=None, description="Mean cross-entropy on completion tokens (classification: on the labels)."),
    ] = None
    perplexity: Annotated[float | None, Field(default=None, description="exp(evalLoss).")] = None
    token_accuracy: Annotated[
        float | None, Field(default=None, description="Share of completion tokens predicted exactly (teacher forcing).")
    ] = None
    exact_match: Annotated[
        float | None, Field(default=None, description="Share of examples whose whole completion is predicted exactly.")
    ] = None
    accuracy: Annotated[
        float | None, Field(default=None, description="sequence-classification: share of examples classified right.")
    ] = None
    macro_f1: Annotated[
        float | None,
        Field(
            default=None,
            description="sequence-classification: F1 averaged over the labels (a label never predicted nor present "
            "is left out).",
        ),
    ] = None
    examples: Annotated[int | None, Field(default=None, description="Number of evaluation examples.")] = None
    predictions: Annotated[
        dict[str, int] | None,
        Field(
            default=None,
            description="sequence-classification: how many evaluation examples were predicted as each label (a model "
            "that predicts one label for almost every input has collapsed).",
        ),
    ] = None


class TrainingShape(StatusModel):
    """How the training runs: processes, nodes and the batch one optimiser step sees."""

    runtime: Annotated[str, Field(description="job or trainjob.")]
    nodes: Annotated[int, Field(description="Pods the training runs on.")]
    processes: Annotated[int, Field(description="Training processes in all (nodes x processes per node).")]
    parallelism: Annotated[str | None, Field(default=None, description="ddp or fsdp (several processes).")] = None
    per_device_batch_size: Annotated[
        int, Field(description="Examples per micro-batch per process (batchSize / gradientAccumulationSteps).")
    ]
    gradient_accumulation_steps: Annotated[int, Field(description="Micro-batches per optimiser step per process.")]
    effective_batch_size: Annotated[
        int,
        Field(
            description="Examples per optimiser step, over all processes: batchSize x processes (= per-device batch "
            "x processes x accumulation when batchSize divides evenly)."
        ),
    ]

    @classmethod
    def of(cls, spec: LanguageExpertSpec, runtime: str) -> TrainingShape:
        """The shape of ``spec``'s training under ``runtime``."""
        resources, training = spec.resources, spec.training
        processes = resources.processes()
        return cls(
            runtime=runtime,
            nodes=resources.nodes,
            processes=processes,
            parallelism=str(training.parallelism) if processes > 1 else None,
            per_device_batch_size=max(1, -(-training.batch_size // training.gradient_accumulation_steps)),
            gradient_accumulation_steps=training.gradient_accumulation_steps,
            effective_batch_size=training.batch_size * processes,
        )


class AdapterRef(StatusModel):
    """A trained adapter committed to S3."""

    uri: Annotated[str, Field(description="S3 prefix of the adapter (a PEFT folder).")]
    digest: Annotated[str, Field(description="Content digest of the adapter files.")]
    fingerprint: Annotated[str, Field(description="Training fingerprint it was trained for.")]
    data_digest: Annotated[str | None, Field(default=None, description="Digest of the data it was trained on.")] = None
    metrics: Annotated[Metrics | None, Field(default=None, description="Evaluation on the held-out split.")] = None
    label_counts: Annotated[
        dict[str, int] | None,
        Field(
            default=None,
            description="sequence-classification: training examples per label; a label at 0 is not covered (the "
            "adapter never learned to predict it, and merges take that label's head row from experts that have "
            "examples of it).",
        ),
    ] = None
    trained_at: Annotated[str | None, Field(default=None, description="When the adapter was committed.")] = None
    init_digest: Annotated[
        str | None,
        Field(default=None, description="spec.initFrom: the digest of the trunk adapter this adapter started from."),
    ] = None


class Progress(StatusModel):
    """Live progress of the running training Job, read from its progress object in S3."""

    step: Annotated[int, Field(default=0, description="Optimiser steps done.")] = 0
    total_steps: Annotated[int, Field(default=0, description="Optimiser steps planned.")] = 0
    loss: Annotated[float | None, Field(default=None, description="Recent training loss.")] = None
    tokens_per_second: Annotated[float | None, Field(default=None, description="Training throughput.")] = None
    eta_seconds: Annotated[float | None, Field(default=None, description="Estimated seconds left.")] = None
    updated_at: Annotated[str | None, Field(default=None, description="When the trainer last reported.")] = None


class TrainingRecord(StatusModel):
    """One training run (or adoption of an existing adapter) in the expert's bounded history."""

    fingerprint: str
    data_digest: Annotated[str | None, Field(default=None)] = None
    job: Annotated[str | None, Field(default=None, description="Name of the training Job.")] = None
    result: Annotated[str, Field(description="Succeeded, Failed or Adopted.")]
    started_at: Annotated[str | None, Field(default=None)] = None
    finished_at: Annotated[str | None, Field(default=None)] = None
    wall_seconds: Annotated[float | None, Field(default=None)] = None
    gpu_seconds: Annotated[float | None, Field(default=None, description="GPUs x wall seconds (0 on CPU).")] = None
    cpu_seconds: Annotated[float | None, Field(default=None, description="Process CPU seconds of the trainer.")] = None
    tokens: Annotated[int | None, Field(default=None, description="Tokens trained on.")] = None
    adapter_digest: Annotated[str | None, Field(default=None)] = None
    message: Annotated[str | None, Field(default=None)] = None
    attempt: Annotated[int | None, Field(default=None, description="Attempt number of the fingerprint's Job.")] = None
    seed: Annotated[
        int | None,
        Field(
            default=None,
            description="Training seed the attempt used: training.seed + 1000 per earlier attempt of the fingerprint "
            "that collapsed.",
        ),
    ] = None


class LanguageExpertStatus(StatusModel):
    """Observed state of a LanguageExpert, written by the operator. S3 holds the record; this is a view of it."""

    phase: Annotated[ExpertPhase | None, Field(default=None, description="Summary of the expert's state.")] = None
    observed_generation: Annotated[int | None, Field(default=None, description="Generation last reconciled.")] = None
    conditions: Annotated[
        list[Condition],
        Field(
            default_factory=list,
            description="Ready, Training, DataChanged, Degraded; LabelsCovered for a sequence classifier (False, "
            "reason LabelsMissing: its training data has no example of some labels).",
        ),
    ]
    health: Health = None
    data_digest: Annotated[str | None, Field(default=None, description="Digest of the data seen in S3.")] = None
    data_changed_at: Annotated[
        str | None, Field(default=None, description="When the data digest last changed (start of the settle window).")
    ] = None
    desired_fingerprint: Annotated[
        str | None, Field(default=None, description="Fingerprint of the current spec and settled data.")
    ] = None
    trained_fingerprint: Annotated[
        str | None, Field(default=None, description="Fingerprint of the adapter in status.adapter.")
    ] = None
    adapter: Annotated[AdapterRef | None, Field(default=None, description="The latest committed adapter.")] = None
    active_job: Annotated[str | None, Field(default=None, description="Name of the running training Job.")] = None
    progress: Annotated[Progress | None, Field(default=None, description="Progress of the running Job.")] = None
    training: Annotated[
        TrainingShape | None,
        Field(default=None, description="How the current training runs (processes, nodes, effective batch)."),
    ] = None
    attempts: Annotated[int, Field(default=0, description="Failed attempts for the desired fingerprint.")] = 0
    preemptions: Annotated[
        int,
        Field(
            default=0,
            description="Times Kueue preempted (suspended again) a running training Job of the desired fingerprint; "
            "not failed attempts.",
        ),
    ] = 0
    next_retry_at: Annotated[str | None, Field(default=None, description="When the next retry may start.")] = None
    message: Annotated[str | None, Field(default=None, description="Last error or waiting reason.")] = None
    history: Annotated[
        list[TrainingRecord], Field(default_factory=list, description="Recent training runs, newest last (bounded).")
    ]
