"""The chart without a cluster: lint, render with default and edge values, schema, CRD copies, NOTES."""

from __future__ import annotations

import json
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_helpers import (
    CHART,
    CRD_OBSERVATION_RULE,
    DEFAULT_OPERATOR_RULES,
    FINALIZERS_RULE,
    KSERVE_RULE,
    LEASE_RULES,
    NAMESPACE_OBSERVATION_RULE,
    OPERATOR_RULES,
    ROOT,
    TRAINJOB_RULE,
    HelmError,
    by_kind,
    container_env,
    helm,
    one,
    render,
    secret_rule,
    set_args,
)

from langmerge.settings import Settings
from langmerge.tenancy import UriPolicy, parse_grants

#: Every knob turned: namespaced watch over two namespaces, ServiceMonitor, Kueue, two replicas, and more.
EDGE: dict[str, Any] = {
    "replicaCount": 2,
    "image": {"repository": "platform/langmerge-operator", "digest": "sha256:" + "ab" * 32},
    "watch": {"namespaces": ["team-a", "team-b"]},
    "artifactsUri": "s3://ml-artifacts/langmerge",
    "s3": {
        "endpoint": "http://minio.storage.svc:9000",
        "region": "eu-west-1",
        "credentials": {"secretName": "s3-creds", "accessKeyIdKey": "id", "secretAccessKeyKey": "key"},
    },
    "jobs": {
        "trainerImage": {"repository": "platform/langmerge-trainer", "tag": "0.1.0-cu128"},
        "imagePullPolicy": "Always",
        "gpuResourceName": "amd.com/gpu",
        "maxTrainingJobs": 8,
        "maxMergeJobs": 1,
        "maxTrainingJobsPerNamespace": 3,
        "maxMergeJobsPerNamespace": 0,
        "maxCpu": "64",
        "maxMemory": "512Gi",
        "allowedRegistries": ["platform", "ghcr.io/acme"],
        "backoffLimit": 3,
        "ttlSecondsAfterFinished": 1000000,
        "keepCheckpoints": True,
        "kueueQueue": "gpu-queue",
        "trainingRuntime": "trainjob",
        "serviceAccountName": "trainer",
        "logLevel": "DEBUG",
        "env": {"NCCL_DEBUG": "WARN", "HF_HUB_OFFLINE": "1"},
    },
    "trainJob": {"enabled": True, "runtime": "langmerge-torch"},
    "serving": {"kserve": {"enabled": True}, "pollSeconds": 2.5},
    "reconcile": {
        "resyncSeconds": 30.5,
        "progressSeconds": 5,
        "historyLimit": 50,
        "workers": 4,
        "deleteArtifactsWithExpert": True,
        "requestTimeoutSeconds": 12.5,
        "storageProbeSeconds": 1,
        "jobRelistSeconds": 600,
    },
    "tenancy": {
        "uriPolicy": "enforce",
        "namespacePrefix": "s3://ml-{namespace}/langmerge/",
        "grants": {
            "team-a": {"readWrite": ["s3://team-a-extra/"], "read": ["s3://shared/datasets/"]},
            "*": {"read": ["s3://shared/base-models/"]},
        },
    },
    "verbose": True,
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/langmerge"}},
    "rbac": {"ownerReferencesPermissionEnforcement": True},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    "podAnnotations": {"team": "ml-platform"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}},
    "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy.internal:3128"}],
}


@pytest.fixture(scope="module")
def default() -> list[dict[str, Any]]:
    return render(namespace="langmerge-system")


@pytest.fixture(scope="module")
def edge() -> list[dict[str, Any]]:
    return render(EDGE, namespace="ml-ops")


def kinds(objects: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    return sorted((o["kind"], o["metadata"].get("namespace")) for o in objects)


def settings_from(deployment: dict[str, Any]) -> Settings:
    """What the operator would read from the rendered environment (fieldRefs and secretKeyRefs left out)."""
    env = {k: v for k, v in container_env(deployment).items() if isinstance(v, str)}
    return Settings.from_env(env)


def test_chart_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]
    assert chart["apiVersion"] == "v2" and chart["name"] == "langmerge"


@pytest.mark.parametrize("values", [None, EDGE], ids=["default", "edge"])
def test_helm_lint(values: dict[str, Any] | None) -> None:
    result = helm("lint", "--strict", str(CHART), *set_args(values))
    assert "0 chart(s) failed" in result.stdout


def test_default_render(default: list[dict[str, Any]]) -> None:
    ns = "langmerge-system"
    assert kinds(default) == sorted(
        [
            ("ClusterRole", None),
            ("ClusterRoleBinding", None),
            ("CustomResourceDefinition", None),
            ("CustomResourceDefinition", None),
            ("Deployment", ns),
            ("Role", ns),
            ("RoleBinding", ns),
            ("Service", ns),
            ("ServiceAccount", ns),
        ]
    )
    # Cluster-wide watch: exactly the operator's rules plus kopf's CRD observation, bound to the chart's account.
    role = one(default, "ClusterRole")
    assert role["rules"] == [*DEFAULT_OPERATOR_RULES, CRD_OBSERVATION_RULE]
    binding = one(default, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "lm-langmerge",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "lm-langmerge", "namespace": ns}]
    lease_role = one(default, "Role")
    assert lease_role["metadata"]["name"] == "lm-langmerge-leader-election" and lease_role["rules"] == LEASE_RULES
    assert one(default, "RoleBinding")["roleRef"]["name"] == "lm-langmerge-leader-election"
    account = one(default, "ServiceAccount")
    assert account["metadata"]["name"] == "lm-langmerge" and account["automountServiceAccountToken"] is False
    # Secrets: only get on the S3 Secret's name (whether it exists), never list, watch or write.
    for obj in by_kind(default, "ClusterRole") + by_kind(default, "Role"):
        assert [r for r in obj["rules"] if "secrets" in r["resources"]] in ([], [secret_rule()])
    assert not by_kind(default, "Secret") and not by_kind(default, "ServiceMonitor")


def test_default_deployment(default: list[dict[str, Any]]) -> None:
    deployment = one(default, "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] == 1
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["serviceAccountName"] == "lm-langmerge" and pod["automountServiceAccountToken"] is True
    assert container["image"] == "langmerge/operator:0.1.0"
    assert container["args"] == ["--liveness", "http://0.0.0.0:8080/healthz"]  # after the entrypoint `langmerge run`
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    # Hardened: non-root numeric user, read-only root, no capabilities, RuntimeDefault seccomp, /tmp writable.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["runAsNonRoot"] is True and security["capabilities"] == {"drop": ["ALL"]}
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]

    env = container_env(deployment)
    assert "LANGMERGE_NAMESPACES" not in env, "empty watch.namespaces: the whole cluster"
    assert env["LANGMERGE_LEADER_ELECTION_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "langmerge-s3", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "langmerge-s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    # The defaults are the operator's own defaults.
    assert settings_from(deployment) == Settings()

    service = one(default, "Service")
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]


def test_edge_render(edge: list[dict[str, Any]]) -> None:
    assert kinds(edge) == sorted(
        [
            ("ClusterRole", None),
            ("ClusterRoleBinding", None),
            ("CustomResourceDefinition", None),
            ("CustomResourceDefinition", None),
            ("Deployment", "ml-ops"),
            ("Role", "ml-ops"),
            ("Role", "team-a"),
            ("Role", "team-b"),
            ("RoleBinding", "ml-ops"),
            ("RoleBinding", "team-a"),
            ("RoleBinding", "team-b"),
            ("Service", "ml-ops"),
            ("ServiceAccount", "ml-ops"),
            ("ServiceMonitor", "ml-ops"),
        ]
    )
    # Namespaced watch: the operator's rules only in the watched namespaces; cluster-wide only kopf's read-only
    # observation (CRDs and namespaces), no custom resources, Jobs or Events.
    assert one(edge, "ClusterRole")["rules"] == [CRD_OBSERVATION_RULE, NAMESPACE_OBSERVATION_RULE]
    for ns in ("team-a", "team-b"):
        (role,) = [r for r in by_kind(edge, "Role") if r["metadata"]["namespace"] == ns]
        assert (
            role["rules"]
            == [
                *OPERATOR_RULES[:2],
                FINALIZERS_RULE,
                *OPERATOR_RULES[2:3],
                TRAINJOB_RULE,  # trainJob.enabled
                KSERVE_RULE,  # serving.kserve.enabled
                *OPERATOR_RULES[3:],
                secret_rule("s3-creds"),
            ]
        )
        (binding,) = [b for b in by_kind(edge, "RoleBinding") if b["metadata"]["namespace"] == ns]
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "lm-langmerge", "namespace": "ml-ops"}]
    (lease_role,) = [r for r in by_kind(edge, "Role") if r["metadata"]["namespace"] == "ml-ops"]
    assert lease_role["rules"] == LEASE_RULES

    deployment = one(edge, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 2
    assert container["image"] == "platform/langmerge-operator@sha256:" + "ab" * 32
    assert container["args"] == ["--liveness", "http://0.0.0.0:8080/healthz", "--verbose"]
    assert pod["tolerations"] == EDGE["tolerations"] and pod["affinity"] == EDGE["affinity"]
    assert deployment["spec"]["template"]["metadata"]["annotations"] == {"team": "ml-platform"}
    env = container_env(deployment)
    assert env["LANGMERGE_NAMESPACES"] == "team-a,team-b"
    assert env["LANGMERGE_KUEUE_QUEUE"] == "gpu-queue"
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-creds", "key": "id"}}
    assert env["HTTPS_PROXY"] == "http://proxy.internal:3128"

    settings = settings_from(deployment)
    assert settings.namespaces == ("team-a", "team-b")
    assert settings.artifacts_uri == "s3://ml-artifacts/langmerge"
    assert (settings.s3_endpoint, settings.s3_region) == ("http://minio.storage.svc:9000", "eu-west-1")
    assert (settings.s3_secret_name, settings.s3_secret_access_key_id_key) == ("s3-creds", "id")
    assert settings.s3_secret_secret_access_key_key == "key"
    assert settings.trainer_image == "platform/langmerge-trainer:0.1.0-cu128"
    assert (settings.image_pull_policy, settings.gpu_resource_name) == ("Always", "amd.com/gpu")
    assert (settings.max_training_jobs, settings.max_merge_jobs, settings.job_backoff_limit) == (8, 1, 3)
    assert settings.job_ttl_seconds == 1000000, "large integers are rendered as integers, not 1e+06"
    assert settings.keep_checkpoints is True
    assert (settings.trainjobs, settings.training_runtime, settings.trainjob_runtime) == (
        True,
        "trainjob",
        "langmerge-torch",
    )
    assert (settings.kueue_queue, settings.job_service_account, settings.trainer_log_level) == (
        "gpu-queue",
        "trainer",
        "DEBUG",
    )
    assert settings.job_env == (("HF_HUB_OFFLINE", "1"), ("NCCL_DEBUG", "WARN"))
    assert (settings.resync_seconds, settings.progress_seconds) == (30.5, 5.0)
    assert (settings.history_limit, settings.workers, settings.delete_artifacts_with_expert) == (50, 4, True)
    assert (settings.max_training_jobs_per_namespace, settings.max_merge_jobs_per_namespace) == (3, 0)
    assert (settings.max_job_cpu, settings.max_job_memory, settings.check_s3_secret) == ("64", "512Gi", True)
    assert settings.allowed_registries == ("platform", "ghcr.io/acme")
    assert settings.uri_policy == "enforce" and settings.namespace_prefix == "s3://ml-{namespace}/langmerge/"
    assert settings.uri_grants == (
        ("*", "read", "s3://shared/base-models/"),
        ("team-a", "read", "s3://shared/datasets/"),
        ("team-a", "readWrite", "s3://team-a-extra/"),
    )
    policy = settings.policy
    assert policy.check("team-a", "f", "s3://ml-team-a/langmerge/x", write=True) is None
    assert policy.check("team-b", "f", "s3://ml-team-a/langmerge/x", write=False) is not None
    assert policy.check("team-b", "f", "s3://shared/base-models/llama", write=False) is None
    assert policy.check("team-b", "f", "s3://shared/base-models/llama", write=True) is not None
    assert (settings.request_timeout_seconds, settings.storage_probe_seconds, settings.job_relist_seconds) == (
        12.5,
        1.0,
        600.0,
    )

    monitor = one(edge, "ServiceMonitor")
    service = one(edge, "Service")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"] == "metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml-ops"]}
    assert one(edge, "ServiceAccount")["metadata"]["annotations"] == EDGE["serviceAccount"]["annotations"]


def test_every_setting_has_a_chart_value(edge: list[dict[str, Any]]) -> None:
    """The chart sets every field of Settings (and nothing that is not one): a new setting needs a chart value."""
    names = {n for n in container_env(one(edge, "Deployment")) if n.startswith("LANGMERGE_")}
    assert names == {f"LANGMERGE_{f.name.upper()}" for f in fields(Settings)}


def test_lease_name_reaches_the_operator_and_the_lease_role() -> None:
    """Two releases share a namespace with two Lease names: the value is the operator's setting and the one name the
    leader-election Role lets it get and update."""
    objects = render({"leaderElection": {"leaseName": "langmerge-team-b"}}, release="lm-b")
    deployment = one(objects, "Deployment")
    settings = settings_from(deployment)
    assert settings.leader_election_lease_name == "langmerge-team-b"
    assert container_env(deployment)["LANGMERGE_LEADER_ELECTION_NAMESPACE"] == {
        "fieldRef": {"fieldPath": "metadata.namespace"}
    }
    (lease_role,) = [r for r in by_kind(objects, "Role") if r["metadata"]["name"].endswith("-leader-election")]
    (by_name,) = [rule for rule in lease_role["rules"] if "resourceNames" in rule]
    assert by_name["resourceNames"] == ["langmerge-team-b"] and by_name["verbs"] == ["get", "update"]


def test_metrics_off_and_existing_service_account() -> None:
    objects = render({"metrics": {"enabled": False}, "serviceAccount": {"create": False, "name": "ops"}})
    deployment = one(objects, "Deployment")
    assert not by_kind(objects, "Service") and not by_kind(objects, "ServiceAccount")
    assert container_env(deployment)["LANGMERGE_METRICS_PORT"] == "0"
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "ops"
    assert one(objects, "ClusterRoleBinding")["subjects"][0]["name"] == "ops"


def test_single_tenant_options_without_secret_permission() -> None:
    """uriPolicy off and checkExists false: the settings say so, and no rule names Secrets at all."""
    objects = render(
        {"tenancy": {"uriPolicy": "off", "namespacePrefix": ""}, "s3": {"credentials": {"checkExists": False}}}
    )
    for obj in by_kind(objects, "ClusterRole") + by_kind(objects, "Role"):
        assert not any("secrets" in rule["resources"] for rule in obj["rules"])
    assert one(objects, "ClusterRole")["rules"] == [*OPERATOR_RULES, CRD_OBSERVATION_RULE]
    settings = settings_from(one(objects, "Deployment"))
    assert (settings.uri_policy, settings.namespace_prefix, settings.check_s3_secret) == ("off", "", False)


def test_strictest_namespaced_install_has_nothing_cluster_scoped() -> None:
    objects = render({"watch": {"namespaces": ["team-a"]}, "rbac": {"kopfObservation": False}})
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "replicaCont=2"], "replicaCont"),
        (["--set", "s3.credentials.secretname=x"], "secretname"),
        (["--set", "metrics.serviceMonitor.enable=true"], "enable"),
        (["--set", "securityContext.readOnlyRootFileSystem=false"], "readOnlyRootFileSystem"),
        (["--set", "artifactsUri=http://bucket/prefix"], "artifactsUri"),
        (["--set", "jobs.maxTrainingJobs=0"], "maxTrainingJobs"),
        (["--set-json", 'watch={"namespaces":["Team_A"]}'], "namespaces"),
        (["--set", "replicaCount=2", "--set", "leaderElection.enabled=false"], "leaderElection.enabled"),
        (["--set", "leaderElection.leaseName=Lease_A"], "leaseName"),
        (["--set-json", 'jobs={"env":{"A":"x,y"}}'], "commas"),
        (["--set", "tenancy.uriPolicy=loose"], "uriPolicy"),
        (["--set-json", 'tenancy={"grants":{"team-a":{"write":["s3://b/"]}}}'], "write"),
        (["--set-json", 'tenancy={"grants":{"team-a":{"read":["http://b/"]}}}'], "read"),
        (["--set", "tenancy.namespacePrefix=s3://b/shared/"], "namespacePrefix"),
        (["--set", "jobs.maxMemory=lots"], "maxMemory"),
        (["--set", "jobs.maxTrainingJobsPerNamespace=-1"], "maxTrainingJobsPerNamespace"),
        (["--set", "jobs.trainingRuntime=slurm"], "trainingRuntime"),
        (["--set", "jobs.trainingRuntime=trainjob"], "enabled"),  # a TrainJob runtime needs trainJob.enabled
        (["--set", "trainJob.runtime=Torch Distributed"], "runtime"),
    ],
)
def test_values_are_checked(args: list[str], message: str) -> None:
    with pytest.raises(HelmError) as err:
        helm("template", "lm", str(CHART), *args)
    assert message in err.value.stderr, err.value.stderr


def _object_nodes(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if schema.get("type") == "object":
        out.append((path or "<root>", schema))
    for key, sub in (schema.get("properties") or {}).items():
        out += _object_nodes(sub, f"{path}.{key}" if path else key)
    if isinstance(schema.get("items"), dict):
        out += _object_nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        out += _object_nodes(schema["additionalProperties"], f"{path}.*")
    return out


#: Kubernetes structures passed through as they are (the API server validates them): no closed schema.
PASSTHROUGH = {"affinity.nodeAffinity", "affinity.podAffinity", "affinity.podAntiAffinity", "extraEnv[].valueFrom"}


def test_schema_is_closed_at_every_level() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    for path, node in _object_nodes(schema):
        if path in PASSTHROUGH:
            continue
        extra = node.get("additionalProperties")
        # Closed objects, or maps whose values are themselves typed (labels, annotations, env, resources).
        assert extra is False or (isinstance(extra, dict) and "properties" not in node), path


#: Typed mirrors of Kubernetes structures: their own keys are optional (only the chart's keys need defaults).
KUBERNETES_MIRRORS = {"podSecurityContext", "securityContext", "affinity", "resources"}


def test_every_schema_key_has_a_documented_default() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: dict[str, Any], value: Any, path: str) -> None:
        for key, sub in (node.get("properties") or {}).items():
            if path in KUBERNETES_MIRRORS:
                return
            assert isinstance(value, dict) and key in value, f"{path}.{key} has no default in values.yaml"
            if sub.get("type") == "object" and sub.get("additionalProperties") is False and value[key]:
                walk(sub, value[key], f"{path}.{key}".lstrip("."))

    walk(schema, values, "")


def test_chart_crds_are_exact_copies() -> None:
    chart_crds = sorted(p.name for p in (CHART / "crds").iterdir())
    assert chart_crds == sorted(p.name for p in (ROOT / "crds").glob("*.yaml")), "run `make crds`"
    for name in chart_crds:
        assert (CHART / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes(), (
            f"charts/langmerge/crds/{name} differs from crds/{name}: run `make crds`"
        )


def test_notes_tell_what_to_apply_next() -> None:
    result = helm(
        "install",
        "lm",
        str(CHART),
        "--dry-run=client",
        "--namespace",
        "ml-ops",
        *set_args({"watch": {"namespaces": ["team-a"]}}),
    )
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n ml-ops create secret generic langmerge-s3" in notes
    assert "kubectl -n team-a create secret generic langmerge-s3" in notes
    assert "--from-literal=AWS_ACCESS_KEY_ID=" in notes and "--from-literal=AWS_SECRET_ACCESS_KEY=" in notes
    assert "kind: LanguageExpert" in notes and "kubectl -n team-a apply -f -" in notes
    assert "kubectl apply --server-side" in notes
    # The example's URIs are under the namespace's own prefix, and the notes say what else is refused.
    assert "uri: s3://langmerge/artifacts/team-a/data/dialog/es" in notes and "UriNotAllowed" in notes


def test_chart_readme_documents_install_upgrade_and_health() -> None:
    readme = (CHART / "README.md").read_text()
    for needle in (
        "helm install",
        "create secret generic",
        "kind: LanguageExpert",
        "kubectl apply --server-side --force-conflicts -f charts/langmerge/crds/",
        "resource.customizations.health.langmerge.dev_LanguageExpert",
        "resource.customizations.health.langmerge.dev_MergedModel",
        "observedGeneration",
    ):
        assert needle in readme, needle


def test_readme_language_expert_is_valid() -> None:
    """The first LanguageExpert shown in the README's install section parses with the operator's own model."""
    from langmerge.api.expert import LanguageExpertSpec

    text = (ROOT / "README.md").read_text()
    section = text.split("## Install on a cluster", 1)[1]
    blocks = [b.split("```", 1)[0] for b in section.split("```yaml")[1:]]
    experts = [d for b in blocks for d in yaml.safe_load_all(b) if d and d.get("kind") == "LanguageExpert"]
    assert experts, "the install section shows a LanguageExpert"
    # Its URIs pass the URI policy the install command sets up, in the namespace the section uses.
    grants = '{"*":{"read":["s3://my-bucket/models/"]}}'
    assert "--set artifactsUri=s3://my-bucket/langmerge" in section and f"tenancy.grants={grants}" in section
    policy = UriPolicy("s3://my-bucket/langmerge", grants=parse_grants(grants))
    for doc in experts:
        spec = LanguageExpertSpec.model_validate(doc["spec"])
        for uri in (spec.base_model.uri, spec.dataset.uri):
            assert policy.check("ml-team", "uri", uri, write=False) is None, uri


def test_readme_grants_for_the_sample_are_what_up_sets() -> None:
    """The grants the README gives for running the sample against an installed operator are the ones `up` sets."""
    from langmerge.dev.demo import DEFAULT_LAYOUT

    text = (ROOT / "README.md").read_text()
    documented = text.split("tenancy.grants=", 1)[1].split("'", 1)[0]
    assert json.loads(documented) == json.loads(DEFAULT_LAYOUT.uri_grants("default"))


def test_chart_files_are_what_helm_packages(tmp_path: Path) -> None:
    """The packaged chart carries the CRDs and the health check, and no stray files."""
    helm("package", str(CHART), "--destination", str(tmp_path))
    import tarfile

    (archive,) = tmp_path.glob("langmerge-*.tgz")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"langmerge/crds/langmerge.dev_languageexperts.yaml", "langmerge/health/argocd-health.lua"} <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".orig", ".bak"))]
