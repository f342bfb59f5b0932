"""``python -m langmerge.dev.serving``: the local serving runner (what KServe would do for InferenceServices) until
SIGTERM or SIGINT. Development only.

The model servers get the S3 endpoint and credentials of this process's environment (:data:`PASSTHROUGH_ENV`) plus
any ``--env KEY=VALUE``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from langmerge.dev.serving.runner import (
    DEFAULT_COMMAND,
    PASSTHROUGH_ENV,
    LocalServingRunner,
    ServingConfig,
    ServingError,
    passthrough_env,
)


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m langmerge.dev.serving",
        description="Serve the InferenceServices of a local development API server with local model-server "
        "processes (what KServe would do). Development only.",
    )
    parser.add_argument("--kubeconfig", help="kubeconfig of the local API server (default: $KUBECONFIG)")
    parser.add_argument(
        "--work-dir", default=".langmerge/serving", help="working folders and logs (default .langmerge/serving)"
    )
    parser.add_argument("--logs-dir", help="model-server logs (default WORK_DIR/_logs)")
    parser.add_argument("--namespace", "-n", help="serve only InferenceServices in this namespace (default: all)")
    parser.add_argument("--selector", "-l", help="serve only InferenceServices matching this label selector")
    parser.add_argument("--python", default=sys.executable, help="the Python of {python} in the command")
    parser.add_argument(
        "--command",
        help=f"model-server command template (shell words; default {shlex.join(DEFAULT_COMMAND)!r})",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        type=_env_pair,
        metavar="KEY=VALUE",
        help=f"extra environment of every model server (repeatable; {', '.join(PASSTHROUGH_ENV)} pass through)",
    )
    parser.add_argument("--ready-timeout-seconds", type=float, default=900.0, help="longest model load (seconds)")
    parser.add_argument("--drain-timeout-seconds", type=float, default=60.0, help="longest drain of an old revision")
    parser.add_argument("--resync-seconds", type=float, default=30.0, help="seconds between full re-lists")
    parser.add_argument(
        "--allow-remote", action="store_true", help="allow an API server that is not on this machine (dangerous)"
    )
    parser.add_argument("--log-level", default="INFO")
    return parser


def _is_loopback(url: str) -> bool:
    host = (urlparse(url).hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from langmerge.kube import load_client

    api = load_client(args.kubeconfig)
    host = str(api.configuration.host)
    if not _is_loopback(host) and not args.allow_remote:
        print(
            f"refusing to serve the InferenceServices of {host}: this runner starts what they name on this machine; "
            "it is meant for the local development API server (pass --allow-remote to override)",
            file=sys.stderr,
        )
        return 2
    try:
        config = ServingConfig(
            work_root=Path(args.work_dir).resolve(),
            logs_dir=Path(args.logs_dir).resolve() if args.logs_dir else None,
            namespace=args.namespace,
            label_selector=args.selector,
            python=args.python,
            command_template=tuple(shlex.split(args.command)) if args.command else DEFAULT_COMMAND,
            extra_env=(("PYTHONUNBUFFERED", "1"), *passthrough_env(), *args.env),
            ready_timeout_seconds=args.ready_timeout_seconds,
            drain_timeout_seconds=args.drain_timeout_seconds,
            resync_seconds=args.resync_seconds,
        )
    except ValueError as err:
        print(f"langmerge serving: {err}", file=sys.stderr)
        return 2
    runner = LocalServingRunner(api, config)

    def on_signal(signum: int, frame: object) -> None:
        runner.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        runner.run_forever()
    except ServingError as err:
        print(f"langmerge serving: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
