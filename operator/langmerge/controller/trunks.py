"""Trunks: experts that start from another expert's adapter (``spec.initFrom``), and MergedModels that merge such
experts relative to it (``spec.trunk``).

A trunk is an ordinary LanguageExpert, typically trained for an epoch on every language's data (language ``mul``)
and not following its data (``schedule.followData: false``), so that one language's new data retrains one branch, not
the trunk and with it every branch. Its committed adapter's digest is part of each branch's training fingerprint: a
new trunk adapter (a trunk spec change) retrains every branch, which ``langmerge cost`` estimates beforehand.

These are pure functions of the parsed specs and statuses; the reconcilers read the objects and act on the answers.
"""

from __future__ import annotations

from dataclasses import dataclass

from langmerge.api.expert import LanguageExpertSpec, LanguageExpertStatus
from langmerge.tasks import AdapterSource


@dataclass(frozen=True)
class TrunkProblem:
    """Why a branch cannot use its trunk (now): ``reason`` for the condition and Event, ``message``, and whether
    waiting can fix it (the trunk has no adapter yet) or the specs must change."""

    reason: str
    message: str
    waiting: bool = False


def mismatch(branch: LanguageExpertSpec, trunk_name: str, trunk: LanguageExpertSpec) -> str | None:
    """What makes ``trunk`` unusable as ``branch``'s starting point (None: nothing)."""
    problems = []
    if trunk.init_from is not None:
        problems.append(f"it starts from {trunk.init_from.expert} itself (a trunk must be trained from the base)")
    if (trunk.base_model.uri, trunk.base_model.revision) != (branch.base_model.uri, branch.base_model.revision):
        problems.append(
            f"its base model is {trunk.base_model.identity()}, this expert's {branch.base_model.identity()}"
        )
    for field in ("rank", "alpha", "target_modules"):
        mine, theirs = _plain(getattr(branch.lora, field)), _plain(getattr(trunk.lora, field))
        if mine != theirs:
            problems.append(f"its lora.{_camel(field)} is {theirs}, this expert's {mine}")
    if trunk.task_type != branch.task_type:
        problems.append(f"its taskType is {trunk.task_type}, this expert's {branch.task_type}")
    elif list(trunk.labels or []) != list(branch.labels or []):
        problems.append(f"its labels are {trunk.labels}, this expert's {branch.labels}")
    if not problems:
        return None
    return (
        f"spec.initFrom names LanguageExpert {trunk_name}, which cannot be this expert's starting point: "
        + "; ".join(problems)
    )


def _plain(value: object) -> object:
    return list(value) if isinstance(value, list | tuple) else value


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def trunk_source(
    namespace: str,
    name: str,
    branch: LanguageExpertSpec,
    trunk: LanguageExpertSpec | None,
    status: LanguageExpertStatus | None,
) -> AdapterSource | TrunkProblem:
    """The trunk adapter a branch starts from, or why it cannot (yet). ``trunk``/``status``: the trunk's parsed spec
    and status (None: no such object, or a spec that does not parse)."""
    if trunk is None or status is None:
        return TrunkProblem(
            "TrunkNotFound",
            f"spec.initFrom names LanguageExpert {name}, which does not exist in namespace {namespace} (or has an "
            "invalid spec); waiting for it",
            waiting=True,
        )
    problem = mismatch(branch, name, trunk)
    if problem is not None:
        return TrunkProblem("InitFromMismatch", problem)
    adapter = status.adapter
    current = adapter is not None and status.trained_fingerprint == status.desired_fingerprint
    if adapter is None or not current:
        what = "commit its adapter" if adapter is None else "train its new adapter (its spec or base changed)"
        return TrunkProblem(
            "WaitingForTrunk",
            f"waiting for the trunk LanguageExpert {name} to {what} (phase {status.phase or 'Pending'})",
            waiting=True,
        )
    return AdapterSource(uri=adapter.uri, digest=adapter.digest, source=f"the trunk LanguageExpert {namespace}/{name}")
