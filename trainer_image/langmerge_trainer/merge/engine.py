"""The streaming merge engine: plan, then merge one module at a time into a PEFT adapter or full merged weights.

I/O lives here; the math lives in :mod:`methods` and :mod:`lowrank`. Memory stays bounded:

* adapters are read one module at a time (positioned reads of that module's two factors);
* a full-weights output streams the base checkpoint tensor by tensor: a tensor that no adapter touches is copied as
  raw bytes in 8 MiB chunks, a merged one is read, upcast to float32 on the device, updated in place
  (``W += B A`` for low-rank results) and written back in the base dtype. Output shards are planned up front and
  written tensor by tensor (:class:`~langmerge_trainer.merge.safetensors_io.SafetensorsWriter`), so neither an input
  nor an output shard is ever held whole: peak memory is about the largest merged tensor (plus the method's
  per-module work space), well under the bound "largest shard + adapters + a small constant";
* everything is written into a temporary sibling folder and renamed into place, so a half-written output is never
  visible under the output's name.

:func:`merge_adapters` is the Python API the merge Job calls; :func:`plan_merge` alone gives the dry-run plan.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from langmerge.store import files_digest
from langmerge_trainer.merge.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, LoraAdapter, load_adapter
from langmerge_trainer.merge.lowrank import (
    Factors,
    adaptive_lowrank,
    auto_lowrank_factors,
    breakeven_rank,
    randomized_lowrank,
    refactor_lowrank,
)
from langmerge_trainer.merge.memory import PeakMemory
from langmerge_trainer.merge.method_math import (
    CPU_BLOCK_ELEMENTS,
    DEVICE_BLOCK_ELEMENTS,
    LowRankDelta,
    MergedDelta,
    MergeMethod,
    get_method,
)
from langmerge_trainer.merge.reference import add_reference, relative
from langmerge_trainer.merge.safetensors_io import (
    DTYPES,
    ITEMSIZE,
    SafetensorsReader,
    SafetensorsWriter,
    TensorInfo,
    file_sha256,
    read_header,
)
from langmerge_trainer.merge.sparsify import derive_seed

PEFT_ADAPTER = "peft-adapter"
FULL_WEIGHTS = "full-weights"
OUTPUT_FORMATS = (PEFT_ADAPTER, FULL_WEIGHTS)
#: Bumped when the engine's results change for the same inputs (part of the local CLI's fingerprint).
ENGINE_VERSION = 1
INDEX = "model.safetensors.index.json"
#: Files of a base model folder that are weights (not copied next to the merged weights).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".part")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


class MergeError(ValueError):
    """The inputs cannot be merged as asked (the message says why)."""


@dataclass(frozen=True)
class AdapterInput:
    """One language's adapter folder. ``weight`` None takes ``parameters['weights'][language]``, else 1.0."""

    language: str
    path: Path
    weight: float | None = None
    #: Where the adapter came from (an s3:// URI), for the report.
    uri: str | None = None
    digest: str | None = None
    #: A sequence classifier's label list: adapters with heads merge only when their lists are identical.
    labels: tuple[str, ...] | None = None
    #: A sequence classifier's training examples per label (the adapter manifest's ``label_counts``; 0: the expert
    #: never saw the label). With every adapter's counts, head rows merge by label support (:func:`merged_heads`).
    label_counts: Mapping[str, int] | None = None


# -- the base checkpoint ---------------------------------------------------------------------------------------------


class BaseCheckpoint:
    """A Hugging Face model folder's safetensors weights, known by their headers only."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / INDEX
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        elif (directory / "model.safetensors").is_file():
            shards = ["model.safetensors"]
        else:
            shards = sorted(p.name for p in directory.glob("*.safetensors"))
        if not shards:
            found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
            raise MergeError(
                f"{directory}: no safetensors weights found (files: {', '.join(found[:10]) or 'none'}); "
                "convert a .bin checkpoint with save_pretrained(safe_serialization=True)"
            )
        self.shards = shards
        self.tensors: list[tuple[str, TensorInfo]] = []
        self.shard_bytes: dict[str, int] = {}
        for shard in shards:
            infos, _ = read_header(directory / shard)
            self.shard_bytes[shard] = (directory / shard).stat().st_size
            self.tensors.extend((shard, info) for info in infos.values())
        self.by_name = {info.name: (shard, info) for shard, info in self.tensors}
        config = directory / "config.json"
        try:
            self.config: dict[str, Any] = json.loads(config.read_text()) if config.is_file() else {}
        except ValueError:
            self.config = {}

    @property
    def tied_embeddings(self) -> bool:
        text = self.config.get("text_config")
        nested = text.get("tie_word_embeddings") if isinstance(text, dict) else None
        return bool(self.config.get("tie_word_embeddings", nested or False))

    @property
    def largest_shard_bytes(self) -> int:
        return max(self.shard_bytes.values())

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for _, info in self.tensors)

    def module_names(self) -> set[str]:
        return {name[: -len(".weight")] for name in self.by_name if name.endswith(".weight")}

    def weight(self, module: str) -> TensorInfo | None:
        found = self.by_name.get(f"{module}.weight")
        return found[1] if found else None


# -- planning --------------------------------------------------------------------------------------------------------


@dataclass
class ModulePlan:
    name: str
    kind: str
    #: Shape of the base weight (rows, columns).
    shape: tuple[int, int]
    transposed: bool
    #: (adapter index, rank) of every adapter that updates the module.
    inputs: list[tuple[int, int]]
    #: The module's name in the base checkpoint when it differs (a task model's adapter on a bare base: the
    #: adapter's ``bert.encoder...`` is the checkpoint's ``encoder...``).
    base_name: str | None = None

    @property
    def input_rank(self) -> int:
        return sum(r for _, r in self.inputs)

    @property
    def checkpoint_name(self) -> str:
        return self.base_name or self.name


@dataclass
class MergePlan:
    """What a merge will do: shown by ``--dry-run``, followed by :func:`execute`."""

    method: str
    method_params: dict[str, Any]
    parameters: dict[str, Any]
    languages: list[str]
    weights: list[float]
    output_format: str
    #: Rank of every module of the PEFT adapter output; None for full weights, and for ``auto`` (per module).
    rank: int | None
    shard_size_mb: float
    device: str
    modules: list[ModulePlan]
    excluded: list[str]
    low_rank_exact: bool
    estimated_peak_bytes: int
    estimated_output_bytes: int
    notes: list[str] = field(default_factory=list)
    #: PEFT adapter output: ranks chosen per module (``auto``), the largest relative error allowed, the cap of ``auto``.
    auto_rank: bool = False
    max_relative_error: float = 0.01
    max_rank: int | None = None
    #: Classifier heads: the label support their rows merge by (None: the language-weighted average).
    head_support: HeadSupport | None = None
    #: The adapter the inputs branched from (a trunk): updates merge relative to it, and it is added back once
    #: (:mod:`langmerge_trainer.merge.reference`). None: updates merge as they are.
    reference: LoraAdapter | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "method_parameters": self.method_params,
            "parameters": self.parameters,
            "inputs": [{"language": lang, "weight": w} for lang, w in zip(self.languages, self.weights, strict=True)],
            "output_format": self.output_format,
            "output_rank": "auto" if self.auto_rank else self.rank,
            "max_relative_error": self.max_relative_error if self.output_format == PEFT_ADAPTER else None,
            "shard_size_mb": self.shard_size_mb if self.output_format == FULL_WEIGHTS else None,
            "device": self.device,
            "modules": [
                {"name": m.name, "shape": list(m.shape), "input_ranks": [r for _, r in m.inputs]} for m in self.modules
            ],
            "excluded_modules": self.excluded,
            "low_rank_exact": self.low_rank_exact,
            "reference": self.reference.path.as_posix() if self.reference is not None else None,
            "head_support": self.head_support.contributors(self.languages, self.weights)
            if self.head_support is not None
            else None,
            "estimated_peak_bytes": self.estimated_peak_bytes,
            "estimated_output_bytes": self.estimated_output_bytes,
            "notes": self.notes,
        }

    def describe(self, max_modules: int = 12) -> str:
        lines = [
            f"method:      {self.method} {json.dumps(self.method_params, sort_keys=True)}",
            "inputs:      "
            + ", ".join(f"{lang} (w={w:g})" for lang, w in zip(self.languages, self.weights, strict=True)),
            f"output:      {self.output_format}"
            + (
                f", shards <= {self.shard_size_mb} MiB"
                if self.output_format == FULL_WEIGHTS
                else f", rank {'auto' if self.auto_rank else self.rank}, max relative error {self.max_relative_error:g}"
            ),
            f"device:      {self.device}",
            f"modules:     {len(self.modules)} merged, {len(self.excluded)} excluded",
        ]
        for m in self.modules[:max_modules]:
            ranks = "+".join(str(r) for _, r in m.inputs)
            lines.append(f"  {m.name}  {m.shape[0]}x{m.shape[1]}  ranks {ranks}")
        if len(self.modules) > max_modules:
            lines.append(f"  ... {len(self.modules) - max_modules} more")
        lines.append(f"memory:      ~{_mib(self.estimated_peak_bytes)} peak working set (estimate)")
        lines.append(f"output size: ~{_mib(self.estimated_output_bytes)}")
        lines.extend(f"note:        {n}" for n in self.notes)
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None: CUDA when available, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MergeError("device cuda was asked for but CUDA is not available")
    return resolved


def resolve_weights(inputs: Sequence[AdapterInput], weights: Mapping[str, float]) -> list[float]:
    """Per-adapter weights: ``parameters['weights'][language]``, else the input's own weight, else 1.0."""
    languages = [a.language for a in inputs]
    duplicates = sorted({lang for lang in languages if languages.count(lang) > 1})
    if duplicates:
        raise MergeError(f"more than one adapter for language(s) {', '.join(duplicates)}")
    unknown = sorted(set(weights) - set(languages))
    if unknown:
        raise MergeError(f"weights name languages without an adapter: {', '.join(unknown)}")
    out = []
    for a in inputs:
        given = weights.get(a.language)
        if given is not None and a.weight is not None and float(given) != float(a.weight):
            raise MergeError(f"{a.language}: weight {a.weight} on the adapter but {given} in parameters.weights")
        w = float(given if given is not None else a.weight if a.weight is not None else 1.0)
        if w < 0 or w != w:
            raise MergeError(f"{a.language}: weight must be >= 0, got {w}")
        out.append(w)
    return out


def select_modules(names: Sequence[str], include: Sequence[str], exclude: Sequence[str]) -> tuple[list[str], list[str]]:
    """Modules kept and left out by the include/exclude regular expressions (``re.search`` on the module name)."""
    try:
        inc = [re.compile(p) for p in include]
        exc = [re.compile(p) for p in exclude]
    except re.error as err:
        raise MergeError(f"bad module regular expression: {err}") from err
    kept: list[str] = []
    dropped: list[str] = []
    for name in names:
        ok = (not inc or any(p.search(name) for p in inc)) and not any(p.search(name) for p in exc)
        (kept if ok else dropped).append(name)
    return kept, dropped


def check_heads(adapters: Sequence[LoraAdapter], inputs: Sequence[AdapterInput]) -> None:
    """Classifier heads merge only between adapters with the same label list and the same head tensors."""
    label_lists = {a.labels for a in inputs}
    if len(label_lists) > 1:
        shown = "; ".join(f"{a.language}: {list(a.labels) if a.labels else 'none'}" for a in inputs)
        raise MergeError(f"the adapters classify over different label sets ({shown}); merge one label set at a time")
    shapes = [
        {name: adapter.reader.tensors[key].shape for name, key in sorted(adapter.heads.items())} for adapter in adapters
    ]
    for adapter, heads in zip(adapters[1:], shapes[1:], strict=True):
        if heads != shapes[0]:
            raise MergeError(
                f"adapter {adapter.language} has classifier head {heads or 'none'}, {adapters[0].language} has "
                f"{shapes[0] or 'none'}: heads of different label sets (or a classifier and a causal LM) cannot merge"
            )


@dataclass(frozen=True)
class HeadSupport:
    """Which training examples stand behind each row of a classifier head: ``counts[i][k]`` is adapter ``i``'s
    training examples of ``labels[k]`` (row ``k`` of the head's output layer)."""

    labels: tuple[str, ...]
    counts: tuple[tuple[int, ...], ...]

    def row_weights(self, weights: Sequence[float]) -> torch.Tensor:
        """``[adapters, labels]``: adapter ``i``'s share of row ``k``, ``w_i n_ik / sum_j w_j n_jk``; the language
        weights ``w_i / sum_j w_j`` for a row no adapter of weight above 0 has an example of."""
        w = torch.tensor(weights, dtype=torch.float64)
        n = torch.tensor(self.counts, dtype=torch.float64)
        support = w[:, None] * n
        totals = support.sum(dim=0)
        fallback = (w / w.sum())[:, None].expand_as(support)
        shares = torch.where(totals > 0, support / totals.clamp(min=1e-300), fallback)
        return shares.to(torch.float32)

    def contributors(self, languages: Sequence[str], weights: Sequence[float]) -> dict[str, dict[str, int]]:
        """Per label, the languages whose head rows went into it, with their examples (``{}``: no adapter of weight
        above 0 saw the label; its row is the language-weighted average)."""
        return {
            label: {
                lang: counts[k]
                for lang, counts, w in zip(languages, self.counts, weights, strict=True)
                if counts[k] > 0 and w > 0
            }
            for k, label in enumerate(self.labels)
        }


def head_support(inputs: Sequence[AdapterInput]) -> HeadSupport | None:
    """The label support of the inputs' heads, or None when some input has no label counts (an adapter committed
    before manifests recorded them: whether it saw a label is unknown, so heads average with the language weights).
    Raises :class:`MergeError` for counts that do not fit the label list."""
    if not inputs or any(a.label_counts is None for a in inputs):
        return None
    labels = next((a.labels for a in inputs if a.labels), None)
    if not labels:
        raise MergeError("label counts were given without the label list: the head rows they count are unknown")
    counts = []
    for a in inputs:
        given = dict(a.label_counts or {})
        unknown = sorted(set(given) - set(labels))
        if unknown:
            raise MergeError(
                f"{a.language}: label counts name {', '.join(repr(u) for u in unknown)}, not in the labels "
                f"{list(labels)}"
            )
        if any(int(v) < 0 for v in given.values()):
            raise MergeError(f"{a.language}: label counts must be >= 0, got {given}")
        counts.append(tuple(int(given.get(label, 0)) for label in labels))
    return HeadSupport(labels=tuple(labels), counts=tuple(counts))


def merged_heads(
    adapters: Sequence[LoraAdapter], weights: Sequence[float], support: HeadSupport | None = None
) -> dict[str, torch.Tensor]:
    """The classifier head of the merge, in float32, whatever the merge method. Empty for adapters without heads.

    A head tensor with one row per label (``classifier.weight`` and ``classifier.bias`` of an encoder, ``score.weight``
    of a decoder, a RoBERTa head's ``out_proj``) merges row by row when every adapter's label counts are known
    (``support``): row ``k`` is the average of the adapters' rows ``k`` weighted by ``w_i * n_ik``, the merge's
    language weight times the adapter's training examples of label ``k``, normalised per row. An expert that never
    saw label ``k`` trained its row ``k`` only to push ``k`` down; with the language weights alone that row would
    drag the label out of the merged model for every language. So it has no say on that row, and an expert with
    more examples of a label has more. A row no adapter (of weight above 0) has an example of, every row without
    ``support``, and every other head tensor (e.g. the dense layer of a RoBERTa head) is the weighted average with
    the language weights (normalised to sum 1): each head's update from the shared initialisation is averaged, like
    a linear merge. Only the first dimension identifies a row-per-label tensor, so a dense layer whose width equals
    the number of labels would be merged row by row too."""
    if not adapters or not adapters[0].heads:
        return {}
    total = float(sum(weights))
    shares = support.row_weights(weights) if support is not None else None
    out: dict[str, torch.Tensor] = {}
    for name in sorted(adapters[0].heads):
        acc: torch.Tensor | None = None
        for index, (adapter, weight) in enumerate(zip(adapters, weights, strict=True)):
            value = adapter.reader.read(adapter.heads[name]).to(torch.float32)
            if shares is not None and value.dim() >= 1 and value.shape[0] == shares.shape[1]:
                value = value * shares[index].view(-1, *([1] * (value.dim() - 1)))
            else:
                value = value * (weight / total)
            acc = value if acc is None else acc + value
        assert acc is not None
        out[name] = acc
    return out


def check_reference(reference: LoraAdapter, modules: Sequence[ModulePlan]) -> None:
    """The reference adapter must update every merged module with the same shape (the inputs branched from it)."""
    for m in modules:
        info = reference.modules.get(m.name)
        if info is None:
            raise MergeError(f"module {m.name}: the reference adapter (the trunk) has no update of it")
        if (info.kind, info.shape, info.transposed) != (m.kind, m.shape, m.transposed):
            raise MergeError(
                f"module {m.name}: the reference adapter has a {info.kind} update of shape {info.shape}, the inputs "
                f"a {m.kind} update of shape {m.shape}"
            )


def plan_merge(
    adapters: Sequence[LoraAdapter],
    inputs: Sequence[AdapterInput],
    method: str,
    parameters: Mapping[str, Any],
    output_format: str,
    rank: int | str | None,
    *,
    base: BaseCheckpoint | None = None,
    shard_size_mb: float = 2048,
    device: str = "cpu",
    max_relative_error: float = 0.01,
    max_rank: int | None = None,
    reference: LoraAdapter | None = None,
) -> MergePlan:
    impl = get_method(method)
    method_params = impl.resolve(parameters)
    if output_format not in OUTPUT_FORMATS:
        raise MergeError(f"unknown output format {output_format!r}; known: {', '.join(OUTPUT_FORMATS)}")
    if not adapters:
        raise MergeError("no adapters to merge")
    weights = resolve_weights(inputs, parameters.get("weights") or {})
    if all(w == 0 for w in weights):
        raise MergeError("every adapter has weight 0")
    modules: dict[str, ModulePlan] = {}
    for index, adapter in enumerate(adapters):
        for name, info in adapter.modules.items():
            existing = modules.get(name)
            if existing is None:
                modules[name] = ModulePlan(name, info.kind, info.shape, info.transposed, [(index, info.rank)])
                continue
            if (existing.kind, existing.shape, existing.transposed) != (info.kind, info.shape, info.transposed):
                raise MergeError(
                    f"module {name}: adapter {adapter.language} has a {info.kind} update of shape {info.shape}, "
                    f"another has a {existing.kind} update of shape {existing.shape}"
                )
            existing.inputs.append((index, info.rank))
    check_heads(adapters, inputs)
    support = head_support(inputs) if adapters[0].heads else None
    kept, excluded = select_modules(
        sorted(modules), parameters.get("include_modules") or [], parameters.get("exclude_modules") or []
    )
    if not kept:
        raise MergeError("include_modules/exclude_modules leave no module to merge")
    plan_modules = [modules[name] for name in kept]
    if reference is not None:
        check_reference(reference, plan_modules)
    if base is not None:
        for m in plan_modules:
            if base.weight(m.name) is None:
                # An adapter trained on a task model (e.g. BertForSequenceClassification: "bert.encoder...") merged
                # onto a bare base checkpoint (BertModel: "encoder..."): the name without its first component.
                rest = m.name.partition(".")[2]
                if rest and base.weight(rest) is not None:
                    m.base_name = rest
            weight_info = base.weight(m.checkpoint_name)
            if weight_info is None:
                raise MergeError(f"module {m.name}: the base model has no tensor {m.name}.weight")
            if weight_info.shape != m.shape:
                raise MergeError(
                    f"module {m.name}: the base weight is {weight_info.shape}, the adapters update {m.shape}"
                )
            if output_format == FULL_WEIGHTS and weight_info.dtype not in _FLOAT_DTYPES:
                raise MergeError(f"module {m.name}: cannot add an update to a {weight_info.dtype} base weight")
            if output_format == FULL_WEIGHTS and m.kind == "embedding" and base.tied_embeddings:
                raise MergeError(
                    f"module {m.name}: the base ties its input embeddings to the output head, so merging the "
                    "embedding update into the weights would change the head too (a PEFT adapter does not); "
                    "exclude the module or use the peft-adapter format"
                )
    notes: list[str] = []
    auto = rank is None or rank == "auto"
    fixed: int | None = None
    if output_format == PEFT_ADAPTER:
        exact_rank = max(m.input_rank for m in plan_modules)
        if auto:
            if impl.low_rank_exact:
                notes.append(
                    "rank auto: each module keeps the sum of its input ranks (exact)"
                    + (f", truncated by an exact SVD to at most {max_rank} where needed" if max_rank else "")
                )
            else:
                cap = f"{max_rank}" if max_rank else "its break-even rank rows*cols/(rows+cols)"
                notes.append(
                    f"{method} results are not low rank: rank auto gives each module the smallest rank whose "
                    f"relative error is <= {max_relative_error:g} (randomized range finder, at most {cap})"
                )
        else:
            fixed = int(rank)  # type: ignore[arg-type]
            if impl.low_rank_exact and fixed < exact_rank:
                notes.append(
                    f"rank {fixed} < {exact_rank} (sum of input ranks): modules are truncated by an exact SVD taken "
                    "from the factors; the error per module is reported"
                )
            elif not impl.low_rank_exact:
                notes.append(
                    f"{method} results are not low rank: each module is re-factorised to rank {fixed} by a randomized "
                    "range finder; the relative error per module is measured and reported"
                )
        notes.append(f"a module whose relative error exceeds {max_relative_error:g} fails the merge")
    notes.extend(_head_notes(adapters, inputs, weights, support))
    if reference is not None:
        notes.append(
            "relative to the reference adapter (the trunk the inputs branched from): each update minus the "
            "reference's is merged, and the reference's update is added once"
        )
    rank = fixed
    plan = MergePlan(
        method=method,
        method_params=method_params,
        parameters=dict(parameters),
        languages=[a.language for a in inputs],
        weights=weights,
        output_format=output_format,
        rank=rank,
        shard_size_mb=shard_size_mb,
        device=str(device),
        modules=plan_modules,
        excluded=excluded,
        low_rank_exact=impl.low_rank_exact,
        estimated_peak_bytes=0,
        estimated_output_bytes=0,
        notes=notes,
        auto_rank=output_format == PEFT_ADAPTER and auto,
        max_relative_error=max_relative_error,
        max_rank=max_rank,
        head_support=support,
        reference=reference,
    )
    plan.estimated_peak_bytes, plan.estimated_output_bytes = _estimate(plan, impl, adapters, base)
    return plan


def _head_notes(
    adapters: Sequence[LoraAdapter],
    inputs: Sequence[AdapterInput],
    weights: Sequence[float],
    support: HeadSupport | None,
) -> list[str]:
    """What the plan says about classifier heads; a :class:`MergeError` when the counts do not fit the heads."""
    if not adapters[0].heads:
        return []
    if support is None:
        without = [a.language for a in inputs if a.label_counts is None]
        return [
            "classifier heads: the language-weighted average"
            + (f" (no label counts for {', '.join(without)})" if len(without) < len(inputs) else "")
        ]
    rows = {
        name: adapters[0].reader.tensors[key].shape[0]
        for name, key in adapters[0].heads.items()
        if adapters[0].reader.tensors[key].shape
    }
    if not any(n == len(support.labels) for n in rows.values()):
        raise MergeError(
            f"the classifier heads have no tensor with one row per label ({len(support.labels)} labels; head "
            f"tensors {rows}): the label counts do not fit these heads"
        )
    languages = [a.language for a in inputs]
    by_label = support.contributors(languages, weights)
    partial = {label: langs for label, langs in by_label.items() if 0 < len(langs) < sum(w > 0 for w in weights)}
    notes = ["classifier heads: rows merged by label support (language weight x training examples of the label)"]
    notes.extend(
        f"label {label!r}: head row from {', '.join(langs)} only (the other adapters have no example of it)"
        for label, langs in partial.items()
    )
    notes.extend(
        f"label {label!r}: no adapter has an example of it; its head row is the language-weighted average"
        for label, langs in by_label.items()
        if not langs
    )
    return notes


def _estimate(
    plan: MergePlan, impl: MergeMethod, adapters: Sequence[LoraAdapter], base: BaseCheckpoint | None
) -> tuple[int, int]:
    """A rough peak working set (bytes) and output size: the largest module's work space plus I/O buffers."""
    peak = 0
    for m in plan.modules:
        rows, cols = m.shape
        dense = rows * cols
        factors = (rows + cols) * m.input_rank * 4
        if impl.low_rank_exact:
            work = 3 * factors + (m.input_rank * cols * 4 * 6 if plan.method == "knots" else 0)
            if plan.output_format == FULL_WEIGHTS:
                work += 2 * 4 * min(dense, _block_elements(plan.device))  # W += B A, a block at a time
        else:
            # the merged update and one update's magnitudes (float32), the selection's masks, a block's temporaries
            work = factors + dense * (4 * 2 + 4) + 16 * 4 * min(dense, _block_elements(plan.device))
            if plan.output_format == PEFT_ADAPTER:
                work += dense * 4  # the measured residual
        if plan.output_format == FULL_WEIGHTS and base is not None:
            info = base.weight(m.checkpoint_name)
            work += info.nbytes if info is not None else 0
        peak = max(peak, work)
    peak += 8 << 20  # pass-through copy buffer
    if plan.output_format == FULL_WEIGHTS and base is not None:
        output = base.total_bytes
    else:
        itemsize = ITEMSIZE[_output_dtype(adapters)]
        output = sum((m.shape[0] + m.shape[1]) * _expected_rank(plan, m) * itemsize for m in plan.modules)
    return peak, output


def _expected_rank(plan: MergePlan, module: ModulePlan) -> int:
    """A module's output rank: the fixed rank, else (auto) its input rank for exact methods or its cap (an upper
    bound) for the others."""
    if plan.rank is not None:
        return plan.rank
    if plan.low_rank_exact:
        return min(module.input_rank, plan.max_rank or module.input_rank)
    return plan.max_rank or breakeven_rank(*module.shape)


def _block_elements(device: str) -> int:
    on_cpu: bool = torch.device(device).type == "cpu"
    return CPU_BLOCK_ELEMENTS if on_cpu else DEVICE_BLOCK_ELEMENTS


def _output_dtype(adapters: Sequence[LoraAdapter]) -> str:
    dtypes = {a.dtype for a in adapters}
    return next(iter(dtypes)) if len(dtypes) == 1 else "F32"


# -- execution -------------------------------------------------------------------------------------------------------


@dataclass
class MergeReport:
    """What a merge did: the manifest's material (``langmerge.artifacts.MergeManifest`` fields)."""

    method: str
    parameters: dict[str, Any]
    method_parameters: dict[str, Any]
    output_format: str
    output_rank: int | None
    device: str
    inputs: list[dict[str, Any]]
    modules: list[str]
    excluded_modules: list[str]
    #: Relative Frobenius error of the written update per module (0.0 where exact).
    module_errors: dict[str, float]
    #: Seconds per phase: plan, read, merge, refactor, write, total.
    timings: dict[str, float]
    #: Relative path -> (size, sha256) of every file written.
    files: dict[str, tuple[int, str]]
    model_digest: str
    #: Peak resident memory above the level at the start (bytes; None where it cannot be measured).
    peak_rss_bytes: int | None = None
    peak_cuda_bytes: int | None = None
    estimated_peak_bytes: int | None = None
    #: PEFT adapter output: the rank of each module (they differ with rank auto).
    module_ranks: dict[str, int] = field(default_factory=dict)
    #: Classifier heads merged by label support: per label, the languages whose head rows went into its row, with
    #: their training examples of it (``{}``: none had one; the row is the language-weighted average). None when
    #: the heads are the language-weighted average (no heads, or an adapter without label counts).
    head_support: dict[str, dict[str, int]] | None = None
    #: The reference adapter (a trunk) the inputs merged relative to: its URI and digest.
    reference: dict[str, str | None] | None = None

    @property
    def max_error(self) -> float:
        return max(self.module_errors.values(), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "parameters": self.parameters,
            "method_parameters": self.method_parameters,
            "output_format": self.output_format,
            "output_rank": self.output_rank,
            "device": self.device,
            "inputs": self.inputs,
            "modules": self.modules,
            "excluded_modules": self.excluded_modules,
            "module_errors": self.module_errors,
            "module_ranks": self.module_ranks,
            "head_support": self.head_support,
            "reference": self.reference,
            "max_error": self.max_error,
            "timings": self.timings,
            "files": {k: {"size": s, "sha256": h} for k, (s, h) in sorted(self.files.items())},
            "model_digest": self.model_digest,
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_cuda_bytes": self.peak_cuda_bytes,
            "estimated_peak_bytes": self.estimated_peak_bytes,
        }


class _Timer:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] += time.perf_counter() - start


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """A temporary sibling folder renamed to ``target`` on success (replacing it); removed on failure."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _progress(total: int, unit: str, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total, unit=unit, unit_scale=unit == "B", disable=not enabled, desc=desc, leave=False, dynamic_ncols=True
    )


def _merge_module(
    plan: MergePlan, module: ModulePlan, adapters: Sequence[LoraAdapter], device: torch.device, timer: _Timer
) -> MergedDelta:
    impl = get_method(plan.method)
    with timer.phase("read"):
        updates = [adapters[i].update(module.name, plan.weights[i], device) for i, _ in module.inputs]
        trunk = plan.reference.update(module.name, 1.0, device) if plan.reference is not None else None
    with timer.phase("merge"):
        if trunk is None:
            return impl.merge(module.name, updates, plan.method_params)
        merged = impl.merge(module.name, [relative(u, trunk) for u in updates], plan.method_params)
        return add_reference(merged, trunk)


def _refactor(plan: MergePlan, merged: MergedDelta, module: ModulePlan) -> Factors:
    """The module's adapter factors: at the fixed rank, or (auto) the smallest meeting the error bound."""
    seed = derive_seed(0, "range-finder", module.name)
    if plan.rank is not None:
        if isinstance(merged, LowRankDelta):
            return refactor_lowrank(merged.B, merged.A, plan.rank)
        return randomized_lowrank(merged.delta, plan.rank, seed=seed)
    if isinstance(merged, LowRankDelta):
        return auto_lowrank_factors(merged.B, merged.A, plan.max_relative_error, plan.max_rank)
    cap = plan.max_rank or breakeven_rank(*module.shape)
    return adaptive_lowrank(merged.delta, plan.max_relative_error, cap, seed=seed)


class RefactorBoundExceeded(MergeError):
    """The PEFT adapter cannot hold the merged update within output.maxRelativeError."""


#: Float rounding allowed above output.maxRelativeError before a module counts as exceeding it.
ERROR_SLACK = 1e-6


def check_error_bound(plan: MergePlan, errors: Mapping[str, float], ranks: Mapping[str, int]) -> None:
    """Raise :class:`RefactorBoundExceeded` naming the worst module when any module's error exceeds the bound."""
    bound = plan.max_relative_error
    over = {name: e for name, e in errors.items() if e > bound + ERROR_SLACK}
    if not over:
        return
    worst = max(over, key=lambda name: over[name])
    if plan.rank is not None:
        how = f"at output.rank {plan.rank}"
        fix = "raise output.rank (or use rank auto)"
    else:
        module = next(m for m in plan.modules if m.name == worst)
        cap = plan.max_rank or breakeven_rank(*module.shape)
        how = f"at rank {ranks[worst]}, the upper bound for this {module.shape[0]}x{module.shape[1]} module"
        fix = f"raise output.maxRank (now {'default ' if plan.max_rank is None else ''}{cap})"
    raise RefactorBoundExceeded(
        f"the {plan.method} merge cannot be written as a PEFT adapter within output.maxRelativeError {bound:g}: "
        f"module {worst} has relative error {over[worst]:.3g} {how}; {len(over)} of {len(errors)} modules exceed "
        f"the bound. Use output.format: full-weights (exact), {fix}, or accept a larger output.maxRelativeError"
    )


def _adapter_keys(module: ModulePlan) -> tuple[str, str]:
    if module.kind == "embedding":
        return f"{PREFIX}{module.name}.lora_embedding_A", f"{PREFIX}{module.name}.lora_embedding_B"
    return f"{PREFIX}{module.name}.lora_A.weight", f"{PREFIX}{module.name}.lora_B.weight"


def _write_adapter(
    plan: MergePlan,
    adapters: Sequence[LoraAdapter],
    base: BaseCheckpoint | None,
    out: Path,
    device: torch.device,
    timer: _Timer,
    progress: bool,
) -> tuple[dict[str, tuple[int, str]], dict[str, float], dict[str, int]]:
    """Every module's factors are computed first (their ranks decide the file's layout; they are the output's size in
    memory), checked against the error bound, then written."""
    dtype = _output_dtype(adapters)
    errors: dict[str, float] = {}
    ranks: dict[str, int] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with _progress(len(plan.modules), "module", progress, "merging") as bar:
        for m in plan.modules:
            merged = _merge_module(plan, m, adapters, device, timer)
            with timer.phase("refactor"):
                found = _refactor(plan, merged, m)
                del merged
                P, Q = found.B, found.A  # delta = P @ Q in the weight's orientation
                lora_A, lora_B = (P.T, Q.T) if m.transposed else (Q, P)
                factors[m.name] = (
                    lora_A.to(dtype=DTYPES[dtype]).cpu().contiguous(),
                    lora_B.to(dtype=DTYPES[dtype]).cpu().contiguous(),
                )
            errors[m.name] = found.rel_error
            ranks[m.name] = found.rank
            bar.update(1)
    check_error_bound(plan, errors, ranks)
    entries: list[tuple[str, str, tuple[int, ...]]] = []
    for m in plan.modules:
        a_key, b_key = _adapter_keys(m)
        lora_A, lora_B = factors[m.name]
        entries += [(a_key, dtype, tuple(lora_A.shape)), (b_key, dtype, tuple(lora_B.shape))]
    heads = merged_heads(adapters, plan.weights, plan.head_support)
    head_dtypes = {name: adapters[0].reader.tensors[key].dtype for name, key in adapters[0].heads.items()}
    entries += [(f"{PREFIX}{name}", head_dtypes[name], tuple(t.shape)) for name, t in heads.items()]
    writer = SafetensorsWriter(out / ADAPTER_WEIGHTS, entries, {"format": "pt"})
    try:
        with timer.phase("write"):
            for m in plan.modules:
                a_key, b_key = _adapter_keys(m)
                writer.write(a_key, factors[m.name][0])
                writer.write(b_key, factors[m.name][1])
            for name, tensor in heads.items():
                writer.write(f"{PREFIX}{name}", tensor.to(dtype=DTYPES[head_dtypes[name]]))
        files = {ADAPTER_WEIGHTS: writer.close()}
    except BaseException:
        writer.abort()
        raise
    config = _adapter_config(plan, adapters, base, ranks)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    files[ADAPTER_CONFIG] = file_sha256(out / ADAPTER_CONFIG)
    return files, errors, ranks


def _adapter_config(
    plan: MergePlan, adapters: Sequence[LoraAdapter], base: BaseCheckpoint | None, ranks: Mapping[str, int]
) -> dict[str, Any]:
    """The first adapter's config with rank, alpha (scaling 1) and target modules of the merged adapter.

    ``r`` is the most common module rank; modules of another rank are listed in ``rank_pattern`` and
    ``alpha_pattern`` (alpha = rank: scaling 1) by their full names."""
    config = dict(adapters[0].config)
    counts: dict[int, int] = defaultdict(int)
    for value in ranks.values():
        counts[value] += 1
    common = max(counts, key=lambda r: (counts[r], r)) if counts else 1
    pattern = {name: value for name, value in sorted(ranks.items()) if value != common}
    written = {m.name for m in plan.modules}
    targets: list[str] = sorted(written)
    lists = [a.config.get("target_modules") for a in adapters]
    restricted = any(a.config.get(k) for a in adapters for k in ("layers_to_transform", "exclude_modules"))
    if base is not None and not restricted and all(isinstance(t, list) for t in lists):
        union = sorted({str(t) for ts in lists for t in ts or []})
        matched = {n for n in base.module_names() if any(n == t or n.endswith("." + t) for t in union)}
        if matched == written:
            targets = union
    config.update(
        r=common,
        lora_alpha=common,
        use_rslora=False,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=targets,
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
        inference_mode=True,
    )
    return config


def _shard_plan(base: BaseCheckpoint, shard_bytes: int) -> list[list[TensorInfo]]:
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for _, info in base.tensors:
        if shards[-1] and size + info.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


def _write_full(
    plan: MergePlan,
    adapters: Sequence[LoraAdapter],
    base: BaseCheckpoint,
    out: Path,
    device: torch.device,
    timer: _Timer,
    progress: bool,
    plan_inputs: Sequence[AdapterInput] = (),
) -> tuple[dict[str, tuple[int, str]], dict[str, float], dict[str, int]]:
    merged_modules = {f"{m.checkpoint_name}.weight": m for m in plan.modules}
    # Adapters of a task model on a bare base: the output takes the task model's names (every base tensor gets the
    # prefix the adapters' module names have), so it loads as that task model.
    prefixes = {m.name[: len(m.name) - len(m.base_name)] for m in plan.modules if m.base_name}
    rename = next(iter(prefixes)) if len(prefixes) == 1 and all(m.base_name for m in plan.modules) else ""
    if len(prefixes) > 1 or (prefixes and not rename):
        raise MergeError("the adapters' module names match the base checkpoint's only partly; cannot name the output")
    shards = _shard_plan(base, int(plan.shard_size_mb * 2**20))
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    heads = merged_heads(adapters, plan.weights, plan.head_support)
    clash = sorted(set(heads) & set(base.by_name))
    if clash:
        raise MergeError(f"the base model already has classifier head tensors {clash}; merge onto a base without one")
    head_dtype = base.tensors[0][1].dtype if base.tensors else "F32"
    files: dict[str, tuple[int, str]] = {}
    weight_map: dict[str, str] = {}
    readers: dict[str, SafetensorsReader] = {}

    def reader(shard: str) -> SafetensorsReader:
        if shard not in readers:
            for old in list(readers):  # the base is read shard after shard: keep one open
                readers.pop(old).close()
            readers[shard] = SafetensorsReader(base.directory / shard)
        return readers[shard]

    try:
        with _progress(base.total_bytes, "B", progress, "merging") as bar:
            for shard_index, (name, infos) in enumerate(zip(names, shards, strict=True)):
                last = shard_index == len(shards) - 1
                entries = [(rename + i.name, i.dtype, i.shape) for i in infos]
                if last:
                    entries += [(head, head_dtype, tuple(t.shape)) for head, t in heads.items()]
                writer = SafetensorsWriter(out / name, entries, {"format": "pt"})
                try:
                    for info in infos:
                        shard, _ = base.by_name[info.name]
                        module = merged_modules.get(info.name)
                        if module is None:
                            with timer.phase("copy"):
                                writer.write_chunks(rename + info.name, reader(shard).iter_bytes(info.name))
                        else:
                            merged = _merge_module(plan, module, adapters, device, timer)
                            with timer.phase("read"):
                                weight = reader(shard).read(info.name).to(device)
                            with timer.phase("merge"):
                                merged.add_to(weight)  # float32 arithmetic, stored back in the base dtype
                                del merged
                            with timer.phase("write"):
                                writer.write(rename + info.name, weight.cpu())
                                del weight
                        weight_map[rename + info.name] = name
                        bar.update(info.nbytes)
                    if last:
                        for head, tensor in heads.items():
                            writer.write(head, tensor.to(dtype=DTYPES[head_dtype]))
                            weight_map[head] = name
                    files[name] = writer.close()
                except BaseException:
                    writer.abort()
                    raise
    finally:
        for r in readers.values():
            r.close()
    total = base.total_bytes + sum(t.numel() * ITEMSIZE[head_dtype] for t in heads.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    files[INDEX] = file_sha256(out / INDEX)
    for path in sorted(base.directory.iterdir()):
        if (
            path.is_file()
            and not path.name.startswith(".")
            and not path.name.endswith(_WEIGHT_SUFFIXES)
            and path.name not in (INDEX, "manifest.json")
        ):
            shutil.copy2(path, out / path.name)
            files[path.name] = file_sha256(out / path.name)
    labels = next((a.labels for a in plan_inputs if a.labels), None)
    if heads and labels and (out / "config.json").is_file():
        # A full classifier: AutoModelForSequenceClassification.from_pretrained(out) loads it with its labels.
        config = json.loads((out / "config.json").read_text())
        config["id2label"] = {str(i): label for i, label in enumerate(labels)}
        config["label2id"] = {label: i for i, label in enumerate(labels)}
        config["problem_type"] = "single_label_classification"
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        files["config.json"] = file_sha256(out / "config.json")
    return files, {m.name: 0.0 for m in plan.modules}, {}


def merge_adapters(
    base_dir: Path | None,
    adapters: Sequence[AdapterInput],
    method: str,
    parameters: Mapping[str, Any],
    output_format: str,
    rank: int | str | None,
    out_dir: Path,
    *,
    shard_size_mb: float = 2048,
    device: str | torch.device | None = "auto",
    progress: bool = False,
    max_relative_error: float = 0.01,
    max_rank: int | None = None,
    reference: AdapterInput | None = None,
) -> MergeReport:
    """Merge LoRA adapters of one base model into ``out_dir`` (written atomically) and report what was done.

    ``parameters`` is ``MergedModelSpec.effective_parameters()``: ``weights``, ``include_modules``,
    ``exclude_modules`` and the method's own (``density``, ``lambda_``, ``seed``, ...). ``output_format`` is
    ``peft-adapter`` (re-factorised to ``rank`` for every module; ``auto`` or None: per module, exact where the method
    allows, else the smallest rank within ``max_relative_error``, at most ``max_rank`` or the break-even rank) or
    ``full-weights`` (base + merged update, sharded safetensors, the base dtype). A PEFT adapter whose error would
    exceed ``max_relative_error`` in any module is not written: :class:`RefactorBoundExceeded` names the worst. ``base_dir`` may be None
    for an adapter output (then the target modules are listed by full name). ``reference``: the adapter every input
    branched from (a trunk); the inputs merge relative to it (:mod:`langmerge_trainer.merge.reference`).
    """
    started = time.perf_counter()
    if output_format == FULL_WEIGHTS and base_dir is None:
        raise MergeError("a full-weights merge needs the base model")
    torch_device = resolve_device(device)
    timer = _Timer(torch_device)
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    opened: list[LoraAdapter] = []
    extra: list[LoraAdapter] = []
    with PeakMemory() as memory:
        try:
            with timer.phase("plan"):
                for a in adapters:
                    opened.append(load_adapter(Path(a.path), a.language))
                trunk = load_adapter(Path(reference.path), reference.language) if reference is not None else None
                if trunk is not None:
                    extra.append(trunk)
                base = BaseCheckpoint(Path(base_dir)) if base_dir is not None else None
                plan = plan_merge(
                    opened,
                    adapters,
                    method,
                    parameters,
                    output_format,
                    rank,
                    base=base,
                    shard_size_mb=shard_size_mb,
                    device=str(torch_device),
                    max_relative_error=max_relative_error,
                    max_rank=max_rank,
                    reference=trunk,
                )
            with torch.no_grad(), atomic_dir(Path(out_dir)) as tmp:
                if plan.output_format == PEFT_ADAPTER:
                    files, errors, ranks = _write_adapter(plan, opened, base, tmp, torch_device, timer, progress)
                else:
                    assert base is not None
                    files, errors, ranks = _write_full(plan, opened, base, tmp, torch_device, timer, progress, adapters)
        finally:
            for adapter in (*opened, *extra):
                adapter.close()
    timings = {k: round(v, 6) for k, v in sorted(timer.totals.items())}
    timings["total"] = round(time.perf_counter() - started, 6)
    return MergeReport(
        method=plan.method,
        parameters=dict(parameters),
        method_parameters=plan.method_params,
        output_format=plan.output_format,
        output_rank=max(ranks.values()) if ranks else plan.rank,
        device=str(torch_device),
        inputs=[
            {
                "language": a.language,
                "path": str(a.path),
                "uri": a.uri,
                "digest": a.digest,
                "weight": w,
                "rank": o.max_rank,
            }
            for a, o, w in zip(adapters, opened, plan.weights, strict=True)
        ],
        modules=[m.name for m in plan.modules],
        excluded_modules=plan.excluded,
        module_errors=errors,
        timings=timings,
        files=files,
        model_digest=files_digest(files),
        peak_rss_bytes=memory.growth,
        peak_cuda_bytes=torch.cuda.max_memory_allocated(torch_device) if torch_device.type == "cuda" else None,
        estimated_peak_bytes=plan.estimated_peak_bytes,
        module_ranks=ranks,
        head_support=plan.head_support.contributors(plan.languages, plan.weights)
        if plan.head_support is not None
        else None,
        reference={"uri": reference.uri, "digest": reference.digest} if reference is not None else None,
    )
