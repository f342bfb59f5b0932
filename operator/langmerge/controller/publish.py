"""Publishing merged revisions: ``current.json`` moved by compare-and-swap, revision records, garbage collection.

Two operators (or a restarted one) can never publish out of order: a revision number is claimed with a conditional
put of ``revisions/<n>.json`` and ``current.json`` moves only with ``IfMatch`` on the ETag that was read. A claim
that never became current (its writer crashed in between) is never overwritten: the next publish skips its number.
Each record names the revision it followed, so the published history is the chain from ``current.json`` back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from langmerge import artifacts
from langmerge.api.expert import Metrics
from langmerge.api.merged import ABSOLUTE_GATE_METRICS, Evaluation, GateFloor, GateMetric, LanguageMetrics
from langmerge.artifacts import MergeManifest, PublishedRevision, refactor_summary
from langmerge.ownership import delete_owned
from langmerge.store import MalformedRecord, ObjectStore, PreconditionFailed, split_uri

log = logging.getLogger(__name__)

#: Claimed-but-unpublished revision numbers skipped in one publish before giving up (each costs one read).
MAX_SKIPPED_CLAIMS = 20


class PublishConflict(Exception):
    """Someone else published first; re-read and try again."""


@dataclass(frozen=True)
class Current:
    record: PublishedRevision | None
    etag: str | None


@dataclass(frozen=True)
class Published:
    record: PublishedRevision
    #: Revision numbers claimed by writers that never published them, skipped by this publish.
    skipped: list[int] = field(default_factory=list)


def read_current(store: ObjectStore, output_uri: str) -> Current:
    found = store.get_record_with_etag(artifacts.current_uri(output_uri), PublishedRevision)
    if found is None:
        return Current(None, None)
    return Current(found[0], found[1])


def read_revision(store: ObjectStore, output_uri: str, revision: int) -> PublishedRevision | None:
    return store.get_record(artifacts.revision_uri(output_uri, revision), PublishedRevision)


def _same_claim(a: PublishedRevision, b: PublishedRevision) -> bool:
    return (a.fingerprint, a.reason, a.rollback_of, a.previous) == (b.fingerprint, b.reason, b.rollback_of, b.previous)


def publish(
    store: ObjectStore,
    output_uri: str,
    manifest: MergeManifest,
    manifest_uri: str,
    expected: Current,
    *,
    reason: str,
    rollback_of: int | None = None,
    job: str | None = None,
) -> Published:
    """Publish ``manifest`` as the revision after ``expected``. Raises :class:`PublishConflict` if another writer
    moved ``current.json`` meanwhile.

    The number is claimed with ``IfNoneMatch``. A number claimed already for the same publish (this writer, in a pass
    that crashed before moving ``current.json``) is reused; one claimed for anything else is skipped, never
    overwritten: a live rival and this writer then race on ``current.json``'s ETag, and exactly one wins.
    """
    previous = expected.record.revision if expected.record else 0
    record = PublishedRevision(
        revision=previous + 1,
        fingerprint=manifest.fingerprint,
        model_uri=manifest.model_uri,
        manifest_uri=manifest_uri,
        output_format=manifest.output_format,
        inputs=manifest.inputs,
        metrics=manifest.evaluation,
        reason=reason,
        rollback_of=rollback_of,
        previous=previous,
        expert_metrics=manifest.expert_metrics,
        base_metrics=manifest.base_metrics,
        cost=manifest.cost,
        job=job,
        refactorization=refactor_summary(manifest.module_errors, manifest.module_ranks),
        search=manifest.search,
    )
    skipped: list[int] = []
    while True:
        try:
            store.put_json(artifacts.revision_uri(output_uri, record.revision), record, if_none_match=True)
            break
        except PreconditionFailed:
            try:
                existing = read_revision(store, output_uri, record.revision)
            except MalformedRecord:
                existing = None
            if existing is not None and _same_claim(existing, record):
                record = existing
                break
            skipped.append(record.revision)
            if len(skipped) >= MAX_SKIPPED_CLAIMS:
                raise PublishConflict(
                    f"revisions {skipped[0]}..{skipped[-1]} of {output_uri} are all claimed by other writers"
                ) from None
            record = record.model_copy(update={"revision": record.revision + 1})
    try:
        if expected.etag is None:
            store.put_json(artifacts.current_uri(output_uri), record, if_none_match=True)
        else:
            store.put_json(artifacts.current_uri(output_uri), record, if_match=expected.etag)
    except PreconditionFailed:
        raise PublishConflict(f"{artifacts.current_uri(output_uri)} changed while publishing") from None
    return Published(record, skipped)


def published_chain(
    store: ObjectStore, output_uri: str, head: PublishedRevision, limit: int
) -> list[PublishedRevision]:
    """The published revisions from ``head`` (normally ``current.json``) back, at most ``limit``, oldest first."""
    chain = [head]
    seen = {head.revision}
    while len(chain) < limit:
        previous = chain[-1].previous_revision()
        if previous is None or previous in seen:
            break
        record = read_revision(store, output_uri, previous)
        if record is None:
            break
        chain.append(record)
        seen.add(previous)
    return chain[::-1]


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


def garbage_collect(
    store: ObjectStore, output_uri: str, chain: list[PublishedRevision], keep: int, protect: set[str]
) -> list[str]:
    """Delete committed merge outputs that none of the newest ``keep`` published revisions (``chain``, oldest first,
    ending at the current one) use. Never deletes the current or the previous revision's output, anything in
    ``protect`` (e.g. the merge being converged to), or uncommitted prefixes (a merge may be writing there).
    Returns the deleted fingerprints."""
    keep_fps = {r.fingerprint for r in chain[-keep:]} | {r.fingerprint for r in chain[-2:]} | protect
    deleted = []
    for fp, committed in sorted(merge_fingerprints_in_store(store, output_uri).items()):
        if fp in keep_fps or not committed:
            continue
        # The manifest goes first: a reader never sees a committed prefix with missing files.
        store.delete(artifacts.join(artifacts.merge_prefix(output_uri, fp), artifacts.MANIFEST))
        _, kept = delete_owned(store, artifacts.merge_prefix(output_uri, fp))
        if kept:
            log.warning("kept %s when collecting merge %s: another owner's record is there", ", ".join(kept), fp)
        deleted.append(fp)
    return deleted


_GATE_FIELDS = {
    GateMetric.EVAL_LOSS: "eval_loss",
    GateMetric.TOKEN_ACCURACY: "token_accuracy",
    GateMetric.ACCURACY: "accuracy",
    GateMetric.MACRO_F1: "macro_f1",
}


def _figure(metrics: Metrics | None, metric: GateMetric) -> float | None:
    if metrics is None:
        return None
    value = getattr(metrics, _GATE_FIELDS[metric])
    return None if value is None else float(value)


#: Float rounding tolerated at the gate's limit (0.80 - 0.78 is 0.020000000000000018, and 2 points are allowed).
_ROUNDING = 1e-9


def gate_regression(metric: GateMetric, merged: float, expert: float) -> float | None:
    """How much worse the merged figure is (positive = worse): relative for evalLoss and tokenAccuracy, absolute
    points (a difference of shares) for accuracy and macroF1. None when a relative regression has no scale."""
    if metric in ABSOLUTE_GATE_METRICS:
        return expert - merged
    if expert == 0:
        return None
    return (merged - expert) / abs(expert) if metric == GateMetric.EVAL_LOSS else (expert - merged) / abs(expert)


def _describe_regression(metric: GateMetric, regression: float, allowed: float) -> str:
    if metric in ABSOLUTE_GATE_METRICS:
        return f"{regression * 100:+.1f} points worse; at most {allowed * 100:.1f} points allowed"
    return f"{regression * 100:+.1f}% worse; at most {allowed * 100:.1f}% allowed"


def quality_gate(
    evaluation: Evaluation,
    merged: dict[str, Metrics],
    experts: dict[str, Metrics],
    base: dict[str, Metrics] | None = None,
) -> tuple[bool, dict[str, LanguageMetrics], list[str]]:
    """Compare the merged model with each expert alone, per language, and (``evaluation.floor`` base) with the base
    model before fine-tuning.

    Regression (:func:`gate_regression`) is relative for eval loss ``(merged - expert) / expert`` and token accuracy
    ``(expert - merged) / expert``, and in absolute points for accuracy and macro-F1 ``expert - merged``. Positive
    means worse. A merged model worse than the base on a language fails, whatever ``maxRegression`` allows (no
    figures of the base, as in a merge from an older Job: no floor). Returns (passed, per-language figures, failure
    messages).
    """
    base = base or {}
    metric = GateMetric(evaluation.metric)
    figures: dict[str, LanguageMetrics] = {}
    failures: list[str] = []
    for language in sorted(set(merged) | set(experts)):
        m, e = merged.get(language), experts.get(language)
        mv, ev = _figure(m, metric), _figure(e, metric)
        regression = gate_regression(metric, mv, ev) if mv is not None and ev is not None else None
        b = base.get(language)
        figures[language] = LanguageMetrics(
            merged=m, expert=e, base=b, regression=round(regression, 6) if regression is not None else None
        )
        if not evaluation.enabled:
            continue
        if mv is None:
            failures.append(f"{language}: the merged model has no {metric.value} figure")
        elif regression is not None and regression > evaluation.max_regression + _ROUNDING:
            failures.append(
                f"{language}: {metric.value} {mv:.4f} vs expert {ev:.4f} "
                f"({_describe_regression(metric, regression, evaluation.max_regression)})"
            )
        bv = _figure(b, metric)
        if evaluation.floor == GateFloor.BASE and mv is not None and bv is not None:
            below = gate_regression(metric, mv, bv)
            if below is not None and below > _ROUNDING:
                failures.append(
                    f"{language}: {metric.value} {mv:.4f} is worse than the base model before fine-tuning ({bv:.4f}); "
                    "a merge never falls below the base (evaluation.floor)"
                )
    return not failures, figures, failures
