"""The local merge config (``merge-local CONFIG.yaml OUT``), validated by the same models as the ``MergedModel`` API.

Example (keys in camelCase or snake_case)::

    name: es-it-pt                     # optional: the manifest's name (default: the config file's stem)
    baseModel: s3://models/tiny-llama  # a local folder or an s3:// prefix
    adapters:
      - {language: es, path: s3://artifacts/experts/default/es/0123abcd/adapter}
      - {language: it, path: ./adapters/it, weight: 0.5}
    method: ties
    parameters: {density: 1.0, lambda: 1.0, excludeModules: ["lm_head"]}
    output: {format: peft-adapter, rank: auto, maxRelativeError: 0.01}  # or {format: full-weights}
    # with --search: each adapter's `validation: <.jsonl file | folder | s3:// prefix>`, and optionally
    # search: {methods: [ties, linear], maxCandidates: 20}, metric: evalLoss | accuracy, labels: [...]
    # classifier adapters: `labels: [...]` and each adapter's `labelCounts: {label: examples}` (from its manifest)
    # merge each label's head row by label support (see langmerge_trainer.merge.engine.merged_heads)

``parameters`` is the API's ``MergeParameters`` and is checked against the method exactly as a ``MergedModel`` spec is
(:meth:`MergeConfig.spec` builds one), so a parameter that does not apply to the method is an error, not ignored.
Relative local paths are relative to the config file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from langmerge.api.common import BaseModelRef
from langmerge.api.expert import LANGUAGE_PATTERN
from langmerge.api.merged import (
    ExpertSelection,
    GateMetric,
    MergedModelSpec,
    MergeParameters,
    Output,
    OutputFormat,
    Search,
)


class ConfigError(ValueError):
    """The merge config is invalid (the message lists every problem)."""


class _ConfigModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, use_enum_values=True
    )


class AdapterEntry(_ConfigModel):
    language: Annotated[str, Field(pattern=LANGUAGE_PATTERN, description="BCP-47 tag of the adapter's language.")]
    path: Annotated[str, Field(min_length=1, description="Adapter folder: a local path or an s3:// prefix.")]
    weight: Annotated[float | None, Field(default=None, ge=0, le=1000, description="Weight (default 1.0).")] = None
    validation: Annotated[
        str | None,
        Field(
            default=None,
            description="--search: this language's validation examples: a .jsonl file, a folder of them or an s3:// "
            "prefix (the same line formats as an expert's data).",
        ),
    ] = None
    label_counts: Annotated[
        dict[str, Annotated[int, Field(ge=0)]] | None,
        Field(
            default=None,
            description="A classifier adapter's training examples per label (its adapter manifest's label_counts; "
            "needs `labels:`). With every adapter's counts, each label's head row is the average of the adapters' "
            "rows weighted by weight x examples of that label.",
        ),
    ] = None


class OutputEntry(_ConfigModel):
    format: OutputFormat = OutputFormat.PEFT_ADAPTER
    rank: Annotated[int, Field(ge=1, le=8192)] | Literal["auto"] = "auto"
    max_relative_error: Annotated[float, Field(default=0.01, ge=0, le=1)] = 0.01
    max_rank: Annotated[int | None, Field(default=None, ge=1, le=8192)] = None
    shard_size_mb: Annotated[int, Field(default=2048, ge=16, le=65536)] = 2048


class MergeConfig(_ConfigModel):
    name: Annotated[str | None, Field(default=None, description="Name recorded in the manifest.")] = None
    base_model: Annotated[str, Field(min_length=1, description="Base model folder: a local path or s3:// prefix.")]
    adapters: Annotated[list[AdapterEntry], Field(min_length=1)]
    method: str = "ties"
    parameters: Annotated[MergeParameters, Field(default_factory=MergeParameters)]
    output: Annotated[OutputEntry, Field(default_factory=OutputEntry)]
    #: --search: the search space and budget (defaults: the MergedModel's spec.search defaults).
    search: Annotated[Search | None, Field(default=None)] = None
    #: --search: the search's metric (evalLoss for causal LMs; accuracy or macroF1 for classifiers).
    metric: GateMetric = GateMetric.EVAL_LOSS
    #: --search and labelCounts: a sequence classifier's labels (the adapters' experts' label list).
    labels: Annotated[list[str] | None, Field(default=None, min_length=2)] = None
    #: --search: validation examples are truncated to this many tokens, as the experts' training did.
    max_seq_length: Annotated[int, Field(default=1024, ge=8, le=131072)] = 1024

    @model_validator(mode="after")
    def _consistent(self) -> MergeConfig:
        languages = [a.language for a in self.adapters]
        duplicates = sorted({lang for lang in languages if languages.count(lang) > 1})
        if duplicates:
            raise ValueError(f"more than one adapter for language(s) {', '.join(duplicates)}")
        unknown = sorted(set(self.parameters.weights) - set(languages))
        if unknown:
            raise ValueError(f"parameters.weights names languages without an adapter: {', '.join(unknown)}")
        counted = [a for a in self.adapters if a.label_counts is not None]
        if counted and not self.labels:
            raise ValueError("adapters[].labelCounts needs `labels:` (the order of the classifier head's rows)")
        for a in counted:
            strange = sorted(set(a.label_counts or {}) - set(self.labels or []))
            if strange:
                raise ValueError(f"{a.language}: labelCounts names labels not in `labels:`: {', '.join(strange)}")
        self.spec()  # the API's own checks: method known, parameters fit the method
        return self

    def spec(self) -> MergedModelSpec:
        """The equivalent ``MergedModel`` spec (placeholder locations): the API validates method and parameters."""
        return MergedModelSpec(
            base_model=BaseModelRef(uri="s3://merge-local/base"),
            experts=ExpertSelection(names=["merge-local"]),
            method=self.method,
            parameters=self.parameters,
            output=Output(
                uri="s3://merge-local/output",
                format=self.output.format,
                rank=self.output.rank,
                max_relative_error=self.output.max_relative_error,
                max_rank=self.output.max_rank,
                shard_size_mb=self.output.shard_size_mb,
            ),
        )

    def effective_parameters(self) -> dict[str, Any]:
        """Exactly what a merge Job gets: ``MergedModelSpec.effective_parameters()``."""
        return self.spec().effective_parameters()


def is_s3(location: str) -> bool:
    return location.startswith("s3://")


def load_config(path: Path) -> MergeConfig:
    """Read and validate a merge config; local paths become absolute (relative to the config's folder)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        config = MergeConfig.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()
        )
        raise ConfigError(f"{path}: {problems}") from err
    root = path.resolve().parent

    def absolute(location: str) -> str:
        return location if is_s3(location) else str((root / Path(location).expanduser()).resolve())

    return config.model_copy(
        update={
            "base_model": absolute(config.base_model),
            "adapters": [
                a.model_copy(
                    update={"path": absolute(a.path), "validation": absolute(a.validation) if a.validation else None}
                )
                for a in config.adapters
            ],
        }
    )
