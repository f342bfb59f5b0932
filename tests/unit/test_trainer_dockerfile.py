"""The trainer image's Dockerfile, checked without building it: entrypoint, Python and torch versions, user, sources."""

from __future__ import annotations

import importlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from dockerfile_helpers import dockerfile_instructions

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "trainer_image" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE)


def args_of(kind: str) -> list[str]:
    return [rest for word, rest in instructions() if word == kind]


def build_args() -> dict[str, str]:
    values: dict[str, str] = {}
    for rest in args_of("ARG"):
        name, _, default = rest.partition("=")
        values.setdefault(name, default)
    return values


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_entrypoint_is_a_real_console_script(pyproject: dict[str, Any]) -> None:
    (entrypoint,) = args_of("ENTRYPOINT")
    command = json.loads(entrypoint)  # exec form: signals reach the trainer (it checkpoints on SIGTERM)
    assert isinstance(command, list) and command
    scripts = pyproject["project"]["scripts"]
    assert command[0] in scripts, f"{command[0]} is not a console script of the package"
    module_name, _, attr = scripts[command[0]].partition(":")
    target = getattr(importlib.import_module(module_name), attr)
    assert callable(target)


def test_python_version_matches_pyproject(pyproject: dict[str, Any]) -> None:
    python = build_args()["PYTHON_VERSION"]
    assert Version(python + ".0") in SpecifierSet(pyproject["project"]["requires-python"])
    # The build asserts the base image's Python is that version.
    assert any("sys.version_info" in rest and "${PYTHON_VERSION}" in rest for rest in args_of("RUN"))


def test_base_image_carries_the_pinned_torch(pyproject: dict[str, Any]) -> None:
    (image,) = args_of("FROM")
    args = build_args()
    resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
    repository, _, tag = resolved.partition(":")
    first = repository.split("/")[0]
    assert "." not in first and ":" not in first, "the image names no registry host"
    assert repository == "pytorch/pytorch" and "cuda" in tag
    pins = [req for req in pyproject["project"]["optional-dependencies"]["trainer"] if req.startswith("torch")]
    assert pins == [f"torch=={args['TORCH_VERSION']}"]
    assert tag.startswith(args["TORCH_VERSION"] + "-")


def test_package_installed_with_the_trainer_and_serving_extras_from_copied_sources() -> None:
    copied = [part for rest in args_of("COPY") for part in rest.split()[:-1]]
    for source in copied:
        assert (ROOT / source).exists(), f"COPY source {source} is not in the repository"
    assert {"pyproject.toml", "operator", "trainer_image"} <= set(copied)
    # The same image trains, merges and (``langmerge-trainer serve``, on KServe's model server) serves.
    assert any('pip install ".[trainer,serving]"' in rest for rest in args_of("RUN"))


def test_runs_as_non_root() -> None:
    kinds = [word for word, _rest in instructions()]
    users = args_of("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    last_user = max(i for i, word in enumerate(kinds) if word == "USER")
    assert all(word != "RUN" for word in kinds[last_user:]), "nothing runs as root after USER"


def test_names_no_package_registry_host() -> None:
    text = DOCKERFILE.read_text()
    assert not re.search(r"https?://", text)
    assert "--index-url" not in text and "--extra-index-url" not in text
