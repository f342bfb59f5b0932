"""The CLI's reports for any cluster (``langmerge status | history | cost``): status tables, histories and the cost
report. Read-only, pure functions over the custom resources as the API returns them (dicts); the CLI fetches and
prints."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from langmerge.api.expert import LanguageExpertSpec, LanguageExpertStatus, TrainingRecord
from langmerge.api.merged import MergedModelStatus
from langmerge.artifacts import JointBaseline


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _expert_status(obj: dict[str, Any]) -> LanguageExpertStatus:
    try:
        return LanguageExpertStatus.model_validate(obj.get("status") or {})
    except ValidationError:
        return LanguageExpertStatus()


def _merged_status(obj: dict[str, Any]) -> MergedModelStatus:
    try:
        return MergedModelStatus.model_validate(obj.get("status") or {})
    except ValidationError:
        return MergedModelStatus()


def experts_table(experts: Sequence[dict[str, Any]]) -> str:
    rows = []
    for obj in sorted(experts, key=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"])):
        spec, status = obj.get("spec") or {}, _expert_status(obj)
        progress = status.progress
        step = f"{progress.step}/{progress.total_steps}" if progress and progress.total_steps else "-"
        loss = _fmt(progress.loss) if progress and progress.loss is not None else "-"
        adapter = status.adapter
        spent = sum(h.cpu_seconds or 0.0 for h in status.history if h.result == "Succeeded")
        gpu = sum(h.gpu_seconds or 0.0 for h in status.history if h.result == "Succeeded")
        rows.append(
            [
                obj["metadata"]["name"],
                spec.get("language"),
                status.phase or "-",
                step,
                loss,
                adapter.digest[:12] if adapter else "-",
                _fmt(adapter.metrics.eval_loss) if adapter and adapter.metrics else "-",
                len([h for h in status.history if h.result == "Succeeded"]),
                f"{gpu:.0f}/{spent:.0f}",
            ]
        )
    return table(["EXPERT", "LANG", "PHASE", "STEP", "LOSS", "ADAPTER", "EVAL-LOSS", "TRAINED", "GPU/CPU-S"], rows)


def merged_table(merged: Sequence[dict[str, Any]]) -> str:
    rows = []
    for obj in sorted(merged, key=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"])):
        spec, status = obj.get("spec") or {}, _merged_status(obj)
        rows.append(
            [
                obj["metadata"]["name"],
                spec.get("method"),
                status.phase or "-",
                status.revision if status.revision is not None else "-",
                (status.fingerprint or "-")[:12],
                ",".join(sorted(i.language for i in status.inputs)) or "-",
                ",".join(status.missing_experts) or "-",
                status.serving_summary or "-",
            ]
        )
    return table(["MERGED", "METHOD", "PHASE", "REVISION", "FINGERPRINT", "LANGUAGES", "MISSING", "SERVING"], rows)


def expert_history(obj: dict[str, Any]) -> str:
    status = _expert_status(obj)
    rows = [
        [
            h.finished_at or "-",
            h.result,
            h.fingerprint,
            h.data_digest or "-",
            h.job or "-",
            h.seed if h.seed is not None else "-",
            h.tokens if h.tokens is not None else "-",
            _fmt(h.wall_seconds, 1),
            _fmt(h.gpu_seconds, 1),
            _fmt(h.cpu_seconds, 1),
            h.message or "",
        ]
        for h in status.history
    ]
    return table(
        ["FINISHED", "RESULT", "FINGERPRINT", "DATA", "JOB", "SEED", "TOKENS", "WALL-S", "GPU-S", "CPU-S", "MESSAGE"],
        rows,
    )


def changes_text(changed: Sequence[str], removed: Sequence[str], nothing: str = "-") -> str:
    """``dialog-nl`` for changed or added inputs, ``-dialog-it`` for removed ones (a history's CHANGED column)."""
    return ",".join([*changed, *(f"-{name}" for name in removed)]) or nothing


def merged_history(obj: dict[str, Any]) -> str:
    status = _merged_status(obj)
    rows = [
        [
            h.revision,
            h.published_at or "-",
            h.reason,
            h.fingerprint,
            changes_text(h.changed_inputs, h.removed_inputs),
            h.job or "-",
            _fmt(h.wall_seconds, 1),
            _fmt(h.cpu_seconds, 1),
            "; ".join(f"{target.removeprefix('kserve/')}: {what}" for target, what in sorted(h.serving.items())) or "-",
        ]
        for h in status.history
    ]
    return table(
        ["REVISION", "PUBLISHED", "REASON", "FINGERPRINT", "CHANGED", "JOB", "WALL-S", "CPU-S", "SERVING"], rows
    )


@dataclass(frozen=True)
class RunCost:
    expert: str
    language: str
    wall_seconds: float
    gpu_seconds: float
    cpu_seconds: float
    tokens: int

    @property
    def throughput(self) -> float | None:
        """Tokens per wall second of this run."""
        return self.tokens / self.wall_seconds if self.wall_seconds > 0 and self.tokens else None


@dataclass(frozen=True)
class TrunkEstimate:
    """A trunk change retrains the trunk and every expert that starts from it: their latest recorded runs, summed."""

    trunk: str
    branches: list[str]
    wall_seconds: float
    gpu_seconds: float
    cpu_seconds: float
    #: Branches without a recorded run yet (not in the sums).
    unmeasured: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CostReport:
    """What training cost, and what retraining everything on each change would have cost."""

    runs: list[RunCost]
    initial: list[RunCost]
    updates: list[RunCost]
    #: Per update: the cost of retraining every language instead: a measured joint retrain when one is recorded for
    #: the task, else an estimate (same device kind, recorded throughput).
    full_retrain_estimates: list[float]
    merges_wall_seconds: float
    #: Per update: the measured joint retrain it is compared with (None: estimated).
    measured: list[JointBaseline | None] = field(default_factory=list)
    #: Per trunk (an expert others start from, spec.initFrom): what changing it would retrain, estimated beforehand.
    trunks: list[TrunkEstimate] = field(default_factory=list)

    @property
    def all_measured(self) -> bool:
        return bool(self.measured) and all(m is not None for m in self.measured)

    @property
    def spent_seconds(self) -> float:
        return sum(r.wall_seconds for r in self.runs)

    @property
    def update_seconds(self) -> float:
        return sum(r.wall_seconds for r in self.updates)

    @property
    def full_retrain_seconds(self) -> float:
        return sum(self.full_retrain_estimates)

    @property
    def saved_seconds(self) -> float:
        return self.full_retrain_seconds - self.update_seconds

    @property
    def gpu_seconds(self) -> float:
        return sum(r.gpu_seconds for r in self.runs)

    @property
    def cpu_seconds(self) -> float:
        return sum(r.cpu_seconds for r in self.runs)


def expert_task(obj: dict[str, Any]) -> str | None:
    """The ``spec.task`` of a LanguageExpert (None if it has none)."""
    task = (obj.get("spec") or {}).get("task")
    return task if isinstance(task, str) else None


def _runs(obj: dict[str, Any]) -> list[tuple[TrainingRecord, RunCost]]:
    try:
        spec = LanguageExpertSpec.model_validate(obj.get("spec") or {})
        language = spec.language
    except ValidationError:
        language = "?"
    out = []
    for h in _expert_status(obj).history:
        if h.result != "Succeeded":
            continue
        out.append(
            (
                h,
                RunCost(
                    expert=obj["metadata"]["name"],
                    language=language,
                    wall_seconds=h.wall_seconds or 0.0,
                    gpu_seconds=h.gpu_seconds or 0.0,
                    cpu_seconds=h.cpu_seconds or 0.0,
                    tokens=h.tokens or 0,
                ),
            )
        )
    return out


def cost_report(
    experts: Sequence[dict[str, Any]],
    merged: Sequence[dict[str, Any]] = (),
    baselines: dict[str, JointBaseline] | None = None,
) -> CostReport:
    """Spent versus saved. A language's first training run is initial cost; every later run is a maintenance update.

    For each update, the cost of retraining one multilingual model instead is the measured joint retrain of the
    expert's task when ``baselines`` has one (task -> record), else an estimate: every language's latest recorded
    token count divided by that language's recorded throughput (tokens per wall second), i.e. what retraining all
    languages on the same hardware would have taken at that point. The merge itself is reported apart.
    """
    baselines = baselines or {}
    tasks = {o["metadata"]["name"]: expert_task(o) for o in experts}
    per_expert = {o["metadata"]["name"]: _runs(o) for o in experts}
    runs = [cost for items in per_expert.values() for _, cost in items]
    initial = [items[0][1] for items in per_expert.values() if items]
    updates: list[RunCost] = []
    estimates: list[float] = []
    measured: list[JointBaseline | None] = []
    # Timeline of updates: every run after a language's first, ordered by finish time.
    timeline = sorted(
        (
            (rec.finished_at or "", name, i)
            for name, items in per_expert.items()
            for i, (rec, _) in enumerate(items)
            if i > 0
        ),
    )
    for finished, name, index in timeline:
        updates.append(per_expert[name][index][1])
        task = tasks.get(name)
        baseline = baselines.get(task) if task else None
        measured.append(baseline)
        if baseline is not None:
            estimates.append(baseline.wall_seconds)
            continue
        total = 0.0
        for other, items in per_expert.items():
            done = [cost for rec, cost in items if (rec.finished_at or "") <= finished] or [c for _, c in items[:1]]
            if not done:
                continue
            latest = done[-1]
            if other == name:
                latest = per_expert[name][index][1]
            throughput = latest.throughput
            total += latest.tokens / throughput if throughput else latest.wall_seconds
        estimates.append(total)
    merge_seconds = sum(
        h.wall_seconds or 0.0 for o in merged for h in _merged_status(o).history if h.reason == "merged"
    )
    return CostReport(
        runs=runs,
        initial=initial,
        updates=updates,
        full_retrain_estimates=estimates,
        merges_wall_seconds=merge_seconds,
        measured=measured,
        trunks=trunk_estimates(experts, per_expert),
    )


def trunk_estimates(
    experts: Sequence[dict[str, Any]], per_expert: dict[str, list[tuple[TrainingRecord, RunCost]]]
) -> list[TrunkEstimate]:
    """For every expert that others start from (spec.initFrom): the cost of retraining it and all of them."""
    branches: dict[str, list[str]] = {}
    for o in experts:
        trunk = ((o.get("spec") or {}).get("initFrom") or {}).get("expert")
        if isinstance(trunk, str):
            branches.setdefault(trunk, []).append(o["metadata"]["name"])
    out = []
    for trunk, names in sorted(branches.items()):
        latest = [per_expert[n][-1][1] for n in [trunk, *names] if per_expert.get(n)]
        out.append(
            TrunkEstimate(
                trunk=trunk,
                branches=sorted(names),
                wall_seconds=sum(r.wall_seconds for r in latest),
                gpu_seconds=sum(r.gpu_seconds for r in latest),
                cpu_seconds=sum(r.cpu_seconds for r in latest),
                unmeasured=sorted(n for n in [trunk, *names] if not per_expert.get(n)),
            )
        )
    return out


def cost_text(report: CostReport) -> str:
    lines = [
        table(
            ["EXPERT", "LANG", "WALL-S", "GPU-S", "CPU-S", "TOKENS", "TOKENS/S"],
            [
                [
                    r.expert,
                    r.language,
                    _fmt(r.wall_seconds, 1),
                    _fmt(r.gpu_seconds, 1),
                    _fmt(r.cpu_seconds, 1),
                    r.tokens,
                    _fmt(r.throughput, 0),
                ]
                for r in report.runs
            ],
        ),
        "",
        f"training runs: {len(report.runs)} ({len(report.initial)} initial, {len(report.updates)} maintenance updates); "
        f"{report.spent_seconds:.1f} wall-s, {report.gpu_seconds:.1f} GPU-s, {report.cpu_seconds:.1f} CPU-s in all",
        f"merges: {report.merges_wall_seconds:.1f} wall-s",
    ]
    if report.updates:
        full = report.full_retrain_seconds
        upd = report.update_seconds
        saving = (1 - upd / full) * 100 if full > 0 else 0.0
        if report.all_measured:
            how = "measured: " + "; ".join(
                sorted(
                    {
                        f"{b.task} joint retrain on {','.join(b.languages)} {b.wall_seconds:.1f} wall-s "
                        f"({b.source}, {b.measured_at}, {b.device})"
                        for b in report.measured
                        if b is not None
                    }
                )
            )
            lines.append(
                f"maintenance updates: {upd:.1f} wall-s of training; retraining one joint model on every language "
                f"each time would have taken {full:.1f} wall-s: {report.saved_seconds:.1f} s saved ({saving:.0f}% "
                f"less) [{how}]"
            )
        else:
            lines.append(
                f"maintenance updates: {upd:.1f} wall-s of training; retraining every language each time would have "
                f"taken ~{full:.1f} wall-s: {report.saved_seconds:.1f} s saved ({saving:.0f}% less) [estimate: "
                "each language's latest token count / its recorded throughput, summed; no measured joint retrain is "
                "recorded for "
                + ("some of the tasks" if any(m is not None for m in report.measured) else "the task")
                + "; `langmerge bench --record-baseline` records one]"
            )
    for t in report.trunks:
        lines.append(
            f"a change of trunk {t.trunk} (its spec or base model) retrains it and the {len(t.branches)} expert(s) "
            f"that start from it ({', '.join(t.branches)}): ~{t.wall_seconds:.1f} wall-s, {t.gpu_seconds:.1f} GPU-s, "
            f"{t.cpu_seconds:.1f} CPU-s (their latest runs)"
            + (f"; not yet trained: {', '.join(t.unmeasured)}" if t.unmeasured else "")
        )
    return "\n".join(lines)


def read_baselines(store: Any, artifacts_uri: str, experts: Sequence[dict[str, Any]]) -> dict[str, JointBaseline]:
    """The recorded joint-retrain baselines of the experts' tasks (task -> record), read from S3 via ``store``
    (a :class:`langmerge.store.ObjectStore`); tasks without one are left out."""
    out: dict[str, JointBaseline] = {}
    from langmerge.artifacts import baseline_uri

    for obj in experts:
        task = expert_task(obj)
        if task is None or task in out:
            continue
        raw = store.get_json_or_none(baseline_uri(artifacts_uri, obj["metadata"]["namespace"], task))
        if raw is not None:
            try:
                out[task] = JointBaseline.model_validate(raw)
            except ValidationError:
                continue
    return out
