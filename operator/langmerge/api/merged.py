"""``MergedModel``: one multilingual model merged from a set of LanguageExperts."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from langmerge.api.common import (
    IMAGE_PATTERN,
    NAME_PATTERN,
    S3_URI_PATTERN,
    ApiModel,
    BaseModelRef,
    Condition,
    Health,
    LabelSelector,
    OnChange,
    Resources,
    StatusModel,
)
from langmerge.api.expert import LANGUAGE_PATTERN, InitFrom, Metrics, Retry
from langmerge.api.serving import RUNTIME_FORMATS, ServingRuntime, ServingStatus, ServingTarget, unique_targets
from langmerge.merge_catalogue import (
    METHOD_NAMES,
    METHODS,
    KnotsMerge,
    Rescale,
    allowed_parameters,
    effective_method_parameters,
)


class ExpertSelection(ApiModel):
    """Which LanguageExperts (in the MergedModel's namespace) are merged: a label selector or a list of names."""

    selector: Annotated[
        LabelSelector | None, Field(default=None, description="Label selector over LanguageExperts.")
    ] = None
    names: Annotated[
        list[Annotated[str, Field(pattern=NAME_PATTERN, max_length=253)]] | None,
        Field(default=None, min_length=1, description="Explicit LanguageExpert names."),
    ] = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ExpertSelection:
        if (self.selector is None) == (self.names is None):
            raise ValueError("set exactly one of experts.selector and experts.names")
        return self


class MergeParameters(ApiModel):
    """Method parameters. Each method accepts only the ones it uses (see the method's description)."""

    weights: Annotated[
        dict[Annotated[str, Field(pattern=LANGUAGE_PATTERN)], Annotated[float, Field(ge=0, le=1000)]],
        Field(
            default_factory=dict,
            description="Per-language weights (BCP-47 tag -> weight >= 0); languages not listed get 1.0.",
        ),
    ]
    density: Annotated[
        float | None,
        Field(
            default=None,
            gt=0,
            le=1,
            description="ties, dare_*, magnitude_prune, knots: share of each update's entries kept "
            "(ties default 1.0, dare default 0.5).",
        ),
    ] = None
    lambda_: Annotated[
        float | None,
        Field(
            default=None,
            alias="lambda",
            gt=0,
            le=100,
            description="task_arithmetic, ties, dare_*, magnitude_prune, knots, tsv, iso_c, iso_cts: scale of the "
            "merged update (the TSV and Iso papers' alpha; default 1.0).",
        ),
    ] = None
    seed: Annotated[
        int | None, Field(default=None, ge=0, le=2**31 - 1, description="dare_*: random seed (default 0).")
    ] = None
    knots_merge: Annotated[
        KnotsMerge | None,
        Field(default=None, description="knots: how coordinates are merged in the shared basis (default ties)."),
    ] = None
    normalize: Annotated[
        bool | None,
        Field(
            default=None,
            description="ties, dare_*, breadcrumbs*, della*: divide the combined entries by the weight behind them "
            "(a mean) instead of summing them (ties, dare_ties, della default true; the others false).",
        ),
    ] = None
    rescale: Annotated[
        Rescale | None,
        Field(
            default=None,
            description="dare_*, della*: rescale kept entries by their inverse keep probability (inverse-density; "
            "dare default), to keep each tensor's L1 norm (l1; della default, mergekit's rescale) or not (none).",
        ),
    ] = None
    gamma: Annotated[
        float | None,
        Field(
            default=None,
            ge=0,
            lt=1,
            description="breadcrumbs*: share of the largest-magnitude entries dropped as outliers (default 0.01).",
        ),
    ] = None
    epsilon: Annotated[
        float | None,
        Field(
            default=None,
            gt=0,
            lt=0.5,
            description="della*: keep probabilities range over density +- epsilon by magnitude rank (default 0.15).",
        ),
    ] = None
    select_topk: Annotated[
        float | None,
        Field(
            default=None,
            gt=0,
            le=1,
            description="sce: share of entries kept, those that vary most across the updates (default 1.0).",
        ),
    ] = None
    filter_wise: Annotated[
        bool | None,
        Field(default=None, description="model_stock: one interpolation factor per row instead of per tensor."),
    ] = None
    sv_fraction: Annotated[
        float | None,
        Field(
            default=None,
            gt=0,
            le=1,
            description="tsv: share of each update's singular components kept, the largest first (of its rank; at "
            "least 1, at most min(rows, cols)/N per update so that the kept ranks fit the module; default 1.0).",
        ),
    ] = None
    common_space_fraction: Annotated[
        float | None,
        Field(
            default=None,
            gt=0,
            le=1,
            description="iso_cts: share of the merged rank given to the common subspace (the top directions of the "
            "summed updates); the rest is split evenly between the updates' task-specific directions (default 0.8; "
            "1.0 is iso_c).",
        ),
    ] = None
    include_modules: Annotated[
        list[str],
        Field(
            default_factory=list,
            description="Regular expressions over module names; when set, only matching modules are merged.",
        ),
    ]
    exclude_modules: Annotated[
        list[str],
        Field(default_factory=list, description="Regular expressions over module names left out of the merge."),
    ]

    @field_validator("include_modules", "exclude_modules")
    @classmethod
    def _regular_expressions(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {err}") from None
        return value


class OutputFormat(StrEnum):
    PEFT_ADAPTER = "peft-adapter"
    FULL_WEIGHTS = "full-weights"


class Output(ApiModel):
    """Where and how the merged model is published."""

    uri: Annotated[
        str,
        Field(
            description="S3 prefix owned by this MergedModel: revisions are written under it, and current.json "
            "points at the published one.",
            pattern=S3_URI_PATTERN,
            max_length=1024,
        ),
    ]
    format: Annotated[
        OutputFormat,
        Field(
            default=OutputFormat.PEFT_ADAPTER,
            description="peft-adapter: one LoRA adapter (loadable by PeftModel.from_pretrained); full-weights: base + "
            "merged update as sharded safetensors (loadable by AutoModelForCausalLM.from_pretrained).",
        ),
    ] = OutputFormat.PEFT_ADAPTER
    rank: Annotated[
        Annotated[int, Field(ge=1, le=8192)] | Literal["auto"],
        Field(
            default="auto",
            description="peft-adapter: rank of the re-factorised adapter. auto (default): per module, exact where "
            "the method's result is low rank (the sum of the input ranks), otherwise the smallest rank whose "
            "relative error is at most maxRelativeError (up to maxRank). A number: that rank for every module.",
        ),
    ] = "auto"
    max_relative_error: Annotated[
        float,
        Field(
            default=0.01,
            ge=0,
            le=1,
            description="peft-adapter: largest relative Frobenius error of any module's re-factorised update "
            "(||B A - D|| / ||D||). A merge whose adapter would exceed it fails with the worst module named; "
            "full-weights output is always exact.",
        ),
    ] = 0.01
    max_rank: Annotated[
        int | None,
        Field(
            default=None,
            ge=1,
            le=8192,
            description="peft-adapter with rank auto: the highest rank a module may get. Default: the rank at which "
            "a module's adapter factors are as large as its dense update (rows*cols/(rows+cols)); above it, "
            "full-weights output is the smaller and exact choice.",
        ),
    ] = None
    shard_size_mb: Annotated[
        int, Field(default=2048, ge=16, le=65536, description="full-weights: maximum shard size in MiB.")
    ] = 2048


class GateMetric(StrEnum):
    EVAL_LOSS = "evalLoss"
    TOKEN_ACCURACY = "tokenAccuracy"
    #: sequence-classification experts.
    ACCURACY = "accuracy"
    MACRO_F1 = "macroF1"


#: Gate metrics whose regression is measured in absolute points (a difference of shares), not relative.
ABSOLUTE_GATE_METRICS = frozenset({GateMetric.ACCURACY, GateMetric.MACRO_F1})


class GateFloor(StrEnum):
    #: The merged model must be at least as good as the base model on every language.
    BASE = "base"
    NONE = "none"


class Evaluation(ApiModel):
    """The quality gate run before publishing."""

    enabled: Annotated[bool, Field(default=True, description="Evaluate per language and gate publishing.")] = True
    metric: Annotated[
        GateMetric,
        Field(
            default=GateMetric.EVAL_LOSS,
            description="Figure compared between the merged model and each expert: evalLoss or tokenAccuracy "
            "(causal-lm), accuracy or macroF1 (sequence-classification; evalLoss works for both).",
        ),
    ] = GateMetric.EVAL_LOSS
    max_regression: Annotated[
        float,
        Field(
            default=0.1,
            ge=0,
            le=100,
            description="Largest allowed regression of the merged model against each expert alone. Relative for "
            "evalLoss and tokenAccuracy (0.1 = eval loss at most 10% higher, token accuracy at most 10% lower); in "
            "absolute points for accuracy and macroF1 (0.02 = at most 2 points lower, e.g. 0.80 -> 0.78).",
        ),
    ] = 0.1
    max_examples: Annotated[
        int, Field(default=512, ge=1, le=1_000_000, description="Evaluation examples per language at most.")
    ] = 512
    floor: Annotated[
        GateFloor,
        Field(
            default=GateFloor.BASE,
            description="base (default): a merged model worse than the base model before fine-tuning on any language "
            "(the gate metric, no tolerance) is never published, whatever maxRegression allows; none: no floor.",
        ),
    ] = GateFloor.BASE


class SearchObjective(StrEnum):
    #: Maximise the worst language's score relative to its own expert.
    WORST = "worst"
    #: Maximise the mean over languages of that relative score.
    MEAN = "mean"


#: Methods a merge search tries by default (each with its defaults first, then density x lambda for the best).
DEFAULT_SEARCH_METHODS = ("ties", "dare_ties", "della", "breadcrumbs_ties", "task_arithmetic", "linear")


class Search(ApiModel):
    """Automatic merge search: candidate merges are evaluated on a validation split of every language (never the
    examples the quality gate uses) and the best one is merged, gated and published."""

    methods: Annotated[
        list[str],
        Field(
            default_factory=lambda: list(DEFAULT_SEARCH_METHODS),
            min_length=1,
            max_length=len(METHOD_NAMES),
            description="Methods tried (each at its defaults; then density x lambda of the best).",
            json_schema_extra={"items": {"type": "string", "enum": list(METHOD_NAMES)}},
        ),
    ]
    densities: Annotated[
        list[Annotated[float, Field(gt=0, le=1)]],
        Field(default_factory=lambda: [0.3, 0.5, 0.7, 1.0], min_length=1, max_length=16),
    ]
    lambdas: Annotated[
        list[Annotated[float, Field(gt=0, le=100)]],
        Field(default_factory=lambda: [0.8, 1.0, 1.2, 1.5, 2.0], min_length=1, max_length=16),
    ]
    weights: Annotated[
        bool, Field(default=True, description="Also search per-language weights around the best candidate.")
    ] = True
    objective: Annotated[
        SearchObjective,
        Field(
            default=SearchObjective.WORST,
            description="worst: maximise the worst language's score relative to its own expert; mean: the mean of "
            "those relative scores (evaluation.metric; absolute points for accuracy and macroF1, relative otherwise).",
        ),
    ] = SearchObjective.WORST
    max_candidates: Annotated[
        int, Field(default=40, ge=1, le=1000, description="Candidates evaluated at most (the budget).")
    ] = 40
    max_seconds: Annotated[
        int, Field(default=1800, ge=10, le=86400, description="Seconds the search may take at most (the budget).")
    ] = 1800
    validation_examples: Annotated[
        int, Field(default=256, ge=8, le=100_000, description="Validation examples per language at most.")
    ] = 256

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(METHOD_NAMES))
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHOD_NAMES)}")
        return list(dict.fromkeys(value))


class Publish(ApiModel):
    keep_revisions: Annotated[
        int,
        Field(
            default=5,
            ge=2,
            le=1000,
            description="Published revisions kept in S3; older merge outputs are deleted (never the current or the "
            "previous one).",
        ),
    ] = 5


def _merge_resources() -> Resources:
    return Resources(gpus=0, cpu="4", memory="32Gi")


class MergedModelSpec(ApiModel):
    """Desired state of a multilingual merged model."""

    base_model: Annotated[BaseModelRef, Field(description="Base model; every selected expert must use the same one.")]
    experts: Annotated[ExpertSelection, Field(description="The LanguageExperts to merge.")]
    method: Annotated[
        str, Field(default="ties", description="Merge method.", json_schema_extra={"enum": list(METHOD_NAMES)})
    ] = "ties"
    parameters: Annotated[MergeParameters, Field(default_factory=MergeParameters, description="Method parameters.")]
    output: Annotated[Output, Field(description="Where the merged model goes.")]
    evaluation: Annotated[Evaluation, Field(default_factory=Evaluation, description="Quality gate.")]
    publish: Annotated[Publish, Field(default_factory=Publish, description="Revision retention.")]
    search: Annotated[
        Search | None,
        Field(
            default=None,
            description="Opt-in automatic merge search over methods, density, lambda and per-language weights; "
            "method and parameters are then the search's starting point.",
        ),
    ] = None
    trunk: Annotated[
        InitFrom | None,
        Field(
            default=None,
            description="The trunk LanguageExpert every selected expert starts from (their spec.initFrom): the "
            "experts merge relative to its adapter (each expert's update minus the trunk's, merged, then the trunk's "
            "added once), and the trunk itself is never merged as a language. An expert that does not start from it "
            "is refused; the merge waits while an expert trains from an older trunk adapter.",
        ),
    ] = None
    pin_revision: Annotated[
        int | None,
        Field(
            default=None,
            ge=1,
            description="Roll back: publish this existing revision again, without merging. Remove it to resume.",
        ),
    ] = None
    require_all_experts: Annotated[
        bool,
        Field(
            default=True,
            description="Wait until every selected expert is Ready; when false, merge the Ready ones and list the "
            "missing ones in status.",
        ),
    ] = True
    settle_seconds: Annotated[
        int,
        Field(
            default=30,
            ge=0,
            le=86400,
            description="Merge only after the inputs have been unchanged this long, so experts finishing close "
            "together give one merge.",
        ),
    ] = 30
    on_change: Annotated[
        OnChange,
        Field(
            default=OnChange.WAIT,
            description="When inputs change while a merge Job runs: wait (let it finish, then merge again) or "
            "restart (cancel it).",
        ),
    ] = OnChange.WAIT
    resources: Annotated[
        Resources, Field(default_factory=_merge_resources, description="Resources of the merge Job (CPU by default).")
    ]
    retry: Annotated[Retry, Field(default_factory=Retry, description="Retries of failed merge Jobs.")]
    image: Annotated[
        str | None,
        Field(
            default=None, description="Merge image; defaults to the operator's trainer image.", pattern=IMAGE_PATTERN
        ),
    ] = None
    suspend: Annotated[bool, Field(default=False, description="Start no new merge Jobs while true.")] = False
    serving: Annotated[
        list[ServingTarget],
        Field(
            default_factory=list,
            max_length=16,
            description="Where each published revision is rolled out: KServe InferenceServices (canary, promotion, "
            "rollback) and CloudEvents sinks. spec.pinRevision moves serving too.",
        ),
    ]

    @field_validator("serving")
    @classmethod
    def _distinct_targets(cls, value: list[ServingTarget]) -> list[ServingTarget]:
        return unique_targets(value)

    @model_validator(mode="after")
    def _servable(self) -> MergedModelSpec:
        for target in self.serving:
            if target.kserve is None:
                continue
            runtime = target.kserve.runtime
            formats = RUNTIME_FORMATS[ServingRuntime(runtime)]
            if str(self.output.format) not in formats:
                raise ValueError(
                    f"serving target {target.key}: the {runtime} runtime cannot load {self.output.format} output "
                    f"(it loads: {', '.join(sorted(formats))}); set spec.output.format to full-weights or use the "
                    "langmerge runtime"
                )
        return self

    @model_validator(mode="after")
    def _parameters_fit_method(self) -> MergedModelSpec:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(METHOD_NAMES)}")
        allowed = allowed_parameters(self.method)
        given = {
            name for name in self.parameters.model_fields_set if getattr(self.parameters, name) not in (None, [], {})
        }
        extra = sorted(given - allowed)
        if extra:
            wire = [MergeParameters.model_fields[n].alias or n for n in extra]
            ok = sorted(MergeParameters.model_fields[n].alias or n for n in allowed)
            raise ValueError(
                f"parameters {', '.join(wire)} do not apply to method {self.method!r} (it accepts: {', '.join(ok)})"
            )
        if self.method.startswith("della"):
            density = self.parameters.density if self.parameters.density is not None else 0.5
            epsilon = self.parameters.epsilon if self.parameters.epsilon is not None else 0.15
            if not (density - epsilon > 0 and density + epsilon < 1):
                raise ValueError(
                    f"{self.method}: density +- epsilon must lie in (0, 1) (density {density}, epsilon {epsilon})"
                )
        return self

    def effective_parameters(self) -> dict[str, Any]:
        """The method's parameters with defaults filled in: exactly what the fingerprint and the engine see."""
        p = self.parameters
        out: dict[str, Any] = {
            "weights": dict(sorted(p.weights.items())),
            "include_modules": list(p.include_modules),
            "exclude_modules": list(p.exclude_modules),
        }
        given = {name: getattr(p, name) for name in METHODS[self.method].parameters}
        given = {k: (str(v.value) if isinstance(v, StrEnum) else v) for k, v in given.items()}
        out.update(effective_method_parameters(self.method, given))
        return out


class MergedPhase(StrEnum):
    PENDING = "Pending"
    WAITING = "Waiting"
    #: The merge Job waits for Kueue's admission (or was preempted by it).
    QUEUED = "Queued"
    MERGING = "Merging"
    READY = "Ready"
    #: The latest merge regressed a language beyond evaluation.maxRegression; the previous revision stays current.
    BLOCKED = "Blocked"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class MergeInput(StatusModel):
    """One expert adapter that went into a merge."""

    expert: str
    language: str
    adapter_uri: str
    adapter_digest: str
    weight: float = 1.0


class LanguageMetrics(StatusModel):
    """The merged model against the expert alone, on one language's held-out split."""

    merged: Annotated[Metrics | None, Field(default=None, description="The merged model.")] = None
    expert: Annotated[Metrics | None, Field(default=None, description="The language's expert alone.")] = None
    base: Annotated[
        Metrics | None, Field(default=None, description="The base model before fine-tuning (the gate's floor).")
    ] = None
    regression: Annotated[
        float | None,
        Field(
            default=None,
            description="Regression of the gate metric (positive = worse): relative for evalLoss and tokenAccuracy, "
            "absolute points for accuracy and macroF1.",
        ),
    ] = None


class PublishRecord(StatusModel):
    """One published revision in the MergedModel's bounded history."""

    revision: int
    fingerprint: str
    uri: str
    published_at: Annotated[str | None, Field(default=None)] = None
    reason: Annotated[str, Field(default="merged", description="merged, adopted or rollback.")] = "merged"
    changed_inputs: Annotated[
        list[str], Field(default_factory=list, description="Experts whose adapter changed, or that were added.")
    ]
    removed_inputs: Annotated[
        list[str],
        Field(
            default_factory=list,
            description="Experts of the previous revision that this one no longer merges (deleted or deselected).",
        ),
    ]
    wall_seconds: Annotated[float | None, Field(default=None, description="Wall seconds of the merge Job.")] = None
    gpu_seconds: Annotated[float | None, Field(default=None)] = None
    cpu_seconds: Annotated[float | None, Field(default=None)] = None
    job: Annotated[str | None, Field(default=None)] = None
    serving: Annotated[
        dict[str, str],
        Field(
            default_factory=dict,
            description="What spec.serving did with this revision, per target (kserve/<name>): e.g. 'Promoted at "
            "<time>' or 'RolledBack at <time>: <why>'.",
        ),
    ]


class RefactorizationStatus(StatusModel):
    """How exactly the published PEFT adapter represents the merged update."""

    max_relative_error: Annotated[float, Field(description="Largest relative Frobenius error over modules.")]
    mean_relative_error: Annotated[float, Field(description="Mean relative error over modules.")]
    worst_module: Annotated[str | None, Field(default=None, description="The module with the largest error.")] = None
    min_rank: Annotated[int | None, Field(default=None)] = None
    max_rank: Annotated[int | None, Field(default=None)] = None
    mean_rank: Annotated[float | None, Field(default=None)] = None


class SearchCandidateStatus(StatusModel):
    method: str
    parameters: Annotated[dict[str, Any], Field(default_factory=dict)]
    objective: float
    #: Per-language score relative to the language's expert on the validation split.
    relative: Annotated[dict[str, float], Field(default_factory=dict)]


class SearchStatus(StatusModel):
    """What the merge search of the published revision chose."""

    objective: str
    candidates: Annotated[int, Field(description="Candidates evaluated.")]
    seconds: float
    stopped: Annotated[str, Field(description="Why the search stopped: exhausted, maxCandidates or maxSeconds.")]
    chosen: SearchCandidateStatus
    default: Annotated[
        SearchCandidateStatus | None, Field(default=None, description="The spec's own method and parameters.")
    ] = None
    top: Annotated[list[SearchCandidateStatus], Field(default_factory=list, description="Best candidates.")]


class MergedModelStatus(StatusModel):
    """Observed state of a MergedModel, written by the operator (a view of S3's current.json and manifests)."""

    phase: Annotated[MergedPhase | None, Field(default=None, description="Summary of the merged model's state.")] = None
    observed_generation: Annotated[int | None, Field(default=None, description="Generation last reconciled.")] = None
    conditions: Annotated[
        list[Condition],
        Field(
            default_factory=list,
            description="Ready, Merging, QualityGate, ExpertsReady, Degraded; LabelsCovered for sequence classifiers "
            "(False, reason LabelNotCovered: no selected expert has a training example of some labels).",
        ),
    ]
    health: Health = None
    revision: Annotated[int | None, Field(default=None, description="Published revision (current.json).")] = None
    fingerprint: Annotated[
        str | None, Field(default=None, description="Merge fingerprint of the published revision.")
    ] = None
    uri: Annotated[str | None, Field(default=None, description="S3 prefix of the published merged model.")] = None
    desired_fingerprint: Annotated[
        str | None, Field(default=None, description="Fingerprint of the inputs the operator is converging to.")
    ] = None
    inputs_changed_at: Annotated[
        str | None, Field(default=None, description="When the inputs last changed (start of the settle window).")
    ] = None
    inputs: Annotated[list[MergeInput], Field(default_factory=list, description="Adapters in the published revision.")]
    missing_experts: Annotated[
        list[str], Field(default_factory=list, description="Selected experts without a Ready adapter.")
    ]
    metrics: Annotated[
        dict[str, LanguageMetrics],
        Field(default_factory=dict, description="Per-language evaluation of the published revision."),
    ]
    refactorization: Annotated[
        RefactorizationStatus | None,
        Field(default=None, description="peft-adapter output: its error against the merged update, and ranks."),
    ] = None
    search: Annotated[
        SearchStatus | None, Field(default=None, description="spec.search: what the published revision chose.")
    ] = None
    active_job: Annotated[str | None, Field(default=None, description="Name of the running merge Job.")] = None
    attempts: Annotated[int, Field(default=0, description="Failed merge attempts for the desired fingerprint.")] = 0
    message: Annotated[str | None, Field(default=None, description="Last error or waiting reason.")] = None
    history: Annotated[
        list[PublishRecord],
        Field(default_factory=list, description="Recent published revisions, newest last (bounded)."),
    ]
    serving: Annotated[
        list[ServingStatus],
        Field(default_factory=list, description="spec.serving: what each target serves, and how its rollout went."),
    ]
    serving_summary: Annotated[
        str | None,
        Field(
            default=None,
            description="One line for the SERVING column: each InferenceService's phase and revision(s), e.g. "
            "'dialog: Canary r3 (r2 serves)'.",
        ),
    ] = None
