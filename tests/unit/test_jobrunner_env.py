"""The local Job runner resolves a container's environment as kubelet does (given the Secrets and ConfigMaps)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from langmerge.dev.jobrunner import (
    CONTAINER_PATH,
    ContainerConfigError,
    PodIdentity,
    RunnerConfig,
    child_environment,
    field_value,
    pod_identity,
    resolve_env,
)


class Objects:
    """An in-memory ObjectSource that records what was looked up."""

    def __init__(
        self, secrets: dict[str, dict[str, str]] | None = None, config_maps: dict[str, dict[str, str]] | None = None
    ) -> None:
        self.secrets = secrets or {}
        self.config_maps = config_maps or {}
        self.lookups: list[tuple[str, str, str]] = []

    def secret(self, namespace: str, name: str) -> Mapping[str, str] | None:
        self.lookups.append(("secret", namespace, name))
        return self.secrets.get(name)

    def config_map(self, namespace: str, name: str) -> Mapping[str, str] | None:
        self.lookups.append(("configmap", namespace, name))
        return self.config_maps.get(name)


POD = PodIdentity(
    name="train-es-0",
    namespace="team",
    uid="uid-1",
    labels={"app": "langmerge", "job-name": "train-es"},
    annotations={"langmerge.dev/attempt": "2"},
    service_account="trainer",
)


def resolve(container: dict[str, Any], objects: Objects | None = None) -> dict[str, str]:
    return resolve_env(container, POD, objects or Objects())


def test_plain_values_and_expansion() -> None:
    env = resolve(
        {
            "env": [
                {"name": "A", "value": "1"},
                {"name": "B", "value": "$(A)-$(LATER)-$$(A)"},
                {"name": "LATER", "value": "x"},
                {"name": "EMPTY"},
            ]
        }
    )
    # $(VAR) sees only variables defined before it; undefined ones stay as written; $$ escapes.
    assert env == {"A": "1", "B": "1-$(LATER)-$(A)", "LATER": "x", "EMPTY": ""}


def test_secret_key_ref() -> None:
    objects = Objects(secrets={"s3": {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "shh"}})
    env = resolve(
        {
            "env": [
                {
                    "name": "AWS_ACCESS_KEY_ID",
                    "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}},
                },
                {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}}},
            ]
        },
        objects,
    )
    assert env == {"AWS_ACCESS_KEY_ID": "AKIA", "KEY": "shh"}
    assert objects.lookups == [("secret", "team", "s3")]  # read once per resolution


def test_missing_secret_has_kubelets_message() -> None:
    with pytest.raises(ContainerConfigError) as info:
        resolve({"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "k"}}}]})
    assert info.value.message == 'secrets "s3" not found'


def test_missing_key_has_kubelets_message() -> None:
    objects = Objects(secrets={"s3": {"other": "v"}}, config_maps={"cm": {}})
    with pytest.raises(ContainerConfigError) as info:
        resolve({"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "k"}}}]}, objects)
    assert info.value.message == "couldn't find key k in Secret team/s3"
    with pytest.raises(ContainerConfigError) as info:
        resolve({"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}}]}, objects)
    assert info.value.message == "couldn't find key k in ConfigMap team/cm"


def test_missing_config_map_has_kubelets_message() -> None:
    with pytest.raises(ContainerConfigError) as info:
        resolve({"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}}]})
    assert info.value.message == 'configmaps "cm" not found'


def test_optional_refs_are_skipped() -> None:
    objects = Objects(secrets={"present": {"a": "1"}})
    env = resolve(
        {
            "env": [
                {"name": "A", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": True}}},
                {"name": "B", "valueFrom": {"secretKeyRef": {"name": "present", "key": "nokey", "optional": True}}},
                {"name": "C", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k", "optional": True}}},
                {"name": "D", "valueFrom": {"secretKeyRef": {"name": "present", "key": "a", "optional": True}}},
            ],
            "envFrom": [{"secretRef": {"name": "absent", "optional": True}}],
        },
        objects,
    )
    assert env == {"D": "1"}


def test_config_map_key_ref() -> None:
    env = resolve(
        {"env": [{"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}}]},
        Objects(config_maps={"cfg": {"mode": "fast"}}),
    )
    assert env == {"MODE": "fast"}


def test_env_from_then_env_overrides() -> None:
    objects = Objects(
        secrets={"creds": {"TOKEN": "t", "SHARED": "from-secret"}},
        config_maps={"cfg": {"SHARED": "from-cm", "LEVEL": "debug", "bad key": "x", "1BAD": "y"}},
    )
    env = resolve(
        {
            "envFrom": [
                {"configMapRef": {"name": "cfg"}},
                {"secretRef": {"name": "creds"}, "prefix": "S_"},
            ],
            "env": [{"name": "LEVEL", "value": "info:$(S_TOKEN)"}],
        },
        objects,
    )
    # Invalid names are skipped; later sources win; env entries see envFrom's variables.
    assert env == {"SHARED": "from-cm", "LEVEL": "info:t", "S_TOKEN": "t", "S_SHARED": "from-secret"}


def test_env_from_missing_object() -> None:
    with pytest.raises(ContainerConfigError) as info:
        resolve({"envFrom": [{"configMapRef": {"name": "nope"}}]})
    assert info.value.message == 'configmaps "nope" not found'
    with pytest.raises(ContainerConfigError) as info:
        resolve({"envFrom": [{"secretRef": {"name": "nope"}}]})
    assert info.value.message == 'secrets "nope" not found'


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("metadata.name", "train-es-0"),
        ("metadata.namespace", "team"),
        ("metadata.uid", "uid-1"),
        ("metadata.labels['app']", "langmerge"),
        ("metadata.labels['absent']", ""),
        ("metadata.annotations['langmerge.dev/attempt']", "2"),
        ("spec.nodeName", "localhost"),
        ("spec.serviceAccountName", "trainer"),
        ("status.podIP", "127.0.0.1"),
        ("status.hostIP", "127.0.0.1"),
    ],
)
def test_field_ref(path: str, value: str) -> None:
    assert field_value(path, POD) == value
    assert resolve({"env": [{"name": "V", "valueFrom": {"fieldRef": {"fieldPath": path}}}]}) == {"V": value}


def test_unsupported_field_refs() -> None:
    with pytest.raises(ContainerConfigError, match="unsupported fieldPath"):
        field_value("metadata.labels", POD)
    with pytest.raises(ContainerConfigError, match="resourceFieldRef"):
        resolve({"env": [{"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}]})


def test_pod_identity_of_an_attempt() -> None:
    job = {
        "metadata": {"name": "train-es", "namespace": "team", "uid": "0d9e7c4a-0000-4000-8000-000000000001"},
        "spec": {
            "template": {
                "metadata": {"labels": {"job-name": "train-es"}, "annotations": {"a": "b"}},
                "spec": {"serviceAccountName": "trainer", "containers": []},
            }
        },
    }
    pod = pod_identity(job, 3)
    assert (pod.name, pod.namespace, pod.service_account) == ("train-es-3", "team", "trainer")
    assert pod.labels == {"job-name": "train-es"} and pod.annotations == {"a": "b"}
    assert pod.uid == pod_identity(job, 3).uid != pod_identity(job, 4).uid


def test_child_environment_is_minimal_and_extras_win(tmp_path: Path) -> None:
    cfg = RunnerConfig(
        work_root=tmp_path, python="/venv/bin/python", extra_env=(("HF_HOME", "/cache"), ("PYTHONUNBUFFERED", "1"))
    )
    env = child_environment(
        {"HF_HOME": "/in-cluster/cache", "A": "1", "HOME": "/job-home"},
        home=tmp_path / "h",
        tmpdir=tmp_path / "t",
        hostname="job-0",
        config=cfg,
    )
    assert env == {
        "PATH": f"/venv/bin:{CONTAINER_PATH}",
        "HOME": "/job-home",
        "LANG": "C.UTF-8",
        "TMPDIR": str(tmp_path / "t"),
        "HOSTNAME": "job-0",
        "A": "1",
        "HF_HOME": "/cache",
        "PYTHONUNBUFFERED": "1",
    }
