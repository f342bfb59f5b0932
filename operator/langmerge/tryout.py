"""``langmerge try NAME``: what to load and show, resolved from the cluster and S3. No torch here.

NAME is a MergedModel (its published revision, or ``--revision N``: the merged model, the base, and the expert of
each language that went into that revision) or a LanguageExpert (its current adapter and the base). The result is a
:class:`langmerge.tasks.TryTask`; the trainer's ``try`` verb (``langmerge_trainer.tryout``) loads the models from S3
and prints their outputs side by side. Every way this can go wrong before loading a model is a :class:`TryError`
with a message that says what exists instead.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from langmerge import artifacts
from langmerge.api.expert import Dataset, LanguageExpertSpec, LanguageExpertStatus, Metrics, TaskType
from langmerge.api.merged import MergedModelSpec, MergedModelStatus
from langmerge.artifacts import AdapterManifest, MergeManifest, PublishedRevision
from langmerge.controller.publish import published_chain, read_current
from langmerge.kube import Kube, ObjectKey
from langmerge.store import ObjectStore, StoreError
from langmerge.tasks import ACCURACY, EVAL_LOSS, TryLanguage, TryTask

#: The models ``langmerge try`` can show, in display order.
MODELS = ("base", "expert", "merged")
#: Published revisions read back from ``current.json`` at most (for ``--revision`` and the error listing them).
MAX_HISTORY = 1000
#: Modules the trainer side needs (the ``trainer`` extra).
TRAINER_MODULES = ("torch", "transformers", "peft", "langmerge_trainer")


class TryError(Exception):
    """Nothing to load: an unknown name, revision or language, or nothing published yet."""


def missing_trainer_modules() -> list[str]:
    """The modules of the trainer extra that this Python cannot import."""
    return [name for name in TRAINER_MODULES if importlib.util.find_spec(name) is None]


def resolve(
    kube: Kube,
    store: ObjectStore,
    namespace: str,
    name: str,
    *,
    revision: int | None = None,
    languages: Sequence[str] = (),
    inputs: Sequence[str] = (),
    examples: int = 3,
    max_new_tokens: int = 32,
    show: Sequence[str] = MODELS,
) -> TryTask:
    """The :class:`TryTask` for NAME in ``namespace``. Raises :class:`TryError`."""
    unknown = sorted(set(show) - set(MODELS))
    if unknown or not show:
        raise TryError(f"--show takes {', '.join(MODELS)} (comma-separated); got {','.join(show) or 'nothing'}")
    key = ObjectKey(namespace, name)
    merged = kube.get_merged(key)
    if merged is not None:
        task = _for_merged(kube, store, merged, revision, languages)
    else:
        expert = kube.get_expert(key)
        if expert is None:
            raise TryError(_not_found(kube, namespace, name))
        if revision is not None:
            raise TryError(
                f"--revision selects a published revision of a MergedModel; {name} is a LanguageExpert "
                "(its current adapter is shown)"
            )
        task = _for_expert(expert, languages)
    wanted = [m for m in MODELS if m in show and (m != "merged" or task.merged_uri is not None)]
    if not wanted:
        raise TryError(f"LanguageExpert {name} has no merged model to show: use --show base,expert")
    return task.model_copy(
        update={"inputs": list(inputs), "examples": examples, "max_new_tokens": max_new_tokens, "show": wanted}
    )


def _not_found(kube: Kube, namespace: str, name: str) -> str:
    merged = sorted(o["metadata"]["name"] for o in kube.list_merged(namespace))
    experts = sorted(o["metadata"]["name"] for o in kube.list_experts(namespace))
    there = [f"MergedModels: {', '.join(merged) or 'none'}", f"LanguageExperts: {', '.join(experts) or 'none'}"]
    return f"no MergedModel or LanguageExpert named {name!r} in namespace {namespace} ({'; '.join(there)})"


def _parse(model: Any, raw: Any, what: str) -> Any:
    try:
        return model.model_validate(raw or {})
    except ValidationError as err:
        raise TryError(f"{what} cannot be read: {err}") from None


def _for_merged(
    kube: Kube, store: ObjectStore, obj: dict[str, Any], revision: int | None, languages: Sequence[str]
) -> TryTask:
    meta = obj["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    spec: MergedModelSpec = _parse(MergedModelSpec, obj.get("spec"), f"MergedModel {name}'s spec")
    output = spec.output.uri
    try:
        record = _published(store, output, name, revision, obj)
        manifest = store.get_record(record.manifest_uri, MergeManifest)
        if manifest is None:
            raise TryError(
                f"revision {record.revision} of {name} is recorded, but its merge output {record.model_uri} is gone "
                f"(publish.keepRevisions: {spec.publish.keep_revisions}); {_revisions_text(store, output)}"
            )
    except StoreError as err:
        raise TryError(f"cannot read MergedModel {name}'s revisions under {output}: {err}") from None
    present = sorted(i.language for i in record.inputs)
    for language in languages:
        if language not in present:
            raise TryError(
                f"revision {record.revision} of {name} has no language {language!r}; its languages: {', '.join(present)}"
            )
    rows: list[TryLanguage] = []
    label_sets: dict[str, list[str]] = {}
    for item in sorted(record.inputs, key=lambda i: i.language):
        trained = _trained_as(kube, store, namespace, item)
        if trained.labels is not None:
            label_sets[item.expert] = trained.labels
        if not languages or item.language in languages:
            rows.append(_merged_language(item, manifest, record, trained))
    labels = _one_label_set(label_sets, name, record.revision, len(record.inputs))
    return TryTask(
        kind="MergedModel",
        labels=labels,
        metric=ACCURACY if labels is not None else EVAL_LOSS,
        namespace=namespace,
        name=name,
        revision=record.revision,
        method=manifest.method,
        base_uri=manifest.base_model.uri,
        base_digest=manifest.base_model.digest,
        merged_uri=record.model_uri,
        merged_format=record.output_format,
        languages=rows,
    )


def _published(
    store: ObjectStore, output: str, name: str, revision: int | None, obj: dict[str, Any]
) -> PublishedRevision:
    current = read_current(store, output).record
    if current is None:
        status: MergedModelStatus = _parse(MergedModelStatus, obj.get("status"), f"MergedModel {name}'s status")
        state = f"phase {status.phase}" + (f": {status.message}" if status.message else "") if status.phase else ""
        raise TryError(f"MergedModel {name} has not published a revision yet{f' ({state})' if state else ''}")
    if revision is None or revision == current.revision:
        return current
    for record in _history(store, output, current):
        if record.revision == revision:
            return record
    raise TryError(f"MergedModel {name} has no published revision {revision}; {_revisions_text(store, output)}")


def _history(store: ObjectStore, output: str, current: PublishedRevision) -> list[PublishedRevision]:
    """The published revisions, oldest first: the chain from ``current.json`` back (a revision number claimed by a
    writer that never published it is not on it)."""
    return published_chain(store, output, current, MAX_HISTORY)


def _revisions_text(store: ObjectStore, output: str) -> str:
    current = read_current(store, output).record
    if current is None:
        return "no revision is published yet"
    revisions = _history(store, output, current)
    kept = [r.revision for r in revisions if store.exists(r.manifest_uri)]
    text = f"published revisions: {', '.join(str(r.revision) for r in revisions)} (current {current.revision})"
    if len(kept) != len(revisions):
        text += f"; still in S3: {', '.join(map(str, kept)) or 'none'}"
    return text


@dataclass(frozen=True)
class Trained:
    """What an input expert is, from its adapter manifest in S3 (the record of what was trained) and its
    LanguageExpert (where its held-out data is), when they still exist."""

    labels: list[str] | None
    dataset: Dataset | None
    max_seq_length: int
    note: str | None


def adapter_manifest_uri(adapter_uri: str) -> str:
    """The manifest committing an adapter folder: ``<prefix>/manifest.json`` for ``<prefix>/adapter`` and for
    ``<prefix>/attempts/<n>-<run>/adapter``."""
    prefix = adapter_uri.rstrip("/").removesuffix("/adapter")
    head, _, _run = prefix.rpartition("/")
    if head.endswith(f"/{artifacts.ATTEMPTS}"):
        prefix = head.removesuffix(f"/{artifacts.ATTEMPTS}")
    return artifacts.join(prefix, artifacts.MANIFEST)


def _trained_as(kube: Kube, store: ObjectStore, namespace: str, item: artifacts.MergeInputRecord) -> Trained:
    try:
        adapter = store.get_record(adapter_manifest_uri(item.adapter_uri), AdapterManifest)
    except StoreError:
        adapter = None
    labels = adapter.labels if adapter is not None and adapter.task_type == TaskType.SEQUENCE_CLASSIFICATION else None
    body = kube.get_expert(ObjectKey(namespace, item.expert))
    if body is None:
        note = f"LanguageExpert {item.expert} no longer exists: its held-out data is unknown (give --input to compare)"
        return Trained(labels, None, 1024, note)
    try:
        spec = LanguageExpertSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        return Trained(labels, None, 1024, f"LanguageExpert {item.expert}'s spec cannot be read: no held-out data")
    if adapter is None and spec.is_classifier:
        labels = spec.labels
    return Trained(labels, spec.dataset, spec.training.max_seq_length, None)


def _one_label_set(label_sets: dict[str, list[str]], name: str, revision: int, inputs: int) -> list[str] | None:
    distinct = {tuple(labels) for labels in label_sets.values()}
    if len(distinct) > 1:
        what = "; ".join(f"{expert}: {', '.join(labels)}" for expert, labels in sorted(label_sets.items()))
        raise TryError(f"the experts of revision {revision} of {name} classify into different labels ({what})")
    if label_sets and len(label_sets) != inputs:
        raise TryError(f"revision {revision} of {name} merges classifiers and other models: nothing to load it as")
    return list(next(iter(distinct))) if distinct else None


def _figures(metric: str, expert: Metrics | None, merged: Metrics | None) -> dict[str, float]:
    out = {}
    for name, metrics in (("expert", expert), ("merged", merged)):
        value = None if metrics is None else metrics.accuracy if metric == ACCURACY else metrics.eval_loss
        if value is not None:
            out[name] = value
    return out


def _merged_language(
    item: artifacts.MergeInputRecord, manifest: MergeManifest, record: PublishedRevision, trained: Trained
) -> TryLanguage:
    merged = record.metrics.get(item.language) or manifest.evaluation.get(item.language)
    expert = record.expert_metrics.get(item.language) or manifest.expert_metrics.get(item.language)
    return TryLanguage(
        language=item.language,
        expert=item.expert,
        adapter_uri=item.adapter_uri,
        dataset=trained.dataset,
        max_seq_length=trained.max_seq_length,
        note=trained.note,
        figures=_figures(ACCURACY if trained.labels is not None else EVAL_LOSS, expert, merged),
    )


def _for_expert(obj: dict[str, Any], languages: Sequence[str]) -> TryTask:
    meta = obj["metadata"]
    name = meta["name"]
    spec: LanguageExpertSpec = _parse(LanguageExpertSpec, obj.get("spec"), f"LanguageExpert {name}'s spec")
    status: LanguageExpertStatus = _parse(LanguageExpertStatus, obj.get("status"), f"LanguageExpert {name}'s status")
    for language in languages:
        if language != spec.language:
            raise TryError(f"LanguageExpert {name} serves language {spec.language!r}, not {language!r}")
    if status.adapter is None:
        state = f" (phase {status.phase}" + (f": {status.message}" if status.message else "") + ")"
        raise TryError(f"LanguageExpert {name} has no trained adapter yet{state if status.phase else ''}")
    metric = ACCURACY if spec.is_classifier else EVAL_LOSS
    return TryTask(
        kind="LanguageExpert",
        labels=spec.labels if spec.is_classifier else None,
        metric=metric,
        namespace=meta["namespace"],
        name=name,
        base_uri=spec.base_model.uri,
        languages=[
            TryLanguage(
                language=spec.language,
                expert=name,
                adapter_uri=status.adapter.uri,
                dataset=spec.dataset,
                max_seq_length=spec.training.max_seq_length,
                figures=_figures(metric, status.adapter.metrics, None),
            )
        ],
    )
