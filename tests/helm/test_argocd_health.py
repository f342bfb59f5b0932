"""The chart's Argo CD health check (Lua 5.1, as in Argo CD) on sample objects built with the operator's own models.

The statuses are made with the API models and ``set_condition`` that the reconcilers use, so field names and condition
shapes are the real ones; the integration test also runs the script on live objects (Healthy after a reconcile).
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from chart_helpers import ARGOCD_PATCH, HEALTH_LUA, argocd_health

from langmerge.api.expert import ExpertPhase, LanguageExpertStatus
from langmerge.api.merged import MergedModelStatus, MergedPhase
from langmerge.controller.status import DEGRADED, QUALITY_GATE, READY, TRAINING, set_condition

NOW = "2026-11-27T10:00:00Z"


def expert(
    generation: int, phase: ExpertPhase | None, conditions: list[tuple[str, bool, str, str]], **status: Any
) -> dict[str, Any]:
    return _object("LanguageExpert", LanguageExpertStatus, generation, phase, conditions, status)


def merged(
    generation: int, phase: MergedPhase | None, conditions: list[tuple[str, bool, str, str]], **status: Any
) -> dict[str, Any]:
    return _object("MergedModel", MergedModelStatus, generation, phase, conditions, status)


def _object(
    kind: str,
    model: Any,
    generation: int,
    phase: Any,
    conditions: list[tuple[str, bool, str, str]],
    status: dict[str, Any],
) -> dict[str, Any]:
    observed = status.pop("observed", generation)
    conds: list[Any] = []
    for type_, value, reason, message in conditions:
        conds = set_condition(conds, type_, value, reason, message, generation=observed, now=NOW)
    body = model(phase=phase, observed_generation=observed, conditions=conds, **status)
    return {
        "apiVersion": "langmerge.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "x", "namespace": "ml", "generation": generation},
        "status": body.model_dump(mode="json", by_alias=True, exclude_none=True),
    }


READY_EXPERT = expert(
    3,
    ExpertPhase.READY,
    [
        (READY, True, "AdapterReady", "adapter sha256:abc at s3://b/experts/ml/x/fp/adapter"),
        (TRAINING, False, "Idle", ""),
        (DEGRADED, False, "AsExpected", ""),
    ],
)

CASES = {
    "healthy expert": (READY_EXPERT, "Healthy", "adapter sha256:abc"),
    "training expert": (
        expert(
            1,
            ExpertPhase.TRAINING,
            [(TRAINING, True, "JobRunning", "Job x-train-1"), (READY, False, "Training", "training fingerprint fp1")],
            message="Job x-train-1 is training fingerprint fp1",
        ),
        "Progressing",
        "training fingerprint fp1",
    ),
    "failed expert": (
        expert(
            2,
            ExpertPhase.FAILED,
            [
                (TRAINING, False, "Failed", "data.jsonl line 3: missing 'completion'"),
                (READY, False, "TrainingFailed", "data.jsonl line 3: missing 'completion'"),
                (DEGRADED, True, "TrainingFailed", "data.jsonl line 3: missing 'completion'"),
            ],
        ),
        "Degraded",
        "missing 'completion'",
    ),
    "suspended expert": (
        expert(4, ExpertPhase.SUSPENDED, [(READY, True, "AdapterReady", "adapter a")], message="spec.suspend is true"),
        "Suspended",
        "",
    ),
    "stale generation": (
        expert(5, ExpertPhase.READY, [(READY, True, "AdapterReady", "adapter a")], observed=4),
        "Progressing",
        "generation 5",
    ),
    "no status yet": (
        {"apiVersion": "langmerge.dev/v1alpha1", "kind": "LanguageExpert", "metadata": {"generation": 1}},
        "Progressing",
        "Waiting",
    ),
    "published merged model": (
        merged(
            2,
            MergedPhase.READY,
            [
                (READY, True, "Published", "revision 3 published"),
                (QUALITY_GATE, True, "Passed", "revision 3 passed the quality gate when merged"),
                (DEGRADED, False, "AsExpected", ""),
            ],
            revision=3,
        ),
        "Healthy",
        "revision 3 published",
    ),
    "merge waiting for experts": (
        merged(1, MergedPhase.WAITING, [(READY, False, "ExpertsNotReady", "waiting for: dialog-pt")]),
        "Progressing",
        "waiting for: dialog-pt",
    ),
    "blocked by the quality gate": (
        merged(
            3,
            MergedPhase.BLOCKED,
            [
                (QUALITY_GATE, False, "Regression", "es regressed 0.31 > maxRegression 0.1"),
                (READY, False, "QualityGateFailed", "merge fp regressed; revision 2 stays current"),
            ],
            revision=2,
        ),
        "Degraded",
        "Quality gate: es regressed 0.31 > maxRegression 0.1 (revision 2 stays published)",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_health(case: str) -> None:
    obj, expected, message = CASES[case]
    status, text = argocd_health(obj)
    assert status == expected, (case, status, text)
    assert message in text, (case, text)


def test_ready_condition_of_an_older_generation_is_not_healthy() -> None:
    obj = expert(2, ExpertPhase.READY, [(READY, True, "AdapterReady", "adapter a")])
    obj["status"]["conditions"][0]["observedGeneration"] = 1  # status bumped, the condition not yet
    assert argocd_health(obj)[0] == "Progressing"


def test_argocd_cm_patch_carries_the_script_for_both_kinds() -> None:
    patch = yaml.safe_load(ARGOCD_PATCH.read_text())
    script = HEALTH_LUA.read_text()
    assert patch["data"] == {
        "resource.customizations.health.langmerge.dev_LanguageExpert": script,
        "resource.customizations.health.langmerge.dev_MergedModel": script,
    }, "regenerate charts/langmerge/health/argocd-cm-patch.yaml: python tests/helm/test_argocd_health.py"


def write_argocd_patch() -> None:
    script = HEALTH_LUA.read_text()
    indented = "".join(("    " + line if line.strip() else line) for line in script.splitlines(keepends=True))
    head = ARGOCD_PATCH.read_text().split("data:\n", 1)[0]
    body = "".join(
        f"  resource.customizations.health.langmerge.dev_{kind}: |\n{indented}"
        for kind in ("LanguageExpert", "MergedModel")
    )
    ARGOCD_PATCH.write_text(f"{head}data:\n{body}")


if __name__ == "__main__":
    write_argocd_patch()
