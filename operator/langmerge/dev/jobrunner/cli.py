"""``langmerge jobrunner``: the local Job runner from the command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from langmerge.dev.jobrunner.config import DEFAULT_TRAINER_PATTERN, HOST_IMAGE, ImageRule, RunnerConfig, RunnerError
from langmerge.dev.jobrunner.runner import LocalJobRunner


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="langmerge jobrunner",
        description="Run the Jobs of a local development API server as local processes (what kubelet and the Job "
        "controller would do). Development only.",
    )
    parser.add_argument("--kubeconfig", help="kubeconfig of the local API server (default: $KUBECONFIG)")
    parser.add_argument("--parallel", type=int, default=1, help="most Jobs running at once (default 1)")
    parser.add_argument(
        "--work-dir", default=".langmerge/jobrunner", help="scratch folders and logs (default .langmerge/jobrunner)"
    )
    parser.add_argument("--logs-dir", help="attempt logs (default WORK_DIR/_logs)")
    parser.add_argument("--namespace", "-n", help="run only Jobs in this namespace (default: all)")
    parser.add_argument("--selector", "-l", help="run only Jobs matching this label selector")
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
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        type=_env_pair,
        metavar="KEY=VALUE",
        help="extra environment for every Job's process, e.g. HF_HOME=/path/to/shared/cache (repeatable)",
    )
    parser.add_argument("--resync-seconds", type=float, default=30.0, help="seconds between full re-lists")
    parser.add_argument("--kill-grace-seconds", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("--retry-delay-seconds", type=float, default=1.0, help="first delay before a retry")
    parser.add_argument(
        "--allow-remote", action="store_true", help="allow an API server that is not on this machine (dangerous)"
    )
    parser.add_argument("--log-level", default="INFO")
    return parser


def _is_loopback(url: str) -> bool:
    host = (urlparse(url).hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def main(argv: Sequence[str] | None = None) -> int:
    """``langmerge jobrunner``: run until SIGINT or SIGTERM."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from langmerge.kube import load_client

    api = load_client(args.kubeconfig)
    host = str(api.configuration.host)
    if not _is_loopback(host) and not args.allow_remote:
        print(
            f"refusing to run Jobs of {host}: the local Job runner executes what Jobs say on this machine; it is meant "
            "for the local development API server (pass --allow-remote to override)",
            file=sys.stderr,
        )
        return 2
    rules = tuple(ImageRule(p, "trainer") for p in (args.trainer_image or [DEFAULT_TRAINER_PATTERN]))
    rules += tuple(ImageRule(p, "host") for p in args.host_image)
    try:
        config = RunnerConfig(
            work_root=Path(args.work_dir).resolve(),
            logs_dir=Path(args.logs_dir).resolve() if args.logs_dir else None,
            parallel=args.parallel,
            namespace=args.namespace,
            label_selector=args.selector,
            image_rules=rules,
            python=args.python,
            extra_env=(("PYTHONUNBUFFERED", "1"), *args.env),
            resync_seconds=args.resync_seconds,
            kill_grace_seconds=args.kill_grace_seconds,
            retry_delay_seconds=args.retry_delay_seconds,
        )
    except ValueError as err:
        print(f"langmerge jobrunner: {err}", file=sys.stderr)
        return 2
    runner = LocalJobRunner(api, config)

    def on_signal(signum: int, frame: object) -> None:
        runner.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        runner.run_forever()
    except RunnerError as err:
        print(f"langmerge jobrunner: {err}", file=sys.stderr)
        return 1
    return 0
