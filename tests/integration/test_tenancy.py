"""Safe for many teams, on the real API server and S3 with the operator in-process (issue 11, one test per item).

Each test is what a careless or hostile user of one namespace tried on an operator that acts with its own S3
credentials and creates Jobs in every namespace it watches: the operator now refuses, says why in a condition and an
Event, and touches nothing it was not allowed to.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from langmerge import artifacts
from langmerge.constants import API_VERSION, EXPERT_KIND, EXPERT_PLURAL, GROUP, MERGED_PLURAL, VERSION
from langmerge.kube import PARTIAL_METADATA
from langmerge.store import ObjectInfo, ObjectStore, UnsafeKey, split_uri
from operator_harness import (
    DIALOG_ROWS,
    SimulatedJobs,
    apply_expert,
    apply_merged,
    condition,
    create_s3_secret,
    events,
    get_expert,
    get_merged,
    jobs,
    put_jsonl,
    run_operator,
    seed_fake_base_model,
    status_of,
    wait_for,
)

pytestmark = pytest.mark.integration

#: The harness's resync period: "several passes" below means a few of these.
RESYNC = 5.0


def _expert(base: str, data: str, lang: str = "es", **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "language": lang,
        "task": "dialog",
        "baseModel": {"uri": base},
        "dataset": {"uri": data},
        "lora": {"rank": 4},
        "resources": {"gpus": 0, "cpu": "1", "memory": "1Gi"},
        "schedule": {"pollIntervalSeconds": 5, "settleSeconds": 1},
        "retry": {"limit": 0, "backoffSeconds": 1},
    }
    spec.update(overrides)
    return spec


def _merged(base: str, output: str, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "baseModel": {"uri": base},
        "experts": {"selector": {"matchLabels": {"task": "dialog"}}},
        "method": "ties",
        "parameters": {"density": 1.0},
        "output": {"uri": output},
        "evaluation": {"maxRegression": 0.5},
        "publish": {"keepRevisions": 5},
        "settleSeconds": 0,
        "retry": {"limit": 0, "backoffSeconds": 1},
    }
    spec.update(overrides)
    return spec


def _phase(obj: dict[str, Any]) -> str | None:
    return status_of(obj).get("phase")


def _refused(get: Any, reason: str) -> dict[str, Any] | None:
    """The object once its Degraded condition carries ``reason``."""
    obj = get()
    cond = condition(obj, "Degraded")
    return obj if cond and cond["status"] == "True" and cond["reason"] == reason else None


def _published(kube: Any, namespace: str, name: str, revision: int) -> dict[str, Any] | None:
    obj = get_merged(kube, namespace, name)
    status = status_of(obj)
    return obj if status.get("revision") == revision and status.get("phase") == "Ready" else None


def _reasons(kube: Any, namespace: str, name: str) -> list[str]:
    return [e.reason for e in events(kube, namespace, name)]


def _event(kube: Any, namespace: str, name: str, reason: str) -> None:
    """Wait for an Event with ``reason`` (posted right after the status it goes with)."""
    wait_for(lambda: reason in _reasons(kube, namespace, name), timeout=10, what=f"a {reason} Event on {name}")


def _snapshot(s3: ObjectStore, output: str) -> dict[str, tuple[int, str]]:
    """Every object under a merged model's output prefix: key -> (size, ETag)."""
    return {o.key: (o.size, o.etag) for o in s3.iter_objects(output)}


@contextlib.contextmanager
def _two_teams(kube: Any, s3: ObjectStore, bucket: str, team_b: str, team_a: str) -> Iterator[str]:
    """One operator watching both teams' namespaces, each with es and it dialog experts; yields the base model URI."""
    base = f"s3://{bucket}/base"
    seed_fake_base_model(s3, base)
    for lang in ("es", "it"):
        put_jsonl(s3, f"s3://{bucket}/data/{lang}/part-0.jsonl", DIALOG_ROWS)
    with (
        run_operator(team_b, f"s3://{bucket}/artifacts", also_watch=(team_a,)),
        SimulatedJobs(kube, s3, team_b),
        SimulatedJobs(kube, s3, team_a),
    ):
        for ns in (team_b, team_a):
            for lang in ("es", "it"):
                data = f"s3://{bucket}/data/{lang}"
                apply_expert(kube, ns, f"dialog-{lang}", _expert(base, data, lang), labels={"task": "dialog"})
        yield base


# -- item 1: an output prefix belongs to one MergedModel ------------------------------------------------------------
def test_two_namespace_takeover_is_refused(
    kube: Any, s3: ObjectStore, bucket: str, namespace: str, make_namespace: Any
) -> None:
    team_b, team_a = namespace, make_namespace()
    out_b = f"s3://{bucket}/models/team-b/dialog"
    with _two_teams(kube, s3, bucket, team_b, team_a) as base:
        apply_merged(kube, team_b, "published", _merged(base, out_b))
        wait_for(lambda: _published(kube, team_b, "published", 1), timeout=40, what="team-b revision 1")
        apply_merged(kube, team_b, "published", _merged(base, out_b, parameters={"weights": {"es": 0.5}}))
        published = wait_for(lambda: _published(kube, team_b, "published", 2), timeout=40, what="team-b revision 2")
        uid_b = published["metadata"]["uid"]
        # A third revision, so that the intruder's keepRevisions: 2 would have one of team-b's merges to delete.
        apply_merged(kube, team_b, "published", _merged(base, out_b, parameters={"weights": {"es": 0.25}}))
        wait_for(lambda: _published(kube, team_b, "published", 3), timeout=40, what="team-b revision 3")
        before = _snapshot(s3, out_b)
        merges_b = {h["uri"] for h in status_of(get_merged(kube, team_b, "published"))["history"]}
        assert len(merges_b) == 3, merges_b
        b_events = len(events(kube, team_b, "published"))

        # team-a points a MergedModel at team-b's prefix, asks for a rollback, and keeps only 2 revisions.
        intruder = _merged(base, out_b, pinRevision=1, publish={"keepRevisions": 2})
        apply_merged(kube, team_a, "intruder", intruder)
        obj = wait_for(
            lambda: _refused(lambda: get_merged(kube, team_a, "intruder"), "OutputOwnedByAnother"),
            what="the intruder refused",
        )
        message = condition(obj, "Ready")["message"]
        assert f"belongs to MergedModel {team_b}/published (uid {uid_b})" in message, message
        assert "writes, pins and deletes nothing there" in message
        assert _phase(obj) == "Failed" and "revision" not in status_of(obj)
        # Several passes later (it looks again every resync), nothing of team-b's moved.
        time.sleep(2 * RESYNC + 1)
        assert _snapshot(s3, out_b) == before
        assert s3.get_json(artifacts.current_uri(out_b))["revision"] == 3
        assert status_of(get_merged(kube, team_b, "published"))["revision"] == 3
        for merge_uri in merges_b:  # the intruder's keepRevisions: 2 deleted none of team-b's three merges
            assert [o.key for o in s3.iter_objects(merge_uri)], merge_uri
        assert len(events(kube, team_b, "published")) == b_events, "no Published Events from the intruder's passes"
        assert _reasons(kube, team_a, "intruder").count("OutputOwnedByAnother") == 1
        assert not jobs(kube, team_a, "langmerge.dev/merged-model=intruder")
        owner = s3.get_json(artifacts.owner_uri(out_b))
        assert (owner["namespace"], owner["name"], owner["kind"], owner["uid"]) == (
            team_b,
            "published",
            "MergedModel",
            uid_b,
        )

        # GitOps re-creates team-b's object (same name, new uid): it takes its prefix back, merges nothing anew.
        client.CustomObjectsApi(kube).delete_namespaced_custom_object(
            GROUP, VERSION, team_b, MERGED_PLURAL, "published"
        )
        wait_for(
            lambda: (
                not [
                    o
                    for o in client.CustomObjectsApi(kube).list_namespaced_custom_object(
                        GROUP, VERSION, team_b, MERGED_PLURAL
                    )["items"]
                ]
            ),
            what="deleted",
        )
        apply_merged(kube, team_b, "published", _merged(base, out_b, parameters={"weights": {"es": 0.25}}))
        wait_for(lambda: _published(kube, team_b, "published", 3), timeout=30, what="re-created, revision 3")
        _event(kube, team_b, "published", "PrefixAdopted")
        assert s3.get_json(artifacts.owner_uri(out_b))["uid"] not in (uid_b, owner["uid"])
        uid = get_merged(kube, team_b, "published")["metadata"]["uid"]
        merge_jobs = jobs(kube, team_b, "langmerge.dev/component=merge")
        assert not [j for j in merge_jobs if j.metadata.owner_references[0].uid == uid], "nothing merged anew"
        assert _refused(lambda: get_merged(kube, team_a, "intruder"), "OutputOwnedByAnother")

        # suspend stops rollbacks too: the owner pins revision 1 while suspended, nothing is published...
        apply_merged(
            kube,
            team_b,
            "published",
            _merged(base, out_b, parameters={"weights": {"es": 0.25}}, pinRevision=1, suspend=True),
        )
        wait_for(lambda: _phase(get_merged(kube, team_b, "published")) == "Suspended", what="Suspended")
        time.sleep(RESYNC + 1)
        assert s3.get_json(artifacts.current_uri(out_b))["revision"] == 3
        # ...and resuming rolls back (revision 4 republishes revision 1's merge).
        apply_merged(
            kube, team_b, "published", _merged(base, out_b, parameters={"weights": {"es": 0.25}}, pinRevision=1)
        )
        wait_for(lambda: _published(kube, team_b, "published", 4), timeout=30, what="rollback revision 4")
        assert s3.get_json(artifacts.current_uri(out_b))["rollback_of"] == 1

        # Within team-b, another MergedModel gets the prefix only once its owner names another output.
        weights = {"weights": {"es": 0.25}}
        apply_merged(kube, team_b, "successor", _merged(base, out_b, parameters=weights))
        wait_for(lambda: _refused(lambda: get_merged(kube, team_b, "successor"), "OutputOwnedByAnother"), what="no")
        apply_merged(kube, team_b, "published", _merged(base, f"s3://{bucket}/models/team-b/v2", parameters=weights))
        wait_for(lambda: _published(kube, team_b, "successor", 5), timeout=30, what="the successor publishes")
        _event(kube, team_b, "successor", "PrefixAdopted")
        assert s3.get_json(artifacts.owner_uri(out_b))["name"] == "successor"


def test_expert_artifact_prefix_is_owned(
    kube: Any, s3: ObjectStore, bucket: str, namespace: str, make_namespace: Any
) -> None:
    """An expert's artifact prefix (``<artifactsUri>/experts/<ns>/<name>/``) has an owner record too: a re-created
    expert (new uid) takes its own prefix back and keeps its adapter; a prefix whose record names another live object
    is refused (nothing trained, not even when its data changes); and deleting an expert whose prefix another live object owns
    deletes nothing, even with ``delete_artifacts_with_expert``."""
    other = make_namespace()
    art = f"s3://{bucket}/artifacts"
    base = f"s3://{bucket}/base"
    seed_fake_base_model(s3, base)
    for lang in ("es", "it", "pt"):
        put_jsonl(s3, f"s3://{bucket}/data/{lang}/part-0.jsonl", DIALOG_ROWS)
    custom_api = client.CustomObjectsApi(kube)

    def ready(name: str) -> dict[str, Any] | None:
        obj = get_expert(kube, namespace, name)
        return obj if _phase(obj) == "Ready" else None

    def delete(name: str) -> None:
        custom_api.delete_namespaced_custom_object(GROUP, VERSION, namespace, EXPERT_PLURAL, name)
        wait_for(lambda: name not in _expert_names(kube, namespace), what=f"{name} deleted")

    # Another namespace's live expert (not watched: it only has to exist) that a planted record names.
    apply_expert(kube, other, "it", _expert(base, f"s3://{bucket}/data/it", "it"))
    other_uid = custom_api.get_namespaced_custom_object(GROUP, VERSION, other, EXPERT_PLURAL, "it")["metadata"]["uid"]
    root = artifacts.expert_root(art, namespace, "es")
    with run_operator(namespace, art), SimulatedJobs(kube, s3, namespace):
        apply_expert(kube, namespace, "es", _expert(base, f"s3://{bucket}/data/es"))
        first = wait_for(lambda: ready("es"), timeout=40, what="es Ready")
        record = s3.get_json(artifacts.owner_uri(root))
        assert (record["kind"], record["namespace"], record["name"], record["uid"]) == (
            EXPERT_KIND,
            namespace,
            "es",
            first["metadata"]["uid"],
        )
        adapter = status_of(first)["adapter"]["digest"]

        # GitOps deletes and re-creates it: the new object takes its prefix over and adopts its adapter, no Job.
        delete("es")
        apply_expert(kube, namespace, "es", _expert(base, f"s3://{bucket}/data/es"))
        again = wait_for(lambda: ready("es"), timeout=40, what="es Ready again")
        _event(kube, namespace, "es", "PrefixAdopted")
        assert s3.get_json(artifacts.owner_uri(root))["uid"] == again["metadata"]["uid"] != first["metadata"]["uid"]
        assert status_of(again)["adapter"]["digest"] == adapter
        owners = {j.metadata.owner_references[0].uid for j in jobs(kube, namespace)}
        assert again["metadata"]["uid"] not in owners, "the re-created expert trained nothing"

        # A record naming another live object: refused at its next check, nothing trained although the data grew.
        s3.put_json(
            artifacts.owner_uri(root),
            artifacts.OwnerRecord(api_version=API_VERSION, kind=EXPERT_KIND, namespace=other, name="it", uid=other_uid),
        )
        obj = wait_for(
            lambda: _refused(lambda: get_expert(kube, namespace, "es"), "ArtifactsOwnedByAnother"),
            timeout=20,
            what="es refused",
        )
        message = status_of(obj)["message"]
        assert f"the expert's artifact prefix {root} belongs to LanguageExpert {other}/it (uid {other_uid})" in message
        _event(kube, namespace, "es", "ArtifactsOwnedByAnother")
        put_jsonl(s3, f"s3://{bucket}/data/es/part-1.jsonl", DIALOG_ROWS[:5])
        time.sleep(2 * RESYNC + 1)
        assert again["metadata"]["uid"] not in {j.metadata.owner_references[0].uid for j in jobs(kube, namespace)}
        kept = sorted(o.key for o in s3.iter_objects(root))

    # Deleting it with delete_artifacts_with_expert keeps the prefix another live object owns; an expert that owns its
    # prefix has it deleted (so the setting is on).
    with run_operator(namespace, art, delete_artifacts_with_expert=True), SimulatedJobs(kube, s3, namespace):
        apply_expert(kube, namespace, "pt", _expert(base, f"s3://{bucket}/data/pt", "pt"))
        wait_for(lambda: ready("pt"), timeout=40, what="pt Ready")
        pt_root = artifacts.expert_root(art, namespace, "pt")
        assert [o.key for o in s3.iter_objects(pt_root)]
        delete("es")
        delete("pt")
        wait_for(lambda: not [o.key for o in s3.iter_objects(pt_root)], timeout=20, what="pt's artifacts deleted")
        time.sleep(RESYNC)
        assert sorted(o.key for o in s3.iter_objects(root)) == kept


def _expert_names(kube: Any, namespace: str) -> set[str]:
    items = client.CustomObjectsApi(kube).list_namespaced_custom_object(GROUP, VERSION, namespace, EXPERT_PLURAL)
    return {o["metadata"]["name"] for o in items["items"]}


# -- item 2: URI policy per namespace ------------------------------------------------------------------------------------
def test_uri_policy_refuses_every_uri_field(
    kube: Any, s3: ObjectStore, bucket: str, namespace: str, make_namespace: Any
) -> None:
    other = make_namespace()
    art = f"s3://{bucket}/artifacts"
    mine, theirs, shared = f"{art}/{namespace}", f"{art}/{other}", f"s3://{bucket}/shared"
    seed_fake_base_model(s3, f"{shared}/base")
    seed_fake_base_model(s3, f"{theirs}/base")
    for prefix in (f"{mine}/data/es", f"{theirs}/data/es", f"{theirs}/eval", f"{mine}x/data/es"):
        put_jsonl(s3, f"{prefix}/part-0.jsonl", DIALOG_ROWS)
    grants = json.dumps({namespace: {"read": [f"{shared}/"]}})
    ok_base = f"{shared}/base"
    with run_operator(namespace, art, uri_grants=grants), SimulatedJobs(kube, s3, namespace):
        apply_expert(kube, namespace, "ok", _expert(ok_base, f"{mine}/data/es"), labels={"task": "dialog"})
        bad_experts = {
            "steal-data": (_expert(ok_base, f"{theirs}/data/es"), f"spec.dataset.uri {theirs}/data/es", "read"),
            "steal-eval": (
                _expert(ok_base, f"{mine}/data/es", dataset={"uri": f"{mine}/data/es", "evalUri": f"{theirs}/eval"}),
                f"spec.dataset.evalUri {theirs}/eval",
                "read",
            ),
            "steal-validation": (
                _expert(
                    ok_base, f"{mine}/data/es", dataset={"uri": f"{mine}/data/es", "validationUri": f"{theirs}/eval"}
                ),
                f"spec.dataset.validationUri {theirs}/eval",
                "read",
            ),
            "steal-base": (_expert(f"{theirs}/base", f"{mine}/data/es"), f"spec.baseModel.uri {theirs}/base", "read"),
            "near-miss": (_expert(ok_base, f"{mine}x/data/es"), f"spec.dataset.uri {mine}x/data/es", "read"),
        }
        for name, (spec, _, _) in bad_experts.items():
            apply_expert(kube, namespace, name, spec)
        bad_merged = {
            "write-shared": (_merged(ok_base, f"{shared}/out"), f"spec.output.uri {shared}/out", "write"),
            "steal-base-mm": (_merged(f"{theirs}/base", f"{mine}/out"), f"spec.baseModel.uri {theirs}/base", "read"),
        }
        for name, (spec, _, _) in bad_merged.items():
            apply_merged(kube, namespace, name, spec)
        apply_merged(kube, namespace, "ok-mm", _merged(ok_base, f"{mine}/merged"))

        for name, (_, field, need) in {**bad_experts, **bad_merged}.items():
            get = (
                (lambda n=name: get_expert(kube, namespace, n))
                if name in bad_experts
                else (lambda n=name: get_merged(kube, namespace, n))
            )
            obj = wait_for(lambda g=get: _refused(g, "UriNotAllowed"), what=f"{name} refused")
            message = status_of(obj)["message"]
            assert message.startswith(f"{field} is outside what namespace {namespace} may {need}"), message
            assert f"{mine}/ (default rule, read and write)" in message and f"{shared}/ (grant, read only)" in message
            assert _phase(obj) == "Failed" and "dataDigest" not in status_of(obj), "nothing was listed"
            _event(kube, namespace, name, "UriNotAllowed")
        # What the policy allows works: the expert trains, the merged model publishes under the namespace's prefix.
        wait_for(lambda: _published(kube, namespace, "ok-mm", 1), timeout=40, what="ok-mm revision 1")
        assert s3.exists(artifacts.current_uri(f"{mine}/merged"))
        owners = {j.metadata.owner_references[0].name for j in jobs(kube, namespace)}
        assert owners == {"ok", "ok-mm"}, owners
        assert not s3.exists(artifacts.owner_uri(f"{shared}/out"))


# -- item 3: admission checks before a Job takes a slot -----------------------------------------------------------------
def test_admission_checks_before_a_job_takes_a_slot(
    kube: Any, s3: ObjectStore, bucket: str, namespace: str, make_namespace: Any
) -> None:
    team_b, no_secret = make_namespace(), make_namespace()
    client.CoreV1Api(kube).delete_namespaced_secret("langmerge-s3", no_secret)
    base = f"s3://{bucket}/base"
    seed_fake_base_model(s3, base)
    for lang in ("es", "it", "pt"):
        put_jsonl(s3, f"s3://{bucket}/data/{lang}/part-0.jsonl", DIALOG_ROWS)

    def spec(lang: str = "es", **overrides: Any) -> dict[str, Any]:
        return _expert(base, f"s3://{bucket}/data/{lang}", lang, **overrides)

    hang = lambda job, fp: "hang"  # noqa: E731
    with (
        run_operator(
            namespace,
            f"s3://{bucket}/artifacts",
            also_watch=(team_b, no_secret),
            max_training_jobs=4,
            max_training_jobs_per_namespace=1,
        ),
        SimulatedJobs(kube, s3, namespace, behaviour=hang),
        SimulatedJobs(kube, s3, team_b, behaviour=hang),
        SimulatedJobs(kube, s3, no_secret, behaviour=hang),
    ):
        refused = {
            "other-registry": (spec(image="evil.example.com/trainer:1"), "ImageNotAllowed", "from evil.example.com"),
            "bad-reference": (spec(image="UPPER/Case::@@"), "ImageNotAllowed", "not a valid image reference"),
            "no-memory": (spec(resources={"gpus": 0, "memory": "0"}), "InvalidResources", "memory 0 must be positive"),
            "all-memory": (
                spec(resources={"gpus": 0, "memory": "99999999999999Ei"}),
                "InvalidResources",
                "more than the operator allows for one Job (4Ti",
            ),
        }
        for name, (body, _, _) in refused.items():
            apply_expert(kube, namespace, name, body)
        for name, (_, reason, text) in refused.items():
            obj = wait_for(lambda n=name, r=reason: _refused(lambda: get_expert(kube, namespace, n), r), what=name)
            assert text in status_of(obj)["message"], status_of(obj)["message"]
            _event(kube, namespace, name, reason)
        # The same checks hold for a MergedModel's merge Job (its image and resources), before anything is read.
        merged_refused = {
            "mm-registry": ({"image": "evil.example.com/merge:1"}, "ImageNotAllowed", "from evil.example.com"),
            "mm-memory": (
                {"resources": {"gpus": 0, "cpu": "1", "memory": "99999999999999Ei"}},
                "InvalidResources",
                "more than the operator allows for one Job (4Ti",
            ),
        }
        for name, (overrides, _, _) in merged_refused.items():
            apply_merged(
                kube, namespace, name, _merged(base, f"s3://{bucket}/artifacts/{namespace}/{name}", **overrides)
            )
        for name, (_, reason, text) in merged_refused.items():
            obj = wait_for(lambda n=name, r=reason: _refused(lambda: get_merged(kube, namespace, n), r), what=name)
            assert text in status_of(obj)["message"], status_of(obj)["message"]
            assert _phase(obj) == "Failed"
            _event(kube, namespace, name, reason)
            assert not s3.exists(artifacts.owner_uri(f"s3://{bucket}/artifacts/{namespace}/{name}")), "nothing written"
        assert not jobs(kube, namespace)

        # Per-namespace cap: the namespace gets one training slot of four; another namespace is not starved.
        apply_expert(kube, namespace, "first", spec("es"))
        wait_for(lambda: len(jobs(kube, namespace)) == 1, what="the namespace's one Job")
        apply_expert(kube, namespace, "second", spec("it"))
        obj = wait_for(
            lambda: (
                (c := condition(get_expert(kube, namespace, "second"), "Training"))
                and c["reason"] == "NamespaceQueueFull"
                and get_expert(kube, namespace, "second")
            ),
            what="second queued by the namespace cap",
        )
        assert "max_training_jobs_per_namespace" in status_of(obj)["message"]
        apply_expert(kube, team_b, "other-team", spec("pt"))
        wait_for(lambda: len(jobs(kube, team_b)) == 1, what="team-b's Job while the first namespace is at its cap")
        assert len(jobs(kube, namespace)) == 1

        # A namespace without the S3 Secret: reported at once, no Job; once the Secret exists, the Job starts.
        apply_expert(kube, no_secret, "es", spec("es"))
        obj = wait_for(lambda: _refused(lambda: get_expert(kube, no_secret, "es"), "SecretMissing"), what="no Secret")
        assert f"Secret langmerge-s3 not found in namespace {no_secret}" in status_of(obj)["message"]
        assert _phase(obj) == "Pending"
        _event(kube, no_secret, "es", "SecretMissing")
        assert not jobs(kube, no_secret)
        create_s3_secret(kube, no_secret)
        wait_for(lambda: jobs(kube, no_secret), timeout=RESYNC * 3, what="the Job once the Secret exists")
        # The check reads metadata only: the API server answers that request without the Secret's data.
        resp = client.CoreV1Api(kube).read_namespaced_secret(
            "langmerge-s3", no_secret, _preload_content=False, _headers={"Accept": PARTIAL_METADATA}
        )
        body = json.loads(resp.data)
        assert body["kind"] == "PartialObjectMetadata" and "data" not in body and "stringData" not in body
        wait_for(
            lambda: condition(get_expert(kube, no_secret, "es"), "Degraded")["status"] == "False", what="not Degraded"
        )


# -- item 4: names that cannot collide ----------------------------------------------------------------------------------
def test_job_and_event_names_cannot_collide(kube: Any, s3: ObjectStore, bucket: str, namespace: str) -> None:
    base = f"s3://{bucket}/base"
    seed_fake_base_model(s3, base)
    put_jsonl(s3, f"s3://{bucket}/data/es/part-0.jsonl", DIALOG_ROWS)
    prefix = "customer-support-summaries-for-the-spanish-team-"
    twins = [prefix + "a", prefix + "b"]
    assert len(prefix) >= 44, "the first 44 characters are shared"
    long = ("long-" * 50)[:249] + "-es"  # 252 characters
    spec = _expert(base, f"s3://{bucket}/data/es")
    with run_operator(namespace, f"s3://{bucket}/artifacts"), SimulatedJobs(kube, s3, namespace, duration=1.0):
        for name in [*twins, long]:
            apply_expert(kube, namespace, name, spec)
        for name in [*twins, long]:
            wait_for(lambda n=name: _phase(get_expert(kube, namespace, n)) == "Ready", timeout=30, what=f"{name} Ready")
        job_names = {
            name: [j["job"] for j in status_of(get_expert(kube, namespace, name))["history"]] for name in twins
        }
        assert job_names[twins[0]] != job_names[twins[1]], job_names
        owners = {j.metadata.name: j.metadata.owner_references[0].name for j in jobs(kube, namespace)}
        for name in twins:
            (job,) = job_names[name]
            assert owners[job] == name and len(job) <= 63
        # Every Event of the 252-character name is there, not only the first.
        for reason in ("TrainingStarted", "AdapterReady"):
            _event(kube, namespace, long, reason)


# -- item 5: local paths from object keys -------------------------------------------------------------------------------
class ListingAsAwsWould(ObjectStore):
    """The real S3 server, with keys this server refuses (``..`` segments: InvalidRequest) or normalises (``//``)
    added to its listings the way AWS S3 lists them, so the download meets what a bucket on AWS can hold."""

    def __init__(self, store: ObjectStore, extra: list[str]) -> None:
        super().__init__(store.client)
        self.extra = extra

    def iter_objects(self, uri: str) -> Iterator[ObjectInfo]:
        yield from super().iter_objects(uri)
        _bucket, key = split_uri(uri)
        for name in self.extra:
            yield ObjectInfo(key=f"{key.rstrip('/')}/{name}", size=1, etag="x")


@pytest.mark.parametrize("key", ["/etc/cron.d/x", "../../escaped.txt", "adapter/../../../escaped.txt"])
def test_download_refuses_keys_outside_the_folder(s3: ObjectStore, bucket: str, tmp_path: Path, key: str) -> None:
    model = f"s3://{bucket}/models/base"
    s3.put_bytes(f"{model}/config.json", b"{}")
    s3.put_bytes(f"{model}/nested/tokenizer.json", b"{}")
    target = tmp_path / "a" / "b" / "download"
    # The plain keys download as before, through the real server.
    assert sorted(p.relative_to(target).as_posix() for p in s3.download_prefix(model, target)) == [
        "config.json",
        "nested/tokenizer.json",
    ]
    fresh = tmp_path / "a" / "b" / "again"
    with pytest.raises(UnsafeKey, match="not a plain relative path"):
        ListingAsAwsWould(s3, [key]).download_prefix(model, fresh)
    assert not list(fresh.rglob("*")), "nothing is written once an unsafe key is listed"
    assert not list(tmp_path.rglob("escaped.txt"))


# -- item 6: refused up front, not at run time --------------------------------------------------------------------------
def test_broken_merge_specs_are_refused_before_any_job(kube: Any, s3: ObjectStore, bucket: str, namespace: str) -> None:
    base = f"s3://{bucket}/base"
    seed_fake_base_model(s3, base)
    for lang in ("es", "it"):
        put_jsonl(s3, f"s3://{bucket}/data/{lang}/part-0.jsonl", DIALOG_ROWS)
    out = f"s3://{bucket}/merged"
    broken = {
        "zero-weights": (
            _merged(base, f"{out}/a", parameters={"density": 1.0, "weights": {"es": 0, "it": 0}}),
            "every selected language weight 0 (es, it)",
        ),
        "bad-regex": (
            _merged(base, f"{out}/b", method="linear", parameters={"includeModules": ["q_proj", "(unclosed"]}),
            "spec.parameters.includeModules: Value error, '(unclosed' is not a valid regular expression",
        ),
        "bad-selector": (
            _merged(base, f"{out}/c", experts={"selector": {"matchLabels": {"task": "dialog tasks"}}}),
            "label value 'dialog tasks'",
        ),
    }
    with run_operator(namespace, f"s3://{bucket}/artifacts") as runner, SimulatedJobs(kube, s3, namespace):
        for lang in ("es", "it"):
            apply_expert(
                kube,
                namespace,
                f"dialog-{lang}",
                _expert(base, f"s3://{bucket}/data/{lang}", lang),
                labels={"task": "dialog"},
            )
        for lang in ("es", "it"):
            wait_for(lambda n=f"dialog-{lang}": _phase(get_expert(kube, namespace, n)) == "Ready", what="Ready")
        for name, (spec, _) in broken.items():
            apply_merged(kube, namespace, name, spec)
        for name, (_, text) in broken.items():
            obj = wait_for(lambda n=name: _refused(lambda: get_merged(kube, namespace, n), "InvalidSpec"), what=name)
            assert text in status_of(obj)["message"], status_of(obj)["message"]
        # A refused spec claims no prefix (issue 23): no owner record, nothing at all under the outputs.
        assert not [o.key for o in s3.iter_objects(out)]
        # Other objects in the namespace change: no merge Job, no second Event, no traceback.
        for lang in ("es", "it"):
            apply_expert(
                kube,
                namespace,
                f"dialog-{lang}",
                _expert(base, f"s3://{bucket}/data/{lang}", lang),
                labels={"task": "dialog", "touched": "yes"},
            )
        time.sleep(RESYNC + 1)
        assert not jobs(kube, namespace, "langmerge.dev/component=merge")
        for name in broken:
            assert _reasons(kube, namespace, name).count("InvalidSpec") == 1, _reasons(kube, namespace, name)
        assert not [o.key for o in s3.iter_objects(out)]
    assert "reconcile of merged" not in runner.output, runner.output


# -- issue 23 item 1: one owner for everything under (and above) an owned prefix ----------------------------------------
def test_prefixes_inside_or_above_an_owned_prefix_are_refused(
    kube: Any, s3: ObjectStore, bucket: str, namespace: str, make_namespace: Any
) -> None:
    """Both teams hold a read-write grant on one bucket (the harness's default grant). team-b publishes to
    ``shared/b-prod``; team-a's outputs inside it (its merge folder, a model folder below it, its revisions) and above
    it (``shared``) are refused naming team-b's object, and write nothing anywhere; a sibling with a common stem
    (``b-prod2``) is free. team-b's own second object nested in its prefix is refused too, while team-b itself moves its
    output below its own prefix freely. Garbage collection deletes nothing under another owner's prefix."""
    team_b, team_a = namespace, make_namespace()
    shared = f"s3://{bucket}/models/shared"
    out_b = f"{shared}/b-prod"
    with _two_teams(kube, s3, bucket, team_b, team_a) as base:
        apply_merged(kube, team_b, "prod", _merged(base, out_b, publish={"keepRevisions": 2}))
        published = wait_for(lambda: _published(kube, team_b, "prod", 1), timeout=40, what="team-b revision 1")
        uid_b = published["metadata"]["uid"]
        fp = status_of(published)["fingerprint"]
        before = _snapshot(s3, out_b)

        intruders = {
            "inside-merge": (f"{out_b}/merges/{fp}", "lies inside"),
            "inside-model": (f"{out_b}/merges/{fp}/model", "lies inside"),
            "inside-revisions": (f"{out_b}/revisions", "lies inside"),
            "above": (shared, "contains"),
        }
        for name, (uri, _) in intruders.items():
            apply_merged(kube, team_a, name, _merged(base, uri))
        apply_merged(kube, team_a, "sibling", _merged(base, f"{shared}/b-prod2"))
        apply_merged(kube, team_b, "nested", _merged(base, f"{out_b}/canary"))
        for ns, name, (uri, relation) in [
            *((team_a, n, v) for n, v in intruders.items()),
            (team_b, "nested", (f"{out_b}/canary", "lies inside")),
        ]:
            obj = wait_for(
                lambda ns=ns, name=name: _refused(lambda: get_merged(kube, ns, name), "OutputOwnedByAnother"),
                what=f"{name} refused",
            )
            message = condition(obj, "Ready")["message"]
            assert f"spec.output.uri {uri} {relation} {out_b}" in message, message
            assert f"MergedModel {team_b}/prod (uid {uid_b})" in message, message
            assert not s3.exists(artifacts.owner_uri(uri)), f"{name} claimed nothing"
        wait_for(lambda: _published(kube, team_a, "sibling", 1), timeout=40, what="the sibling b-prod2 publishes")
        time.sleep(RESYNC + 1)
        assert _snapshot(s3, out_b) == before, "nothing landed inside team-b's prefix"
        assert not s3.exists(artifacts.owner_uri(shared))
        for name in intruders:
            assert not jobs(kube, team_a, f"langmerge.dev/merged-model={name}")

        # Expert artifact prefixes are owned the same way: an output above them (the artifacts root) is refused.
        artifacts_root = f"s3://{bucket}/artifacts"
        apply_merged(kube, team_a, "above-experts", _merged(base, artifacts_root))
        obj = wait_for(
            lambda: _refused(lambda: get_merged(kube, team_a, "above-experts"), "OutputOwnedByAnother"), what="refused"
        )
        message = condition(obj, "Ready")["message"]
        assert f"spec.output.uri {artifacts_root} contains {artifacts_root}/experts/" in message, message
        assert "which belongs to LanguageExpert" in message, message
        assert not s3.exists(artifacts.owner_uri(artifacts_root))

        # Garbage collection: an owner record planted inside team-b's first merge (someone else's data, there by
        # hand) keeps everything under it when that merge is collected.
        planted = f"{out_b}/merges/{fp}/kept"
        s3.put_json(
            artifacts.owner_uri(planted),
            artifacts.OwnerRecord(api_version=API_VERSION, kind="MergedModel", namespace=team_a, name="x", uid="u"),
        )
        s3.put_bytes(f"{planted}/model/weights.bin", b"someone else's")
        for revision, weight in ((2, 0.5), (3, 0.25)):
            spec = _merged(base, out_b, publish={"keepRevisions": 2}, parameters={"weights": {"es": weight}})
            apply_merged(kube, team_b, "prod", spec)
            wait_for(lambda r=revision: _published(kube, team_b, "prod", r), timeout=40, what=f"revision {revision}")
        wait_for(
            lambda: not s3.exists(artifacts.join(artifacts.merge_prefix(out_b, fp), artifacts.MANIFEST)),
            timeout=20,
            what="revision 1's merge collected",
        )
        left = sorted(o.key for o in s3.iter_objects(artifacts.merge_prefix(out_b, fp)))
        _, planted_key = split_uri(planted)
        assert left == [f"{planted_key}/{artifacts.OWNER}", f"{planted_key}/model/weights.bin"], left

        # The owner's own nested path: team-b moves its output below its own prefix and publishes there.
        moved = _merged(base, f"{out_b}/v2", parameters={"weights": {"es": 0.75}})
        apply_merged(kube, team_b, "prod", moved)
        wait_for(lambda: _published(kube, team_b, "prod", 1), timeout=40, what="team-b publishes at b-prod/v2")


def test_a_waiting_object_takes_a_prefix_over_as_soon_as_its_owner_goes(
    kube: Any, s3: ObjectStore, bucket: str, namespace: str
) -> None:
    """Resync is a minute here: the waiter (same namespace, refused OutputOwnedByAnother) is woken by the owner's
    deletion, and by the owner naming another output, not found at its next periodic pass (issue 23)."""
    base = f"s3://{bucket}/base"
    seed_fake_base_model(s3, base)
    put_jsonl(s3, f"s3://{bucket}/data/es/part-0.jsonl", DIALOG_ROWS)
    out = f"s3://{bucket}/models/dialog"
    custom_api = client.CustomObjectsApi(kube)
    with run_operator(namespace, f"s3://{bucket}/artifacts", resync_seconds=60), SimulatedJobs(kube, s3, namespace):
        apply_expert(kube, namespace, "dialog-es", _expert(base, f"s3://{bucket}/data/es"), labels={"task": "dialog"})
        apply_merged(kube, namespace, "owner", _merged(base, out))
        wait_for(lambda: _published(kube, namespace, "owner", 1), timeout=40, what="the owner publishes")
        for name in ("waiter", "second"):
            apply_merged(kube, namespace, name, _merged(base, out))
            wait_for(lambda n=name: _refused(lambda: get_merged(kube, namespace, n), "OutputOwnedByAnother"), what=name)

        custom_api.delete_namespaced_custom_object(GROUP, VERSION, namespace, MERGED_PLURAL, "owner")
        gone = time.monotonic()
        wait_for(lambda: s3.get_json(artifacts.owner_uri(out))["name"] != "owner", timeout=15, what="taken over")
        assert time.monotonic() - gone < 15
        heir = s3.get_json(artifacts.owner_uri(out))["name"]
        other = "second" if heir == "waiter" else "waiter"
        wait_for(lambda: _published(kube, namespace, heir, 1), timeout=15, what=f"{heir} serves revision 1")

        # The heir names another output: the other waiter takes the prefix over at once too.
        apply_merged(kube, namespace, heir, _merged(base, f"s3://{bucket}/models/elsewhere"))
        moved = time.monotonic()
        wait_for(lambda: s3.get_json(artifacts.owner_uri(out))["name"] == other, timeout=15, what="taken over again")
        assert time.monotonic() - moved < 15
        _event(kube, namespace, other, "PrefixAdopted")
