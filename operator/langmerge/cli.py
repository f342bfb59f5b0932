"""The ``langmerge`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

DEFAULT_STATE = ".langmerge"


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state or os.environ.get("LANGMERGE_STATE") or DEFAULT_STATE)


def cmd_crds(args: argparse.Namespace) -> int:
    from langmerge.api.crdgen import all_crds, render, write_crds

    out = Path(args.output)
    if args.check:
        stale = [
            name
            for name, crd in all_crds().items()
            if not (out / name).exists() or (out / name).read_text(encoding="utf-8") != render(crd)
        ]
        for name in stale:
            print(f"stale: {out / name}", file=sys.stderr)
        return 1 if stale else 0
    for path in write_crds(out):
        print(path)
    return 0


def cmd_controlplane(args: argparse.Namespace) -> int:
    from langmerge.dev import tools
    from langmerge.dev.controlplane import ControlPlane

    cp = ControlPlane(_state_dir(args))
    if args.action == "build":
        tools.ensure_kube_binaries()
        print(tools.kube_bin_dir())
        return 0
    if args.action == "start":
        endpoints = cp.start()
        from langmerge.kube import install_crds, load_client

        install_crds(load_client(endpoints.kubeconfig))
        print(f"kube-apiserver {endpoints.apiserver_url}   S3 {endpoints.s3_endpoint}")
        print(f"environment: source {cp.dir / 'env.sh'}")
        return 0
    if args.action == "stop":
        cp.stop()
        return 0
    print(json.dumps(cp.status(), indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run the operator (kopf) in the foreground."""
    import kopf

    import langmerge.controller.main  # noqa: F401  (registers the handlers)
    from langmerge.settings import Settings

    settings = Settings.from_env()
    namespaces = list(args.namespace or settings.namespaces)
    kopf.configure(verbose=args.verbose)
    kopf.run(
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=args.liveness or None,
    )
    return 0


def cmd_jobrunner(args: argparse.Namespace) -> int:
    """The local Job runner (development only): runs Jobs of the local control plane as local processes."""
    from langmerge.dev import jobrunner

    rest = list(args.rest)
    if not any(a == "--kubeconfig" or a.startswith("--kubeconfig=") for a in rest):
        kubeconfig = _state_dir(args) / "kubeconfig"
        if kubeconfig.exists():
            rest = ["--kubeconfig", str(kubeconfig), *rest]
    return jobrunner.main(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="langmerge", description=__doc__)
    parser.add_argument("--state", help=f"local state folder (default ${{LANGMERGE_STATE}} or {DEFAULT_STATE})")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("crds", help="generate the CRDs from the API models")
    p.add_argument("--output", "-o", default="crds")
    p.add_argument("--check", action="store_true", help="exit 1 if the files differ from the generated ones")
    p.set_defaults(func=cmd_crds)

    p = sub.add_parser("controlplane", help="the local control plane: kube-apiserver, etcd, S3 (development)")
    p.add_argument("action", choices=["build", "start", "stop", "status"])
    p.set_defaults(func=cmd_controlplane)

    p = sub.add_parser("run", help="run the operator (watches LanguageExperts and MergedModels)")
    p.add_argument("--namespace", "-n", action="append", help="namespace to watch (repeatable; default: all)")
    p.add_argument("--liveness", default="", help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "jobrunner",
        help="development only: run the local control plane's Jobs as local processes (see --help after it)",
        add_help=False,
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_jobrunner)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "jobrunner":
        args.rest = [*unknown, *args.rest]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
