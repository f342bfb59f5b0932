"""``merge-local CONFIG.yaml OUT``: merge language adapters on this machine, like mergekit's ``mergekit-yaml``.

Inputs are local folders or ``s3://`` prefixes (downloaded through :class:`langmerge.store.ObjectStore` into a cache,
reached with ``LANGMERGE_S3_ENDPOINT`` and the usual AWS credentials). OUT receives the model files (a PEFT adapter
or sharded full weights) and, last, ``manifest.json`` (``langmerge.artifacts.MergeManifest`` fields). The manifest's
fingerprint hashes every input (method, parameters, adapter digests and weights, base model digest, output settings,
engine version): a second run with the same inputs into the same OUT finds the fingerprint and does nothing.

``--dry-run`` prints the plan (modules, ranks, method and parameters, output rank, estimated memory) and writes
nothing. The operator's ``langmerge merge`` runs ``python -m langmerge_trainer merge-local ...``; this module's
:func:`main` takes the arguments after ``merge-local`` (a leading ``merge-local`` is accepted too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langmerge.api.merged import Search
from langmerge.artifacts import (
    MANIFEST,
    BaseModelIdentity,
    Cost,
    FileEntry,
    MergeInputRecord,
    MergeManifest,
    SearchRecord,
    Versions,
    utcnow,
)
from langmerge.fingerprint import digest
from langmerge.store import ObjectStore, StoreError, file_sha256, files_digest
from langmerge_trainer.merge.adapters import AdapterError, LoraAdapter
from langmerge_trainer.merge.config import ConfigError, MergeConfig, is_s3, load_config

if TYPE_CHECKING:
    from langmerge_trainer.merge.engine import AdapterInput, MergeReport

#: Files never part of a folder's digest: hidden files and partial downloads.
_SKIP_SUFFIXES = (".part",)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def default_cache() -> Path:
    return Path(os.environ.get("LANGMERGE_CACHE") or Path.home() / ".cache" / "langmerge")


class Inputs:
    """Resolves config locations to local folders (downloading s3:// ones) and digests them (cached by mtime)."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self._store: ObjectStore | None = None
        self._digests_path = cache / "digests.json"
        try:
            self._digests: dict[str, str] = json.loads(self._digests_path.read_text())
        except (OSError, ValueError):
            self._digests = {}

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = ObjectStore.from_config()
        return self._store

    def listing_digest(self, uri: str) -> str:
        found, count = self.store.prefix_digest(uri)
        if count == 0:
            raise StoreError(f"nothing found under {uri}")
        return found

    def download(self, uri: str) -> Path:
        """A local copy of the objects under ``uri``, in a cache folder keyed by their listing digest."""
        bucket_and_key = uri.removeprefix("s3://").strip("/")
        target = self.cache / "s3" / bucket_and_key / self.listing_digest(uri)
        _log(f"downloading {uri} -> {target}")
        self.store.download_prefix(uri, target)
        return target

    def folder_digest(self, folder: Path) -> str:
        """``files_digest`` over (name, size, sha256) of the folder's files; sha256s cached by (path, size, mtime)."""
        if not folder.is_dir():
            raise ConfigError(f"{folder}: not a folder")
        files: dict[str, tuple[int, str]] = {}
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            if not path.is_file() or any(p.startswith(".") for p in rel.split("/")) or rel.endswith(_SKIP_SUFFIXES):
                continue
            stat = path.stat()
            key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
            sha = self._digests.get(key)
            if sha is None:
                sha = file_sha256(path)
                self._digests[key] = sha
            files[rel] = (stat.st_size, sha)
        if not files:
            raise ConfigError(f"{folder}: empty folder")
        return files_digest(files)

    def save(self) -> None:
        with contextlib.suppress(OSError):
            self.cache.mkdir(parents=True, exist_ok=True)
            tmp = self._digests_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._digests, sort_keys=True))
            tmp.replace(self._digests_path)


def _validation_digest(inputs: Inputs, location: str) -> str:
    if is_s3(location):
        return inputs.listing_digest(location)
    path = Path(location)
    if path.is_file():
        return file_sha256(path)
    return inputs.folder_digest(path)


def read_validation(inputs: Inputs, location: str, labels: Sequence[str] | None) -> list[Any]:
    """The examples of a `validation:` location: a .jsonl file, a folder of them or an s3:// prefix."""
    from langmerge_trainer.data import parse_jsonl, read_examples

    if is_s3(location):
        examples, _skipped, _files = read_examples(inputs.store, location, labels=labels)
        return examples
    path = Path(location)
    files = [path] if path.is_file() else sorted(path.rglob("*.jsonl"))
    out = []
    for file in files:
        rows, _ = parse_jsonl(file.read_bytes(), source=str(file), labels=labels)
        out.extend(rows)
    if not out:
        raise ConfigError(f"{location}: no validation examples")
    return out


def fingerprint(
    config: MergeConfig,
    parameters: dict[str, Any],
    adapters: list[dict[str, Any]],
    base: str,
    search: dict[str, Any] | None = None,
) -> str:
    from langmerge_trainer.merge.engine import ENGINE_VERSION

    counts = {a.language: a.label_counts for a in config.adapters if a.label_counts is not None}
    return digest(
        {
            **({"search": search} if search is not None else {}),
            # configs without label counts keep their fingerprints
            **({"labelCounts": counts, "labels": config.labels} if counts else {}),
            "v": 1,
            "engine": ENGINE_VERSION,
            "langmerge": version("langmerge"),
            "method": config.method,
            "parameters": parameters,
            "inputs": sorted([a["language"], a["digest"], a["weight"]] for a in adapters),
            "base": base,
            "output": {
                "format": config.output.format,
                "rank": config.output.rank,
                "maxRelativeError": config.output.max_relative_error,
                "maxRank": config.output.max_rank,
                "shardSizeMb": config.output.shard_size_mb,
            },
        }
    )


def up_to_date(out: Path, fp: str) -> bool:
    """OUT holds a complete output (its manifest, every file at its size) for this fingerprint."""
    try:
        manifest = MergeManifest.model_validate_json((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.fingerprint != fp:
        return False
    return all((out / name).is_file() and (out / name).stat().st_size == f.size for name, f in manifest.files.items())


def _versions() -> Versions:
    import torch

    return Versions(
        langmerge=version("langmerge"),
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=version("transformers"),
        peft=version("peft"),
        cuda=torch.version.cuda if torch.cuda.is_available() else None,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["merge-local"]:
        args = args[1:]
    parser = argparse.ArgumentParser(
        prog="merge-local",
        description="Merge per-language LoRA adapters into one model (a PEFT adapter or full merged weights).",
    )
    parser.add_argument(
        "config", type=Path, help="merge config (YAML): baseModel, adapters, method, parameters, output"
    )
    parser.add_argument("out", type=Path, help="output folder (model files + manifest.json)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if present")
    parser.add_argument("--cache", type=Path, default=None, help="download cache (default: $LANGMERGE_CACHE)")
    parser.add_argument("--force", action="store_true", help="merge even if OUT already holds this fingerprint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--search",
        action="store_true",
        help="choose method, density, lambda and weights on each adapter's `validation:` examples first (the "
        "config's `search:` section sets the space and budget); the config's method and parameters are the start",
    )
    return parser.parse_args(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``merge-local``; returns the exit code (0 done or up to date, 2 bad inputs, 1 other failures)."""
    args = parse_args(argv)
    try:
        return run(args)
    except (ConfigError, AdapterError, StoreError, ValueError) as err:
        _log(f"error: {err}")
        return 2


def run(args: argparse.Namespace) -> int:
    """``langmerge merge``: the steps are resolve the inputs (downloads cached), fingerprint (up to date: done),
    plan (``--dry-run``), search (``--search``), merge, then commit the manifest last."""
    from langmerge_trainer.merge.engine import AdapterInput, merge_adapters, resolve_device

    started_at, started = utcnow(), time.perf_counter()
    cpu_start = resource.getrusage(resource.RUSAGE_SELF)
    config = load_config(args.config)
    parameters = config.effective_parameters()
    inputs = Inputs(args.cache or default_cache())

    adapters = _resolve_adapters(config, parameters, inputs)
    base_location = config.base_model
    base_digest = (
        inputs.listing_digest(base_location) if is_s3(base_location) else inputs.folder_digest(Path(base_location))
    )
    search_inputs = _search_inputs(config, inputs) if args.search else None
    inputs.save()
    fp = fingerprint(config, parameters, adapters, base_digest, search_inputs)
    out: Path = args.out
    if not args.dry_run and not args.force and up_to_date(out, fp):
        print(f"{out}: up to date (fingerprint {fp}); nothing to do")
        return 0

    counted = any(a.label_counts is not None for a in config.adapters)
    adapter_inputs = [
        AdapterInput(
            language=a["language"],
            path=a["folder"],
            weight=config.adapters[i].weight,
            uri=a["location"] if is_s3(a["location"]) else None,
            digest=a["digest"],
            # the label list orders the head rows the counts weigh (the config requires it with counts)
            labels=tuple(config.labels) if config.labels and counted else None,
            label_counts=config.adapters[i].label_counts,
        )
        for i, a in enumerate(adapters)
    ]
    device = resolve_device(args.device)
    if args.dry_run:
        return _dry_run(config, parameters, adapter_inputs, base_location, str(device), fp, out)

    base_dir = inputs.download(base_location) if is_s3(base_location) else Path(base_location)
    method, search_record = config.method, None
    if search_inputs is not None:
        method, parameters, search_record = _search(
            config, inputs, base_dir, adapter_inputs, parameters, search_inputs, device
        )
        adapter_inputs = [replace(a, weight=None) for a in adapter_inputs]  # the chosen weights are in parameters
    report = merge_adapters(
        base_dir,
        adapter_inputs,
        method,
        parameters,
        config.output.format,
        config.output.rank,
        out,
        shard_size_mb=config.output.shard_size_mb,
        device=device,
        progress=not args.no_progress,
        max_relative_error=config.output.max_relative_error,
        max_rank=config.output.max_rank,
    )
    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter() - started
    manifest = _manifest(
        fp,
        config.name or args.config.stem,
        method,
        parameters,
        search_record,
        adapters,
        report,
        base=BaseModelIdentity(uri=base_location, digest=base_digest),
        out=out,
        wall=wall,
        cpu_seconds=(cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime),
        started_at=started_at,
    )
    _commit(out, manifest)
    print(_summary(out, method, len(adapters), report, wall, fp))
    return 0


def _manifest(
    fp: str,
    model_name: str,
    method: str,
    parameters: dict[str, Any],
    search_record: SearchRecord | None,
    adapters: list[dict[str, Any]],
    report: MergeReport,
    *,
    base: BaseModelIdentity,
    out: Path,
    wall: float,
    cpu_seconds: float,
    started_at: str,
) -> MergeManifest:
    """The output's record: what went in, what came out, what it cost."""
    return MergeManifest(
        fingerprint=fp,
        namespace="local",
        name=model_name,
        method=method,
        parameters=parameters,
        search=search_record,
        inputs=[
            MergeInputRecord(
                expert=a["language"],
                language=a["language"],
                adapter_uri=a["location"],
                adapter_digest=a["digest"],
                weight=w,
                rank=r["rank"],
            )
            for a, w, r in zip(adapters, [i["weight"] for i in report.inputs], report.inputs, strict=True)
        ],
        base_model=base,
        output_format=report.output_format,
        output_rank=report.output_rank,
        model_uri=str(out.resolve()),
        model_digest=report.model_digest,
        files={name: FileEntry(size=size, sha256=sha) for name, (size, sha) in sorted(report.files.items())},
        module_errors=report.module_errors,
        module_ranks=report.module_ranks,
        head_support=report.head_support,
        timings={**report.timings, "wall": round(wall, 6)},
        cost=Cost(
            wall_seconds=round(wall, 3),
            cpu_seconds=round(cpu_seconds, 3),
            gpus=1 if report.device.startswith("cuda") else 0,
            device=report.device,
        ),
        versions=_versions(),
        started_at=started_at,
        finished_at=utcnow(),
    )


def _resolve_adapters(config: MergeConfig, parameters: dict[str, Any], inputs: Inputs) -> list[dict[str, Any]]:
    """Each adapter's language, location, local folder (downloaded into the cache), digest and weight."""
    adapters: list[dict[str, Any]] = []
    for entry in config.adapters:
        folder = inputs.download(entry.path) if is_s3(entry.path) else Path(entry.path)
        weight = parameters["weights"].get(entry.language, entry.weight if entry.weight is not None else 1.0)
        adapters.append(
            {
                "language": entry.language,
                "location": entry.path,
                "folder": folder,
                "digest": inputs.folder_digest(folder),
                "weight": float(weight),
            }
        )
    return adapters


def _search_inputs(config: MergeConfig, inputs: Inputs) -> dict[str, Any]:
    """What a search adds to the fingerprint: its space, its metric and each language's validation data."""
    missing = [e.language for e in config.adapters if not e.validation]
    if missing:
        raise ConfigError(f"--search needs `validation:` examples for every adapter; missing: {', '.join(missing)}")
    return {
        "space": (config.search or Search()).model_dump(mode="json"),
        "metric": str(config.metric),
        "validation": {e.language: _validation_digest(inputs, str(e.validation)) for e in config.adapters},
    }


def _dry_run(
    config: MergeConfig,
    parameters: dict[str, Any],
    adapter_inputs: Sequence[AdapterInput],
    base_location: str,
    device: str,
    fp: str,
    out: Path,
) -> int:
    """``--dry-run``: the plan (shapes, ranks, memory), the fingerprint and where the output would go."""
    from langmerge_trainer.merge.engine import BaseCheckpoint, plan_merge

    base = None if is_s3(base_location) else BaseCheckpoint(Path(base_location))
    opened = [LoraAdapter(a.path, a.language) for a in adapter_inputs]
    try:
        plan = plan_merge(
            opened,
            adapter_inputs,
            config.method,
            parameters,
            config.output.format,
            config.output.rank,
            base=base,
            shard_size_mb=config.output.shard_size_mb,
            device=device,
            max_relative_error=config.output.max_relative_error,
            max_rank=config.output.max_rank,
        )
    finally:
        for a in opened:
            a.close()
    print(plan.describe())
    print(f"fingerprint: {fp}")
    print(f"output:      {out}{' (exists: would be replaced)' if out.exists() else ''}")
    if base is None:
        print(f"note:        base model {base_location} not downloaded for a dry run; shapes not checked")
    return 0


def _search(
    config: MergeConfig,
    inputs: Inputs,
    base_dir: Path,
    adapter_inputs: Sequence[AdapterInput],
    parameters: dict[str, Any],
    search_inputs: dict[str, Any],
    device: Any,
) -> tuple[str, dict[str, Any], SearchRecord]:
    """``--search``: candidates scored on the validation examples; returns the chosen method and parameters and the
    search's record."""
    from langmerge_trainer.merge.search import CandidateEvaluator, describe, run_search

    validation = {e.language: read_validation(inputs, str(e.validation), config.labels) for e in config.adapters}
    space = config.search or Search()
    validation = {lang: examples[: space.validation_examples] for lang, examples in validation.items()}
    evaluator = CandidateEvaluator(
        base_dir,
        adapter_inputs,
        validation,
        device=device,
        labels=config.labels,
        max_seq_length=dict.fromkeys(validation, config.max_seq_length),
        include_modules=parameters.get("include_modules") or [],
        exclude_modules=parameters.get("exclude_modules") or [],
    )
    try:
        result = run_search(evaluator, config.method, parameters, space, str(config.metric))
    finally:
        evaluator.close()
    result.validation = {
        lang: {"examples": len(v), "source": search_inputs["validation"][lang]} for lang, v in validation.items()
    }
    _log(describe(result))
    return result.chosen.candidate.method, dict(result.chosen.candidate.parameters), result.record()


def _commit(out: Path, manifest: MergeManifest) -> None:
    """The manifest, written last (atomically): the output is complete once it is there."""
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(manifest.to_json() + "\n")
    tmp.replace(out / MANIFEST)  # the commit: written last


def _summary(out: Path, method: str, adapters: int, report: MergeReport, wall: float, fp: str) -> str:
    """The one line ``langmerge merge`` prints when it is done."""
    from langmerge_trainer.merge.engine import FULL_WEIGHTS

    ranks = sorted(set(report.module_ranks.values()))
    shown = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}" if ranks else "?"
    kind = f"adapter of rank {shown}" if report.output_format != FULL_WEIGHTS else "full weights"
    return (
        f"{out}: {method} merge of {adapters} adapters -> {kind}; {len(report.modules)} modules, "
        f"max relative error {report.max_error:.3g}, {wall:.1f} s"
        + (f", peak +{report.peak_rss_bytes / 2**20:.0f} MiB" if report.peak_rss_bytes is not None else "")
        + f"; fingerprint {fp}"
    )
