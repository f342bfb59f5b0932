"""Publishing merged revisions: ``current.json`` moved by compare-and-swap, revision records, garbage collection.

Two operators (or a restarted one) can never publish out of order: a revision number is claimed with a conditional
put of ``revisions/<n>.json`` and ``current.json`` moves only with ``IfMatch`` on the ETag that was read.
"""

from __future__ import annotations

from dataclasses import dataclass

from langmerge import artifacts
from langmerge.api.expert import Metrics
from langmerge.api.merged import Evaluation, GateMetric, LanguageMetrics
from langmerge.artifacts import MergeManifest, PublishedRevision
from langmerge.store import NotFound, ObjectStore, PreconditionFailed, split_uri


class PublishConflict(Exception):
    """Someone else published first; re-read and try again."""


@dataclass(frozen=True)
class Current:
    record: PublishedRevision | None
    etag: str | None


def read_current(store: ObjectStore, output_uri: str) -> Current:
    found = store.get_json_with_etag(artifacts.current_uri(output_uri))
    if found is None:
        return Current(None, None)
    raw, etag = found
    return Current(PublishedRevision.model_validate(raw), etag)


def read_revision(store: ObjectStore, output_uri: str, revision: int) -> PublishedRevision | None:
    raw = store.get_json_or_none(artifacts.revision_uri(output_uri, revision))
    return PublishedRevision.model_validate(raw) if raw is not None else None


def publish(
    store: ObjectStore,
    output_uri: str,
    manifest: MergeManifest,
    manifest_uri: str,
    expected: Current,
    *,
    reason: str,
    rollback_of: int | None = None,
) -> PublishedRevision:
    """Publish ``manifest`` as revision ``expected + 1``. Raises :class:`PublishConflict` if another writer won."""
    revision = (expected.record.revision if expected.record else 0) + 1
    record = PublishedRevision(
        revision=revision,
        fingerprint=manifest.fingerprint,
        model_uri=manifest.model_uri,
        manifest_uri=manifest_uri,
        output_format=manifest.output_format,
        inputs=manifest.inputs,
        metrics=manifest.evaluation,
        reason=reason,
        rollback_of=rollback_of,
    )
    rev_uri = artifacts.revision_uri(output_uri, revision)
    try:
        store.put_json(rev_uri, record, if_none_match=True)
    except PreconditionFailed:
        # Claimed before: by us in a pass that crashed before moving current.json (same content), or by a rival.
        existing = read_revision(store, output_uri, revision)
        if existing is None or existing.fingerprint != record.fingerprint or existing.reason != reason:
            raise PublishConflict(f"revision {revision} of {output_uri} was claimed by another writer") from None
        record = existing
    try:
        if expected.etag is None:
            store.put_json(artifacts.current_uri(output_uri), record, if_none_match=True)
        else:
            store.put_json(artifacts.current_uri(output_uri), record, if_match=expected.etag)
    except PreconditionFailed:
        raise PublishConflict(f"{artifacts.current_uri(output_uri)} changed while publishing") from None
    return record


def list_revisions(store: ObjectStore, output_uri: str) -> list[PublishedRevision]:
    bucket, _ = split_uri(output_uri)
    out = []
    for obj in store.iter_objects(artifacts.join(output_uri, "revisions")):
        if obj.key.endswith(".json"):
            try:
                out.append(PublishedRevision.model_validate(store.get_json(f"s3://{bucket}/{obj.key}")))
            except NotFound:
                continue
    return sorted(out, key=lambda r: r.revision)


def merge_fingerprints_in_store(store: ObjectStore, output_uri: str) -> dict[str, bool]:
    """fingerprint -> committed (has a manifest), for every merge prefix under ``<output>/merges/``."""
    _, key = split_uri(output_uri)
    base = key.rstrip("/") + "/merges/"
    found: dict[str, bool] = {}
    for obj in store.iter_objects(artifacts.join(output_uri, "merges")):
        rest = obj.key[len(base) :]
        fp, _, name = rest.partition("/")
        found[fp] = found.get(fp, False) or name == artifacts.MANIFEST
    return found


def garbage_collect(store: ObjectStore, output_uri: str, keep: int, protect: set[str]) -> list[str]:
    """Delete committed merge outputs that none of the newest ``keep`` revisions use. Never deletes the current or
    the previous revision's output, anything in ``protect`` (e.g. the merge being converged to), or uncommitted
    prefixes (a merge may be writing there). Returns the deleted fingerprints."""
    revisions = list_revisions(store, output_uri)
    keep_fps = {r.fingerprint for r in revisions[-keep:]} | {r.fingerprint for r in revisions[-2:]} | protect
    current = read_current(store, output_uri).record
    if current is not None:
        keep_fps.add(current.fingerprint)
    deleted = []
    for fp, committed in sorted(merge_fingerprints_in_store(store, output_uri).items()):
        if fp in keep_fps or not committed:
            continue
        # The manifest goes first: a reader never sees a committed prefix with missing files.
        store.delete(artifacts.join(artifacts.merge_prefix(output_uri, fp), artifacts.MANIFEST))
        store.delete_prefix(artifacts.merge_prefix(output_uri, fp))
        deleted.append(fp)
    return deleted


def _figure(metrics: Metrics | None, metric: GateMetric) -> float | None:
    if metrics is None:
        return None
    return metrics.eval_loss if metric == GateMetric.EVAL_LOSS else metrics.token_accuracy


def quality_gate(
    evaluation: Evaluation, merged: dict[str, Metrics], experts: dict[str, Metrics]
) -> tuple[bool, dict[str, LanguageMetrics], list[str]]:
    """Compare the merged model with each expert alone, per language.

    Regression is relative: for eval loss ``(merged - expert) / expert``; for token accuracy
    ``(expert - merged) / expert``. Positive means worse. Returns (passed, per-language figures, failure messages).
    """
    metric = GateMetric(evaluation.metric)
    figures: dict[str, LanguageMetrics] = {}
    failures: list[str] = []
    for language in sorted(set(merged) | set(experts)):
        m, e = merged.get(language), experts.get(language)
        mv, ev = _figure(m, metric), _figure(e, metric)
        regression = None
        if mv is not None and ev is not None and ev != 0:
            regression = (mv - ev) / abs(ev) if metric == GateMetric.EVAL_LOSS else (ev - mv) / abs(ev)
        figures[language] = LanguageMetrics(
            merged=m, expert=e, regression=round(regression, 6) if regression is not None else None
        )
        if not evaluation.enabled:
            continue
        if mv is None:
            failures.append(f"{language}: the merged model has no {metric.value} figure")
        elif regression is not None and regression > evaluation.max_regression:
            failures.append(
                f"{language}: {metric.value} {mv:.4f} vs expert {ev:.4f} "
                f"({regression * 100:+.1f}% worse; at most {evaluation.max_regression * 100:.1f}% allowed)"
            )
    return not failures, figures, failures
