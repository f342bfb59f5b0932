"""The operator image's Dockerfile, checked without building it: entrypoint, no trainer extra, user, read-only root."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_helpers import CHART, ROOT
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from dockerfile_helpers import dockerfile_instructions
from langmerge.cli import build_parser

DOCKERFILE = ROOT / "operator" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE)


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def args_of(kind: str, steps: list[tuple[str, str]] | None = None) -> list[str]:
    return [rest for word, rest in (steps or instructions()) if word == kind]


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_entrypoint_is_langmerge_run(pyproject: dict[str, Any]) -> None:
    (entrypoint,) = args_of("ENTRYPOINT")
    command = json.loads(entrypoint)  # exec form: SIGTERM reaches kopf, which stops cleanly
    assert command == ["langmerge", "run"]
    module_name, _, attr = pyproject["project"]["scripts"]["langmerge"].partition(":")
    assert callable(getattr(importlib.import_module(module_name), attr))
    # The chart's container args are flags of `langmerge run`.
    args = build_parser().parse_args(["run", "--liveness", "http://0.0.0.0:8080/healthz", "--verbose"])
    assert args.func.__name__ == "cmd_run" and args.liveness.endswith("/healthz")


def test_installs_the_package_without_the_trainer_extra(pyproject: dict[str, Any]) -> None:
    copied = [part for rest in args_of("COPY") if "--from" not in rest for part in rest.split()[:-1]]
    for source in copied:
        assert (ROOT / source).exists(), f"COPY source {source} is not in the repository"
    assert "trainer_image" not in copied, "the trainer package stays out of the operator image"
    installs = [rest for rest in args_of("RUN") if "pip install" in rest]
    assert installs and all(re.search(r"pip install (--[\w-]+ )*\.(\s|$)", rest) for rest in installs), installs
    assert not any("[trainer" in rest or "torch" in rest.split("pip install", 1)[1].split("&&")[0] for rest in installs)
    # What the base install pulls in: nothing heavy.
    base = " ".join(pyproject["project"]["dependencies"])
    for heavy in ("torch", "transformers", "peft", "accelerate", "safetensors"):
        assert heavy not in base
    # The build itself fails if torch or the trainer package were importable.
    assert any("find_spec('torch') is None" in rest for rest in args_of("RUN"))


#: Run with langmerge.dev unimportable, as in the image: the operator and the CLI load; a development command says
#: what is missing instead of a traceback.
_WITHOUT_DEV = """
import importlib.abc, sys

class NoDev(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "langmerge.dev" or name.startswith("langmerge.dev."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoDev())
import langmerge.controller.main, langmerge.cli
assert "langmerge.dev" not in sys.modules
sys.exit(langmerge.cli.main(["controlplane", "status"]))
"""


def test_development_tooling_stays_out_of_the_image() -> None:
    """langmerge.dev (local control plane, Job runner, sample) is removed before the install, the build fails if it
    is importable, and what the image runs needs nothing from it."""
    (install,) = [rest for rest in args_of("RUN") if "pip install" in rest]
    removal = "rm -rf operator/langmerge/dev "
    assert (ROOT / "operator" / "langmerge" / "dev").is_dir()
    assert removal in install and install.index(removal) < install.index("pip install"), install
    assert "find_spec('langmerge.dev') is None" in install
    result = subprocess.run([sys.executable, "-c", _WITHOUT_DEV], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "development tooling (langmerge.dev) is not installed here" in result.stderr, result.stderr


def test_slim_python_of_the_supported_version(pyproject: dict[str, Any]) -> None:
    args = {k: v for k, _, v in (rest.partition("=") for rest in args_of("ARG"))}
    for image in args_of("FROM"):
        name = image.split()[0]
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], name)
        repository, _, tag = resolved.partition(":")
        assert repository == "python" and tag.endswith("-slim"), resolved  # by plain name: no registry host
    assert Version(args["PYTHON_VERSION"] + ".0") in SpecifierSet(pyproject["project"]["requires-python"])


def test_runs_as_a_numeric_non_root_user_that_the_chart_uses() -> None:
    steps = final_stage()
    (user,) = args_of("USER", steps)
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit(), "numeric, so runAsNonRoot can verify it"
    kinds = [word for word, _ in steps]
    assert all(word != "RUN" for word in kinds[kinds.index("USER") :]), "nothing runs as root after USER"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["runAsGroup"] == int(gid)


def test_read_only_root_filesystem_friendly() -> None:
    env = " ".join(args_of("ENV", final_stage()))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "HOME=/tmp" in env, "anything that writes under $HOME lands in the chart's /tmp emptyDir"
    assert args_of("WORKDIR", final_stage())[-1] == "/tmp"
    # Bytecode is compiled at build time, so imports never need to write it.
    assert any("compileall" in rest for rest in args_of("RUN"))


def test_exposes_the_chart_ports() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    (exposed,) = args_of("EXPOSE")
    assert {int(p) for p in exposed.split()} == {values["probes"]["port"], values["metrics"]["port"]}


def test_names_no_package_registry_host() -> None:
    for path in (DOCKERFILE, ROOT / ".dockerignore"):
        text = path.read_text()
        assert not re.search(r"https?://", text), path
        assert "--index-url" not in text and "--extra-index-url" not in text


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()}
    ignored = {line for line in ignored if not line.startswith("#")}
    assert {".git", ".venv", "tests"} <= ignored
    # Neither image's sources are ignored (both build from the repository root).
    for needed in ("pyproject.toml", "README.md", "operator", "trainer_image"):
        assert needed not in ignored and not any(Path(needed).match(p) for p in ignored), needed
