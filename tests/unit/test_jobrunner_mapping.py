"""The local Job runner's pure parts: image rules, command mapping, ``$(VAR)`` expansion, configuration."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from langmerge.dev.jobrunner import (
    DEFAULT_TRAINER_PATTERN,
    HOST_IMAGE,
    REASON_COMMAND,
    REASON_IMAGE,
    ImageRule,
    NotRunnable,
    RunnerConfig,
    build_parser,
    expand,
    image_repository,
    match_image,
    plan_command,
)

RULES = (ImageRule(DEFAULT_TRAINER_PATTERN, "trainer"), ImageRule(HOST_IMAGE, "host"))


def config(**kw: Any) -> RunnerConfig:
    return RunnerConfig(work_root=Path("/tmp/unused"), image_rules=RULES, python="/venv/bin/python", **kw)


@pytest.mark.parametrize(
    ("image", "repository"),
    [
        ("langmerge/trainer:0.1.0", "langmerge/trainer"),
        ("langmerge/trainer", "langmerge/trainer"),
        ("registry.local:5000/team/langmerge-trainer:1.2", "registry.local:5000/team/langmerge-trainer"),
        ("registry.local:5000/langmerge-trainer", "registry.local:5000/langmerge-trainer"),
        ("ghcr.io/x/langmerge-trainer@sha256:abc", "ghcr.io/x/langmerge-trainer"),
        ("ghcr.io/x/langmerge-trainer:v1@sha256:abc", "ghcr.io/x/langmerge-trainer"),
        ("busybox", "busybox"),
    ],
)
def test_image_repository(image: str, repository: str) -> None:
    assert image_repository(image) == repository


@pytest.mark.parametrize(
    ("image", "mode"),
    [
        ("langmerge/trainer:0.1.0", "trainer"),
        ("ghcr.io/acme/langmerge-trainer:2", "trainer"),
        ("langmerge.local/host", "host"),
        ("langmerge.local/host:latest", "host"),
        ("busybox:1.36", None),
        ("langmerge/operator:0.1.0", None),
        # The tag is not part of the match: a "trainer" tag does not make an image a trainer.
        ("busybox:langmerge-trainer", None),
        # Case-sensitive, like image references.
        ("LANGMERGE/TRAINER", None),
    ],
)
def test_match_image(image: str, mode: str | None) -> None:
    assert match_image(image, RULES) == mode


def test_first_matching_rule_wins() -> None:
    rules = (ImageRule("langmerge.local/*", "host"), ImageRule("*", "trainer"))
    assert match_image("langmerge.local/trainer", rules) == "host"
    assert match_image("anything", rules) == "trainer"
    assert match_image("anything", ()) is None


@pytest.mark.parametrize(
    ("command", "args", "expected_tail"),
    [
        (["langmerge-trainer", "train", "--task", "@t.json"], None, ["train", "--task", "@t.json"]),
        (["/usr/local/bin/langmerge-trainer"], ["merge", "--task", "{}"], ["merge", "--task", "{}"]),
        (["langmerge-trainer", "train"], ["--device", "cpu"], ["train", "--device", "cpu"]),
        # No command: the image's entrypoint is the trainer, args follow it.
        (None, ["evaluate", "--output", "o"], ["evaluate", "--output", "o"]),
        ([], ["--help"], ["--help"]),
        (["python", "-m", "langmerge_trainer", "train"], None, ["train"]),
        (["/usr/bin/python3.11", "-m", "langmerge_trainer"], ["merge"], ["merge"]),
    ],
)
def test_trainer_mode_runs_the_projects_python(
    command: list[str] | None, args: list[str] | None, expected_tail: list[str]
) -> None:
    container: dict[str, Any] = {"name": "trainer", "image": "langmerge/trainer:0.1.0"}
    if command is not None:
        container["command"] = command
    if args is not None:
        container["args"] = args
    mode, argv = plan_command(container, config())
    assert mode == "trainer"
    assert argv == ["/venv/bin/python", "-m", "langmerge_trainer", *expected_tail]


def test_trainer_mode_uses_configured_python_and_module() -> None:
    cfg = RunnerConfig(work_root=Path("/w"), trainer_module="fake_trainer")
    _, argv = plan_command({"name": "c", "image": "langmerge/trainer:1", "command": ["langmerge-trainer", "x"]}, cfg)
    assert argv == [sys.executable, "-m", "fake_trainer", "x"]


def test_trainer_image_with_a_foreign_command_is_refused() -> None:
    container = {"name": "trainer", "image": "langmerge/trainer:0.1.0", "command": ["sh", "-c", "rm -rf /"]}
    with pytest.raises(NotRunnable) as info:
        plan_command(container, config())
    assert info.value.reason == REASON_COMMAND
    assert "langmerge/trainer:0.1.0" in info.value.message
    assert "langmerge-trainer" in info.value.message


def test_host_mode_runs_command_and_args_as_is() -> None:
    container = {"name": "c", "image": HOST_IMAGE, "command": ["sh", "-c"], "args": ["echo $(X) $$HOME"]}
    assert plan_command(container, config()) == ("host", ["sh", "-c", "echo $(X) $$HOME"])


def test_host_mode_needs_a_command() -> None:
    with pytest.raises(NotRunnable) as info:
        plan_command({"name": "c", "image": HOST_IMAGE, "args": ["x"]}, config())
    assert info.value.reason == REASON_IMAGE
    assert "sets no command" in info.value.message


def test_unknown_image_names_the_image_and_the_rules() -> None:
    with pytest.raises(NotRunnable) as info:
        plan_command({"name": "main", "image": "busybox:1.36", "command": ["true"]}, config())
    assert info.value.reason == REASON_IMAGE
    assert '"busybox:1.36"' in info.value.message
    assert '"main"' in info.value.message
    assert DEFAULT_TRAINER_PATTERN in info.value.message


def test_host_mode_is_off_by_default() -> None:
    cfg = RunnerConfig(work_root=Path("/w"))
    with pytest.raises(NotRunnable):
        plan_command({"name": "c", "image": HOST_IMAGE, "command": ["sh"]}, cfg)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)", "a"),
        ("x$(A)y$(B)z", "xaybz"),
        ("$(MISSING)", "$(MISSING)"),
        ("$$(A)", "$(A)"),
        ("$$$(A)", "$a"),
        ("$$", "$"),
        ("$", "$"),
        ("a$", "a$"),
        ("$(A", "$(A"),
        ("$A", "$A"),
        ("$()", "$()"),
        ("$(A)$(A)", "aa"),
        ("no refs", "no refs"),
        ("$(EMPTY)-", "-"),
        ("$(A)$", "a$"),
    ],
)
def test_expand_like_kubernetes(text: str, expected: str) -> None:
    assert expand(text, {"A": "a", "B": "b", "EMPTY": ""}) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"parallel": 0},
        {"resync_seconds": 0},
        {"poll_seconds": -1},
        {"watch_timeout_seconds": 0},
        {"kill_grace_seconds": -1},
        {"image_rules": (ImageRule("*", "docker"),)},  # type: ignore[arg-type]
        {"extra_env": (("A=B", "c"),)},
    ],
)
def test_config_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RunnerConfig(work_root=Path("/w"), **kwargs)


def test_config_paths() -> None:
    cfg = RunnerConfig(work_root=Path("/w"))
    assert cfg.logs_path == Path("/w/_logs")
    assert cfg.attempt_dir("ns", "job", 2) == Path("/w/ns/job/2")
    assert cfg.attempt_log("ns", "job", 2) == Path("/w/_logs/ns_job_2.log")
    assert RunnerConfig(work_root=Path("/w"), logs_dir=Path("/l")).attempt_log("a", "b", 0) == Path("/l/a_b_0.log")


def test_cli_flags() -> None:
    args = build_parser().parse_args(
        [
            "--kubeconfig",
            "kc",
            "--parallel",
            "3",
            "--work-dir",
            "w",
            "--host-image",
            HOST_IMAGE,
            "--env",
            "HF_HOME=/cache",
            "--env",
            "A=b=c",
        ]
    )
    assert (args.kubeconfig, args.parallel, args.work_dir) == ("kc", 3, "w")
    assert args.host_image == [HOST_IMAGE]
    assert args.env == [("HF_HOME", "/cache"), ("A", "b=c")]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--env", "novalue"])
