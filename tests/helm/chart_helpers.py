"""Helpers for the chart tests: run helm, parse rendered manifests, evaluate the Argo CD health script."""

from __future__ import annotations

import functools
import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "langmerge"
HEALTH_LUA = CHART / "health" / "argocd-health.lua"
ARGOCD_PATCH = CHART / "health" / "argocd-cm-patch.yaml"

#: What the operator does with its custom resources, Jobs and Events (the ClusterRole's rules in cluster-wide mode,
#: each watched namespace's Role otherwise). Keep in sync with the chart's templates/rbac/_rules.tpl.
OPERATOR_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": ["langmerge.dev"],
        "resources": ["languageexperts", "mergedmodels"],
        "verbs": ["get", "list", "watch"],
    },
    {
        "apiGroups": ["langmerge.dev"],
        "resources": ["languageexperts/status", "mergedmodels/status"],
        "verbs": ["patch"],
    },
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["list", "watch", "create", "delete"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]


#: With trainJob.enabled only: Kubeflow Trainer TrainJobs, as Jobs (no get).
TRAINJOB_RULE: dict[str, Any] = {
    "apiGroups": ["trainer.kubeflow.org"],
    "resources": ["trainjobs"],
    "verbs": ["list", "watch", "create", "delete"],
}


#: With serving.kserve.enabled only: read and patch the InferenceServices a MergedModel rolls revisions out to.
KSERVE_RULE: dict[str, Any] = {
    "apiGroups": ["serving.kserve.io"],
    "resources": ["inferenceservices"],
    "verbs": ["get", "patch"],
}


def secret_rule(name: str = "langmerge-s3") -> dict[str, Any]:
    """s3.credentials.checkExists (default on): get on the S3 Secret's name only, to check it exists before a Job."""
    return {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [name], "verbs": ["get"]}


#: The operator's rules with the default values (the Secret check on, Secret name langmerge-s3).
DEFAULT_OPERATOR_RULES: list[dict[str, Any]] = [*OPERATOR_RULES, secret_rule()]
#: With rbac.ownerReferencesPermissionEnforcement (OpenShift-style clusters).
FINALIZERS_RULE = {
    "apiGroups": ["langmerge.dev"],
    "resources": ["languageexperts/finalizers", "mergedmodels/finalizers"],
    "verbs": ["update"],
}
#: kopf's observation (rbac.kopfObservation, default on): CRDs always, Namespaces only for a namespaced watch.
CRD_OBSERVATION_RULE = {
    "apiGroups": ["apiextensions.k8s.io"],
    "resources": ["customresourcedefinitions"],
    "verbs": ["list", "watch"],
}
NAMESPACE_OBSERVATION_RULE = {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}
#: Leader election, in the release namespace only.
LEASE_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "resourceNames": ["langmerge-operator"],
        "verbs": ["get", "update"],
    },
]


class HelmError(AssertionError):
    def __init__(self, args: Sequence[str], result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(f"helm {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        self.stdout = result.stdout
        self.stderr = result.stderr


@functools.cache
def helm_binary() -> str:
    from langmerge.dev import binaries

    return str(binaries.helm())


def helm(*args: str, kubeconfig: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        # helm's own state stays out of the user's folders and never touches a repository index.
        "HELM_CACHE_HOME": str(Path(os.environ.get("TMPDIR", "/tmp")) / "langmerge-helm-cache"),
        "HELM_CONFIG_HOME": str(Path(os.environ.get("TMPDIR", "/tmp")) / "langmerge-helm-config"),
        "HELM_DATA_HOME": str(Path(os.environ.get("TMPDIR", "/tmp")) / "langmerge-helm-data"),
    }
    if kubeconfig:
        env["KUBECONFIG"] = kubeconfig
    result = subprocess.run([helm_binary(), *args], capture_output=True, text=True, env=env, timeout=120, check=False)
    if check and result.returncode != 0:
        raise HelmError(args, result)
    return result


def set_args(values: dict[str, Any] | None) -> list[str]:
    """``--set-json`` for each top-level value: exact types, lists and maps, no escaping rules."""
    out: list[str] = []
    for key, value in (values or {}).items():
        out += ["--set-json", f"{key}={json.dumps(value)}"]
    return out


def render(
    values: dict[str, Any] | None = None, namespace: str = "langmerge", release: str = "lm"
) -> list[dict[str, Any]]:
    """``helm template`` of the chart: the rendered objects (CRDs included, as Helm would install them)."""
    result = helm("template", release, str(CHART), "--namespace", namespace, "--include-crds", *set_args(values))
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def container_env(deployment: dict[str, Any]) -> dict[str, Any]:
    """name -> value (a string) or valueFrom (a dict) of the operator container."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def argocd_health(obj: dict[str, Any]) -> tuple[str, str]:
    """Run the chart's Argo CD health script on ``obj`` the way Argo CD does (Lua 5.1, global ``obj``)."""
    from lupa import lua51

    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(HEALTH_LUA.read_text(encoding="utf-8"))
    return str(result["status"]), str(result["message"])


def sa_kubeconfig(admin_kubeconfig: str, token: str, path: Path) -> str:
    """A kubeconfig for a bearer token on the same API server (server and CA from the admin kubeconfig)."""
    admin = yaml.safe_load(Path(admin_kubeconfig).read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    cluster = next(c for c in admin["clusters"] if c["name"] == context["cluster"])["cluster"]
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "local", "user": "operator"}}],
        "current-context": "operator",
    }
    path.write_text(yaml.safe_dump(kubeconfig))
    path.chmod(0o600)
    return str(path)
