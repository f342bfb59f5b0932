"""``langmerge try`` on the operator side: the trainer extra check, the local state's S3 settings, the namespace from
the kubeconfig, and where an adapter's manifest is."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from langmerge import cli, tryout


def test_without_the_trainer_extra_it_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tryout, "missing_trainer_modules", lambda: ["torch", "peft"])
    assert cli.main(["try", "dialog-multilingual"]) == 1
    err = capsys.readouterr().err
    assert "needs the trainer extra (torch, peft missing here)" in err and "pip install 'langmerge[trainer]'" in err


def test_the_trainer_extra_is_found_here() -> None:
    assert tryout.missing_trainer_modules() == []


def _args(state: Path, **kw: str | None) -> argparse.Namespace:
    return argparse.Namespace(state=str(state), kubeconfig=kw.get("kubeconfig"), namespace=kw.get("namespace"))


def test_s3_settings_come_from_make_ups_env_file_when_the_shell_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "env.sh").write_text(
        "export AWS_ENDPOINT_URL=http://127.0.0.1:9\nexport AWS_ACCESS_KEY_ID=key\nexport AWS_SECRET_ACCESS_KEY=secret\n"
    )
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    env = cli._state_env(_args(tmp_path))
    assert (env["AWS_ENDPOINT_URL"], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        "http://127.0.0.1:9",
        "key",
        "secret",
    )
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "mine")
    assert "AWS_ENDPOINT_URL" not in cli._state_env(_args(tmp_path)), "the shell's own S3 settings win"


def test_the_namespace_is_the_kubeconfig_contexts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}}],
        "current-context": "x",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    assert cli._default_namespace(_args(tmp_path / "none", kubeconfig=str(path))) == "team-a"
    assert cli._default_namespace(_args(tmp_path / "none", kubeconfig=str(path), namespace="ml")) == "ml"
    assert cli._default_namespace(_args(tmp_path, kubeconfig=None)) == "team-a", "the local state's kubeconfig"
    assert cli._default_namespace(_args(tmp_path / "none", kubeconfig=str(tmp_path / "missing"))) == "default"


@pytest.mark.parametrize(
    ("adapter", "manifest"),
    [
        ("s3://b/a/experts/ns/x/fp/attempts/1-abcd/adapter", "s3://b/a/experts/ns/x/fp/manifest.json"),
        ("s3://b/a/experts/ns/x/fp/adapter", "s3://b/a/experts/ns/x/fp/manifest.json"),
        ("s3://b/a/experts/ns/x/fp/adapter/", "s3://b/a/experts/ns/x/fp/manifest.json"),
    ],
)
def test_an_adapters_manifest_is_beside_its_attempts(adapter: str, manifest: str) -> None:
    assert tryout.adapter_manifest_uri(adapter) == manifest
