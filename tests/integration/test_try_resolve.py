"""``langmerge try``: what NAME resolves to, and the errors a user gets, on the real API server and S3.

The records are written the way the operator writes them (adapter status, merge manifest, ``publish``); no model is
loaded here (the trainer side is tests/trainer/test_tryout.py, the sample end to end is tests/e2e).
"""

from __future__ import annotations

from typing import Any

import pytest

from langmerge import artifacts
from langmerge.api.expert import Metrics
from langmerge.artifacts import AdapterManifest, BaseModelIdentity, Cost, MergeInputRecord, MergeManifest, Versions
from langmerge.constants import EXPERT_PLURAL
from langmerge.controller.publish import publish, read_current
from langmerge.kube import Kube, ObjectKey
from langmerge.store import ObjectStore
from langmerge.tryout import TryError, adapter_manifest_uri, resolve
from operator_harness import apply_expert, apply_merged, custom, now

pytestmark = pytest.mark.integration

LANGS = ("es", "it")


def _expert_spec(bucket: str, lang: str) -> dict[str, Any]:
    return {
        "language": lang,
        "task": "dialog",
        "baseModel": {"uri": f"s3://{bucket}/base"},
        "dataset": {"uri": f"s3://{bucket}/data/{lang}", "evalFraction": 0.2},
        "training": {"maxSeqLength": 64},
    }


def _adapter(bucket: str, lang: str, n: int) -> str:
    return f"s3://{bucket}/adapters/{lang}/{n}"


def _publish(
    store: ObjectStore,
    bucket: str,
    fingerprint: str,
    langs: tuple[str, ...],
    loss: float,
    out: str | None = None,
    adapters: dict[str, str] | None = None,
) -> None:
    out = out or f"s3://{bucket}/merged"
    prefix = artifacts.merge_prefix(out, fingerprint)
    model = artifacts.merged_model_uri(prefix)
    store.put_bytes(artifacts.join(model, "adapter_model.safetensors"), b"weights")
    manifest = MergeManifest(
        fingerprint=fingerprint,
        namespace="ns",
        name="mm",
        method="ties",
        parameters={},
        inputs=[
            MergeInputRecord(
                expert=f"dialog-{lang}",
                language=lang,
                adapter_uri=(adapters or {}).get(lang) or _adapter(bucket, lang, 1),
                adapter_digest=lang,
            )
            for lang in langs
        ],
        base_model=BaseModelIdentity(uri=f"s3://{bucket}/base", digest="basedigest"),
        output_format="peft-adapter",
        model_uri=model,
        model_digest=fingerprint,
        files={},
        evaluation={lang: Metrics(eval_loss=loss, accuracy=0.75) for lang in langs},
        expert_metrics={lang: Metrics(eval_loss=loss - 0.1, accuracy=0.8) for lang in langs},
        cost=Cost(wall_seconds=1.0),
        versions=Versions(langmerge="test"),
        started_at=now(),
        finished_at=now(),
    )
    manifest_uri = artifacts.join(prefix, artifacts.MANIFEST)
    store.put_json(manifest_uri, manifest, if_none_match=True)
    publish(store, out, manifest, manifest_uri, read_current(store, out), reason="merged")


def test_try_resolves_revisions_experts_and_says_what_is_wrong(
    kube: Any, s3: ObjectStore, namespace: str, bucket: str
) -> None:
    k = Kube(kube)
    for lang in LANGS:
        apply_expert(kube, namespace, f"dialog-{lang}", _expert_spec(bucket, lang), {"langmerge.dev/task": "dialog"})
    apply_merged(
        kube,
        namespace,
        "mm",
        {
            "baseModel": {"uri": f"s3://{bucket}/base"},
            "experts": {"selector": {"matchLabels": {"langmerge.dev/task": "dialog"}}},
            "output": {"uri": f"s3://{bucket}/merged"},
        },
    )

    with pytest.raises(TryError, match=r"no MergedModel or LanguageExpert named 'nope' .*MergedModels: mm; "):
        resolve(k, s3, namespace, "nope")
    with pytest.raises(TryError, match="MergedModel mm has not published a revision yet"):
        resolve(k, s3, namespace, "mm")
    with pytest.raises(TryError, match="LanguageExpert dialog-es has no trained adapter yet"):
        resolve(k, s3, namespace, "dialog-es")

    _publish(s3, bucket, "fp1", ("es",), 2.5)
    _publish(s3, bucket, "fp2", LANGS, 2.25)
    task = resolve(k, s3, namespace, "mm", examples=2, max_new_tokens=8)
    assert (task.kind, task.revision, task.method, task.merged_format) == ("MergedModel", 2, "ties", "peft-adapter")
    assert task.merged_uri == artifacts.merged_model_uri(artifacts.merge_prefix(f"s3://{bucket}/merged", "fp2"))
    assert (task.base_uri, task.base_digest) == (f"s3://{bucket}/base", "basedigest")
    assert [lang.language for lang in task.languages] == ["es", "it"]
    es = task.languages[0]
    assert es.expert == "dialog-es" and es.adapter_uri == _adapter(bucket, "es", 1)
    assert es.dataset is not None and es.dataset.uri == f"s3://{bucket}/data/es" and es.max_seq_length == 64
    assert es.figures == {"expert": pytest.approx(2.15), "merged": pytest.approx(2.25)}
    assert task.labels is None and task.metric == "eval loss"
    assert (task.examples, task.max_new_tokens, task.show) == (2, 8, ["base", "expert", "merged"])

    old = resolve(k, s3, namespace, "mm", revision=1)
    assert old.revision == 1 and [lang.language for lang in old.languages] == ["es"]
    with pytest.raises(TryError, match=r"no published revision 7; published revisions: 1, 2 \(current 2\)"):
        resolve(k, s3, namespace, "mm", revision=7)
    with pytest.raises(TryError, match="revision 1 of mm has no language 'it'; its languages: es"):
        resolve(k, s3, namespace, "mm", revision=1, languages=["it"])
    only = resolve(k, s3, namespace, "mm", languages=["it"], inputs=["hola"], show=["merged"])
    assert [lang.language for lang in only.languages] == ["it"] and only.inputs == ["hola"] and only.show == ["merged"]
    with pytest.raises(TryError, match="--show takes base, expert, merged"):
        resolve(k, s3, namespace, "mm", show=["everything"])

    # An expert deleted since: its language is still in the revision, without held-out data.
    custom(kube).delete_namespaced_custom_object("langmerge.dev", "v1alpha1", namespace, EXPERT_PLURAL, "dialog-it")
    gone = resolve(k, s3, namespace, "mm")
    it = gone.languages[1]
    assert it.dataset is None and it.note is not None and "dialog-it no longer exists" in it.note

    # A revision whose merge output keepRevisions deleted.
    s3.delete(artifacts.join(artifacts.merge_prefix(f"s3://{bucket}/merged", "fp1"), artifacts.MANIFEST))
    with pytest.raises(
        TryError, match=r"revision 1 of mm is recorded, but its merge output .* is gone.*still in S3: 2"
    ):
        resolve(k, s3, namespace, "mm", revision=1)

    # A LanguageExpert: its adapter and the base, no merged model; --revision is for MergedModels.
    k.patch_status(
        EXPERT_PLURAL,
        ObjectKey(namespace, "dialog-es"),
        {
            "phase": "Ready",
            "adapter": {
                "uri": _adapter(bucket, "es", 1),
                "digest": "d",
                "fingerprint": "f",
                "metrics": {"evalLoss": 1.5},
            },
        },
    )
    expert = resolve(k, s3, namespace, "dialog-es")
    assert (expert.kind, expert.merged_uri, expert.show) == ("LanguageExpert", None, ["base", "expert"])
    assert expert.base_uri == f"s3://{bucket}/base" and expert.languages[0].figures == {"expert": 1.5}
    with pytest.raises(TryError, match="--revision selects a published revision of a MergedModel"):
        resolve(k, s3, namespace, "dialog-es", revision=1)
    with pytest.raises(TryError, match="LanguageExpert dialog-es serves language 'es', not 'pt'"):
        resolve(k, s3, namespace, "dialog-es", languages=["pt"])
    with pytest.raises(TryError, match="has no merged model to show"):
        resolve(k, s3, namespace, "dialog-es", show=["merged"])


LABELS = ["money", "science"]


def _commit_adapter(store: ObjectStore, prefix: str, lang: str, labels: list[str]) -> str:
    """An adapter committed the way the trainer commits one (files under attempts/, then manifest.json)."""
    adapter = f"{prefix}/attempts/1-abcd/adapter"
    store.put_bytes(f"{adapter}/adapter_config.json", b"{}")
    manifest = AdapterManifest.model_validate(
        {
            "fingerprint": "fp",
            "namespace": "ns",
            "name": f"dialog-{lang}",
            "language": lang,
            "task": "topic",
            "task_type": "sequence-classification",
            "labels": labels,
            "base_model": {"uri": "s3://b/base", "digest": "d"},
            "data_digest": "d",
            "adapter_uri": adapter,
            "adapter_digest": lang,
            "files": {},
            "lora": {},
            "training": {},
            "metrics": {"accuracy": 0.8},
            "examples_train": 1,
            "examples_eval": 1,
            "tokens_trained": 1,
            "steps": 1,
            "cost": {"wall_seconds": 1.0},
            "versions": {},
            "started_at": now(),
            "finished_at": now(),
        }
    )
    store.put_json(f"{prefix}/manifest.json", manifest, if_none_match=True)
    assert adapter_manifest_uri(adapter) == f"{prefix}/manifest.json"
    return adapter


def test_try_resolves_a_classifier_from_its_adapter_records(
    kube: Any, s3: ObjectStore, namespace: str, bucket: str
) -> None:
    k = Kube(kube)
    classifier = {"taskType": "sequence-classification", "labels": LABELS}
    for lang in LANGS:
        spec = {**_expert_spec(bucket, lang), **classifier}
        apply_expert(kube, namespace, f"dialog-{lang}", spec, {"langmerge.dev/task": "topic"})
    apply_merged(
        kube,
        namespace,
        "topics",
        {
            "baseModel": {"uri": f"s3://{bucket}/base"},
            "experts": {"selector": {"matchLabels": {"langmerge.dev/task": "topic"}}},
            "output": {"uri": f"s3://{bucket}/topics"},
        },
    )
    adapters = {lang: _commit_adapter(s3, f"s3://{bucket}/experts/{lang}", lang, LABELS) for lang in LANGS}
    _publish(s3, bucket, "fp1", LANGS, 0.5, out=f"s3://{bucket}/topics", adapters=adapters)
    task = resolve(k, s3, namespace, "topics")
    assert task.labels == LABELS and task.metric == "accuracy"
    assert task.languages[0].figures == {"expert": pytest.approx(0.8), "merged": pytest.approx(0.75)}
    # The labels are the record's: an expert deleted since still has them (its adapter manifest says what it is).
    custom(kube).delete_namespaced_custom_object("langmerge.dev", "v1alpha1", namespace, EXPERT_PLURAL, "dialog-es")
    assert resolve(k, s3, namespace, "topics").labels == LABELS

    # Experts whose label sets differ cannot be shown as one classifier.
    other = _commit_adapter(s3, f"s3://{bucket}/experts/it-other", "it", ["science", "money"])
    _publish(s3, bucket, "fp2", LANGS, 0.5, out=f"s3://{bucket}/topics", adapters={**adapters, "it": other})
    with pytest.raises(TryError, match="classify into different labels"):
        resolve(k, s3, namespace, "topics")
