"""LanguageExpert reconciliation: desired state = training fingerprint; S3 says whether it exists.

One pass, level-triggered: read the object, its Jobs and S3 fresh, decide, act (at most one Job created or cancelled),
write the status if it changed, and say when to look again. Safe to run any number of times: the same inputs give
the same fingerprint, the same Job name and the same S3 prefix, so re-applying, restarting or adopting never trains
twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import ValidationError

from langmerge import artifacts
from langmerge.admission import Refusal, check_job_spec, check_uris
from langmerge.api.expert import (
    AdapterRef,
    ExpertPhase,
    LanguageExpertSpec,
    LanguageExpertStatus,
    Progress,
    TrainingRecord,
    TrainingShape,
)
from langmerge.api.expert import (
    Runtime as TrainingRuntime,
)
from langmerge.artifacts import AdapterManifest, BaseModelIdentity, FailureRecord, ProgressRecord
from langmerge.constants import COMPONENT_TRAINING, EXPERT_KIND, EXPERT_PLURAL, LABEL_EXPERT, TRAINJOB_KIND
from langmerge.controller import metrics
from langmerge.controller.attempts import RetryDecision, failure_records
from langmerge.controller.jobs import JobState, Owner, build_training_job
from langmerge.controller.reconcile import (
    ReconcilePass,
    delete_jobs_of,
    fmt_time,
    format_validation_error,
    object_exists,
    reconcile_object,
)
from langmerge.controller.runtime import EXPERT, Key, Runtime
from langmerge.controller.status import (
    DATA_CHANGED,
    LABELS_COVERED,
    READY,
    TRAINING,
    bounded,
    get_condition,
    is_true,
    missing_labels,
    truncate,
)
from langmerge.controller.trainjobs import build_trainjob
from langmerge.controller.trunks import TrunkProblem, trunk_source
from langmerge.fingerprint import training_fingerprint
from langmerge.ownership import delete_owned, live_owner
from langmerge.store import MalformedRecord
from langmerge.tasks import AdapterSource, TrainTask

log = logging.getLogger(__name__)


#: Event and condition reason: a classifier expert's training data has no example of some of its labels.
LABELS_MISSING = "LabelsMissing"


def parse_expert_spec(raw: dict[str, Any]) -> LanguageExpertSpec:
    return LanguageExpertSpec.model_validate(raw)


def gave_up_message(last: FailureRecord, attempts: int, collapsed: int) -> str:
    """What the status says once every retry is spent: ``attempts`` failed attempts counted, ``collapsed`` of them
    ended with a collapsed adapter (nothing committed), ``last`` the latest one's record."""
    if attempts and collapsed >= attempts:
        return f"training failed: every attempt collapsed ({collapsed} of {attempts}); the last: {last.message}"
    return f"training failed after {attempts} attempt(s): {last.error_class}: {last.message}"


def labels_missing_message(missing: list[str], total: int, adapter_digest: str) -> str:
    """What the expert's status and its ``LabelsMissing`` Event say about labels its data has no example of."""
    named = ", ".join(repr(label) for label in missing)
    return (
        f"the training data of adapter {adapter_digest} has no example of label(s) {named} ({len(missing)} of "
        f"{total} labels): this expert never learned to predict them (its head only learned to push them down); "
        "a merge takes those labels' head rows from the experts that have examples of them"
    )


@dataclass
class DataView:
    """The dataset as seen in S3 this pass."""

    digest: str
    eval_digest: str | None
    objects: int

    @property
    def combined(self) -> str:
        return self.digest if self.eval_digest is None else f"{self.digest}+{self.eval_digest}"


def split_combined(value: str) -> tuple[str, str | None]:
    data, _, evaluation = value.partition("+")
    return data, evaluation or None


@dataclass(frozen=True)
class Settled:
    """What the settle window leaves to train: the data (its combined digest), the seconds until new data has
    settled (None: nothing settling), and ``hold_until``: the pass stops for that long (nothing trained yet)."""

    data: str
    wait: float | None
    hold_until: float | None = None


class ExpertReconciler(ReconcilePass[LanguageExpertStatus]):
    """One reconcile pass over one LanguageExpert."""

    kind = EXPERT_KIND
    plural = EXPERT_PLURAL
    status_model = LanguageExpertStatus
    #: Nothing but the poll can have changed S3 for the desired fingerprint (see :meth:`_run`).
    quiet: bool = False
    #: spec.initFrom: the digest of the trunk adapter this pass trains from (part of the fingerprint).
    init_digest: str | None = None
    #: The failure records of the desired fingerprint's attempts, as this pass read them (:meth:`failure_records`).
    records: dict[int, FailureRecord] | None = None

    # -- the pass ------------------------------------------------------------------------------------------------
    def run(self) -> float | None:
        try:
            spec = parse_expert_spec(self.body.get("spec") or {})
        except ValidationError as err:
            message = f"invalid spec: {format_validation_error(err)}"
            if self.old.message != truncate(message):
                self.event("Warning", "InvalidSpec", message)
            self.set_phase(ExpertPhase.FAILED, message)
            self.condition(READY, False, "InvalidSpec", message)
            self.degrade("InvalidSpec", message)
            return self.commit(None)
        self.spec = spec
        self.image = spec.image or self.settings.trainer_image
        self.prefix_root = artifacts.expert_root(self.settings.artifacts_uri, self.namespace, self.name)
        refusal = self.admit(spec)
        if refusal is not None:
            self.refuse(refusal, phase=ExpertPhase.FAILED, condition_type=TRAINING)
            return self.commit(None)
        return self.guarded(
            self._run_owned,
            failed_phase=ExpertPhase.FAILED,
            user_error_retry=float(spec.schedule.poll_interval_seconds),
        )

    def _run_owned(self) -> float | None:
        """The pass, once this expert owns its artifact prefix (checked at most once per poll interval)."""
        memo = self.rt.memo(self.key)
        uid = self.body["metadata"].get("uid")
        poll = float(self.spec.schedule.poll_interval_seconds)
        if (
            memo.claimed is None
            or memo.claimed[:2] != (self.prefix_root, uid)
            or self.rt.monotonic() - memo.claimed[2] >= poll
        ):
            claim = self.claim(self.prefix_root, "the expert's artifact prefix")
            if not claim.owned:
                memo.claimed = None
                self.refuse(
                    Refusal("ArtifactsOwnedByAnother", claim.message), phase=ExpertPhase.FAILED, condition_type=TRAINING
                )
                return self.commit(self.settings.resync_seconds)
            memo.claimed = (self.prefix_root, uid, self.rt.monotonic())
        return self._run()

    def written_view(self) -> tuple[Any, ...]:
        adapter = self.status.adapter
        return (
            self.status.phase,
            self.status.observed_generation,
            self.status.trained_fingerprint,
            self.status.desired_fingerprint,
            adapter.digest if adapter else None,
        )

    def _base_digest(self, spec_changed: bool, poll: float) -> tuple[str, int]:
        """The base model's digest, listed at most once per poll interval for every expert on that base model."""
        spec = self.spec
        base_id = f"{spec.base_model.uri}@{spec.base_model.revision or ''}"
        mono = self.rt.monotonic()
        known = self.rt.base_digests.get(base_id)
        if known is None or spec_changed or mono - known[2] >= poll or known[1] == 0:
            digest, count = self.rt.store.prefix_digest(spec.base_model.uri)
            known = (digest, count, mono)
            self.rt.base_digests[base_id] = known
        return known[0], known[1]

    def admit(self, spec: LanguageExpertSpec) -> Refusal | None:
        """The URIs this namespace may read, the image, the resources and the runtime, before any S3 request or
        Job."""
        return (
            self.check_runtime(spec)
            or check_uris(
                self.settings,
                self.namespace,
                [
                    ("spec.baseModel.uri", spec.base_model.uri, False),
                    ("spec.dataset.uri", spec.dataset.uri, False),
                    ("spec.dataset.evalUri", spec.dataset.eval_uri, False),
                    ("spec.dataset.validationUri", spec.dataset.validation_uri, False),
                ],
            )
            or check_job_spec(
                self.image,
                "spec.image" if spec.image else "the operator's trainer image",
                spec.resources,
                "spec.resources",
                self.settings,
            )
        )

    @property
    def runtime(self) -> str:
        """``job`` or ``trainjob``: the spec's, else the operator's setting."""
        return str(self.spec.runtime or self.settings.training_runtime)

    def check_runtime(self, spec: LanguageExpertSpec) -> Refusal | None:
        runtime = str(spec.runtime or self.settings.training_runtime)
        if runtime == TrainingRuntime.TRAINJOB and not self.settings.trainjobs:
            return Refusal(
                "TrainJobsDisabled",
                "spec.runtime is trainjob, but this operator does not create Kubeflow Trainer TrainJobs (chart value "
                "trainJob.enabled, LANGMERGE_TRAINJOBS); use runtime job (one pod) or ask the administrator",
            )
        if spec.resources.nodes > 1 and runtime != TrainingRuntime.TRAINJOB:
            return Refusal(
                "NodesNeedTrainJob",
                f"spec.resources.nodes is {spec.resources.nodes}: training on several nodes runs as a Kubeflow Trainer "
                "TrainJob; set spec.runtime: trainjob (the operator's default runtime is "
                f"{self.settings.training_runtime})",
            )
        return None

    def _run(self) -> float | None:
        """The pass: the base model and the data (listed at the poll interval), the settle window, the desired
        fingerprint; its adapter committed: Ready; else converge on it (a training Job)."""
        spec = self.spec
        memo = self.rt.memo(self.key)
        spec_changed = self.old.observed_generation != self.generation
        poll = float(spec.schedule.poll_interval_seconds)
        mono = self.rt.monotonic()

        # Base model identity (digest of its objects), re-listed at the poll interval or on a spec change.
        base_digest, base_count = self._base_digest(spec_changed, poll)
        if base_count == 0:
            return self._blocked("BaseModelMissing", f"no objects under the base model URI {spec.base_model.uri}", poll)
        source = None
        if spec.init_from is not None:
            found = self._trunk(spec.init_from.expert)
            if isinstance(found, TrunkProblem):
                return self._trunk_problem(found, poll)
            source = found
        self.init_digest = source.digest if source is not None else None
        blocked = self._poll_data(spec_changed, poll, mono)
        if blocked is not None:
            return blocked
        next_poll = max(1.0, poll - (mono - memo.last_poll))
        settled = self._settle(spec_changed, base_digest)
        if settled.hold_until is not None:
            return self.commit(min(settled.hold_until, next_poll))
        data_for_training, settle_wait = settled.data, settled.wait

        data_digest, eval_digest = split_combined(data_for_training)
        fingerprint = training_fingerprint(
            spec,
            base_model_digest=base_digest,
            data_digest=data_digest,
            eval_data_digest=eval_digest,
            image=self.image,
            init_adapter_digest=self.init_digest,
        )
        self.status.desired_fingerprint = fingerprint
        self.status.training = TrainingShape.of(spec, self.runtime)
        prefix = artifacts.expert_prefix(self.settings.artifacts_uri, self.namespace, self.name, fingerprint)
        jobs = self.owned_jobs(COMPONENT_TRAINING)
        requeue = [next_poll] + ([settle_wait] if settle_wait is not None else [])
        # With no Job of this fingerprint, its failure records cannot change, and its manifest only by someone else's
        # hand: a queued expert (woken by a slot event, or polling its data) lists neither again and reads the
        # manifest once per poll interval.
        self.quiet = not spec_changed and not any(j.fingerprint == fingerprint for j in jobs)

        manifest = self._manifest(prefix, fingerprint)
        if manifest is not None:
            self._ready(manifest, jobs, data_for_training)
            self._cancel_outdated(jobs, fingerprint)
            return self.commit(min(requeue))
        if not spec.schedule.follow_data:
            earlier = self._earlier_adapter(fingerprint, base_digest, poll)
            if earlier is not None:  # the adapter of this spec on the data as first listed stands: it is desired
                self.status.desired_fingerprint = earlier.fingerprint
                self._ready(earlier, jobs, DataView(earlier.data_digest, earlier.eval_data_digest, 0).combined)
                self.condition(
                    DATA_CHANGED,
                    True,
                    "NotFollowed",
                    f"the data changed since adapter {earlier.adapter_digest} was trained (digest "
                    f"{earlier.data_digest}, now {data_digest}); schedule.followData is false, so it does not retrain "
                    "(change the spec, e.g. dataset.revision, to retrain: every expert that starts from this one "
                    "retrains then; `langmerge cost` estimates it)",
                )
                self._cancel_outdated(jobs, earlier.fingerprint)
                return self.commit(min(requeue))

        task = TrainTask(
            fingerprint=fingerprint,
            output_uri=prefix,
            namespace=self.namespace,
            name=self.name,
            spec=spec,
            base_model=BaseModelIdentity(
                uri=spec.base_model.uri, revision=spec.base_model.revision, digest=base_digest
            ),
            data_digest=data_digest,
            eval_data_digest=eval_digest,
            image=self.image,
            keep_checkpoints=self.settings.keep_checkpoints,
            init_adapter=source,
        )
        converge = self._converge(task, jobs, prefix)
        return self.commit(min([*requeue, *([converge] if converge is not None else [])]))

    def _poll_data(self, spec_changed: bool, poll: float, mono: float) -> float | None:
        """The data: one paginated listing of the prefix, digested over (key, size, ETag) of *.jsonl objects, when
        the poll is due. A change is recorded (status.dataDigest, dataChangedAt, an Event). Returns the requeue
        delay when the pass stops here (no data), else None."""
        spec = self.spec
        memo = self.rt.memo(self.key)
        due = spec_changed or self.status.data_digest is None or mono - memo.last_poll >= poll
        if not due:
            return None
        data_digest, count = self.rt.store.prefix_digest(spec.dataset.uri, suffix=".jsonl")
        eval_digest = None
        if spec.dataset.eval_uri:
            eval_digest, eval_count = self.rt.store.prefix_digest(spec.dataset.eval_uri, suffix=".jsonl")
            if eval_count == 0:
                return self._blocked("EvalDatasetEmpty", f"no *.jsonl objects under {spec.dataset.eval_uri}", poll)
        memo.last_poll = mono
        if count == 0:
            return self._blocked("DatasetEmpty", f"no *.jsonl objects under {spec.dataset.uri}", poll)
        observed = DataView(data_digest, eval_digest, count).combined
        first = self.status.data_digest is None
        if observed != self.status.data_digest:
            if not first:
                self.event("Normal", "DataChanged", f"data under {spec.dataset.uri} changed (digest {observed})")
            self.status.data_digest = observed
            self.status.data_changed_at = self.now_s
            if first:
                self.status.data_changed_at = None  # the first sighting is settled by definition
        return None

    def _settle(self, spec_changed: bool, base_digest: str) -> Settled:
        """The settle window: train on new data only once it has been stable for settleSeconds. Until then the
        adapter's data stays the one to train (or, with nothing trained yet, the pass holds). Sets the DataChanged
        condition."""
        spec = self.spec
        assert self.status.data_digest is not None
        data_for_training = self.status.data_digest
        changed_at = artifacts.parse_time(self.status.data_changed_at)
        settle_wait: float | None = None
        trained_data = self.status.adapter.data_digest if self.status.adapter else None
        if changed_at is not None and not spec_changed and data_for_training != trained_data:
            settle_until = changed_at + timedelta(seconds=spec.schedule.settle_seconds)
            # Nothing to wait for when the adapter of the new data exists already (a Job that read the data after
            # it changed committed it, or the data went back to what was trained before): adopt it now.
            if settle_until > self.now and not self._committed_for(data_for_training, base_digest):
                settle_wait = (settle_until - self.now).total_seconds()
                if trained_data is None:
                    # Nothing trained yet: wait for the settle window before the first Job.
                    self.condition(
                        DATA_CHANGED,
                        True,
                        "Settling",
                        f"data changed; training starts at {fmt_time(settle_until)} unless it changes again",
                    )
                    self.set_phase(
                        ExpertPhase.PENDING, f"waiting for the data to settle until {fmt_time(settle_until)}"
                    )
                    return Settled(data_for_training, settle_wait, hold_until=settle_wait)
                data_for_training = trained_data
        if settle_wait is not None:
            self.condition(
                DATA_CHANGED,
                True,
                "Settling",
                f"data changed at {self.status.data_changed_at}; retraining starts after {spec.schedule.settle_seconds}s without further changes",
            )
        elif self.status.adapter is None:
            self.condition(DATA_CHANGED, False, "NoAdapter", "no adapter has been trained yet")
        elif data_for_training == trained_data:
            self.condition(DATA_CHANGED, False, "UpToDate", "the adapter was trained on the current data")
        else:
            self.condition(DATA_CHANGED, True, "Retraining", "the data differs from the adapter's training data")
        return Settled(data_for_training, settle_wait)

    def _manifest(self, prefix: str, fingerprint: str) -> AdapterManifest | None:
        """The committed manifest of ``fingerprint``. A look that found none stands while no Job of this expert
        appears, changes or goes (any Job event forgets it, see :meth:`Controller.on_job_event`): a queued expert
        does not read it again at every poll."""
        memo = self.rt.memo(self.key)
        mono = self.rt.monotonic()
        if self.quiet and memo.manifest_absent is not None and memo.manifest_absent[0] == fingerprint:
            return None
        manifest = self.rt.store.get_record(artifacts.join(prefix, artifacts.MANIFEST), AdapterManifest)
        memo.manifest_absent = None if manifest is not None else (fingerprint, mono)
        return manifest

    def failure_records(self, prefix: str) -> dict[int, FailureRecord]:
        """Failure records change only when a Job of this fingerprint ends: without one (and with no Job event since,
        see :meth:`Controller.on_job_event`), the last listing stands."""
        memo = self.rt.memo(self.key)
        if self.quiet and memo.failures is not None and memo.failures[0] == prefix:
            self.records = dict(memo.failures[1])
            return dict(self.records)
        records = failure_records(self.rt.store, prefix)
        memo.failures = (prefix, dict(records), self.rt.monotonic())
        self.records = dict(records)
        return records

    def _committed_for(self, data_combined: str, base_digest: str) -> bool:
        """Whether the adapter of this spec on the data with digest ``data_combined`` is committed in S3."""
        data_digest, eval_digest = split_combined(data_combined)
        fingerprint = training_fingerprint(
            self.spec,
            base_model_digest=base_digest,
            data_digest=data_digest,
            eval_data_digest=eval_digest,
            image=self.image,
            init_adapter_digest=self.init_digest,
        )
        prefix = artifacts.expert_prefix(self.settings.artifacts_uri, self.namespace, self.name, fingerprint)
        return self.rt.store.exists(artifacts.join(prefix, artifacts.MANIFEST))

    def _earlier_adapter(self, fingerprint: str, base_digest: str, poll: float) -> AdapterManifest | None:
        """schedule.followData false: the newest committed adapter of this spec (same settings, base and trunk) on
        any earlier data, from the manifests under the expert's prefix (S3 is the record: a lost status finds it
        again). Searched at most once per poll interval for the same desired fingerprint."""
        memo = self.rt.memo(self.key)
        mono = self.rt.monotonic()
        if memo.earlier is not None and memo.earlier[0] == fingerprint and mono - memo.earlier[1] < poll:
            found: AdapterManifest | None = memo.earlier[2]
            return found
        found = None
        bucket = self.prefix_root.removeprefix("s3://").split("/", 1)[0]
        for info in self.rt.store.list_objects(self.prefix_root):
            # <prefix>/<fingerprint>/manifest.json: the commit record of one fingerprint
            if info.relative_to(self.prefix_root.split("/", 3)[3].rstrip("/") + "/").count("/") != 1:
                continue
            if not info.key.endswith("/" + artifacts.MANIFEST):
                continue
            manifest = self.rt.store.get_record(f"s3://{bucket}/{info.key}", AdapterManifest)
            if manifest is None or manifest.fingerprint == fingerprint:
                continue
            same_spec = training_fingerprint(
                self.spec,
                base_model_digest=base_digest,
                data_digest=manifest.data_digest,
                eval_data_digest=manifest.eval_data_digest,
                image=self.image,
                init_adapter_digest=self.init_digest,
            )
            if same_spec == manifest.fingerprint and (found is None or manifest.finished_at > found.finished_at):
                found = manifest
        memo.earlier = (fingerprint, mono, found)
        return found

    def _trunk(self, name: str) -> AdapterSource | TrunkProblem:
        """spec.initFrom: the trunk's current adapter, or why there is none to start from (yet)."""
        if name == self.name:
            return TrunkProblem("InitFromSelf", "spec.initFrom names this expert itself: name its trunk")
        from langmerge.kube import ObjectKey

        body = self.rt.kube.get_expert(ObjectKey(self.namespace, name))
        trunk = status = None
        if body is not None:
            try:
                trunk = parse_expert_spec(body.get("spec") or {})
                status = LanguageExpertStatus.model_validate(body.get("status") or {})
            except ValidationError:
                trunk = status = None
        return trunk_source(self.namespace, name, self.spec, trunk, status)

    def _trunk_problem(self, problem: TrunkProblem, poll: float) -> float | None:
        """The trunk cannot be used: wait for it (no adapter yet; the trunk's change wakes this expert), or refuse
        the spec (a trunk of another shape). Any adapter already trained stays in status."""
        if not problem.waiting:
            self.refuse(Refusal(problem.reason, problem.message), phase=ExpertPhase.FAILED, condition_type=TRAINING)
            return self.commit(poll)
        if self.old.message != problem.message:
            self.event("Normal", problem.reason, problem.message)
        if self.status.adapter is None or self.old.phase != ExpertPhase.READY:
            self.set_phase(ExpertPhase.PENDING, problem.message)
        else:
            self.status.message = problem.message
        self.condition(
            READY,
            self.old.phase == ExpertPhase.READY and self.status.adapter is not None,
            problem.reason,
            problem.message,
        )
        self.condition(TRAINING, False, problem.reason, problem.message)
        return self.commit(poll)

    def _blocked(self, reason: str, message: str, retry: float) -> float:
        """Inputs missing in S3: report, keep any existing adapter, look again at the next poll (``retry`` seconds:
        the pass is committed and ends)."""
        if self.old.message != message:
            self.event("Warning", reason, message)
        self.degrade(reason, message)
        self.condition(READY, self.status.adapter is not None and self.old.phase == ExpertPhase.READY, reason, message)
        if self.status.adapter is None:
            self.set_phase(ExpertPhase.PENDING, message)
        else:
            self.status.message = message
        self.commit(retry)
        return retry

    # -- desired adapter exists ----------------------------------------------------------------------------------
    def _ready(self, manifest: AdapterManifest, jobs: list[JobState], data_combined: str) -> None:
        fingerprint = manifest.fingerprint
        # A Job that found the data changed trains the fingerprint of what it read: it is that adapter's Job too.
        trained_by = {fingerprint, manifest.requested_fingerprint}
        job = next((j for j in sorted(jobs, key=lambda j: -j.attempt) if j.fingerprint in trained_by), None)
        if self.status.trained_fingerprint != fingerprint or self.status.adapter is None:
            adopted = job is None
            # A removed status is rebuilt from S3 without announcing again what was announced when it happened.
            announce = self.old.adapter is not None or self.is_news(manifest.finished_at)
            if announce and adopted:
                metrics.CACHE_HITS.labels(COMPONENT_TRAINING).inc()
            elif announce:
                metrics.TRAINING_SECONDS.inc(manifest.cost.wall_seconds)
                metrics.TRAINING_GPU_SECONDS.inc(manifest.cost.gpu_seconds)
            record = TrainingRecord(
                fingerprint=fingerprint,
                data_digest=data_combined,
                job=job.name if job else None,
                result="Adopted" if adopted else "Succeeded",
                started_at=manifest.started_at,
                finished_at=manifest.finished_at,
                wall_seconds=round(manifest.cost.wall_seconds, 3),
                gpu_seconds=round(manifest.cost.gpu_seconds, 3),
                cpu_seconds=round(manifest.cost.cpu_seconds, 3),
                tokens=manifest.tokens_trained,
                adapter_digest=manifest.adapter_digest,
                attempt=job.attempt if job else None,
                seed=manifest.seed,
            )
            if not any(h.fingerprint == fingerprint and h.result != "Failed" for h in self.status.history):
                self.status.history = bounded(self.status.history, record, self.settings.history_limit)
            loss = manifest.metrics.eval_loss
            origin = "found in S3, no Job" if adopted or job is None else f"trained by Job {job.name}"
            figures = f"; eval loss {loss:.4f}" if loss is not None else ""
            if announce:
                self.event(
                    "Normal",
                    "AdapterAdopted" if adopted else "AdapterReady",
                    f"adapter {manifest.adapter_digest} for fingerprint {fingerprint} ({origin}{figures})",
                )
            if announce and manifest.listed_data_digest is not None:
                self.event(
                    "Warning",
                    "TrainedOnOtherData",
                    f"adapter {manifest.adapter_digest} was trained on data digest {manifest.data_digest}, not the "
                    f"listed {manifest.listed_data_digest}: the data changed while the Job read it",
                )
        self.status.adapter = AdapterRef(
            uri=manifest.adapter_uri,
            digest=manifest.adapter_digest,
            fingerprint=fingerprint,
            data_digest=data_combined,
            metrics=manifest.metrics,
            label_counts=manifest.label_counts,
            trained_at=manifest.finished_at,
            init_digest=(manifest.init_adapter or {}).get("digest"),
        )
        self._label_coverage(manifest)
        self.status.trained_fingerprint = fingerprint
        if self.status.data_digest == data_combined:
            self.condition(DATA_CHANGED, False, "UpToDate", "the adapter was trained on the current data")
        self.status.active_job = None
        self.status.progress = None
        self.status.attempts = 0
        self.status.preemptions = 0
        self.status.next_retry_at = None
        self.set_phase(ExpertPhase.READY)
        self.condition(READY, True, "AdapterReady", f"adapter {manifest.adapter_digest} at {manifest.adapter_uri}")
        self.condition(TRAINING, False, "Idle")

    def _label_coverage(self, manifest: AdapterManifest) -> None:
        """A classifier's LabelsCovered condition, from the label counts its adapter manifest records. Labels its data
        has no example of do not fail the expert: the condition says which, and a ``LabelsMissing`` Warning Event
        says it once per adapter (not again on the next pass, after an operator restart that finds the condition, or
        after someone removed the status)."""
        counts = manifest.label_counts
        if not self.spec.is_classifier or not self.spec.labels or counts is None:
            self.drop_condition(LABELS_COVERED)  # a causal LM, or an adapter committed before counts were recorded
            return
        labels = self.spec.labels
        missing = missing_labels(labels, counts)
        if not missing:
            shown = ", ".join(f"{label} {counts.get(label, 0)}" for label in labels)
            self.condition(LABELS_COVERED, True, "AllLabelsCovered", f"training examples per label: {shown}")
            return
        message = labels_missing_message(missing, len(labels), manifest.adapter_digest)
        self.condition(LABELS_COVERED, False, LABELS_MISSING, message)
        memo = self.rt.memo(self.key)
        old = get_condition(self.old.conditions, LABELS_COVERED)
        shown_before = (
            old is not None
            and old.reason == LABELS_MISSING
            and self.old.adapter is not None
            and self.old.adapter.digest == manifest.adapter_digest
        )
        if memo.labels_warned != manifest.adapter_digest and not shown_before:
            self.event("Warning", LABELS_MISSING, message)
        memo.labels_warned = manifest.adapter_digest

    def _cancel_outdated(self, jobs: list[JobState], fingerprint: str) -> list[JobState]:
        """Running Jobs for other fingerprints: cancelled under onChange=restart; returned otherwise."""
        message = "cancelled {job.kind} {job.name}: its fingerprint {job.fingerprint} is outdated"
        return self.cancel_outdated(jobs, fingerprint, self.spec.on_change, "TrainingCancelled", message)

    # -- desired adapter missing (the flow: ReconcilePass.converge) ---------------------------------------------
    def _converge(self, task: TrainTask, jobs: list[JobState], prefix: str) -> float | None:
        def start(attempt: int) -> float | None:
            self.status.next_retry_at = None
            return self._start(task.model_copy(update={"attempt": attempt}), jobs)

        return self.converge(task.fingerprint, jobs, prefix, self.spec.retry, start)

    def job_ended(self, job: JobState, record: FailureRecord) -> float | None:
        if record.error_class == artifacts.DATA_CHANGED and self.old.active_job == job.name:
            return self._data_changed_during_training(job, record)
        if record.disruption and self.old.active_job == job.name:
            self.event("Warning", "Disrupted", record.message)
            self.status.active_job = None
        if record.error_class == artifacts.COLLAPSED and self.old.active_job == job.name:
            self._collapsed(job, record)
        return None

    def _collapsed(self, job: JobState, record: FailureRecord) -> None:
        """The Job this status followed ended with a collapsed adapter (nothing committed): a ``Collapsed`` Warning
        Event and the attempt in the history, once (the next pass no longer follows that Job; a lost status does not
        bring the Event back). The retry decision then counts it like any failed attempt."""
        self.event("Warning", "Collapsed", f"{job.kind} {job.name} (attempt {job.attempt}): {record.message}")
        entry = TrainingRecord(
            fingerprint=record.fingerprint,
            job=job.name,
            result="Failed",
            started_at=job.started,
            finished_at=record.at,
            message=truncate(record.message, 256),
            attempt=job.attempt,
            seed=record.seed,
        )
        self.status.history = bounded(self.status.history, entry, self.settings.history_limit)
        self.status.active_job = None
        self.status.progress = None

    def backing_off(self, decision: RetryDecision, last: FailureRecord) -> None:
        assert decision.wait_until is not None
        due = fmt_time(decision.wait_until)
        self.status.next_retry_at = due
        self.status.active_job = None
        self.set_phase(ExpertPhase.PENDING, f"attempt {decision.attempts} failed ({last.message}); retry at {due}")
        self.condition(TRAINING, False, "RetryBackoff", self.status.message or "")
        self.condition(READY, False, "TrainingFailed", last.message)

    def _data_changed_during_training(self, job: JobState, record: FailureRecord) -> float:
        """The Job found other data than was listed, trained on what it read and committed that data's adapter
        under its fingerprint: list the data again at once (the next pass adopts that adapter if the data is still
        what the Job read, or trains the data as it is now)."""
        self.event("Normal", "DataChangedDuringTraining", f"Job {job.name}: {record.message}")
        self.rt.memo(self.key).last_poll = float("-inf")
        self.status.active_job = None
        self.status.progress = None
        self.condition(DATA_CHANGED, True, "ChangedDuringTraining", record.message)
        self.set_phase(ExpertPhase.PENDING, f"listing the data again: {record.message}")
        self.condition(TRAINING, False, "DataChanged", record.message)
        return 0.1

    def stop_hopeless_job(self, job: JobState, prefix: str) -> FailureRecord | None:
        """A TrainJob whose trainer recorded an error no retry can fix is stopped at once (its runtime may restart
        the nodes otherwise: a Job's podFailurePolicy does this for Jobs). Returns that record, else None."""
        if job.kind != TRAINJOB_KIND or job.suspended:
            return None
        try:
            record = self.rt.store.get_record(artifacts.failure_uri(prefix, job.attempt), FailureRecord)
        except MalformedRecord:
            return None
        if record is None or record.retryable or record.error_class == artifacts.DATA_CHANGED:
            return None
        if self.rt.kube.delete_trainjob(self.namespace, job.name):
            self.event(
                "Warning",
                "TrainingStopped",
                f"stopped TrainJob {job.name}: the trainer reported an error no retry can fix "
                f"({record.error_class}: {record.message})",
            )
        return record

    def _count_attempts(self, job: JobState) -> None:
        """``status.attempts`` while ``job`` runs: what the retry decision that started it counted (disruptions
        do not count); for a Job this status did not start (adopted), the attempts before it."""
        if self.old.active_job != job.name:
            self.status.attempts = job.attempt - 1

    def _queued(self, job: JobState, progress: ProgressRecord | None) -> float:
        """The Job waits for Kueue: never admitted yet ("Queued (Kueue)"), or preempted (suspended again after it
        ran: recorded, and not a failed attempt; the next admission resumes from the last checkpoint)."""
        ran = progress is not None and progress.fingerprint == job.fingerprint and progress.attempt == job.attempt
        # Kueue resets a Job's startTime when it suspends it; this status may have seen it train.
        seen = self.old.active_job == job.name and (
            self.old.phase == ExpertPhase.TRAINING
            or (self.old.phase == ExpertPhase.QUEUED and (self.old.message or "").startswith("Preempted"))
        )
        queue = self.settings.kueue_queue or "its LocalQueue"
        self._count_attempts(job)
        self.status.active_job = job.name
        if job.started is not None or ran or seen:
            where = f" at step {progress.step}" if progress is not None and ran and progress.step else ""
            message = (
                f"Preempted (Kueue): {job.kind} {job.name} (attempt {job.attempt}) was suspended{where}; it resumes "
                f"from its last checkpoint once {queue} admits it again (not a failed attempt)"
            )
            if self.old.phase != ExpertPhase.QUEUED or not (self.old.message or "").startswith("Preempted"):
                self.status.preemptions += 1
                self.event("Warning", "Preempted", message)
            reason = "PreemptedByKueue"
        else:
            message = f"Queued (Kueue): {job.kind} {job.name} (attempt {job.attempt}) waits for admission in {queue}"
            reason = "QueuedByKueue"
        self.set_phase(ExpertPhase.QUEUED, message)
        self.condition(TRAINING, False, reason, message)
        self.condition(READY, False, "Queued", message)
        return self.settings.resync_seconds

    def job_running(self, job: JobState, prefix: str) -> float:
        try:
            progress = self.rt.store.get_record(artifacts.join(prefix, artifacts.PROGRESS), ProgressRecord)
        except MalformedRecord as err:
            # The Job goes on; only its progress cannot be shown.
            progress = None
            self.degrade("MalformedRecord", f"{err}; progress is not shown until the Job writes a valid record")
        if job.suspended:
            return self._queued(job, progress)
        if progress is not None and progress.fingerprint == job.fingerprint:
            self.status.progress = Progress(
                step=progress.step,
                total_steps=progress.total_steps,
                loss=round(progress.loss, 4) if progress.loss is not None else None,
                tokens_per_second=round(progress.tokens_per_second, 1) if progress.tokens_per_second else None,
                eta_seconds=round(progress.eta_seconds, 1) if progress.eta_seconds is not None else None,
                updated_at=progress.updated_at,
            )
        self._count_attempts(job)
        self.status.active_job = job.name
        where = f"{job.kind} {job.name} (attempt {job.attempt})"
        self.set_phase(ExpertPhase.TRAINING, f"{where} is training fingerprint {job.fingerprint}")
        self.condition(TRAINING, True, "JobRunning", where)
        self.condition(READY, False, "Training", f"training fingerprint {job.fingerprint}")
        return self.settings.progress_seconds

    def gave_up(self, last: FailureRecord, attempts: int) -> float:
        records = self.records or {}
        collapsed = sum(1 for r in records.values() if r.error_class == artifacts.COLLAPSED and not r.disruption)
        message = gave_up_message(last, attempts, collapsed)
        if self.old.phase != ExpertPhase.FAILED or self.old.message != truncate(message):
            self.event("Warning", "TrainingFailed", message)
            shown = any(
                h.result == "Failed" and h.fingerprint == last.fingerprint and h.attempt == last.attempt
                for h in self.status.history
                if last.attempt is not None
            )
            history = TrainingRecord(
                fingerprint=last.fingerprint,
                result="Failed",
                finished_at=last.at,
                message=truncate(last.message, 256),
                attempt=last.attempt,
                seed=last.seed,
            )
            if not shown:  # a collapsed last attempt is in the history already (job_ended)
                self.status.history = bounded(self.status.history, history, self.settings.history_limit)
        self.status.active_job = None
        self.status.progress = None
        self.set_phase(ExpertPhase.FAILED, message)
        self.condition(TRAINING, False, "Failed", message)
        self.condition(READY, False, "TrainingFailed", message)
        if is_true(self.status.conditions, DATA_CHANGED) and self.status.adapter is not None:
            self.condition(
                DATA_CHANGED,
                True,
                "TrainingFailed",
                "the data differs from the adapter's training data and training on it failed; "
                f"adapter {self.status.adapter.digest} stays",
            )
        self.degrade("TrainingFailed", message)
        return float(self.spec.schedule.poll_interval_seconds)

    def _start(self, task: TrainTask, jobs: list[JobState]) -> float | None:
        spec = self.spec
        if spec.suspend:
            self.status.active_job = None
            self.set_phase(ExpertPhase.SUSPENDED, "spec.suspend is true: no new training Jobs")
            self.condition(TRAINING, False, "Suspended", "spec.suspend is true")
            self.condition(
                READY, False, "Suspended", f"fingerprint {task.fingerprint} is not trained; spec.suspend is true"
            )
            return float(spec.schedule.poll_interval_seconds)
        outdated = self._cancel_outdated(jobs, task.fingerprint)
        if outdated:
            job = outdated[0]
            self.status.active_job = job.name
            self.set_phase(
                ExpertPhase.SUPERSEDED,
                f"Job {job.name} trains outdated fingerprint {job.fingerprint}; fingerprint {task.fingerprint} "
                "starts when it finishes (spec.onChange: wait)",
            )
            self.condition(TRAINING, True, "Superseded", self.status.message or "")
            self.condition(READY, False, "Superseded", self.status.message or "")
            return self.settings.progress_seconds
        owner = Owner(EXPERT_KIND, self.namespace, self.name, self.body["metadata"]["uid"])
        if self.runtime == TrainingRuntime.TRAINJOB:
            manifest = build_trainjob(owner, task, self.settings)
        else:
            manifest = build_training_job(owner, task, self.settings)
        kind = manifest["kind"]
        created = self.launch_job(
            manifest, component=COMPONENT_TRAINING, waiting_phase=ExpertPhase.PENDING, condition_type=TRAINING
        )
        if created is None or isinstance(created, float):
            return created
        name = manifest["metadata"]["name"]
        if created:
            shape = self.status.training
            layout = f"; {shape.nodes} node(s), {shape.processes} process(es)" if shape and shape.processes > 1 else ""
            self.event(
                "Normal",
                "TrainingStarted",
                f"created {kind} {name} (attempt {task.attempt}) for fingerprint {task.fingerprint} on data "
                f"{task.data_digest}{layout}",
            )
        self.status.active_job = name
        self.status.progress = Progress(step=0, total_steps=0, updated_at=self.now_s)
        if self.settings.kueue_queue:  # created suspended: Kueue admits it
            queue = self.settings.kueue_queue
            message = f"Queued (Kueue): {kind} {name} (attempt {task.attempt}) waits for admission in {queue}"
            self.set_phase(ExpertPhase.QUEUED, message)
            self.condition(TRAINING, False, "QueuedByKueue", message)
            self.condition(READY, False, "Queued", message)
            return self.settings.resync_seconds
        self.set_phase(
            ExpertPhase.TRAINING, f"{kind} {name} (attempt {task.attempt}) created for fingerprint {task.fingerprint}"
        )
        self.condition(TRAINING, True, "JobCreated", f"{kind} {name}")
        self.condition(READY, False, "Training", f"training fingerprint {task.fingerprint}")
        return self.settings.progress_seconds


def reconcile_expert(rt: Runtime, key: Key) -> float | None:
    """One pass over ``key``; returns seconds until the next pass (None: only on events)."""
    assert key[0] == EXPERT
    return reconcile_object(rt, key, rt.kube.get_expert, cleanup_deleted_expert, ExpertReconciler)


def cleanup_deleted_expert(rt: Runtime, key: Key) -> None:
    """The expert is gone: stop its Jobs (the garbage collector would too) and, if configured, its artifacts."""
    namespace, name = key[1], key[2]
    if deleted := delete_jobs_of(rt, namespace, LABEL_EXPERT, name):
        log.info("deleted %d Job(s) of deleted expert %s/%s", deleted, namespace, name)
    rt.forget(key)
    if rt.settings.delete_artifacts_with_expert:
        root = artifacts.expert_root(rt.settings.artifacts_uri, namespace, name)
        owner = live_owner(rt.store, root, lambda record: object_exists(rt, record))
        if owner is not None:
            log.info("kept %s: it belongs to %s now", root, owner.describe())
            return
        _, kept = delete_owned(rt.store, root)
        if kept:
            log.info("kept %s under %s: another owner's record is there", ", ".join(kept), root)
