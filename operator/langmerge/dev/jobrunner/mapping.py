"""Job-to-process mapping (pure): which local command an image and a container run, ``$(VAR)`` expansion, the
podFailurePolicy, termination messages, and a TrainJob's nodes and their torchrun variables."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from langmerge.constants import ANNOTATION_POD_FAILURE_POLICY
from langmerge.dev.jobrunner.config import (
    REASON_COMMAND,
    REASON_IMAGE,
    TERMINATION_LOG_TAIL_BYTES,
    TERMINATION_LOG_TAIL_LINES,
    TERMINATION_MESSAGE_MAX_BYTES,
    TRAINER_MODULE,
    TRAINJOB_NODE,
    ImageRule,
    Mode,
    RunnerConfig,
)

log = logging.getLogger("langmerge.jobrunner")

_PYTHON = re.compile(r"python[0-9.]*")


class NotRunnable(Exception):
    """The Job cannot run locally; ``reason`` and ``message`` go into its ``Failed`` condition."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def image_repository(image: str) -> str:
    """``registry:5000/org/name:tag@sha256:...`` -> ``registry:5000/org/name``."""
    ref = image.split("@", 1)[0]
    colon = ref.rfind(":")
    if colon > ref.rfind("/"):
        ref = ref[:colon]
    return ref


def match_image(image: str, rules: Sequence[ImageRule]) -> Mode | None:
    """The mode of the first rule whose pattern matches the image's repository, else None."""
    repository = image_repository(image.strip())
    for rule in rules:
        if fnmatch.fnmatchcase(repository, rule.pattern):
            return rule.mode
    return None


def plan_command(container: Mapping[str, Any], config: RunnerConfig) -> tuple[Mode, list[str]]:
    """The local argv of a container (before ``$(VAR)`` expansion); :class:`NotRunnable` if there is none."""
    image = str(container.get("image") or "")
    name = str(container.get("name") or "")
    mode = match_image(image, config.image_rules)
    if mode is None:
        patterns = ", ".join(repr(r.pattern) for r in config.image_rules) or "none"
        raise NotRunnable(
            REASON_IMAGE,
            f'image "{image}" of container "{name}" cannot run on the local Job runner: it runs only images whose '
            f"repository matches one of its image rules ({patterns})",
        )
    command = [str(x) for x in container.get("command") or []]
    args = [str(x) for x in container.get("args") or []]
    if mode == "host":
        if not command:
            raise NotRunnable(
                REASON_IMAGE,
                f'image "{image}" runs host commands on the local Job runner, but container "{name}" sets no '
                "command (a host image has no entrypoint)",
            )
        return mode, command + args
    tail = _trainer_tail(command, config)
    if tail is None:
        raise NotRunnable(
            REASON_COMMAND,
            f'container "{name}" of trainer image "{image}" runs {command!r}; the local Job runner runs only '
            f'"{config.trainer_command} ..." (or the image entrypoint with args) in trainer images',
        )
    return mode, [config.python, "-m", config.trainer_module, *tail, *args]


def _trainer_tail(command: list[str], config: RunnerConfig) -> list[str] | None:
    """The trainer's arguments within ``command``; None if ``command`` does not run the trainer."""
    if not command:
        return []  # the image's entrypoint is the trainer
    program = os.path.basename(command[0])
    if program == config.trainer_command:
        return command[1:]
    if (
        _PYTHON.fullmatch(program)
        and command[1:2] == ["-m"]
        and command[2:3] in ([TRAINER_MODULE], [config.trainer_module])
    ):
        return command[3:]
    return None


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined variables are replaced, ``$$`` is a literal ``$``, the rest is kept."""
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(text):
        if text[cursor] == "$" and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            nxt = text[cursor + 1]
            advance = 1
            if nxt == "$":
                out.append("$")
            elif nxt == "(":
                close = text.find(")", cursor + 2)
                if close == -1:
                    out.append("$(")
                else:
                    var = text[cursor + 2 : close]
                    out.append(env.get(var, f"$({var})"))
                    advance = close - cursor
            else:
                out.append("$" + nxt)
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    out.append(text[checkpoint:])
    return "".join(out)


# ---------------------------------------------------------------------------------------------------------------------
# Pure parts: podFailurePolicy
# ---------------------------------------------------------------------------------------------------------------------
def pod_failure_policy(job: Mapping[str, Any]) -> dict[str, Any] | None:
    """The Job's ``spec.podFailurePolicy``, else the one in its ``langmerge.dev/pod-failure-policy`` annotation."""
    policy = (job.get("spec") or {}).get("podFailurePolicy")
    if policy:
        return dict(policy)
    raw = ((job.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_POD_FAILURE_POLICY)
    if not raw:
        return None
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as err:
        log.warning("annotation %s is not JSON (%s); no podFailurePolicy", ANNOTATION_POD_FAILURE_POLICY, err)
        return None
    return parsed if isinstance(parsed, dict) else None


def container_exit_code(code: int) -> int:
    """The exit code Kubernetes reports for a process: 128 + the signal for a process killed by one."""
    return 128 - code if code < 0 else code


def match_pod_failure_policy(
    policy: Mapping[str, Any] | None,
    *,
    pod: str,
    container: str,
    exit_code: int,
    conditions: Sequence[Mapping[str, str]],
) -> tuple[str, str] | None:
    """The (action, message) of the first rule matching a failed pod, as the Job controller words it; None if none.

    ``exit_code`` is the container's (see :func:`container_exit_code`); ``conditions`` are the pod's conditions.
    """
    for index, rule in enumerate((policy or {}).get("rules") or []):
        action = str(rule.get("action") or "")
        codes = rule.get("onExitCodes")
        if codes:
            if codes.get("containerName") not in (None, container) or exit_code == 0:
                continue
            values = {int(v) for v in codes.get("values") or []}
            inside = exit_code in values
            if inside == (codes.get("operator") == "In"):
                return action, (
                    f"Container {container} for pod {pod} failed with exit code {exit_code} matching {action} rule "
                    f"at index {index}"
                )
            continue
        for pattern in rule.get("onPodConditions") or []:
            wanted = (pattern.get("type"), pattern.get("status", "True"))
            if any((c.get("type"), c.get("status")) == wanted for c in conditions):
                return action, f"Pod {pod} has condition {wanted[0]} matching {action} rule at index {index}"
    return None


def termination_message(path: Path, log_path: Path, *, fallback_to_logs: bool) -> str:
    """What kubelet would keep as the container's termination message: the file's first 4 KiB, or (with
    ``FallbackToLogsOnError``, for a failed container that wrote none) the log's last 80 lines / 2 KiB."""
    text = ""
    with contextlib.suppress(OSError):
        text = path.read_bytes()[:TERMINATION_MESSAGE_MAX_BYTES].decode("utf-8", "replace").strip()
    if text or not fallback_to_logs:
        return text
    with contextlib.suppress(OSError):
        data = log_path.read_bytes()[-TERMINATION_LOG_TAIL_BYTES:]
        text = "\n".join(data.decode("utf-8", "replace").splitlines()[-TERMINATION_LOG_TAIL_LINES:]).strip()
    return text


# ---------------------------------------------------------------------------------------------------------------------
# TrainJobs: its nodes as local processes, as Kubeflow Trainer's torch runtime would run them
# ---------------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the rendezvous port of one attempt)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def trainjob_layout(trainjob: Mapping[str, Any]) -> tuple[int, int]:
    """(numNodes, numProcPerNode) of a TrainJob's trainer (1 and 1 when unset; ``auto`` is 1 on this CPU host)."""
    trainer = (trainjob.get("spec") or {}).get("trainer") or {}
    nodes = int(trainer.get("numNodes") or 1)
    per_node = trainer.get("numProcPerNode")
    procs = int(per_node) if isinstance(per_node, int) or (isinstance(per_node, str) and per_node.isdigit()) else 1
    return nodes, procs


def trainjob_container(trainjob: Mapping[str, Any]) -> dict[str, Any]:
    """The trainer container of a TrainJob as the torch runtime builds it: the trainer's image, command, args and
    env, plus the env of the runtime patches' ``node`` container."""
    spec = trainjob.get("spec") or {}
    trainer = spec.get("trainer") or {}
    env = list(trainer.get("env") or [])
    for patch in spec.get("runtimePatches") or []:
        template = ((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}
        for job in template.get("replicatedJobs") or []:
            pod = (((job.get("template") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
            for container in pod.get("containers") or []:
                if container.get("name") == TRAINJOB_NODE:
                    env += list(container.get("env") or [])
    return {
        "name": TRAINJOB_NODE,
        "image": trainer.get("image") or "",
        "command": list(trainer.get("command") or []),
        "args": list(trainer.get("args") or []),
        "env": env,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def torch_env(*, nodes: int, per_node: int, node_rank: int, port: int) -> dict[str, str]:
    """What Kubeflow Trainer's torch plugin injects into the node containers (torchrun reads ``PET_*``)."""
    return {
        "PET_NNODES": str(nodes),
        "PET_NPROC_PER_NODE": str(per_node),
        "PET_NODE_RANK": str(node_rank),
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(port),
    }
