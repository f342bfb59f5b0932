"""``python -m langmerge.dev.serving``: the local serving runner (what KServe would do for InferenceServices) until
SIGTERM or SIGINT. Development only.

The model servers get the S3 endpoint and credentials of this process's environment (:data:`PASSTHROUGH_ENV`) plus
any ``--env KEY=VALUE``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from langmerge.dev import runnercli
from langmerge.dev.serving.runner import (
    DEFAULT_COMMAND,
    PASSTHROUGH_ENV,
    LocalServingRunner,
    ServingConfig,
    passthrough_env,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m langmerge.dev.serving",
        description="Serve the InferenceServices of a local development API server with local model-server "
        "processes (what KServe would do). Development only.",
    )
    parser.add_argument("--kubeconfig", help="kubeconfig of the local API server (default: $KUBECONFIG)")
    runnercli.add_folder_and_scope_options(
        parser,
        work_dir=".langmerge/serving",
        folders="working folders",
        logs="model-server logs",
        only="serve only InferenceServices",
    )
    parser.add_argument("--python", default=sys.executable, help="the Python of {python} in the command")
    parser.add_argument(
        "--command",
        help=f"model-server command template (shell words; default {shlex.join(DEFAULT_COMMAND)!r})",
    )
    runnercli.add_env_option(
        parser, f"extra environment of every model server (repeatable; {', '.join(PASSTHROUGH_ENV)} pass through)"
    )
    parser.add_argument("--ready-timeout-seconds", type=float, default=900.0, help="longest model load (seconds)")
    parser.add_argument("--drain-timeout-seconds", type=float, default=60.0, help="longest drain of an old revision")
    parser.add_argument("--resync-seconds", type=float, default=30.0, help="seconds between full re-lists")
    runnercli.add_safety_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return runnercli.run(
        args,
        "langmerge serving",
        refusal=("serve the InferenceServices of", "this runner starts what they name on this machine"),
        runner=lambda api: LocalServingRunner(api, _config(args)),
    )


def _config(args: argparse.Namespace) -> ServingConfig:
    return ServingConfig(
        **runnercli.folders_and_scope(args),
        python=args.python,
        command_template=tuple(shlex.split(args.command)) if args.command else DEFAULT_COMMAND,
        extra_env=(("PYTHONUNBUFFERED", "1"), *passthrough_env(), *args.env),
        ready_timeout_seconds=args.ready_timeout_seconds,
        drain_timeout_seconds=args.drain_timeout_seconds,
        resync_seconds=args.resync_seconds,
    )


if __name__ == "__main__":
    sys.exit(main())
