"""``langmerge jobrunner``: the local Job runner from the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from langmerge.dev import runnercli
from langmerge.dev.jobrunner.config import DEFAULT_TRAINER_PATTERN, HOST_IMAGE, ImageRule, RunnerConfig
from langmerge.dev.jobrunner.runner import LocalJobRunner


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="langmerge jobrunner",
        description="Run the Jobs of a local development API server as local processes (what kubelet and the Job "
        "controller would do). Development only.",
    )
    parser.add_argument("--kubeconfig", help="kubeconfig of the local API server (default: $KUBECONFIG)")
    parser.add_argument("--parallel", type=int, default=1, help="most Jobs running at once (default 1)")
    runnercli.add_folder_and_scope_options(
        parser, work_dir=".langmerge/jobrunner", folders="scratch folders", logs="attempt logs", only="run only Jobs"
    )
    parser.add_argument(
        "--trainer-image",
        action="append",
        metavar="PATTERN",
        help=f"repository pattern of trainer images (repeatable; default {DEFAULT_TRAINER_PATTERN!r})",
    )
    parser.add_argument(
        "--host-image",
        action="append",
        default=[],
        metavar="PATTERN",
        help=f"repository pattern of images whose command runs as-is on this host (repeatable; e.g. {HOST_IMAGE})",
    )
    parser.add_argument("--python", default=sys.executable, help="Python that runs langmerge-trainer")
    runnercli.add_env_option(
        parser, "extra environment for every Job's process, e.g. HF_HOME=/path/to/shared/cache (repeatable)"
    )
    parser.add_argument("--resync-seconds", type=float, default=30.0, help="seconds between full re-lists")
    parser.add_argument("--kill-grace-seconds", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("--retry-delay-seconds", type=float, default=1.0, help="first delay before a retry")
    runnercli.add_safety_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``langmerge jobrunner``: run until SIGINT or SIGTERM."""
    args = build_parser().parse_args(argv)
    return runnercli.run(
        args,
        "langmerge jobrunner",
        refusal=("run Jobs of", "the local Job runner executes what Jobs say on this machine"),
        runner=lambda api: LocalJobRunner(api, _config(args)),
    )


def _config(args: argparse.Namespace) -> RunnerConfig:
    rules = tuple(ImageRule(p, "trainer") for p in (args.trainer_image or [DEFAULT_TRAINER_PATTERN]))
    rules += tuple(ImageRule(p, "host") for p in args.host_image)
    return RunnerConfig(
        **runnercli.folders_and_scope(args),
        parallel=args.parallel,
        image_rules=rules,
        python=args.python,
        extra_env=(("PYTHONUNBUFFERED", "1"), *args.env),
        resync_seconds=args.resync_seconds,
        kill_grace_seconds=args.kill_grace_seconds,
        retry_delay_seconds=args.retry_delay_seconds,
    )
