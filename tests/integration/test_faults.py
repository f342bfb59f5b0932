"""Faults on the real API server and S3: stopped servers, hung servers, leftover and malformed records, a lost
status. Each fault either heals by itself within seconds of its cause going away, or shows as a condition and an
Event that says what is wrong (issue 12)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from kubernetes import client

from fault_injection import BlackHole, elapsed, stopped
from langmerge import artifacts
from langmerge.artifacts import PublishedRevision
from langmerge.dev.controlplane import ControlPlane, Endpoints
from langmerge.kube import FIELD_MANAGER, Kube, ObjectKey
from langmerge.store import ObjectStore, S3Config, StorageUnavailable
from operator_harness import (
    DIALOG_ROWS,
    SimulatedJobs,
    apply_expert,
    apply_merged,
    condition,
    dialog_expert,
    dialog_merged,
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


def _expert(bucket: str, lang: str, **overrides: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "schedule": {"pollIntervalSeconds": 300, "settleSeconds": 1},
        "retry": {"limit": 0, "backoffSeconds": 1},
    }
    return dialog_expert(bucket, lang, **{**defaults, **overrides})


def _merged(bucket: str, **overrides: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {"evaluation": {"maxRegression": 0.1}, "retry": {"limit": 0, "backoffSeconds": 1}}
    return dialog_merged(bucket, **{**defaults, **overrides})


@pytest.fixture
def seeded(s3: ObjectStore, bucket: str) -> str:
    seed_fake_base_model(s3, f"s3://{bucket}/base")
    for lang in ("es", "it", "pt"):
        put_jsonl(s3, f"s3://{bucket}/data/{lang}/part-0.jsonl", DIALOG_ROWS)
    return bucket


def _phase(obj: dict[str, Any]) -> str | None:
    return status_of(obj).get("phase")


def _degraded(obj: dict[str, Any], reason: str) -> dict[str, Any] | None:
    cond = condition(obj, "Degraded")
    return cond if cond and cond["status"] == "True" and cond["reason"] == reason else None


def _not_degraded(obj: dict[str, Any]) -> bool:
    cond = condition(obj, "Degraded")
    return cond is not None and cond["status"] == "False"


def _published(kube: Any, namespace: str, name: str, revision: int) -> dict[str, Any] | None:
    obj = get_merged(kube, namespace, name)
    return obj if status_of(obj).get("revision") == revision and _phase(obj) == "Ready" else None


def _reasons(kube: Any, namespace: str, name: str) -> list[str]:
    return [e.reason for e in events(kube, namespace, name)]


def _posted(kube: Any, namespace: str, name: str, reason: str) -> list[str]:
    """The Events of ``reason`` about ``name``, once there is one (they follow the status write a test saw)."""
    return wait_for(
        lambda: [r for r in _reasons(kube, namespace, name) if r == reason], timeout=10, what=f"a {reason} Event"
    )


# -- item 1: an S3 outage ----------------------------------------------------------------------------------------------
def test_s3_outage_shows_degraded_and_heals_within_seconds(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str, local_cluster: ControlPlane, control_plane: Endpoints
) -> None:
    """SeaweedFS stopped while a training Job and a merge Job run: both objects say Degraded=True
    StorageUnavailable naming the endpoint (no traceback in the log); once S3 answers again both heal within
    seconds, although the resync interval is a minute (a probe wakes them), and the merge is published."""
    bucket = seeded
    release = threading.Event()

    def behaviour(job: Any, fp: str) -> str:
        return "succeed" if release.is_set() or "dialog-es" in job.metadata.name else "hang"

    with (
        run_operator(namespace, f"s3://{bucket}/artifacts", resync_seconds=60, storage_probe_seconds=1) as runner,
        SimulatedJobs(kube, s3, namespace, behaviour=behaviour) as sim,
    ):
        apply_expert(kube, namespace, "dialog-es", _expert(bucket, "es"), labels={"task": "dialog"})
        apply_merged(kube, namespace, "mm", _merged(bucket))
        wait_for(lambda: _phase(get_merged(kube, namespace, "mm")) == "Merging", timeout=30, what="Merging")
        apply_expert(kube, namespace, "solo-it", _expert(bucket, "it"))
        wait_for(lambda: _phase(get_expert(kube, namespace, "solo-it")) == "Training", what="Training")

        with stopped(local_cluster, "seaweedfs"):
            expert = wait_for(
                lambda: (o := get_expert(kube, namespace, "solo-it")) and _degraded(o, "StorageUnavailable") and o,
                timeout=20,
                what="the expert Degraded by the outage",
            )
            merged = wait_for(
                lambda: (o := get_merged(kube, namespace, "mm")) and _degraded(o, "StorageUnavailable") and o,
                timeout=20,
                what="the merged model Degraded by the outage",
            )
            for obj in (expert, merged):
                assert control_plane.s3_endpoint in condition(obj, "Degraded")["message"]
                assert control_plane.s3_endpoint in status_of(obj)["message"]
            assert _phase(expert) == "Training" and _phase(merged) == "Merging"
            time.sleep(3)  # several passes fail meanwhile
        back = time.monotonic()
        # Nothing else happens to them meanwhile (their Jobs still run; the resync is a minute away): the probe.
        for get, name in ((get_expert, "solo-it"), (get_merged, "mm")):
            wait_for(lambda get=get, name=name: _not_degraded(get(kube, namespace, name)), timeout=15, what="healed")
        healed = elapsed(back)
        assert _phase(get_expert(kube, namespace, "solo-it")) == "Training"
        release.set()
        wait_for(
            lambda: _published(kube, namespace, "mm", 1),
            timeout=15,
            what=lambda: (
                f"revision 1 after the outage: {json.dumps(status_of(get_merged(kube, namespace, 'mm')))}; "
                f"Jobs: {[(j.metadata.name, j.status.conditions) for j in jobs(kube, namespace)]}; "
                f"simulation errors: {sim.errors}"
            ),
        )
        published = elapsed(back)
        wait_for(lambda: _phase(get_expert(kube, namespace, "solo-it")) == "Ready", timeout=15, what="Ready")
        assert len(_posted(kube, namespace, "solo-it", "StorageUnavailable")) == 1
        assert _posted(kube, namespace, "mm", "StorageUnavailable")
    print(f"\nafter S3 returned: both healed in {healed:.1f}s, the merge was published in {published:.1f}s")
    assert healed < 10 and published < 10
    assert "Traceback" not in runner.output


def test_an_s3_outage_shows_on_every_object_within_seconds(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str, local_cluster: ControlPlane, control_plane: Endpoints
) -> None:
    """Nothing is running (a Ready expert, a published MergedModel; the resync is a minute away) when S3 stops: the
    health probe notices, both show Degraded=True StorageUnavailable within seconds and say so in status.health (a
    printer column), one WARNING line opens the outage and one closes it, and both heal within seconds (issue 23)."""
    bucket = seeded
    with (
        run_operator(namespace, f"s3://{bucket}/artifacts", resync_seconds=60, storage_probe_seconds=1) as runner,
        SimulatedJobs(kube, s3, namespace),
    ):
        apply_expert(kube, namespace, "dialog-es", _expert(bucket, "es"), labels={"task": "dialog"})
        apply_merged(kube, namespace, "mm", _merged(bucket))
        wait_for(lambda: _published(kube, namespace, "mm", 1), timeout=30, what="revision 1")
        wait_for(lambda: _phase(get_expert(kube, namespace, "dialog-es")) == "Ready", what="Ready")
        gets = ((get_expert, "dialog-es"), (get_merged, "mm"))
        for get, name in gets:
            assert status_of(get(kube, namespace, name))["health"] == "OK"
        down = time.monotonic()
        with stopped(local_cluster, "seaweedfs"):
            for get, name in gets:
                obj = wait_for(
                    lambda get=get, name=name: (o := get(kube, namespace, name)) and _degraded(o, "StorageUnavailable"),
                    timeout=15,
                    what=f"{name} Degraded by the outage",
                )
                assert control_plane.s3_endpoint in obj["message"]
                assert status_of(get(kube, namespace, name))["health"] == "Degraded: StorageUnavailable"
            shown = elapsed(down)
            time.sleep(3)
        back = time.monotonic()
        for get, name in gets:
            wait_for(lambda get=get, name=name: _not_degraded(get(kube, namespace, name)), timeout=15, what="healed")
            assert status_of(get(kube, namespace, name))["health"] == "OK"
        healed = elapsed(back)
    print(f"\nidle objects Degraded {shown:.1f}s into the outage, healed {healed:.1f}s after it")
    assert shown < 10 and healed < 10
    warnings = [line for line in runner.output.splitlines() if "WARNING" in line and "S3 at" in line]
    assert sum("is not answering" in line for line in warnings) == 1, warnings
    assert sum("answers again" in line for line in warnings) == 1, warnings


def test_api_server_outage_is_one_log_line_and_heals(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str, local_cluster: ControlPlane
) -> None:
    """The API server stopped while two Jobs run (their passes fail every half second meanwhile): the operator logs
    the outage (once, or a few times while the restarted server is still starting), without a traceback per pass,
    and carries on when it is back."""
    bucket = seeded
    release = threading.Event()
    with (
        run_operator(namespace, f"s3://{bucket}/artifacts") as runner,
        SimulatedJobs(
            kube,
            s3,
            namespace,
            behaviour=lambda job, fp: "succeed" if release.is_set() else "hang",
            outage_tolerant=True,
        ),
    ):
        for lang in ("es", "it"):
            apply_expert(kube, namespace, lang, _expert(bucket, lang))
        for lang in ("es", "it"):
            wait_for(lambda lang=lang: _phase(get_expert(kube, namespace, lang)) == "Training", what="Training")
        with stopped(local_cluster, "kube-apiserver"):
            time.sleep(5)
        back = time.monotonic()
        release.set()
        for lang in ("es", "it"):
            wait_for(lambda lang=lang: _phase(get_expert(kube, namespace, lang)) == "Ready", timeout=30, what="Ready")
        ready = elapsed(back)
    print(f"\nafter the API server returned: both experts Ready in {ready:.1f}s")
    ours = [line for line in runner.output.splitlines() if "langmerge.controller" in line]
    # One line per outage (a server that is still starting may answer some requests and not others: a few).
    assert 1 <= sum("objects are retried within" in line for line in ours) <= 3, ours
    assert 1 <= sum("the outage is over" in line for line in ours) <= 3, ours
    assert not [line for line in ours if "failed; retrying in" in line], ours  # a traceback per pass, before
    assert "Traceback" not in runner.output


def test_control_plane_components_restart_on_their_ports(local_cluster: ControlPlane, control_plane: Endpoints) -> None:
    """A restarted S3 server or API server keeps its port (running operators and Jobs keep their endpoint), even
    while clients' connections to the old process linger in TIME_WAIT."""
    store = ObjectStore.from_config(
        S3Config(endpoint_url=control_plane.s3_endpoint),
        aws_access_key_id=control_plane.s3_access_key,
        aws_secret_access_key=control_plane.s3_secret_key,
    )
    store.client.list_buckets()  # a kept-alive connection to the old process
    kube = Kube(client.ApiClient(_config(control_plane)))
    kube.list_all("languageexperts")
    for component in ("seaweedfs", "kube-apiserver"):
        with stopped(local_cluster, component):
            assert not local_cluster.status()[component]
        assert local_cluster.status()[component]
    assert local_cluster.endpoints().s3_endpoint == control_plane.s3_endpoint
    store.client.list_buckets()
    wait_for(lambda: _answers(kube), timeout=30, what="the API server on its old port")


def _config(endpoints: Endpoints) -> client.Configuration:
    from kubernetes import config

    cfg = client.Configuration()
    config.load_kube_config(config_file=endpoints.kubeconfig, client_configuration=cfg)
    return cfg


def _answers(kube: Kube) -> bool:
    try:
        kube.list_all("languageexperts")
    except Exception:
        return False
    return True


# -- item 3: a leftover revision claim ----------------------------------------------------------------------------------
def test_leftover_revision_claim_is_skipped_not_overwritten(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str
) -> None:
    """``revisions/2.json`` claimed for another fingerprint by a writer that crashed before moving current.json:
    the next publish leaves it as it is, publishes revision 3, and says so in an Event."""
    bucket = seeded
    out = f"s3://{bucket}/merged/dialog"
    with run_operator(namespace, f"s3://{bucket}/artifacts"), SimulatedJobs(kube, s3, namespace):
        apply_expert(kube, namespace, "dialog-es", _expert(bucket, "es"), labels={"task": "dialog"})
        apply_merged(kube, namespace, "mm", _merged(bucket))
        wait_for(lambda: _published(kube, namespace, "mm", 1), timeout=30, what="revision 1")
        first = PublishedRevision.model_validate(s3.get_json(artifacts.current_uri(out)))
        stale = first.model_copy(update={"revision": 2, "fingerprint": "f" * 16, "previous": 1})
        s3.put_json(artifacts.revision_uri(out, 2), stale, if_none_match=True)
        stale_bytes, _ = s3.get_bytes(artifacts.revision_uri(out, 2))

        apply_merged(kube, namespace, "mm", _merged(bucket, parameters={"density": 1.0, "weights": {"es": 0.5}}))
        obj = wait_for(
            lambda: _published(kube, namespace, "mm", 3),
            timeout=30,
            what=lambda: f"revision 3: {json.dumps(status_of(get_merged(kube, namespace, 'mm')))}",
        )
        current = PublishedRevision.model_validate(s3.get_json(artifacts.current_uri(out)))
        assert (current.revision, current.previous) == (3, 1)
        assert s3.get_bytes(artifacts.revision_uri(out, 2))[0] == stale_bytes, "the claim is never overwritten"
        assert [h["revision"] for h in status_of(obj)["history"]] == [1, 3]
        skipped = [e.message for e in events(kube, namespace, "mm") if e.reason == "StaleRevisionClaim"]
        assert skipped and "revision number(s) 2" in skipped[0] and "published revision 3" in skipped[0]


# -- item 4: a crash between moving current.json and writing status -----------------------------------------------------
def test_status_history_events_and_gc_follow_s3_after_a_crash(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str
) -> None:
    """S3 holds revision 2 while the status still shows revision 1 (the operator died in between): the next
    operator shows revision 2 with its own metrics and history, posts its Published Event, and collects garbage."""
    bucket = seeded
    out = f"s3://{bucket}/merged/dialog"
    artifacts_uri = f"s3://{bucket}/artifacts"
    custom = client.CustomObjectsApi(kube)
    with run_operator(namespace, artifacts_uri), SimulatedJobs(kube, s3, namespace, merge_losses={"es": 2.05}) as sim:
        apply_expert(kube, namespace, "dialog-es", _expert(bucket, "es"), labels={"task": "dialog"})
        apply_merged(kube, namespace, "mm", _merged(bucket, publish={"keepRevisions": 2}))
        before = wait_for(lambda: _published(kube, namespace, "mm", 1), timeout=30, what="revision 1")
        sim.merge_losses = {"es": 2.1}
        apply_merged(
            kube,
            namespace,
            "mm",
            _merged(bucket, publish={"keepRevisions": 2}, parameters={"density": 1.0, "weights": {"es": 0.5}}),
        )
        wait_for(lambda: _published(kube, namespace, "mm", 2), timeout=30, what="revision 2")
    # The crash: revision 2 is current in S3, the status still says revision 1, its Events never got out.
    obj = get_merged(kube, namespace, "mm")
    obj["status"] = before["status"]
    custom.replace_namespaced_custom_object_status("langmerge.dev", "v1alpha1", namespace, "mergedmodels", "mm", obj)
    assert status_of(get_merged(kube, namespace, "mm"))["revision"] == 1
    for event in events(kube, namespace, "mm"):
        client.CoreV1Api(kube).delete_namespaced_event(event.metadata.name, namespace)
    # An old merge output that garbage collection (keepRevisions: 2) has not removed yet.
    old_prefix = artifacts.merge_prefix(out, "0" * 16)
    s3.put_bytes(artifacts.join(old_prefix, "model", "adapter_model.safetensors"), b"old")
    s3.put_json(artifacts.join(old_prefix, artifacts.MANIFEST), {"fingerprint": "0" * 16})

    with run_operator(namespace, artifacts_uri):
        obj = wait_for(lambda: _published(kube, namespace, "mm", 2), timeout=30, what="status at revision 2")
        status = status_of(obj)
        assert [h["revision"] for h in status["history"]] == [1, 2]
        assert status["metrics"]["es"]["merged"]["evalLoss"] == pytest.approx(2.1)
        assert status["history"][-1]["job"] and status["history"][-1]["wallSeconds"] == 0.5
        published = wait_for(
            lambda: [e.message for e in events(kube, namespace, "mm") if e.reason == "Published"], what="Published"
        )
        assert len(published) == 1 and published[0].startswith("revision 2 ")
        wait_for(lambda: not s3.list_objects(old_prefix), what="the old merge output collected")


# -- item 5: a lost expert status ----------------------------------------------------------------------------------------
def test_lost_expert_status_comes_back_at_once(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    """The status of a Ready expert is removed by someone: it is back in seconds, not at the next data poll
    (pollIntervalSeconds is 300 here)."""
    bucket = seeded
    with run_operator(namespace, f"s3://{bucket}/artifacts"), SimulatedJobs(kube, s3, namespace):
        apply_expert(kube, namespace, "es", _expert(bucket, "es"))
        ready = wait_for(
            lambda: _phase(get_expert(kube, namespace, "es")) == "Ready" and get_expert(kube, namespace, "es")
        )
        client.CustomObjectsApi(kube).patch_namespaced_custom_object_status(
            "langmerge.dev", "v1alpha1", namespace, "languageexperts", "es", {"status": None}
        )
        lost = time.monotonic()
        obj = wait_for(
            lambda: _phase(get_expert(kube, namespace, "es")) == "Ready" and get_expert(kube, namespace, "es"),
            timeout=15,
        )
        back = elapsed(lost)
        assert status_of(obj)["adapter"]["digest"] == status_of(ready)["adapter"]["digest"]
        assert len(jobs(kube, namespace)) == 1
    print(f"\nlost status back in {back:.1f}s")  # outside the operator's runner, which captures stdout


def test_a_removed_status_is_rebuilt_without_replaying_events(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str
) -> None:
    """Someone removes the status of a Ready expert and of a published MergedModel well after the facts (issue 23):
    both come back from S3, and neither "AdapterReady" nor "Published revision 1" is announced a second time."""
    bucket = seeded
    announced = ("AdapterReady", "AdapterAdopted", "Published")

    def counts() -> dict[str, int]:
        return {
            name: sum(1 for e in events(kube, namespace, name) if e.reason in announced) for name in ("dialog-es", "mm")
        }

    custom = client.CustomObjectsApi(kube)
    with run_operator(namespace, f"s3://{bucket}/artifacts"), SimulatedJobs(kube, s3, namespace):
        apply_expert(kube, namespace, "dialog-es", _expert(bucket, "es"), labels={"task": "dialog"})
        apply_merged(kube, namespace, "mm", _merged(bucket))
        published = wait_for(lambda: _published(kube, namespace, "mm", 1), timeout=30, what="revision 1")
        assert counts() == {"dialog-es": 1, "mm": 1}
        time.sleep(3 * 5.0 + 2)  # older than the operator's news window (three resync periods of 5 s)
        for plural, name in (("languageexperts", "dialog-es"), ("mergedmodels", "mm")):
            custom.patch_namespaced_custom_object_status(
                "langmerge.dev", "v1alpha1", namespace, plural, name, {"status": None}
            )
        obj = wait_for(lambda: _published(kube, namespace, "mm", 1), timeout=20, what="mm's status back")
        assert status_of(obj)["history"][-1]["revision"] == 1
        assert status_of(obj)["fingerprint"] == status_of(published)["fingerprint"]
        wait_for(lambda: _phase(get_expert(kube, namespace, "dialog-es")) == "Ready", timeout=20, what="es back")
        time.sleep(2 * 5.0)
        assert counts() == {"dialog-es": 1, "mm": 1}, [(e.reason, e.message) for e in events(kube, namespace, "mm")]


# -- item 6: malformed records -------------------------------------------------------------------------------------------
def test_malformed_records_are_named_in_status(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    """A progress record, an adapter manifest, a failure record, current.json and a revision record that do not
    parse: each gives Degraded=True MalformedRecord naming the object and the parse error, and an Event; no
    traceback loop. A progress record only hides the progress: the Job goes on."""
    bucket = seeded
    garbage = b"{not json"
    release = threading.Event()

    def behaviour(job: Any, fp: str) -> str:
        if job.metadata.name.startswith("pt-"):
            return "fail-silently" if release.is_set() else "hang"
        return "succeed" if release.is_set() and job.metadata.name.startswith("es-") else "hang"

    bad_current = f"s3://{bucket}/merged/bad-current"
    s3.put_bytes(artifacts.current_uri(bad_current), b'{"revision": "one"}')
    bad_revision = f"s3://{bucket}/merged/bad-revision"
    s3.put_bytes(artifacts.revision_uri(bad_revision, 1), garbage)
    with (
        run_operator(namespace, f"s3://{bucket}/artifacts", max_training_jobs_per_namespace=3) as runner,
        SimulatedJobs(kube, s3, namespace, behaviour=behaviour),
    ):
        for lang in ("es", "it", "pt"):
            apply_expert(kube, namespace, lang, _expert(bucket, lang))
        apply_merged(kube, namespace, "current", _merged(bucket, output={"uri": bad_current}))
        apply_merged(
            kube,
            namespace,
            "pinned",
            _merged(bucket, experts={"names": ["es"]}, output={"uri": bad_revision}, pinRevision=1),
        )
        prefixes = {}
        for lang in ("es", "it", "pt"):
            job = wait_for(
                lambda lang=lang: jobs(kube, namespace, f"langmerge.dev/expert={lang}"),
                what=lambda lang=lang: f"a Job of {lang}: {json.dumps(status_of(get_expert(kube, namespace, lang)))}",
            )[0]
            prefixes[lang] = job.metadata.annotations["langmerge.dev/artifact-uri"]
        planted = {
            "es": artifacts.join(prefixes["es"], artifacts.PROGRESS),
            "it": artifacts.join(prefixes["it"], artifacts.MANIFEST),
            "pt": artifacts.failure_uri(prefixes["pt"], 1),
        }
        for lang, uri in planted.items():
            # Not JSON, or JSON that is not the record expected there.
            s3.put_bytes(uri, b'{"attempt": 1}' if lang == "pt" else garbage)
        # A malformed progress record only hides the progress: the expert still trains.
        cond = wait_for(
            lambda: _degraded(get_expert(kube, namespace, "es"), "MalformedRecord"),
            what="es Degraded by its progress record",
        )
        assert planted["es"] in cond["message"] and _phase(get_expert(kube, namespace, "es")) == "Training"
        release.set()
        seen = {}
        for name, uri in [
            ("it", planted["it"]),
            ("pt", planted["pt"]),
            ("current", artifacts.current_uri(bad_current)),
            ("pinned", artifacts.revision_uri(bad_revision, 1)),
        ]:
            get = get_merged if name in ("current", "pinned") else get_expert
            cond = wait_for(
                lambda get=get, name=name: _degraded(get(kube, namespace, name), "MalformedRecord"),
                timeout=20,
                what=lambda get=get, name=name: f"{name} Degraded: {json.dumps(status_of(get(kube, namespace, name)))}",
            )
            assert uri in cond["message"], cond["message"]
            seen[name] = cond["message"]
            assert _posted(kube, namespace, name, "MalformedRecord")
        assert "not JSON" in seen["it"] and "revision: " in seen["current"]
        assert "not a valid FailureRecord" in seen["pt"] and "error_class: missing" in seen["pt"]
        wait_for(lambda: _phase(get_expert(kube, namespace, "es")) == "Ready", what="es Ready")
        assert _not_degraded(get_expert(kube, namespace, "es"))
        assert _phase(get_expert(kube, namespace, "it")) == "Failed"
    assert "Traceback" not in runner.output


# -- item 7: a missing bucket ----------------------------------------------------------------------------------------------
def test_missing_bucket_is_a_user_error_not_an_outage(kube: Any, s3: ObjectStore, seeded: str, namespace: str) -> None:
    bucket = seeded
    grants = json.dumps({"*": {"readWrite": [f"s3://{bucket}/", "s3://no-such-bucket-lm/"]}})
    with run_operator(namespace, f"s3://{bucket}/artifacts", uri_grants=grants):
        apply_expert(kube, namespace, "es", _expert(bucket, "es", dataset={"uri": "s3://no-such-bucket-lm/data/es"}))
        obj = wait_for(
            lambda: (o := get_expert(kube, namespace, "es")) and _degraded(o, "BucketNotFound") and o,
            what=lambda: f"BucketNotFound: {json.dumps(status_of(get_expert(kube, namespace, 'es')))}",
        )
        assert _phase(obj) == "Failed"
        assert "S3 bucket 'no-such-bucket-lm' does not exist" in status_of(obj)["message"]
        assert "s3://no-such-bucket-lm/data/es" in status_of(obj)["message"]
        assert condition(obj, "Ready")["reason"] == "BucketNotFound"
        assert _posted(kube, namespace, "es", "BucketNotFound")
        # Created later, the bucket is found at the next look (here the spec change), with no restart.
        s3.client.create_bucket(Bucket="no-such-bucket-lm")
        try:
            put_jsonl(s3, "s3://no-such-bucket-lm/data/es/part-0.jsonl", DIALOG_ROWS)
            apply_expert(
                kube,
                namespace,
                "es",
                _expert(bucket, "es", dataset={"uri": "s3://no-such-bucket-lm/data/es"}, lora={"rank": 8}),
            )
            wait_for(lambda: _phase(get_expert(kube, namespace, "es")) == "Training", what="Training")
        finally:
            s3.delete_prefix("s3://no-such-bucket-lm/data")
            s3.client.delete_bucket(Bucket="no-such-bucket-lm")


# -- item 10: weights of experts that are not Ready --------------------------------------------------------------------
def test_partial_merge_ignores_weights_of_absent_experts(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str
) -> None:
    bucket = seeded
    weights = {"es": 1.0, "it": 0.5, "pt": 2.0}
    with (
        run_operator(namespace, f"s3://{bucket}/artifacts"),
        SimulatedJobs(
            kube, s3, namespace, behaviour=lambda job, fp: "hang" if "dialog-pt" in job.metadata.name else "succeed"
        ),
    ):
        for lang in ("es", "it", "pt"):
            apply_expert(kube, namespace, f"dialog-{lang}", _expert(bucket, lang), labels={"task": "dialog"})
        spec = _merged(bucket, requireAllExperts=False, parameters={"density": 1.0, "weights": weights})
        apply_merged(kube, namespace, "mm", spec)
        obj = wait_for(lambda: _published(kube, namespace, "mm", 1), timeout=40, what="partial revision 1")
        assert sorted(i["language"] for i in status_of(obj)["inputs"]) == ["es", "it"]
        assert "weights of pt ignored" in condition(obj, "ExpertsReady")["message"]
        fingerprint = status_of(obj)["fingerprint"]
        job = jobs(kube, namespace, f"langmerge.dev/component=merge,langmerge.dev/fingerprint={fingerprint}")[0]
        task = json.loads(job.spec.template.spec.containers[0].args[2])
        assert task["parameters"]["weights"] == {"es": 1.0, "it": 0.5}

        # A weight for a language no selected expert serves is a spec error, before any Job runs.
        typo = {
            **spec,
            "parameters": {"density": 1.0, "weights": {"fr": 1.0}},
            "output": {"uri": f"s3://{bucket}/typo"},
        }
        apply_merged(kube, namespace, "typo", typo)
        obj = wait_for(
            lambda: _phase(get_merged(kube, namespace, "typo")) == "Failed" and get_merged(kube, namespace, "typo")
        )
        assert "no selected LanguageExpert serves" in status_of(obj)["message"] and "fr" in status_of(obj)["message"]


# -- item 14: every request has a timeout --------------------------------------------------------------------------------
def test_hung_servers_cost_a_timeout_not_the_operator(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str, control_plane: Endpoints
) -> None:
    """Servers that accept connections and never answer: each Kubernetes and S3 request ends after its timeout;
    the operator on a hung S3 reports Degraded instead of hanging, and keeps serving what needs no S3."""
    with BlackHole() as hole:
        cfg = _config(control_plane)
        cfg.host = f"https://127.0.0.1:{hole.port}"
        cfg.refresh_api_key_hook = None  # it would re-apply the kubeconfig, host included
        cfg.retries = 1  # as the operator's client (langmerge.kube.operator_client)
        hung = Kube(client.ApiClient(cfg), timeout=1.0)
        for call in (
            lambda: hung.get_expert(ObjectKey(namespace, "x")),
            lambda: hung.list_jobs("a=b", namespace),
            lambda: hung.patch_status("languageexperts", ObjectKey(namespace, "x"), {}),
            lambda: hung.create_job(namespace, {"metadata": {"name": "x"}}),
        ):
            started = time.monotonic()
            with pytest.raises(Exception):  # noqa: B017  (urllib3's ReadTimeoutError, wrapped or not)
                call()
            assert elapsed(started) < 5
        store = ObjectStore.from_config(
            S3Config(endpoint_url=f"http://127.0.0.1:{hole.port}", read_timeout=1, max_attempts=1),
            aws_access_key_id="x",
            aws_secret_access_key="y",
        )
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            store.get_json_or_none(f"s3://{seeded}/x.json")
        assert elapsed(started) < 5

        bucket = seeded
        with run_operator(
            namespace,
            f"s3://{bucket}/artifacts",
            s3_endpoint=f"http://127.0.0.1:{hole.port}",
            request_timeout_seconds=1,
        ) as runner:
            apply_expert(kube, namespace, "es", _expert(bucket, "es"))
            # Parameters that do not fit the method: an error found without S3.
            apply_merged(kube, namespace, "bad", _merged(bucket, method="linear", parameters={"density": 0.5}))
            obj = wait_for(
                lambda: (o := get_expert(kube, namespace, "es")) and _degraded(o, "StorageUnavailable") and o,
                timeout=20,
                what="Degraded on a hung S3",
            )
            assert "timeout" in condition(obj, "Degraded")["message"].lower()
            wait_for(lambda: _degraded(get_merged(kube, namespace, "bad"), "InvalidSpec"), timeout=10)
    assert "Traceback" not in runner.output


# -- item 15: queued experts wait for a slot, they do not poll ----------------------------------------------------------
def test_queued_experts_wait_for_a_slot_without_listing(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str
) -> None:
    """One training slot, four experts: the three queued ones list neither Jobs nor S3 while they wait (Job state
    comes from the watch's index); when the slot frees, the longest-waiting expert gets it."""
    from prometheus_client import REGISTRY

    def count(metric: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(metric, labels) or 0.0

    bucket = seeded
    s3.put_bytes(f"s3://{bucket}/data/de/part-0.jsonl", s3.get_bytes(f"s3://{bucket}/data/es/part-0.jsonl")[0])
    release = threading.Event()
    with (
        run_operator(namespace, f"s3://{bucket}/artifacts", max_training_jobs=1),
        SimulatedJobs(kube, s3, namespace, behaviour=lambda job, fp: "succeed" if release.is_set() else "hang") as sim,
    ):
        order = ["es", "it", "pt", "de"]
        for lang in order:
            apply_expert(kube, namespace, lang, _expert(bucket, lang))
            time.sleep(0.3)  # a defined arrival order
        wait_for(
            lambda: (
                sum(
                    (c := condition(get_expert(kube, namespace, n), "Training")) is not None
                    and c["reason"] == "QueueFull"
                    for n in order
                )
                == 3
            ),
            what="three experts queued",
        )
        before = (
            count("langmerge_kube_requests_total", verb="list", resource="jobs"),
            count("langmerge_s3_requests_total", operation="ListObjectsV2"),
        )
        time.sleep(4)
        after = (
            count("langmerge_kube_requests_total", verb="list", resource="jobs"),
            count("langmerge_s3_requests_total", operation="ListObjectsV2"),
        )
        assert all(n > 0 for n in before), f"the operator counts its requests: {before}"
        assert after == before, f"Job LISTs and S3 LISTs while queued: {before} -> {after}"
        first = sim.started[0]
        release.set()
        wait_for(lambda: all(_phase(get_expert(kube, namespace, n)) == "Ready" for n in order), timeout=40)
        assert [name.split("-train-")[0] for name in sim.started] == [
            first.split("-train-")[0],
            *[n for n in order if not first.startswith(n)],
        ]
        assert sim.max_active_seen <= 1


# -- item 17: small things --------------------------------------------------------------------------------------------------
def test_operator_writes_carry_its_field_manager_and_failed_is_not_retraining(
    kube: Any, s3: ObjectStore, seeded: str, namespace: str
) -> None:
    bucket = seeded
    with (
        run_operator(namespace, f"s3://{bucket}/artifacts"),
        SimulatedJobs(kube, s3, namespace, behaviour=lambda j, fp: "fail"),
    ):
        apply_expert(kube, namespace, "es", _expert(bucket, "es"))
        obj = wait_for(
            lambda: _phase(get_expert(kube, namespace, "es")) == "Failed" and get_expert(kube, namespace, "es")
        )
        # The status is the operator's; the spec is the test client's (its default manager name).
        owners = {m["manager"] for m in obj["metadata"]["managedFields"] if "f:status" in m.get("fieldsV1", {})}
        assert owners == {FIELD_MANAGER}
        job = jobs(kube, namespace)[0]
        assert {m.manager for m in job.metadata.managed_fields if "f:spec" in (m.fields_v1 or {})} == {FIELD_MANAGER}
        data_changed = condition(obj, "DataChanged")
        assert data_changed["status"] == "False" and data_changed["reason"] == "NoAdapter"
