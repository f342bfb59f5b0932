"""The chart installed into the real local API server, and the operator run with exactly the chart's permissions.

``helm install`` runs without ``--wait``: the local control plane has no kubelet and no Deployment controller, so the
operator's Deployment never gets a ready pod and ``--wait`` could only time out. Instead the tests read back what
Helm created, then prove the RBAC: they take a token of the chart's ServiceAccount (issued by the real
serviceaccount-token controller), run the real operator in-process authenticated as that ServiceAccount, drive a
LanguageExpert to Ready and a MergedModel to revision 1 (SimulatedJobs, as admin, plays kubelet + trainer), and show
that actions outside the chart's rules are refused with 403.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from chart_helpers import (
    CHART,
    CRD_OBSERVATION_RULE,
    DEFAULT_OPERATOR_RULES,
    LEASE_RULES,
    NAMESPACE_OBSERVATION_RULE,
    TRAINJOB_RULE,
    argocd_health,
    helm,
    sa_kubeconfig,
    set_args,
)
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from langmerge.constants import EXPERT_PLURAL, GROUP, VERSION
from langmerge.dev.controlplane import Endpoints
from langmerge.kube import Forbidden, Kube, load_client
from langmerge.store import ObjectStore
from operator_harness import (
    DIALOG_ROWS,
    SimulatedJobs,
    apply_expert,
    apply_merged,
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

LANGS = ("es", "it")
#: An authorization refusal in the operator's log: kopf's own warning when it lacks a permission it could use, or the
#: API server's RBAC denial (`User "system:serviceaccount:..." cannot list resource "..."`), whichever client logged it.
#: Other 403s (e.g. creating in a namespace being deleted by an earlier test) are not about the chart's rules.
PERMISSION_PROBLEMS = re.compile(r'Not enough permissions|cannot [a-z]+ resource "')


@contextlib.contextmanager
def installed(kubeconfig: str, namespace: str, values: dict[str, Any]) -> Iterator[str]:
    """``helm install`` (no --wait, see the module docstring); ``helm uninstall`` afterwards (cluster-scoped RBAC)."""
    release = f"lm-{uuid.uuid4().hex[:6]}"
    helm("install", release, str(CHART), "--namespace", namespace, *set_args(values), kubeconfig=kubeconfig)
    try:
        yield f"{release}-langmerge"
    finally:
        helm("uninstall", release, "--namespace", namespace, kubeconfig=kubeconfig, check=False)


def hang_first_job_of(expert: str) -> Callable[[Any, str], str]:
    """SimulatedJobs behaviour: the first training Job of ``expert`` runs until it is deleted; the rest succeed."""
    first: dict[str, str] = {}

    def behaviour(job: Any, fingerprint: str) -> str:
        if job.metadata.labels.get("langmerge.dev/expert") != expert:
            return "succeed"
        first.setdefault("fingerprint", fingerprint)
        return "hang" if fingerprint == first["fingerprint"] else "succeed"

    return behaviour


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_account_token(kube: Any, namespace: str, name: str) -> str:
    """The token the 1.20 serviceaccount-token controller mints for the ServiceAccount (polled for)."""
    core = client.CoreV1Api(kube)

    def find() -> str | None:
        secrets = core.list_namespaced_secret(namespace, field_selector="type=kubernetes.io/service-account-token")
        for secret in secrets.items:
            annotations = secret.metadata.annotations or {}
            if annotations.get("kubernetes.io/service-account.name") == name and (secret.data or {}).get("token"):
                return base64.b64decode(secret.data["token"]).decode()
        return None

    token: str = wait_for(find, timeout=30, what=f"a token Secret for ServiceAccount {namespace}/{name}")
    return token


def token_secret_name(kube: Any, namespace: str, sa: str) -> str:
    account = client.CoreV1Api(kube).read_namespaced_service_account(sa, namespace)
    return str(account.secrets[0].name)


def expect_forbidden(call: Callable[[], Any], what: str) -> None:
    with pytest.raises(ApiException) as err:
        call()
    assert err.value.status == 403, f"{what}: expected 403, got {err.value.status}"


def rules_of(obj: Any) -> list[dict[str, Any]]:
    """RBAC rules as read from the API server, in the chart's shape."""
    out = []
    for rule in obj.rules:
        item: dict[str, Any] = {"apiGroups": rule.api_groups, "resources": rule.resources}
        if rule.resource_names:
            item["resourceNames"] = rule.resource_names
        item["verbs"] = rule.verbs
        out.append(item)
    return out


def _expert(bucket: str, lang: str) -> dict[str, Any]:
    return dialog_expert(bucket, lang)


def _merged(bucket: str) -> dict[str, Any]:
    return dialog_merged(bucket, evaluation={"maxRegression": 0.1})


@pytest.fixture
def seeded(s3: ObjectStore, bucket: str) -> str:
    seed_fake_base_model(s3, f"s3://{bucket}/base")
    for lang in LANGS:
        put_jsonl(s3, f"s3://{bucket}/data/{lang}/part-0.jsonl", DIALOG_ROWS)
    return bucket


def _ready_expert(kube: Any, namespace: str, name: str) -> dict[str, Any] | None:
    obj = get_expert(kube, namespace, name)
    return obj if status_of(obj).get("phase") == "Ready" else None


def _published(kube: Any, namespace: str, revision: int) -> dict[str, Any] | None:
    obj = get_merged(kube, namespace, "mm")
    status = status_of(obj)
    return obj if status.get("revision") == revision and status.get("phase") == "Ready" else None


def test_cluster_wide_install_and_reconcile_as_the_service_account(
    control_plane: Endpoints,
    kube: Any,
    s3: ObjectStore,
    seeded: str,
    namespace: str,
    make_namespace: Callable[[], str],
    tmp_path: Path,
) -> None:
    bucket = seeded
    release_ns, work_ns = namespace, make_namespace()
    values = {"artifactsUri": f"s3://{bucket}/artifacts", "s3": {"endpoint": control_plane.s3_endpoint}}
    with installed(control_plane.kubeconfig, release_ns, values) as fullname:
        # What Helm created, read back from the API server.
        rbac = client.RbacAuthorizationV1Api(kube)
        assert rules_of(rbac.read_cluster_role(fullname)) == [*DEFAULT_OPERATOR_RULES, CRD_OBSERVATION_RULE]
        binding = rbac.read_cluster_role_binding(fullname)
        assert binding.role_ref.name == fullname
        assert [(s.kind, s.name, s.namespace) for s in binding.subjects] == [("ServiceAccount", fullname, release_ns)]
        assert rules_of(rbac.read_namespaced_role(f"{fullname}-leader-election", release_ns)) == LEASE_RULES
        deployment = client.AppsV1Api(kube).read_namespaced_deployment(fullname, release_ns)
        assert deployment.spec.template.spec.service_account_name == fullname
        assert client.CoreV1Api(kube).read_namespaced_service(f"{fullname}-metrics", release_ns).spec.ports[0].port
        assert client.CoreV1Api(kube).read_namespaced_service_account(fullname, release_ns)

        # The operator, authenticated as the chart's ServiceAccount: cluster-wide, as the chart runs it by default.
        token = service_account_token(kube, release_ns, fullname)
        kubeconfig = sa_kubeconfig(control_plane.kubeconfig, token, tmp_path / "operator.kubeconfig")
        as_operator = load_client(kubeconfig)
        liveness = f"http://127.0.0.1:{free_port()}/healthz"  # the chart's probes, on loopback here
        with (
            run_operator(
                work_ns,
                f"s3://{bucket}/artifacts",
                kubeconfig=kubeconfig,
                clusterwide=True,
                extra_args=("--liveness", liveness),
                max_training_jobs=16,  # cluster-wide: other tests' leftover Jobs must not fill the cap
                leader_election_namespace=release_ns,
            ) as runner,
            SimulatedJobs(kube, s3, work_ns, behaviour=hang_first_job_of("restart-es")),
        ):
            apply_merged(kube, work_ns, "mm", _merged(bucket))
            for lang in LANGS:
                apply_expert(kube, work_ns, f"dialog-{lang}", _expert(bucket, lang), labels={"task": "dialog"})
            experts = [
                wait_for(lambda n=f"dialog-{lang}": _ready_expert(kube, work_ns, n), timeout=30, what=f"{lang} Ready")
                for lang in LANGS
            ]
            merged = wait_for(lambda: _published(kube, work_ns, 1), timeout=40, what="MergedModel revision 1")
            # Deleting Jobs: a spec change under onChange=restart cancels the running, now outdated Job.
            restart = {**_expert(bucket, "es"), "onChange": "restart"}
            apply_expert(kube, work_ns, "restart-es", restart)
            first = wait_for(lambda: jobs(kube, work_ns, "langmerge.dev/expert=restart-es"), what="a Job")[0]
            apply_expert(kube, work_ns, "restart-es", {**restart, "lora": {"rank": 8}})
            wait_for(lambda: _ready_expert(kube, work_ns, "restart-es"), timeout=30, what="Ready after a restart")
            assert "TrainingCancelled" in {e.reason for e in events(kube, work_ns, "restart-es")}
            assert first.metadata.name not in {
                j.metadata.name for j in jobs(kube, work_ns) if not j.metadata.deletion_timestamp
            }
            # Leader election through the lease Role: created (create), then renewed (get + update) every 5 s.
            leases = client.CoordinationV1Api(kube)
            first = leases.read_namespaced_lease("langmerge-operator", release_ns).spec
            assert first.holder_identity
            wait_for(
                lambda: (
                    leases.read_namespaced_lease("langmerge-operator", release_ns).spec.renew_time != first.renew_time
                ),
                timeout=15,
                interval=0.5,
                what="a Lease renewal",
            )
            # What the Deployment's liveness and readiness probes get: 200 and kopf's probe results.
            with urllib.request.urlopen(liveness, timeout=5) as response:
                assert response.status == 200 and "workqueue" in json.loads(response.read())
        assert "became the leader" in runner.output  # the log is captured, and the Lease was taken
        assert not PERMISSION_PROBLEMS.search(runner.output), runner.output

        # It did its work through the chart's rules: Jobs, status, Events, the Lease (above).
        assert {j.metadata.labels["langmerge.dev/component"] for j in jobs(kube, work_ns)} == {"training", "merge"}
        assert "AdapterReady" in {e.reason for e in events(kube, work_ns, "dialog-es")}
        for obj in [*experts, merged]:
            assert argocd_health(obj)[0] == "Healthy", (obj["kind"], argocd_health(obj))

        # The S3 Secret's existence, by name and as metadata only (what the reconcilers check before a Job).
        assert Kube(as_operator).secret_exists(work_ns, "langmerge-s3")
        with pytest.raises(Forbidden):  # any other name: RBAC refuses even the existence check
            Kube(as_operator).secret_exists(work_ns, "another-secret")
        # And nothing more.
        core, custom = client.CoreV1Api(as_operator), client.CustomObjectsApi(as_operator)
        expect_forbidden(lambda: core.list_secret_for_all_namespaces(), "list Secrets cluster-wide")
        expect_forbidden(lambda: core.list_namespaced_secret(work_ns), "list Secrets in a namespace")
        expect_forbidden(
            lambda: core.read_namespaced_secret(token_secret_name(kube, release_ns, fullname), release_ns),
            "read its own token Secret",
        )
        expect_forbidden(
            lambda: client.AppsV1Api(as_operator).create_namespaced_deployment(
                work_ns,
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": {"name": "x"},
                    "spec": {
                        "selector": {"matchLabels": {"a": "b"}},
                        "template": {
                            "metadata": {"labels": {"a": "b"}},
                            "spec": {"containers": [{"name": "x", "image": "x"}]},
                        },
                    },
                },
            ),
            "create a Deployment",
        )
        expect_forbidden(
            lambda: custom.patch_namespaced_custom_object(
                GROUP, VERSION, work_ns, EXPERT_PLURAL, "dialog-es", {"spec": {"suspend": True}}
            ),
            "patch a LanguageExpert's spec",
        )
        expect_forbidden(
            lambda: custom.delete_namespaced_custom_object(GROUP, VERSION, work_ns, EXPERT_PLURAL, "dialog-es"),
            "delete a LanguageExpert",
        )
        expect_forbidden(
            lambda: client.CoordinationV1Api(as_operator).read_namespaced_lease("langmerge-operator", work_ns),
            "read a Lease outside the release namespace",
        )


def test_namespaced_install_and_reconcile_as_the_service_account(
    control_plane: Endpoints,
    kube: Any,
    s3: ObjectStore,
    seeded: str,
    namespace: str,
    make_namespace: Callable[[], str],
    tmp_path: Path,
) -> None:
    bucket = seeded
    release_ns, team_a, team_b = namespace, make_namespace(), make_namespace()
    values = {
        "artifactsUri": f"s3://{bucket}/artifacts",
        "s3": {"endpoint": control_plane.s3_endpoint},
        "watch": {"namespaces": [team_a, team_b]},
    }
    with installed(control_plane.kubeconfig, release_ns, values) as fullname:
        rbac = client.RbacAuthorizationV1Api(kube)
        for ns in (team_a, team_b):
            assert rules_of(rbac.read_namespaced_role(fullname, ns)) == DEFAULT_OPERATOR_RULES
        # Cluster-wide, only kopf's read-only observation: without it kopf retries the forbidden namespace listing
        # for about a minute at every start (logging errors) and reconciles nothing meanwhile (measured here).
        assert rules_of(rbac.read_cluster_role(fullname)) == [CRD_OBSERVATION_RULE, NAMESPACE_OBSERVATION_RULE]

        token = service_account_token(kube, release_ns, fullname)
        kubeconfig = sa_kubeconfig(control_plane.kubeconfig, token, tmp_path / "operator.kubeconfig")
        as_operator = load_client(kubeconfig)
        with (
            run_operator(
                team_a,
                f"s3://{bucket}/artifacts",
                kubeconfig=kubeconfig,
                namespaces=f"{team_a},{team_b}",
                leader_election_namespace=release_ns,
            ) as runner,
            SimulatedJobs(kube, s3, team_a),
        ):
            apply_expert(kube, team_a, "dialog-es", _expert(bucket, "es"), labels={"task": "dialog"})
            wait_for(lambda: _ready_expert(kube, team_a, "dialog-es"), timeout=30, what="Ready")
        assert "became the leader" in runner.output  # the log is captured, and the Lease was taken
        assert not PERMISSION_PROBLEMS.search(runner.output), runner.output

        batch, custom = client.BatchV1Api(as_operator), client.CustomObjectsApi(as_operator)
        expect_forbidden(lambda: batch.list_job_for_all_namespaces(), "list Jobs cluster-wide")
        expect_forbidden(
            lambda: custom.list_namespaced_custom_object(GROUP, VERSION, release_ns, EXPERT_PLURAL),
            "list LanguageExperts in a namespace it does not watch",
        )
        expect_forbidden(lambda: client.CoreV1Api(as_operator).list_namespaced_secret(team_a), "list Secrets")
        # trainJob.enabled is off by default: no permission on TrainJobs at all.
        expect_forbidden(
            lambda: custom.list_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", team_a, "trainjobs"),
            "list TrainJobs without trainJob.enabled",
        )


class SimulatedTrainJobs(threading.Thread):
    """Kubeflow Trainer + the trainer for TrainJobs (as admin): each new TrainJob of the namespace commits its
    adapter (what rank 0 writes) and gets the Complete condition."""

    def __init__(self, kube: Any, store: ObjectStore, namespace: str) -> None:
        super().__init__(daemon=True)
        self.api = client.CustomObjectsApi(kube)
        self.store = store
        self.namespace = namespace
        self.stop = threading.Event()
        self.done: list[str] = []

    def run(self) -> None:
        from langmerge.tasks import TrainTask
        from operator_harness import now, write_fake_adapter

        group = ("trainer.kubeflow.org", "v1alpha1")
        while not self.stop.is_set():
            with contextlib.suppress(ApiException):
                for item in self.api.list_namespaced_custom_object(*group, self.namespace, "trainjobs")["items"]:
                    name = item["metadata"]["name"]
                    if name in self.done:
                        continue
                    write_fake_adapter(self.store, TrainTask.model_validate_json(item["spec"]["trainer"]["args"][-1]))
                    self.done.append(name)
                    cond = {
                        "type": "Complete",
                        "status": "True",
                        "reason": "JobsCompleted",
                        "message": "TrainJob completed",
                        "lastTransitionTime": now(),
                    }
                    self.api.patch_namespaced_custom_object_status(
                        *group, self.namespace, "trainjobs", name, {"status": {"conditions": [cond]}}
                    )
            time.sleep(0.1)


def test_trainjob_permissions_only_when_enabled(
    control_plane: Endpoints,
    kube: Any,
    s3: ObjectStore,
    seeded: str,
    namespace: str,
    make_namespace: Callable[[], str],
    tmp_path: Path,
) -> None:
    """trainJob.enabled adds exactly list/watch/create/delete on TrainJobs, and that is enough to train an expert as
    a TrainJob as the chart's ServiceAccount (and not enough to read or change one otherwise)."""
    from langmerge.dev.trainjob_crd import trainjob_crd
    from langmerge.kube import install_crds

    install_crds(kube, [trainjob_crd()])
    bucket = seeded
    release_ns, team = namespace, make_namespace()
    values = {
        "artifactsUri": f"s3://{bucket}/artifacts",
        "s3": {"endpoint": control_plane.s3_endpoint},
        "watch": {"namespaces": [team]},
        "trainJob": {"enabled": True},
        "jobs": {"trainingRuntime": "trainjob"},
    }
    with installed(control_plane.kubeconfig, release_ns, values) as fullname:
        rules = rules_of(client.RbacAuthorizationV1Api(kube).read_namespaced_role(fullname, team))
        assert rules == [*DEFAULT_OPERATOR_RULES[:3], TRAINJOB_RULE, *DEFAULT_OPERATOR_RULES[3:]]
        token = service_account_token(kube, release_ns, fullname)
        kubeconfig = sa_kubeconfig(control_plane.kubeconfig, token, tmp_path / "operator.kubeconfig")
        as_operator = load_client(kubeconfig)
        trainjobs = SimulatedTrainJobs(kube, s3, team)
        trainjobs.start()
        try:
            with run_operator(
                team,
                f"s3://{bucket}/artifacts",
                kubeconfig=kubeconfig,
                leader_election_namespace=release_ns,
                trainjobs=True,
                training_runtime="trainjob",
            ) as runner:
                spec = {**_expert(bucket, "es"), "resources": {"gpus": 0, "nodes": 2}}
                apply_expert(kube, team, "dialog-es", spec, labels={"task": "dialog"})
                ready = wait_for(lambda: _ready_expert(kube, team, "dialog-es"), timeout=40, what="Ready")
        finally:
            trainjobs.stop.set()
            trainjobs.join(5)
        assert not PERMISSION_PROBLEMS.search(runner.output), runner.output
        assert trainjobs.done == [status_of(ready)["history"][-1]["job"]] and jobs(kube, team) == []
        assert status_of(ready)["training"]["nodes"] == 2

        custom = client.CustomObjectsApi(as_operator)
        group = ("trainer.kubeflow.org", "v1alpha1")
        expect_forbidden(
            lambda: custom.get_namespaced_custom_object(*group, team, "trainjobs", trainjobs.done[0]),
            "get a TrainJob by name",
        )
        expect_forbidden(
            lambda: custom.patch_namespaced_custom_object(*group, team, "trainjobs", trainjobs.done[0], {"spec": {}}),
            "patch a TrainJob",
        )
        expect_forbidden(
            lambda: custom.list_namespaced_custom_object(*group, release_ns, "trainjobs"),
            "list TrainJobs in a namespace it does not watch",
        )


def test_documented_crd_upgrade_applies(control_plane: Endpoints) -> None:
    """The README's CRD upgrade step, as a server-side dry run against the real API server."""
    import subprocess

    from langmerge.dev import binaries

    command = [str(binaries.kubectl()), "--kubeconfig", control_plane.kubeconfig, "apply", "--server-side"]
    command += ["--force-conflicts", "--dry-run=server", "-f", str(CHART / "crds")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("serverside-applied (server dry run)") == 2, result.stdout
