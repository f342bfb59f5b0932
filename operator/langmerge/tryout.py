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
from typing import Any

from pydantic import ValidationError

from langmerge import artifacts
from langmerge.api.expert import LanguageExpertSpec, LanguageExpertStatus
from langmerge.api.merged import MergedModelSpec, MergedModelStatus
from langmerge.artifacts import MergeManifest, PublishedRevision
from langmerge.controller.publish import list_revisions, read_current, read_revision
from langmerge.kube import Kube, ObjectKey
from langmerge.store import ObjectStore, StoreError
from langmerge.tasks import TryLanguage, TryTask

#: The models ``langmerge try`` can show, in display order.
MODELS = ("base", "expert", "merged")
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
        manifest_raw = store.get_json_or_none(record.manifest_uri)
    except StoreError as err:
        raise TryError(f"cannot read MergedModel {name}'s revisions under {output}: {err}") from None
    if manifest_raw is None:
        raise TryError(
            f"revision {record.revision} of {name} is recorded, but its merge output {record.model_uri} is gone "
            f"(publish.keepRevisions: {spec.publish.keep_revisions}); {_revisions_text(store, output)}"
        )
    manifest: MergeManifest = _parse(MergeManifest, manifest_raw, f"the merge manifest {record.manifest_uri}")
    present = sorted(i.language for i in record.inputs)
    for language in languages:
        if language not in present:
            raise TryError(
                f"revision {record.revision} of {name} has no language {language!r}; its languages: {', '.join(present)}"
            )
    rows = []
    for item in sorted(record.inputs, key=lambda i: i.language):
        if languages and item.language not in languages:
            continue
        rows.append(_merged_language(kube, namespace, item, manifest, record))
    return TryTask(
        kind="MergedModel",
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
    if revision is None:
        current = read_current(store, output).record
        if current is None:
            status: MergedModelStatus = _parse(MergedModelStatus, obj.get("status"), f"MergedModel {name}'s status")
            state = f"phase {status.phase}" + (f": {status.message}" if status.message else "") if status.phase else ""
            raise TryError(f"MergedModel {name} has not published a revision yet{f' ({state})' if state else ''}")
        return current
    record = read_revision(store, output, revision)
    if record is None:
        raise TryError(f"MergedModel {name} has no published revision {revision}; {_revisions_text(store, output)}")
    return record


def _revisions_text(store: ObjectStore, output: str) -> str:
    revisions = list_revisions(store, output)
    if not revisions:
        return "no revision is published yet"
    current = read_current(store, output).record
    kept = [r.revision for r in revisions if store.exists(r.manifest_uri)]
    text = f"published revisions: {', '.join(str(r.revision) for r in revisions)}"
    if current is not None:
        text += f" (current {current.revision})"
    if len(kept) != len(revisions):
        text += f"; still in S3: {', '.join(map(str, kept)) or 'none'}"
    return text


def _merged_language(
    kube: Kube,
    namespace: str,
    item: artifacts.MergeInputRecord,
    manifest: MergeManifest,
    record: PublishedRevision,
) -> TryLanguage:
    losses = {}
    expert_metrics = manifest.expert_metrics.get(item.language)
    merged_metrics = record.metrics.get(item.language) or manifest.evaluation.get(item.language)
    if expert_metrics is not None and expert_metrics.eval_loss is not None:
        losses["expert"] = expert_metrics.eval_loss
    if merged_metrics is not None and merged_metrics.eval_loss is not None:
        losses["merged"] = merged_metrics.eval_loss
    body = kube.get_expert(ObjectKey(namespace, item.expert))
    note = None
    dataset = None
    max_seq_length = 1024
    if body is None:
        note = f"LanguageExpert {item.expert} no longer exists: its held-out data is unknown (give --input to compare)"
    else:
        try:
            spec = LanguageExpertSpec.model_validate(body.get("spec") or {})
        except ValidationError:
            note = f"LanguageExpert {item.expert}'s spec cannot be read: its held-out data is unknown"
        else:
            dataset = spec.dataset
            max_seq_length = spec.training.max_seq_length
    return TryLanguage(
        language=item.language,
        expert=item.expert,
        adapter_uri=item.adapter_uri,
        dataset=dataset,
        max_seq_length=max_seq_length,
        note=note,
        eval_loss=losses,
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
    losses = {}
    if status.adapter.metrics is not None and status.adapter.metrics.eval_loss is not None:
        losses["expert"] = status.adapter.metrics.eval_loss
    return TryTask(
        kind="LanguageExpert",
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
                eval_loss=losses,
            )
        ],
    )
