"""The operator's pure parts: Job builders, fingerprints, conditions, retries, the quality gate, settings, the queue."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from api_cases import expert, merged
from langmerge.api import LanguageExpertSpec, MergedModelSpec
from langmerge.api.common import ConditionStatus
from langmerge.api.expert import Metrics
from langmerge.api.merged import Evaluation
from langmerge.artifacts import BaseModelIdentity, FailureRecord
from langmerge.controller.attempts import decide_retry
from langmerge.controller.jobs import Owner, build_merge_job, build_training_job, job_name, job_state, owner_hash
from langmerge.controller.publish import quality_gate
from langmerge.controller.status import bounded, merge_patch_body, set_condition
from langmerge.controller.workqueue import WorkQueue
from langmerge.fingerprint import merge_fingerprint, objects_digest, training_fingerprint
from langmerge.settings import Settings, SettingsError
from langmerge.tasks import MergeTask, MergeTaskInput, TrainTask

BASE = BaseModelIdentity(uri="s3://models/tiny", digest="b" * 16)


def _spec(**overrides: Any) -> LanguageExpertSpec:
    return LanguageExpertSpec.model_validate(expert(**overrides)["spec"])


def _task(spec: LanguageExpertSpec | None = None, attempt: int = 1, fp: str = "0123456789abcdef") -> TrainTask:
    return TrainTask(
        fingerprint=fp,
        output_uri=f"s3://a/artifacts/experts/ns/de/{fp}",
        namespace="ns",
        name="de",
        spec=spec or _spec(),
        base_model=BASE,
        data_digest="d" * 16,
        attempt=attempt,
    )


OWNER = Owner("LanguageExpert", "ns", "de", "uid-1")


# -- Job builders -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("owner", "attempt"),
    [("de", 1), ("a" * 63, 3), ("summarize.de-at", 12), ("x" * 80 + "-", 2)],
)
def test_job_names_are_deterministic_and_short(owner: str, attempt: int) -> None:
    who = Owner("LanguageExpert", "ns", owner, "uid-1")
    name = job_name(who, "training", "0123456789abcdef", attempt)
    assert name == job_name(who, "training", "0123456789abcdef", attempt)
    assert len(name) <= 63 and name.endswith(f"-train-0123456789-{owner_hash(who)}-{attempt}")
    assert name[0].isalnum() and name[-1].isalnum()


def test_job_names_differ_by_namespace_name_and_uid() -> None:
    """Names sharing their first 44 characters, the same name in another namespace, a re-created object (new uid):
    never the same Job name for the same fingerprint and attempt."""
    prefix = "summarize-customer-support-tickets-language-"
    owners = [
        Owner("LanguageExpert", "ns", prefix + "german", "uid-1"),
        Owner("LanguageExpert", "ns", prefix + "french", "uid-2"),
        Owner("LanguageExpert", "other", prefix + "german", "uid-3"),
        Owner("LanguageExpert", "ns", prefix + "german", "uid-4"),
    ]
    names = {job_name(o, "training", "0123456789abcdef", 1) for o in owners}
    assert len(names) == len(owners) and all(len(n) <= 63 for n in names)


@pytest.mark.parametrize(
    ("resources", "settings", "gpu_key", "gpus"),
    [
        ({"gpus": 1}, {}, "nvidia.com/gpu", "1"),
        ({"gpus": 4, "gpuResourceName": "amd.com/gpu"}, {}, "amd.com/gpu", "4"),
        ({"gpus": 2}, {"gpu_resource_name": "habana.ai/gaudi"}, "habana.ai/gaudi", "2"),
        ({"gpus": 0}, {}, None, None),
    ],
)
def test_training_job_resources(
    resources: dict[str, Any], settings: dict[str, Any], gpu_key: str | None, gpus: str | None
) -> None:
    job = build_training_job(OWNER, _task(_spec(resources=resources)), Settings(**settings))
    container = job["spec"]["template"]["spec"]["containers"][0]
    limits = container["resources"]["limits"]
    if gpu_key is None:
        assert not any("gpu" in k or "gaudi" in k for k in limits)
    else:
        assert limits[gpu_key] == gpus and container["resources"]["requests"][gpu_key] == gpus


def test_training_job_manifest() -> None:
    spec = _spec(
        resources={
            "gpus": 1,
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "training",
            "activeDeadlineSeconds": 3600,
        }
    )
    settings = Settings(
        kueue_queue="gpu-queue",
        job_service_account="trainer",
        s3_endpoint="http://s3:9000",
        job_env=(("HF_HOME", "/cache/hf"),),
    )
    job = build_training_job(OWNER, _task(spec, attempt=2), settings)
    meta, jspec = job["metadata"], job["spec"]
    pod = jspec["template"]["spec"]
    container = pod["containers"][0]
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert meta["labels"]["langmerge.dev/fingerprint"] == "0123456789abcdef"
    assert meta["annotations"]["langmerge.dev/attempt"] == "2"
    assert meta["ownerReferences"] == [OWNER.reference()] and meta["ownerReferences"][0]["controller"] is True
    assert jspec["activeDeadlineSeconds"] == 3600 and jspec["backoffLimit"] == 1
    assert jspec["ttlSecondsAfterFinished"] == 7 * 86400
    assert pod["nodeSelector"] == {"pool": "gpu"} and pod["tolerations"][0]["operator"] == "Exists"
    assert pod["priorityClassName"] == "training" and pod["serviceAccountName"] == "trainer"
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["command"] == ["langmerge-trainer"] and container["args"][:2] == ["train", "--task"]
    assert TrainTask.model_validate_json(container["args"][2]).attempt == 2
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "langmerge-s3",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert "value" not in env["AWS_ACCESS_KEY_ID"] and env["LANGMERGE_S3_ENDPOINT"]["value"] == "http://s3:9000"
    assert env["HF_HOME"]["value"] == "/cache/hf" and env["HF_HUB_OFFLINE"]["value"] == "1"
    assert not any(
        "secret" in json.dumps(e).lower() and "value" in e for e in container["env"] if e["name"].startswith("AWS_S")
    )


def test_merge_job_is_cpu_by_default() -> None:
    spec = MergedModelSpec.model_validate(merged()["spec"])
    task = MergeTask(
        fingerprint="f" * 16,
        output_uri="s3://m/out/merges/" + "f" * 16,
        namespace="ns",
        name="mm",
        method=spec.method,
        parameters=spec.effective_parameters(),
        base_model=BASE,
        inputs=[
            MergeTaskInput(
                expert="de", language="de", adapter_uri="s3://a/x", adapter_digest="1" * 16, dataset=_spec().dataset
            )
        ],
        output=spec.output,
        evaluation=spec.evaluation,
    )
    job = build_merge_job(Owner("MergedModel", "ns", "mm", "u"), task, spec.resources, Settings())
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "merge" and "nvidia.com/gpu" not in container["resources"]["limits"]
    assert job["metadata"]["labels"]["langmerge.dev/merged-model"] == "mm"


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ([], (True, False, False)),
        ([{"type": "Complete", "status": "True", "lastTransitionTime": "2026-01-01T00:00:10Z"}], (False, True, False)),
        (
            [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "too slow"}],
            (False, False, True),
        ),
        ([{"type": "Failed", "status": "False"}], (True, False, False)),
    ],
)
def test_job_state(conditions: list[dict[str, Any]], expected: tuple[bool, bool, bool]) -> None:
    job = {
        "metadata": {
            "name": "j",
            "labels": {"langmerge.dev/fingerprint": "fp"},
            "annotations": {"langmerge.dev/attempt": "3"},
        },
        "status": {"startTime": "2026-01-01T00:00:00Z", "conditions": conditions},
    }
    state = job_state(job)
    assert (state.active, state.succeeded, state.failed) == expected
    assert state.attempt == 3 and state.fingerprint == "fp"
    if state.succeeded:
        assert state.wall_seconds() == 10.0
    if state.failed:
        assert state.reason == "DeadlineExceeded" and state.message == "too slow"


# -- fingerprints -------------------------------------------------------------------------------------------------------
def _fp(spec: LanguageExpertSpec, **kw: Any) -> str:
    args = {"base_model_digest": "b", "data_digest": "d", "eval_data_digest": None, "image": "img:1"}
    args.update(kw)
    return training_fingerprint(spec, **args)


@pytest.mark.parametrize(
    "change",
    [
        {"lora": {"rank": 8}},
        {"training": {"learningRate": 1e-3}},
        {"training": {"seed": 1}},
        {"dataset": {"uri": "s3://data/summarization/de", "revision": "2"}},
        {"dataset": {"uri": "s3://data/summarization/de", "evalFraction": 0.2}},
        {"baseModel": {"uri": "s3://models/tiny-llama", "revision": "v2"}},
    ],
)
def test_training_fingerprint_changes_with_what_changes_the_result(change: dict[str, Any]) -> None:
    assert _fp(_spec()) != _fp(_spec(**change))


@pytest.mark.parametrize(
    "change",
    [
        {"resources": {"gpus": 0}},
        {"training": {"parallelism": "fsdp"}},
        {"runtime": "trainjob"},
        {"schedule": {"pollIntervalSeconds": 30}},
        {"training": {"gradientCheckpointing": True}},
        {"training": {"progressEverySteps": 1}},
        {"training": {"collapseCheck": False}},
        {"suspend": True},
        {"onChange": "restart"},
        {"retry": {"limit": 5}},
    ],
)
def test_training_fingerprint_ignores_operational_settings(change: dict[str, Any]) -> None:
    assert _fp(_spec()) == _fp(_spec(**change))


def test_training_fingerprint_inputs() -> None:
    spec = _spec()
    base = _fp(spec)
    assert (
        base != _fp(spec, data_digest="d2")
        and base != _fp(spec, base_model_digest="b2")
        and base != _fp(spec, image="img:2")
    )
    assert len(base) == 16


def test_merge_fingerprint_is_order_independent_and_input_sensitive() -> None:
    spec = MergedModelSpec.model_validate(merged()["spec"])
    a = [("de", "d1", 1.0), ("fr", "f1", 1.0)]
    fp = merge_fingerprint(spec, inputs=a, base_model_digest="b", image="i")
    assert fp == merge_fingerprint(spec, inputs=list(reversed(a)), base_model_digest="b", image="i")
    assert fp != merge_fingerprint(
        spec, inputs=[("de", "d2", 1.0), ("fr", "f1", 1.0)], base_model_digest="b", image="i"
    )
    assert fp != merge_fingerprint(
        spec, inputs=[("de", "d1", 0.5), ("fr", "f1", 1.0)], base_model_digest="b", image="i"
    )
    other = MergedModelSpec.model_validate(merged(parameters={"density": 0.5})["spec"])
    assert fp != merge_fingerprint(other, inputs=a, base_model_digest="b", image="i")
    gate = MergedModelSpec.model_validate(merged(evaluation={"maxRegression": 0.3})["spec"])
    assert fp == merge_fingerprint(gate, inputs=a, base_model_digest="b", image="i"), (
        "the gate threshold needs no re-merge"
    )


def test_objects_digest() -> None:
    rows = [("a.jsonl", 10, '"e1"'), ("b.jsonl", 5, "e2")]
    assert objects_digest(rows) == objects_digest(list(reversed(rows)))
    assert objects_digest(rows) == objects_digest([("a.jsonl", 10, "e1"), ("b.jsonl", 5, "e2")])
    assert objects_digest(rows) != objects_digest([("a.jsonl", 10, "e1"), ("b.jsonl", 6, "e2")])


# -- status ---------------------------------------------------------------------------------------------------------------
def test_condition_transition_time_moves_only_on_flips() -> None:
    conds = set_condition([], "Ready", False, "Training", generation=1, now="t1")
    conds = set_condition(conds, "Ready", False, "Queued", "waiting", generation=2, now="t2")
    assert conds[0].last_transition_time == "t1" and conds[0].reason == "Queued" and conds[0].observed_generation == 2
    conds = set_condition(conds, "Ready", True, "AdapterReady", generation=2, now="t3")
    assert conds[0].status == ConditionStatus.TRUE and conds[0].last_transition_time == "t3"
    conds = set_condition(conds, "Degraded", False, "AsExpected", generation=2, now="t4")
    assert [c.type for c in conds] == ["Ready", "Degraded"]


def test_merge_patch_body_drops_nulls_only_inside_lists() -> None:
    body = {
        "phase": None,
        "conditions": [{"type": "Ready", "message": "", "reason": None}],
        "adapter": {"metrics": None},
    }
    assert merge_patch_body(body) == {"phase": None, "conditions": [{"type": "Ready"}], "adapter": {"metrics": None}}


def test_bounded_history() -> None:
    assert bounded([1, 2, 3], 4, 3) == [2, 3, 4]


# -- retries -------------------------------------------------------------------------------------------------------------
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _failure(minutes_ago: float, retryable: bool = True, disruption: bool = False) -> FailureRecord:
    at = (NOW - timedelta(minutes=minutes_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return FailureRecord(
        fingerprint="f", error_class="E", message="m", retryable=retryable, at=at, disruption=disruption
    )


def _disrupted(minutes_ago: float = 0) -> FailureRecord:
    return _failure(minutes_ago, disruption=True)


@pytest.mark.parametrize(
    ("records", "limit", "expected"),
    [
        ({}, 2, (1, False, False)),
        ({1: _failure(10)}, 2, (2, False, False)),  # backoff 60 s passed
        ({1: _failure(0.5)}, 2, (None, False, True)),  # still in backoff
        ({1: _failure(10), 2: _failure(1.5)}, 2, (None, False, True)),  # second backoff is 120 s
        ({1: _failure(10), 2: _failure(3)}, 2, (3, False, False)),
        ({1: _failure(10), 2: _failure(10), 3: _failure(10)}, 2, (None, True, False)),  # limit spent
        ({1: _failure(10, retryable=False)}, 5, (None, True, False)),  # bad data: no retry
        # disruptions: not counted, no back-off
        ({1: _disrupted()}, 0, (2, False, False)),
        ({1: _disrupted(), 2: _disrupted()}, 0, (3, False, False)),
        ({1: _disrupted(), 2: _failure(0)}, 0, (None, True, False)),  # the one failure spends limit 0
        ({1: _disrupted(), 2: _failure(0.5)}, 1, (None, False, True)),  # first back-off (60 s) for the 1st failure
        ({1: _disrupted(), 2: _failure(1.5)}, 1, (3, False, False)),
        ({1: _failure(10), 2: _disrupted(), 3: _failure(1.5)}, 2, (None, False, True)),  # 2nd failure: 120 s
        ({1: _failure(10), 2: _disrupted(), 3: _failure(10)}, 1, (None, True, False)),
    ],
)
def test_decide_retry(records: dict[int, FailureRecord], limit: int, expected: tuple[int | None, bool, bool]) -> None:
    decision = decide_retry(records, limit=limit, backoff_seconds=60, now=NOW)
    assert (decision.next_attempt, decision.give_up, decision.wait_until is not None) == expected
    assert decision.attempts == sum(1 for r in records.values() if not r.disruption)


# -- the quality gate ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("metric", "merged_value", "expert_value", "max_regression", "passes"),
    [
        ("evalLoss", 2.1, 2.0, 0.1, True),
        ("evalLoss", 2.3, 2.0, 0.1, False),
        ("evalLoss", 1.9, 2.0, 0.0, True),
        ("tokenAccuracy", 0.45, 0.5, 0.1, True),
        ("tokenAccuracy", 0.40, 0.5, 0.1, False),
    ],
)
def test_quality_gate(
    metric: str, merged_value: float, expert_value: float, max_regression: float, passes: bool
) -> None:
    field = "eval_loss" if metric == "evalLoss" else "token_accuracy"
    evaluation = Evaluation(metric=metric, max_regression=max_regression)
    merged_m = {"de": Metrics(**{field: merged_value}), "fr": Metrics(**{field: expert_value})}
    expert_m = {"de": Metrics(**{field: expert_value}), "fr": Metrics(**{field: expert_value})}
    ok, figures, failures = quality_gate(evaluation, merged_m, expert_m)
    assert ok is passes and figures["fr"].regression == 0
    if not passes:
        assert len(failures) == 1 and failures[0].startswith("de: ") and "worse" in failures[0]


def test_quality_gate_disabled_never_blocks() -> None:
    ok, _, _ = quality_gate(Evaluation(enabled=False), {"de": Metrics(eval_loss=9)}, {"de": Metrics(eval_loss=1)})
    assert ok


# -- settings -----------------------------------------------------------------------------------------------------------
def test_settings_from_env() -> None:
    s = Settings.from_env(
        {
            "LANGMERGE_MAX_TRAINING_JOBS": "7",
            "LANGMERGE_NAMESPACES": "a, b",
            "LANGMERGE_DELETE_ARTIFACTS_WITH_EXPERT": "true",
        }
    )
    assert s.max_training_jobs == 7 and s.namespaces == ("a", "b") and s.delete_artifacts_with_expert
    # Leader election: off (always the leader) unless a namespace is set; the Lease name is a setting too.
    assert (s.leader_election_namespace, s.leader_election_lease_name) == ("", "langmerge-operator")
    s = Settings.from_env(
        {"LANGMERGE_LEADER_ELECTION_NAMESPACE": "ops", "LANGMERGE_LEADER_ELECTION_LEASE_NAME": "langmerge-b"}
    )
    assert (s.leader_election_namespace, s.leader_election_lease_name) == ("ops", "langmerge-b")


def test_controller_elects_with_the_lease_settings() -> None:
    """The controller's leader election uses the settings' namespace and Lease name (no namespace: no election)."""
    from langmerge.controller.manager import Controller

    settings = Settings.from_env(
        {"LANGMERGE_LEADER_ELECTION_NAMESPACE": "ops", "LANGMERGE_LEADER_ELECTION_LEASE_NAME": "langmerge-b"}
    )
    for given, expected in ((settings, ("ops", "langmerge-b")), (Settings(), (None, "langmerge-operator"))):
        controller = Controller(given, kube=None, store=None)  # type: ignore[arg-type]  # neither is used here
        try:
            assert (controller.leader.namespace, controller.leader.name) == expected
        finally:
            controller.pool.shutdown()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LANGMERGE_MAX_TRAINING_JOBS": "many"}, "LANGMERGE_MAX_TRAINING_JOBS"),
        ({"LANGMERGE_MAX_TRAINING_JOBS": "0"}, "must be >= 1"),
        ({"LANGMERGE_ARTIFACTS_URI": "/tmp/x"}, "s3://"),
        ({"LANGMERGE_DELETE_ARTIFACTS_WITH_EXPERT": "perhaps"}, "true or false"),
        ({"LANGMERGE_JOB_ENV": "novalue"}, "K=V"),
        ({"LANGMERGE_LEADER_ELECTION_LEASE_NAME": "Lease_A"}, "LANGMERGE_LEADER_ELECTION_LEASE_NAME"),
        ({"LANGMERGE_LEADER_ELECTION_NAMESPACE": "ops/x"}, "LANGMERGE_LEADER_ELECTION_NAMESPACE"),
    ],
)
def test_settings_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


# -- the work queue -----------------------------------------------------------------------------------------------------
def test_workqueue_dedups_and_reprocesses_dirty_keys() -> None:
    async def scenario() -> list[str]:
        q: WorkQueue[str] = WorkQueue()
        q.add("a")
        q.add("a")
        q.add("b")
        got = [await q.get()]
        q.add("a")  # added while being processed: runs once more after done()
        q.done("a")
        got.append(await q.get())
        q.done("b")
        got.append(await q.get())
        q.done("a")
        q.add_after("c", 0.05)
        q.add_after("c", 10)  # a later timer does not postpone the earlier one
        got.append(await asyncio.wait_for(q.get(), 2))
        assert len(q) == 0
        return got

    assert asyncio.run(scenario()) == ["a", "b", "a", "c"]


def test_workqueue_backoff_grows_and_resets() -> None:
    async def scenario() -> list[float]:
        q: WorkQueue[str] = WorkQueue(base_backoff=1, max_backoff=5)
        delays = [q.add_rate_limited("k") for _ in range(4)]
        q.forget("k")
        delays.append(q.add_rate_limited("k"))
        return delays

    assert asyncio.run(scenario()) == [1, 2, 4, 5, 1]
