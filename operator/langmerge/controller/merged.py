"""MergedModel reconciliation: desired state = merge fingerprint over the Ready experts' adapters.

One pass: read the published pointer (S3 is the record), select the experts, check they share the base model,
compute the fingerprint of their adapters, wait out the settle window, then adopt an existing merge or run a merge
Job, gate it on per-language quality, and publish it with a compare-and-swap.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import ValidationError

from langmerge import artifacts
from langmerge.admission import Refusal, check_job_spec, check_uris
from langmerge.api.common import ConditionStatus
from langmerge.api.expert import ExpertPhase, LanguageExpertSpec, LanguageExpertStatus, TaskType
from langmerge.api.merged import (
    GateFloor,
    LanguageMetrics,
    MergedModelSpec,
    MergedModelStatus,
    MergedPhase,
    MergeInput,
    PublishRecord,
    RefactorizationStatus,
    SearchCandidateStatus,
    SearchStatus,
)
from langmerge.api.serving import ServingPhase, ServingStatus
from langmerge.artifacts import (
    BaseModelIdentity,
    FailureRecord,
    MergeManifest,
    PublishedRevision,
    RefactorSummary,
    SearchCandidate,
    SearchRecord,
)
from langmerge.constants import COMPONENT_MERGE, LABEL_MERGED, MERGED_KIND, MERGED_PLURAL
from langmerge.controller import cloudevents, metrics
from langmerge.controller.attempts import RetryDecision
from langmerge.controller.jobs import JobState, Owner, build_merge_job
from langmerge.controller.publish import (
    Current,
    PublishConflict,
    Published,
    garbage_collect,
    publish,
    published_chain,
    quality_gate,
    read_current,
    read_revision,
)
from langmerge.controller.reconcile import (
    ReconcilePass,
    Stop,
    delete_jobs_of,
    fmt_time,
    format_validation_error,
    reconcile_object,
)
from langmerge.controller.runtime import MERGED, Key, Runtime
from langmerge.controller.serving import Serving, rolled_back_revision, summary
from langmerge.controller.status import (
    EXPERTS_READY,
    LABELS_COVERED,
    MERGING,
    QUALITY_GATE,
    READY,
    get_condition,
    truncate,
)
from langmerge.fingerprint import merge_fingerprint
from langmerge.tasks import AdapterSource, MergeTask, MergeTaskInput

log = logging.getLogger(__name__)

#: Event and condition reason: no expert of a classifier merge has a training example of some labels.
LABEL_NOT_COVERED = "LabelNotCovered"


@dataclass(frozen=True)
class SelectedExpert:
    name: str
    spec: LanguageExpertSpec | None
    status: LanguageExpertStatus
    labels: dict[str, str]

    @property
    def ready(self) -> bool:
        s = self.status
        return (
            self.spec is not None
            and s.phase == ExpertPhase.READY
            and s.adapter is not None
            and s.trained_fingerprint is not None
            and s.trained_fingerprint == s.desired_fingerprint
        )


def _selected(body: dict[str, Any]) -> SelectedExpert:
    try:
        spec: LanguageExpertSpec | None = LanguageExpertSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        spec = None
    try:
        status = LanguageExpertStatus.model_validate(body.get("status") or {})
    except ValidationError:
        status = LanguageExpertStatus()
    meta = body["metadata"]
    return SelectedExpert(meta["name"], spec, status, dict(meta.get("labels") or {}))


class MergedReconciler(ReconcilePass[MergedModelStatus]):
    """One reconcile pass over one MergedModel."""

    kind = MERGED_KIND
    plural = MERGED_PLURAL
    status_model = MergedModelStatus
    #: This object's merge Jobs, listed once per pass (none are needed for a rollback).
    jobs: Sequence[JobState] = ()
    #: The published revision this pass found (current.json), which spec.serving rolls out.
    serving_record: PublishedRevision | None = None
    #: Serving runs at the end of a pass that got as far as reading current.json (the output prefix is ours).
    serving_on: bool = False

    def mark_failed(self, reason: str, message: str) -> None:
        """A problem only the user can fix: say so in status and an Event (once), keep the published revision."""
        if self.old.message != truncate(message):
            self.event("Warning", reason, message)
        self.set_phase(MergedPhase.FAILED, message)
        self.condition(READY, False, reason, message)
        self.degrade(reason, message)
        self.condition(MERGING, False, reason)

    def fail(self, reason: str, message: str, requeue: float | None = None) -> float | None:
        self.mark_failed(reason, message)
        return self.commit(requeue)

    # -- the pass ------------------------------------------------------------------------------------------------
    def run(self) -> float | None:
        try:
            self.spec = MergedModelSpec.model_validate(self.body.get("spec") or {})
        except ValidationError as err:
            return self.fail("InvalidSpec", f"invalid spec: {format_validation_error(err)}")
        self.output = self.spec.output.uri
        self.image = self.spec.image or self.settings.trainer_image
        refusal = self.admit()
        if refusal is not None:
            self.refuse(refusal, phase=MergedPhase.FAILED, condition_type=MERGING)
            return self.commit(None)
        return self.guarded(
            self._run_publishing, failed_phase=MergedPhase.FAILED, user_error_retry=self.settings.resync_seconds
        )

    def _serving(self) -> Serving:
        return Serving(
            self.rt,
            self.key,
            self.body,
            self.spec,
            self.serving_record,
            self.status.metrics,
            self.event,
            list(self.old.serving),
        )

    def commit(self, requeue: float | None) -> float | None:
        """Every pass that read the published revision ends by rolling it out to spec.serving's targets."""
        if self.serving_on and (self.spec.serving or self.old.serving):
            statuses, wait = self._serving().run()
            self.status.serving = statuses
            self.status.serving_summary = summary(statuses)
            self._record_serving(statuses)
            if wait is not None:
                requeue = wait if requeue is None else min(requeue, wait)
        elif self.serving_on:
            self.status.serving = []
            self.status.serving_summary = None
        return super().commit(requeue)

    def _record_serving(self, statuses: list[ServingStatus]) -> None:
        """status.history: the outcome of each kserve rollout, on the revision it was about."""
        for s in statuses:
            if s.phase is None or not s.target.startswith("kserve/"):
                continue
            revision = s.canary_revision if s.phase in (ServingPhase.PROGRESSING, ServingPhase.CANARY) else s.revision
            if s.phase == ServingPhase.ROLLED_BACK:
                revision = rolled_back_revision(s.message) or revision
            entry = next((h for h in self.status.history if h.revision == revision), None)
            if entry is None:
                continue
            what = f"{s.phase} at {s.since}" if s.since else str(s.phase)
            if s.phase in (ServingPhase.ROLLED_BACK, ServingPhase.FAILED) and s.message:
                what += f": {s.message}"
            entry.serving[s.target] = truncate(what, 300)

    def written_view(self) -> tuple[Any, ...]:
        return (self.status.phase, self.status.observed_generation, self.status.revision, self.status.fingerprint)

    def _run_publishing(self) -> float | None:
        # What only the API server can tell about the spec comes first: a spec refused here claims no prefix.
        experts = self._select()
        refusal = self._selection_refusal(experts)
        if refusal is not None:
            return self.fail(refusal.reason, refusal.message, self.settings.resync_seconds)
        # Nothing is read, written, pinned or deleted under the output prefix before it is ours.
        claim = self.claim(self.output, "spec.output.uri", legacy_owner=self._legacy_owner)
        if not claim.owned:
            self.refuse(
                Refusal("OutputOwnedByAnother", claim.message), phase=MergedPhase.FAILED, condition_type=MERGING
            )
            return self.commit(self.settings.resync_seconds)
        try:
            return self._run(experts)
        except PublishConflict as err:
            # Another writer moved current.json between our read and our compare-and-swap: the next pass re-reads.
            message = f"publishing raced with another writer ({err}); re-reading {artifacts.current_uri(self.output)}"
            log.info("%s/%s: %s", self.namespace, self.name, message)
            if self.old.message != truncate(message):
                self.event("Warning", "PublishConflict", message)
            self.status.message = truncate(message)
            self.condition(MERGING, False, "PublishConflict", message)
            return self.commit(1.0)

    def admit(self) -> Refusal | None:
        """The URIs this namespace may read and write, the image and the resources, before any S3 request or Job."""
        spec = self.spec
        kserve = [t.key for t in spec.serving if t.kserve is not None]
        if kserve and not self.settings.kserve:
            return Refusal(
                "KServeDisabled",
                f"spec.serving names {', '.join(kserve)}, but this operator may not patch InferenceServices: KServe "
                "serving is off (the chart's serving.kserve.enabled, LANGMERGE_KSERVE)",
            )
        return check_uris(
            self.settings,
            self.namespace,
            [("spec.baseModel.uri", spec.base_model.uri, False), ("spec.output.uri", spec.output.uri, True)],
        ) or check_job_spec(
            self.image,
            "spec.image" if spec.image else "the operator's trainer image",
            spec.resources,
            "spec.resources",
            self.settings,
        )

    def _legacy_owner(self) -> tuple[str, str] | None:
        """An output prefix published before ownership records: the MergedModel named in its published manifest."""
        current = read_current(self.rt.store, self.output).record
        if current is None:
            return None
        manifest = self.rt.store.get_record(current.manifest_uri, MergeManifest)
        if manifest is None:
            return None
        return manifest.namespace, manifest.name

    def _suspended(self, message: str) -> float | None:
        """spec.suspend: nothing is published, rolled back or garbage-collected."""
        self.status.active_job = None
        self.set_phase(MergedPhase.SUSPENDED, f"spec.suspend is true: {message}")
        self.condition(MERGING, False, "Suspended", self.status.message or "")
        return self.commit(self.settings.resync_seconds)

    def _selection_refusal(self, experts: list[SelectedExpert]) -> Refusal | None:
        """Weights that no selected expert's language has, or weight 0 for every selected language."""
        weights = self.spec.parameters.weights
        if not weights:
            return None
        trunk = self.spec.trunk.expert if self.spec.trunk is not None else None
        served = sorted({e.spec.language for e in experts if e.spec is not None and e.name != trunk})
        unknown = sorted(set(weights) - set(served))
        if unknown:
            return Refusal(
                "WeightsWithoutExpert",
                f"parameters.weights names language(s) {', '.join(unknown)} that no selected LanguageExpert "
                f"serves (they serve: {', '.join(served) or 'none'})",
            )
        if served and all(weights.get(language, 1.0) == 0 for language in served):
            return Refusal(
                "InvalidSpec",
                f"invalid spec: spec.parameters.weights gives every selected language weight 0 ({', '.join(served)}): "
                "the merge would be the base model; give at least one language a weight above 0",
            )
        return None

    def _run(self, experts: list[SelectedExpert]) -> float | None:
        spec = self.spec
        store = self.rt.store
        current = read_current(store, self.output)
        self._observe(current)
        self.serving_on = True
        resync = self.settings.resync_seconds

        reference: AdapterSource | None = None
        if spec.trunk is not None:
            experts = [e for e in experts if e.name != spec.trunk.expert]  # the trunk is no language of the merge
            trunk = self._trunk(spec.trunk.expert, experts)
            if isinstance(trunk, Stop):
                return trunk.requeue
            reference = trunk
        stop = self._check_selection(experts)
        if stop is not None:
            return stop.requeue
        if spec.pin_revision is not None:
            return self._pinned(spec.pin_revision, current)
        ready = [e for e in experts if e.ready]
        merge_spec = self._merge_spec(experts, ready)
        if isinstance(merge_spec, Stop):
            return merge_spec.requeue

        inputs = self._inputs(ready)
        self._label_coverage(inputs)
        if all(i.weight == 0 for i in inputs):
            zero_weighted = ", ".join(i.language for i in inputs)
            return self.fail(
                "InvalidSpec",
                f"invalid spec: spec.parameters.weights gives every selected language weight 0 ({zero_weighted}): the "
                "merge would be the base model; give at least one language a weight above 0",
            )
        base_digest, count = store.prefix_digest(spec.base_model.uri)
        if count == 0:
            return self.fail("BaseModelMissing", f"no objects under the base model URI {spec.base_model.uri}", resync)
        fingerprint = merge_fingerprint(
            merge_spec,
            inputs=[(i.language, i.adapter_digest, i.weight) for i in inputs],
            base_model_digest=base_digest,
            image=self.image,
            validation=[(i.language, i.dataset.validation_uri) for i in inputs],
            label_counts=[(i.language, i.label_counts) for i in inputs],
            reference_digest=reference.digest if reference is not None else None,
        )
        if current.record is not None and current.record.fingerprint == fingerprint:
            self.status.desired_fingerprint = fingerprint
            self.status.inputs_changed_at = None
            self.status.active_job = None
            self.status.attempts = 0
            self._ready_current(current.record)
            return self.commit(resync)

        # Debounce: merge once the inputs have been unchanged for settleSeconds.
        if self.status.desired_fingerprint != fingerprint:
            self.status.desired_fingerprint = fingerprint
            self.status.inputs_changed_at = self.now_s
            self.status.attempts = 0
        changed_at = artifacts.parse_time(self.status.inputs_changed_at) or self.now
        settle_until = changed_at + timedelta(seconds=spec.settle_seconds)

        prefix = artifacts.merge_prefix(self.output, fingerprint)
        manifest_uri = artifacts.join(prefix, artifacts.MANIFEST)
        manifest = store.get_record(manifest_uri, MergeManifest)
        # A Job that merged into another output (the output moved since) is not one of this output's attempts.
        jobs = self.jobs = [
            j
            for j in self.owned_jobs(COMPONENT_MERGE)
            if j.artifact is None or j.artifact.rstrip("/") == artifacts.merge_prefix(self.output, j.fingerprint)
        ]
        if manifest is not None:
            self._cancel_outdated(jobs, fingerprint)
            return self._gate_and_publish(manifest, manifest_uri, current, fingerprint)

        if settle_until > self.now:
            wait = (settle_until - self.now).total_seconds()
            self.set_phase(
                MergedPhase.WAITING, f"inputs changed; merging at {fmt_time(settle_until)} unless they change again"
            )
            self.condition(MERGING, False, "Settling", self.status.message or "")
            return self.commit(wait)

        task = MergeTask(
            fingerprint=fingerprint,
            output_uri=prefix,
            namespace=self.namespace,
            name=self.name,
            method=spec.method,
            parameters=merge_spec.effective_parameters(),
            base_model=BaseModelIdentity(
                uri=spec.base_model.uri, revision=spec.base_model.revision, digest=base_digest
            ),
            inputs=inputs,
            output=spec.output,
            evaluation=spec.evaluation,
            image=self.image,
            search=spec.search,
            reference=reference,
            evaluation_cache_uri=artifacts.evaluation_cache_uri(self.output),
        )
        return self.commit(self._converge(task, jobs, prefix))

    def _trunk(self, name: str, experts: list[SelectedExpert]) -> AdapterSource | Stop:
        """spec.trunk: its current adapter, every selected expert starting from it; else Stop (status says why)."""
        from langmerge.kube import ObjectKey

        strays = sorted(
            e.name
            for e in experts
            if e.spec is not None and (e.spec.init_from.expert if e.spec.init_from is not None else None) != name
        )
        if strays:
            return Stop(
                self.fail(
                    "NotBranchedFromTrunk",
                    f"spec.trunk is {name}, but LanguageExpert(s) {', '.join(strays)} do not start from it "
                    f"(spec.initFrom.expert: {name}); a merge relative to a trunk needs every expert branched from it",
                )
            )
        body = self.rt.kube.get_expert(ObjectKey(self.namespace, name))
        status = LanguageExpertStatus.model_validate((body or {}).get("status") or {})
        adapter = status.adapter
        if body is None or adapter is None or status.trained_fingerprint != status.desired_fingerprint:
            what = "does not exist" if body is None else "has no current adapter"
            message = f"the trunk LanguageExpert {name} {what}; waiting for it"
            return Stop(self._waiting("WaitingForTrunk", message, self.settings.resync_seconds))
        # An expert still trained from an older trunk adapter has a new desired fingerprint: it is not Ready, and
        # the merge waits for it (or, with requireAllExperts false, merges without it).
        return AdapterSource(
            uri=adapter.uri, digest=adapter.digest, source=f"the trunk LanguageExpert {self.namespace}/{name}"
        )

    def _check_selection(self, experts: list[SelectedExpert]) -> Stop | None:
        """The selected experts can be merged at all: at least one, on this MergedModel's base model, of one task
        type. Stop (status and Event say why) or None."""
        spec = self.spec
        if not experts:
            what = (
                f"selector {spec.experts.selector.to_query()}"
                if spec.experts.selector is not None
                else f"names {', '.join(spec.experts.names or [])}"
            )
            message = f"no LanguageExpert in namespace {self.namespace} matches {what}"
            return Stop(self._waiting("NoExperts", message, self.settings.resync_seconds))
        for expert in experts:
            if expert.spec is None:
                continue
            if (expert.spec.base_model.uri, expert.spec.base_model.revision) != (
                spec.base_model.uri,
                spec.base_model.revision,
            ):
                return Stop(
                    self.fail(
                        "BaseModelMismatch",
                        f"LanguageExpert {expert.name} is trained on {expert.spec.base_model.identity()}, but this "
                        f"MergedModel merges onto {spec.base_model.identity()}; fix one of them or deselect the expert",
                    )
                )
        mismatch = _task_type_mismatch(experts)
        if mismatch is not None:
            return Stop(self.fail("TaskTypeMismatch", mismatch))
        return None

    def _merge_spec(self, experts: list[SelectedExpert], ready: list[SelectedExpert]) -> MergedModelSpec | Stop:
        """The spec this merge runs with: the Ready experts (one per language; all of them with requireAllExperts),
        weights only for languages a selected expert serves, those of experts not Ready dropped. Sets the
        ExpertsReady condition; Stop when the merge cannot run (yet)."""
        spec = self.spec
        missing = sorted(e.name for e in experts if not e.ready)
        self.status.missing_experts = missing
        languages: dict[str, str] = {}
        for expert in ready:
            assert expert.spec is not None
            other = languages.setdefault(expert.spec.language, expert.name)
            if other != expert.name:
                return Stop(
                    self.fail(
                        "DuplicateLanguage",
                        f"LanguageExperts {other} and {expert.name} both serve language {expert.spec.language}; "
                        "select one expert per language",
                    )
                )
        if missing and (spec.require_all_experts or not ready):
            self.condition(EXPERTS_READY, False, "ExpertsNotReady", f"waiting for: {', '.join(missing)}")
            message = f"waiting for experts to be Ready: {', '.join(missing)}"
            return Stop(self._waiting("ExpertsNotReady", message, self.settings.resync_seconds))
        served = {e.spec.language for e in experts if e.spec is not None}
        unknown = sorted(set(spec.parameters.weights) - served)
        if unknown:
            return Stop(
                self.fail(
                    "WeightsWithoutExpert",
                    f"parameters.weights names language(s) {', '.join(unknown)} that no selected LanguageExpert "
                    f"serves (they serve: {', '.join(sorted(served)) or 'none'})",
                )
            )
        # Weights of selected experts that are not Ready (requireAllExperts: false) do not apply to this merge.
        present = {e.spec.language for e in ready if e.spec is not None}
        ignored = sorted(set(spec.parameters.weights) - present)
        merge_spec = spec
        if ignored:
            weights = {k: v for k, v in spec.parameters.weights.items() if k in present}
            merge_spec = spec.model_copy(update={"parameters": spec.parameters.model_copy(update={"weights": weights})})
        self.condition(
            EXPERTS_READY,
            True,
            "AllReady" if not missing else "PartiallyReady",
            f"{len(ready)} expert(s) ready"
            + (f"; merging without: {', '.join(missing)}" if missing else "")
            + (f"; weights of {', '.join(ignored)} ignored (no Ready expert)" if ignored else ""),
        )
        return merge_spec

    # -- reading -------------------------------------------------------------------------------------------------
    def _select(self) -> list[SelectedExpert]:
        sel = self.spec.experts
        if sel.selector is not None:
            bodies = self.rt.kube.list_experts(self.namespace, sel.selector.to_query() or None)
            return sorted((_selected(b) for b in bodies), key=lambda e: e.name)
        found = []
        from langmerge.kube import ObjectKey

        for name in sel.names or []:
            body = self.rt.kube.get_expert(ObjectKey(self.namespace, name))
            if body is None:
                found.append(SelectedExpert(name, None, LanguageExpertStatus(message="not found"), {}))
            else:
                found.append(_selected(body))
        return found

    def _inputs(self, ready: list[SelectedExpert]) -> list[MergeTaskInput]:
        weights = self.spec.parameters.weights
        inputs = []
        for e in ready:
            assert e.spec is not None and e.status.adapter is not None
            inputs.append(
                MergeTaskInput(
                    expert=e.name,
                    language=e.spec.language,
                    adapter_uri=e.status.adapter.uri,
                    adapter_digest=e.status.adapter.digest,
                    weight=weights.get(e.spec.language, 1.0),
                    dataset=e.spec.dataset,
                    expert_metrics=e.status.adapter.metrics,
                    max_seq_length=e.spec.training.max_seq_length,
                    task_type=e.spec.task_type,
                    labels=e.spec.labels,
                    label_counts=e.status.adapter.label_counts if e.spec.is_classifier else None,
                )
            )
        return sorted(inputs, key=lambda i: i.language)

    def _label_coverage(self, inputs: list[MergeTaskInput]) -> None:
        """Classifiers: the LabelsCovered condition over the experts being merged. A label no expert (of weight above
        0) has a training example of does not stop the merge: the condition and a ``LabelNotCovered`` Warning Event
        (once per message) say that the merged model will hardly predict it."""
        labels = inputs[0].labels if inputs and inputs[0].task_type == TaskType.SEQUENCE_CLASSIFICATION else None
        if not labels:
            self.drop_condition(LABELS_COVERED)
            return
        unknown = [i.language for i in inputs if i.label_counts is None]
        if unknown:
            self.condition(
                LABELS_COVERED,
                ConditionStatus.UNKNOWN,
                "LabelCountsUnknown",
                f"the adapters of {', '.join(unknown)} do not record their label counts (trained by an older "
                "trainer): head rows are the language-weighted average",
            )
            return
        uncovered = [
            label
            for label in labels
            if not any(i.weight > 0 and (i.label_counts or {}).get(label, 0) > 0 for i in inputs)
        ]
        if not uncovered:
            self.condition(LABELS_COVERED, True, "AllLabelsCovered", "every label has training examples in an expert")
            return
        named = ", ".join(repr(label) for label in uncovered)
        message = (
            f"no selected expert has a training example of label(s) {named} (experts: "
            f"{', '.join(f'{i.expert} ({i.language})' for i in inputs if i.weight > 0)}): the merged model has no "
            "head row trained to predict them and will hardly ever predict them; add training data with these "
            "labels to an expert"
        )
        self.condition(LABELS_COVERED, False, LABEL_NOT_COVERED, message)
        memo = self.rt.memo(self.key)
        old = get_condition(self.old.conditions, LABELS_COVERED)
        shown_before = old is not None and old.reason == LABEL_NOT_COVERED and old.message == truncate(message)
        if memo.labels_warned != message and not shown_before:
            self.event("Warning", LABEL_NOT_COVERED, message)
        memo.labels_warned = message

    def _observe(self, current: Current) -> None:
        """S3 is the record: status (revision, inputs, metrics, history), the ``Published`` Events and garbage
        collection follow ``current.json`` and the revision records, whoever moved it and whatever the last pass
        managed to write (a crash between publishing and writing status loses nothing)."""
        record = current.record
        if record is None:
            return
        self.serving_record = record
        self._show_current(current)
        memo = self.rt.memo(self.key)
        lagging = (self.old.revision, self.old.fingerprint) != (record.revision, record.fingerprint) or not any(
            h.revision == record.revision for h in self.old.history
        )
        if not lagging and memo.observed_revision == record.revision:
            return
        keep = self.spec.publish.keep_revisions
        chain = published_chain(self.rt.store, self.output, record, max(self.settings.history_limit, keep, 2) + 1)
        if lagging:
            # Records written before they carried cost and Job keep what the status said about them.
            shown = {h.revision: h for h in self.old.history}
            self.status.history = [
                shown[r.revision] if r.cost is None and r.revision in shown else self._history_entry(r, before)
                for r, before in zip(chain, [None, *chain[:-1]], strict=True)
            ][-self.settings.history_limit :]
            for entry in self.status.history:  # what serving did is known only to the status (and the Events)
                if entry.revision in shown and not entry.serving:
                    entry.serving = dict(shown[entry.revision].serving)
            self.status.metrics = self._figures(record)
            seen = self.old.revision if self.old.revision is not None else record.revision - 1
            for r in chain:
                # A removed status is rebuilt from S3 without posting again what was announced when it happened.
                if r.revision > seen and (self.old.revision is not None or self.is_news(r.published_at)):
                    metrics.PUBLISHED.labels(r.reason).inc()
                    self.event("Normal", "Published", self._published_message(r, chain))
                    if r.revision == record.revision:  # an older revision's announcement would be stale now
                        self._serving().announce(cloudevents.PUBLISHED, r.revision, uri=r.model_uri)
        if self.spec.suspend:
            return  # spec.suspend: nothing is garbage-collected (the next pass after it is lifted does it)
        deleted = garbage_collect(
            self.rt.store,
            self.output,
            chain,
            keep,
            protect={record.fingerprint}
            | ({self.status.desired_fingerprint} if self.status.desired_fingerprint else set()),
        )
        if deleted:
            self.event("Normal", "GarbageCollected", f"deleted merge outputs {', '.join(deleted)} (keepRevisions)")
        memo.observed_revision = record.revision

    def _history_entry(self, record: PublishedRevision, before: PublishedRevision | None) -> PublishRecord:
        cost = record.cost
        return PublishRecord(
            revision=record.revision,
            fingerprint=record.fingerprint,
            uri=record.model_uri,
            published_at=record.published_at,
            reason=record.reason,
            changed_inputs=_changed_inputs(record, before) if record.reason == "merged" else [],
            removed_inputs=_removed_inputs(record, before) if record.reason == "merged" else [],
            wall_seconds=round(cost.wall_seconds, 3) if cost else None,
            gpu_seconds=round(cost.gpu_seconds, 3) if cost else None,
            cpu_seconds=round(cost.cpu_seconds, 3) if cost else None,
            job=record.job,
        )

    def _published_message(self, record: PublishedRevision, chain: list[PublishedRevision]) -> str:
        before = next((r for r in chain if r.revision == record.previous_revision()), None)
        changed = _changed_inputs(record, before) if record.reason == "merged" else []
        removed = _removed_inputs(record, before) if record.reason == "merged" else []
        what = f"rollback to revision {record.rollback_of}" if record.reason == "rollback" else "merged"
        return (
            f"revision {record.revision} ({what}, fingerprint {record.fingerprint}) at {record.model_uri}"
            + (f"; changed inputs: {', '.join(changed)}" if changed else "")
            + (f"; removed inputs: {', '.join(removed)}" if removed else "")
            + refactor_note(record.refactorization)
            + search_note(record.search)
        )

    def _figures(self, record: PublishedRevision) -> dict[str, LanguageMetrics]:
        """Per-language figures of the published revision (the merge manifest's, for records that lack them)."""
        expert_metrics = record.expert_metrics
        merged_metrics = record.metrics
        base_metrics = record.base_metrics
        if not expert_metrics:
            manifest = self.rt.store.get_record(record.manifest_uri, MergeManifest)
            if manifest is not None:
                expert_metrics, merged_metrics = manifest.expert_metrics, manifest.evaluation
                base_metrics = manifest.base_metrics
        return quality_gate(self.spec.evaluation, merged_metrics, expert_metrics, base_metrics)[1]

    def _show_current(self, current: Current) -> None:
        """status.revision/uri/inputs mirror current.json (S3 is the record)."""
        record = current.record
        if record is None:
            return
        self.status.revision = record.revision
        self.status.fingerprint = record.fingerprint
        self.status.uri = record.model_uri
        self.status.inputs = [
            MergeInput(
                expert=i.expert,
                language=i.language,
                adapter_uri=i.adapter_uri,
                adapter_digest=i.adapter_digest,
                weight=i.weight,
            )
            for i in record.inputs
        ]
        self.status.refactorization = (
            RefactorizationStatus.model_validate(record.refactorization.model_dump())
            if record.refactorization is not None
            else None
        )
        self.status.search = _search_status(record.search) if record.search is not None else None

    def _waiting(self, reason: str, message: str, requeue: float) -> float | None:
        self.set_phase(MergedPhase.WAITING, message)
        self.condition(MERGING, False, reason, message)
        ready = self.status.revision is not None
        self.condition(
            READY,
            False,
            reason,
            message + (f"; revision {self.status.revision} stays published" if ready else ""),
        )
        return self.commit(requeue)

    def _ready_current(self, record: PublishedRevision) -> None:
        self.set_phase(MergedPhase.READY)
        message = f"revision {record.revision} ({record.fingerprint}) published at {record.model_uri}"
        self.condition(READY, True, "Published", message)
        self.condition(MERGING, False, "Idle")
        self.condition(QUALITY_GATE, True, "Passed", f"revision {record.revision} passed the quality gate when merged")

    # -- converging ----------------------------------------------------------------------------------------------
    def _cancel_outdated(self, jobs: list[JobState], fingerprint: str) -> list[JobState]:
        """Running merge Jobs for other fingerprints: cancelled under onChange=restart; returned otherwise."""
        message = "cancelled Job {job.name}: its inputs are outdated"
        return self.cancel_outdated(jobs, fingerprint, self.spec.on_change, "MergeCancelled", message)

    def _queued(self, job: JobState) -> float:
        """The merge Job waits for Kueue: for its first admission, or again after a preemption (recorded with an
        Event; not a failed attempt: the merge runs again from the start once admitted)."""
        queue = self.settings.kueue_queue or "its LocalQueue"
        # Kueue resets a Job's startTime when it suspends it: that the Job ran is what this status saw before.
        ran = self.old.active_job == job.name and (
            self.old.phase == MergedPhase.MERGING
            or (self.old.phase == MergedPhase.QUEUED and (self.old.message or "").startswith("Preempted"))
        )
        if job.started is not None or ran:
            message = (
                f"Preempted (Kueue): Job {job.name} (attempt {job.attempt}) was suspended; it runs again once {queue} "
                "admits it (not a failed attempt)"
            )
            reason = "PreemptedByKueue"
            if self.old.phase != MergedPhase.QUEUED or not (self.old.message or "").startswith("Preempted"):
                self.event("Warning", "Preempted", message)
        else:
            message = f"Queued (Kueue): Job {job.name} (attempt {job.attempt}) waits for admission in {queue}"
            reason = "QueuedByKueue"
        self.set_phase(MergedPhase.QUEUED, message)
        self.condition(MERGING, False, reason, message)
        return self.settings.resync_seconds

    def _converge(self, task: MergeTask, jobs: list[JobState], prefix: str) -> float | None:
        """The desired merge is not committed (the flow: ReconcilePass.converge)."""
        return self.converge(
            task.fingerprint,
            jobs,
            prefix,
            self.spec.retry,
            lambda attempt: self._start(task.model_copy(update={"attempt": attempt}), jobs),
        )

    def job_running(self, job: JobState, prefix: str) -> float | None:
        self.status.active_job = job.name
        if job.suspended:
            return self._queued(job)
        self.set_phase(MergedPhase.MERGING, f"Job {job.name} is merging fingerprint {job.fingerprint}")
        self.condition(MERGING, True, "JobRunning", self.status.message or "")
        return self.settings.progress_seconds

    def gave_up(self, last: FailureRecord, attempts: int) -> float | None:
        self.status.active_job = None
        return (
            self.fail(
                "MergeFailed",
                f"merge failed after {attempts} attempt(s): {last.error_class}: {last.message}",
                self.settings.resync_seconds,
            )
            or self.settings.resync_seconds
        )

    def backing_off(self, decision: RetryDecision, last: FailureRecord) -> None:
        assert decision.wait_until is not None
        self.status.active_job = None
        self.set_phase(
            MergedPhase.MERGING,
            f"attempt {decision.attempts} failed ({last.message}); retry at {fmt_time(decision.wait_until)}",
        )
        self.condition(MERGING, False, "RetryBackoff", self.status.message or "")

    def _start(self, task: MergeTask, jobs: list[JobState]) -> float | None:
        spec = self.spec
        if spec.suspend:
            self.status.active_job = None
            self.set_phase(MergedPhase.SUSPENDED, "spec.suspend is true: no new merge Jobs")
            self.condition(MERGING, False, "Suspended", self.status.message or "")
            return self.settings.resync_seconds
        outdated = self._cancel_outdated(jobs, task.fingerprint)
        if outdated:
            self.status.active_job = outdated[0].name
            self.set_phase(
                MergedPhase.MERGING,
                f"Job {outdated[0].name} merges outdated inputs; fingerprint {task.fingerprint} follows when it finishes",
            )
            self.condition(MERGING, True, "Superseded", self.status.message or "")
            return self.settings.progress_seconds
        owner = Owner(MERGED_KIND, self.namespace, self.name, self.body["metadata"]["uid"])
        manifest = build_merge_job(owner, task, spec.resources, self.settings)
        created = self.launch_job(
            manifest, component=COMPONENT_MERGE, waiting_phase=MergedPhase.WAITING, condition_type=MERGING
        )
        if created is None or isinstance(created, float):
            return created
        name = manifest["metadata"]["name"]
        if created:
            languages = ", ".join(f"{i.language}:{i.adapter_digest[:8]}" for i in task.inputs)
            self.event(
                "Normal",
                "MergeStarted",
                f"created Job {name} (attempt {task.attempt}) merging {languages} with {task.method}",
            )
        self.status.active_job = name
        if self.settings.kueue_queue:  # created suspended: Kueue admits it
            message = f"Queued (Kueue): Job {name} (attempt {task.attempt}) waits for admission in {self.settings.kueue_queue}"
            self.set_phase(MergedPhase.QUEUED, message)
            self.condition(MERGING, False, "QueuedByKueue", message)
            return self.settings.resync_seconds
        self.set_phase(MergedPhase.MERGING, f"Job {name} merging fingerprint {task.fingerprint}")
        self.condition(MERGING, True, "JobCreated", f"Job {name}")
        return self.settings.progress_seconds

    def _gate_and_publish(
        self, manifest: MergeManifest, manifest_uri: str, current: Current, fingerprint: str
    ) -> float | None:
        spec = self.spec
        self.status.active_job = None
        passed, _, failures = quality_gate(
            spec.evaluation, manifest.evaluation, manifest.expert_metrics, manifest.base_metrics
        )
        if not passed:
            message = "not published: " + "; ".join(failures)
            if self.old.phase != MergedPhase.BLOCKED or self.old.message != truncate(message):
                metrics.QUALITY_GATE_BLOCKS.inc()
                self.event("Warning", "QualityGateFailed", message)
            self.set_phase(MergedPhase.BLOCKED, message)
            below_base = any("worse than the base model" in f for f in failures)
            self.condition(QUALITY_GATE, False, "BelowBase" if below_base else "Regression", message)
            kept = f"revision {current.record.revision} stays current" if current.record else "nothing is published"
            self.condition(READY, False, "QualityGateFailed", f"merge {fingerprint} regressed; {kept}")
            self.condition(MERGING, False, "Blocked")
            return self.commit(self.settings.resync_seconds)
        floor = " and not below the base model" if spec.evaluation.floor == GateFloor.BASE else ""
        self.condition(QUALITY_GATE, True, "Passed", f"every language within evaluation.maxRegression{floor}")
        if spec.suspend:
            return self._suspended(f"merge {fingerprint} passed the quality gate and is not published")
        ours = sorted((j for j in self.jobs if j.fingerprint == manifest.fingerprint), key=lambda j: j.attempt)
        published = publish(
            self.rt.store,
            self.output,
            manifest,
            manifest_uri,
            current,
            reason="merged",
            job=ours[-1].name if ours else None,
        )
        self._after_publish(published)
        return self.commit(self.settings.resync_seconds)

    def _after_publish(self, published: Published) -> None:
        record = published.record
        if published.skipped:
            numbers = ", ".join(str(n) for n in published.skipped)
            self.event(
                "Warning",
                "StaleRevisionClaim",
                f"revision number(s) {numbers} of {self.output} were claimed by a writer that never published them "
                f"(left as they are); published revision {record.revision} instead",
            )
        self._observe(Current(record, None))
        self._ready_current(record)
        self.status.attempts = 0

    def _pinned(self, revision: int, current: Current) -> float | None:
        """Rollback: publish an existing revision's merge output again, as a new revision, without merging."""
        target = read_revision(self.rt.store, self.output, revision)
        if target is None:
            return self.fail("RevisionNotFound", f"spec.pinRevision {revision}: no such revision under {self.output}")
        record = current.record
        if (
            record is not None
            and record.fingerprint == target.fingerprint
            and (record.revision == revision or record.rollback_of == revision)
        ):
            self._ready_current(record)
            self.condition(
                READY, True, "Pinned", f"revision {revision} is pinned; remove spec.pinRevision to resume merging"
            )
            return self.commit(self.settings.resync_seconds)
        manifest = self.rt.store.get_record(target.manifest_uri, MergeManifest)
        if manifest is None:
            return self.fail(
                "RevisionGarbageCollected",
                f"spec.pinRevision {revision}: its merge output {target.manifest_uri} no longer exists "
                "(garbage-collected; raise publish.keepRevisions to keep more)",
            )
        if self.spec.suspend:
            return self._suspended(f"revision {revision} is pinned and not published again (no rollback)")
        new = publish(
            self.rt.store, self.output, manifest, target.manifest_uri, current, reason="rollback", rollback_of=revision
        )
        self._after_publish(new)
        self.condition(
            READY, True, "Pinned", f"revision {revision} is pinned; remove spec.pinRevision to resume merging"
        )
        return self.commit(self.settings.resync_seconds)


def refactor_note(summary: RefactorSummary | None) -> str:
    """The published adapter's fidelity, for the Published Event: errors over modules and the chosen ranks."""
    if summary is None:
        return ""
    ranks = (
        f"rank {summary.min_rank}"
        if summary.min_rank == summary.max_rank
        else f"ranks {summary.min_rank}-{summary.max_rank} (mean {summary.mean_rank:g})"
    )
    return (
        f"; adapter {ranks}, relative error max {summary.max_relative_error:.2g} "
        f"(mean {summary.mean_relative_error:.2g}, worst module {summary.worst_module})"
    )


def _format_parameters(parameters: dict[str, Any]) -> str:
    shown = {k: v for k, v in parameters.items() if k not in ("include_modules", "exclude_modules") and v != {}}
    return ", ".join(f"{'lambda' if k == 'lambda_' else k}={v}" for k, v in sorted(shown.items()))


def search_note(search: SearchRecord | None) -> str:
    """What a merge search chose, for the Published Event."""
    if search is None:
        return ""
    chosen = search.chosen
    note = (
        f"; search ({search.objective} {search.metric} vs each expert, {search.candidates} candidates, "
        f"{search.stopped}) chose {chosen.method}({_format_parameters(chosen.parameters)}): {chosen.objective:+.4g}"
    )
    if search.default is not None:
        note += f", the spec's own {search.default.method}: {search.default.objective:+.4g}"
    return note


def _search_status(record: SearchRecord) -> SearchStatus:
    def candidate(c: SearchCandidate) -> SearchCandidateStatus:
        return SearchCandidateStatus(
            method=c.method, parameters=c.parameters, objective=c.objective, relative=c.relative
        )

    return SearchStatus(
        objective=record.objective,
        candidates=record.candidates,
        seconds=record.seconds,
        stopped=record.stopped,
        chosen=candidate(record.chosen),
        default=candidate(record.default) if record.default is not None else None,
        top=[candidate(c) for c in record.top[:3]],
    )


def _task_type_mismatch(experts: list[SelectedExpert]) -> str | None:
    """Why the selected experts cannot be merged into one model (different task types or label sets), or None.

    A classifier's head is merged like its adapter, class by class, so every expert must have the same labels in the
    same order."""
    seen: tuple[str, str, list[str] | None] | None = None
    for expert in experts:
        if expert.spec is None:
            continue
        kind = (expert.name, str(expert.spec.task_type), expert.spec.labels)
        if seen is None:
            seen = kind
            continue
        if kind[1] != seen[1]:
            return (
                f"LanguageExpert {expert.name} trains a {kind[1]} model but {seen[0]} a {seen[1]} model: "
                "one MergedModel merges experts of one task type"
            )
        if kind[2] != seen[2]:
            return (
                f"LanguageExpert {expert.name} has labels {kind[2]} but {seen[0]} has {seen[2]}: experts merged "
                "into one classifier need the same label list in the same order"
            )
    return None


def reconcile_merged(rt: Runtime, key: Key) -> float | None:
    """One pass over ``key``; returns seconds until the next pass (None: only on events)."""
    assert key[0] == MERGED
    return reconcile_object(rt, key, rt.kube.get_merged, cleanup_deleted_merged, MergedReconciler)


def cleanup_deleted_merged(rt: Runtime, key: Key) -> None:
    """The MergedModel is gone: stop its merge Jobs. Its published models stay in S3 (they are data)."""
    delete_jobs_of(rt, key[1], LABEL_MERGED, key[2])
    rt.forget(key)


def _changed_inputs(record: PublishedRevision, before: PublishedRevision | None) -> list[str]:
    """Experts whose adapter differs from the revision before (every expert for the first revision)."""
    previous = {i.language: i.adapter_digest for i in (before.inputs if before else [])}
    if before is None and record.previous_revision() is not None:
        return []  # the revision before is beyond what was read: unknown
    return sorted(i.expert for i in record.inputs if previous.get(i.language) != i.adapter_digest)


def _removed_inputs(record: PublishedRevision, before: PublishedRevision | None) -> list[str]:
    """Experts of the revision before that this one no longer merges (deleted or deselected)."""
    if before is None:
        return []
    return sorted({i.expert for i in before.inputs} - {i.expert for i in record.inputs})
