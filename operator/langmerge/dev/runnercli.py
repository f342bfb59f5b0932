"""The command-line pieces both local runners share (``langmerge jobrunner`` and ``python -m langmerge.dev.serving``):
the work and logs folders and the namespace and label selector, ``--env KEY=VALUE``, ``--allow-remote`` and
``--log-level``, connecting to the local API server only, and running until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import urlparse

from langmerge.dev.watching import LocalRunner


class FoldersAndScope(TypedDict):
    """What :func:`add_folder_and_scope_options` reads, as config fields."""

    work_root: Path
    logs_dir: Path | None
    namespace: str | None
    label_selector: str | None


def add_folder_and_scope_options(
    parser: argparse.ArgumentParser, *, work_dir: str, folders: str, logs: str, only: str
) -> None:
    """``--work-dir`` (default ``work_dir``: ``folders`` and logs), ``--logs-dir`` (``logs``), ``--namespace``/``-n``
    and ``--selector``/``-l`` (``only``: "run only Jobs"); :func:`folders_and_scope` reads them."""
    parser.add_argument("--work-dir", default=work_dir, help=f"{folders} and logs (default {work_dir})")
    parser.add_argument("--logs-dir", help=f"{logs} (default WORK_DIR/_logs)")
    parser.add_argument("--namespace", "-n", help=f"{only} in this namespace (default: all)")
    parser.add_argument("--selector", "-l", help=f"{only} matching this label selector")


def folders_and_scope(args: argparse.Namespace) -> FoldersAndScope:
    """The options of :func:`add_folder_and_scope_options` as config fields (folders made absolute)."""
    return {
        "work_root": Path(args.work_dir).resolve(),
        "logs_dir": Path(args.logs_dir).resolve() if args.logs_dir else None,
        "namespace": args.namespace,
        "label_selector": args.selector,
    }


def env_pair(text: str) -> tuple[str, str]:
    """An ``argparse`` type: ``KEY=VALUE`` (the value may hold ``=``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_env_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--env KEY=VALUE`` (repeatable): ``args.env``, a list of pairs."""
    parser.add_argument("--env", action="append", default=[], type=env_pair, metavar="KEY=VALUE", help=help)


def add_safety_options(parser: argparse.ArgumentParser) -> None:
    """``--allow-remote`` and ``--log-level``, the last options of a runner's command line."""
    parser.add_argument(
        "--allow-remote", action="store_true", help="allow an API server that is not on this machine (dangerous)"
    )
    parser.add_argument("--log-level", default="INFO")


def is_loopback(url: str) -> bool:
    host = (urlparse(url).hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def connect(args: argparse.Namespace, action: str, reason: str) -> Any | None:
    """Log at ``--log-level``, then the API client of ``--kubeconfig``; None, having said on stderr ``refusing to
    <action> <host>: <reason>; ...``, if the API server is not on this machine and ``--allow-remote`` was not given."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from langmerge.kube import load_client

    api = load_client(args.kubeconfig)
    host = str(api.configuration.host)
    if not is_loopback(host) and not args.allow_remote:
        print(
            f"refusing to {action} {host}: {reason}; it is meant for the local development API server (pass "
            "--allow-remote to override)",
            file=sys.stderr,
        )
        return None
    return api


def run_until_signalled(runner: LocalRunner[Any], prog: str) -> int:
    """Run ``runner`` until SIGTERM or SIGINT: 0, or 1 (said on stderr) if it cannot start."""

    def on_signal(signum: int, frame: object) -> None:
        runner.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        runner.run_forever()
    except runner.error as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    return 0


def run(
    args: argparse.Namespace, prog: str, *, refusal: tuple[str, str], runner: Callable[[Any], LocalRunner[Any]]
) -> int:
    """A runner's command line once ``args`` are parsed: :func:`connect` (``refusal``: its ``action`` and ``reason``;
    2 if it refuses), then ``runner(api_client)`` (2, said on stderr, if its configuration is invalid:
    ``ValueError``), run by :func:`run_until_signalled`."""
    api = connect(args, *refusal)
    if api is None:
        return 2
    try:
        made = runner(api)
    except ValueError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    return run_until_signalled(made, prog)
