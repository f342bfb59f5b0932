"""The merge Job: ``langmerge-trainer merge --task <MergeTask JSON>``.

Downloads the base model and every input adapter (checking each adapter's digest), merges them with the streaming
engine, uploads the result under this run's own prefix ``<output_uri>/attempts/<n>-<run>/model/``, evaluates the merged
model *and each expert alone* on the same held-out examples of every language (so the operator's quality gate compares
like with like; one model in memory, :mod:`langmerge_trainer.merge.evaluation`), and commits ``manifest.json`` last with a conditional put; it names exactly the files of this run.
A run that loses the commit to another keeps nothing. A second run of the same fingerprint finds the manifest and
exits 0. S3 is reached through :class:`langmerge_trainer.s3retry.RetryingStore`. Any failure writes a failure record
for the attempt and exits 1, or 4 when no retry can fix it (``langmerge.constants``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from langmerge import artifacts
from langmerge.api.expert import Metrics, TaskType
from langmerge.artifacts import (
    Cost,
    FileEntry,
    MergeInputRecord,
    MergeManifest,
    ProgressRecord,
    SearchRecord,
    utcnow,
)
from langmerge.constants import EXIT_FAILED, EXIT_OK, EXIT_USAGE, EXIT_USER_ERROR
from langmerge.store import ObjectStore, PreconditionFailed, files_digest
from langmerge.tasks import MergeTask
from langmerge_trainer.branch import AdapterDigestMismatch, download_checked
from langmerge_trainer.data import DataError, Example, load_eval_split
from langmerge_trainer.evaluate import pick_device
from langmerge_trainer.failures import failure_record, report_failure, write_termination_message
from langmerge_trainer.merge.engine import FULL_WEIGHTS, AdapterInput, MergeError, MergeReport, merge_adapters
from langmerge_trainer.merge.evalcache import EvaluationCache, cache_key, examples_digest
from langmerge_trainer.merge.evaluation import LanguageInput, eval_dtype, evaluate_merge
from langmerge_trainer.modelcache import ensure_model
from langmerge_trainer.runs import delete_stale_runs
from langmerge_trainer.s3retry import RetryingStore, retrying
from langmerge_trainer.train import device_name, library_versions

log = logging.getLogger("langmerge_trainer.merge.job")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _progress(store: RetryingStore, task: MergeTask, stage: str, step: int, total: int) -> None:
    record = ProgressRecord(
        fingerprint=task.fingerprint, stage=stage, step=step, total_steps=total, attempt=task.attempt
    )
    try:  # best effort, without retries: progress never holds up the merge
        store.inner.put_json(artifacts.join(task.output_uri, artifacts.PROGRESS), record)
    except Exception as err:
        log.warning("progress not written: %s", err)


def run_merge_task(
    task: MergeTask, store: ObjectStore, *, device: str | None = None, work_dir: Path | None = None
) -> MergeManifest:
    """Run the task (idempotent by fingerprint); returns the committed manifest. ``store`` is used through
    :func:`langmerge_trainer.s3retry.retrying`.

    Steps: download the base model and the adapters, search (``spec.search``), merge, upload, evaluate, then commit
    the manifest (``IfNoneMatch``: the first run to commit wins)."""
    s3 = retrying(store)
    manifest_uri = artifacts.join(task.output_uri, artifacts.MANIFEST)
    existing = s3.get_json_or_none(manifest_uri)
    if existing is not None:
        log.info("merge %s already committed at %s: nothing to do", task.fingerprint, manifest_uri)
        committed = MergeManifest.model_validate(existing)
        _clean_up(s3, task, committed)
        return committed
    run_prefix = artifacts.attempt_prefix(task.output_uri, task.attempt, artifacts.new_run_id())
    started_at = utcnow()
    wall0, cpu0 = time.monotonic(), _cpu_seconds()
    torch_device = pick_device(device)
    timings: dict[str, float] = {}
    total_steps = 3 + len(task.inputs)
    with tempfile.TemporaryDirectory(prefix="langmerge-merge-", dir=work_dir) as tmp:
        root = Path(tmp)
        _progress(s3, task, "downloading", 0, total_steps)
        t = time.monotonic()
        base_dir = ensure_model(s3, task.base_model.uri, task.base_model.digest)
        inputs = _download_inputs(s3, task, root / "adapters")
        reference = _download_reference(s3, task, root / "reference")
        timings["download"] = time.monotonic() - t

        labels = task.inputs[0].labels if task.inputs[0].task_type == TaskType.SEQUENCE_CLASSIFICATION else None
        method, parameters = task.method, task.parameters
        search_record = None
        gate_examples: dict[str, list[Example]] | None = None
        if task.search is not None:
            _progress(s3, task, "searching", 1, total_steps)
            t = time.monotonic()
            method, parameters, search_record, gate_examples = _search(
                task, s3, base_dir, inputs, labels, torch_device, reference
            )
            timings["search"] = time.monotonic() - t
            # the chosen weights are in the parameters; the inputs' own (the spec's) no longer apply
            inputs = [dataclasses.replace(a, weight=None) for a in inputs]

        _progress(s3, task, "merging", 1, total_steps)
        out_dir = root / "merged"
        report = _merge(task, base_dir, inputs, method, parameters, out_dir, torch_device, reference)
        timings.update({f"merge_{k}": v for k, v in report.timings.items()})

        _progress(s3, task, "uploading", 2, total_steps)
        t = time.monotonic()
        model_uri = artifacts.merged_model_uri(run_prefix)
        files = s3.upload_dir(out_dir, model_uri)
        timings["upload"] = time.monotonic() - t

        merged_metrics: dict[str, Metrics] = {}
        expert_metrics: dict[str, Metrics] = {}
        base_metrics: dict[str, Metrics] = {}
        cache = EvaluationCache(s3, task.evaluation_cache_uri)
        if task.evaluation.enabled:
            t = time.monotonic()
            merged_metrics, expert_metrics, base_metrics = _evaluate(
                s3,
                task,
                run_prefix,
                base_dir,
                out_dir,
                full_weights=report.output_format == FULL_WEIGHTS,
                inputs=inputs,
                gate_examples=gate_examples,
                labels=labels,
                device=torch_device,
                total_steps=total_steps,
                cache=cache,
            )
            timings["evaluate"] = time.monotonic() - t
        else:
            expert_metrics = {i.language: i.expert_metrics for i in task.inputs if i.expert_metrics is not None}

    wall = time.monotonic() - wall0
    gpus = 1 if torch_device.type == "cuda" else 0
    cost = Cost(
        wall_seconds=wall,
        cpu_seconds=_cpu_seconds() - cpu0,
        gpus=gpus,
        gpu_seconds=gpus * wall,
        device=device_name(torch_device),
    )
    manifest = _manifest(
        task,
        method,
        parameters,
        report,
        model_uri=model_uri,
        files=files,
        search=search_record,
        merged_metrics=merged_metrics,
        expert_metrics=expert_metrics,
        base_metrics=base_metrics,
        evaluation_cached=cache.hits,
        timings=timings,
        cost=cost,
        started_at=started_at,
    )
    return _commit(s3, task, manifest_uri, manifest, report, total_steps)


def _download_inputs(s3: RetryingStore, task: MergeTask, folder: Path) -> list[AdapterInput]:
    """Every input adapter, downloaded (digest-checked) into ``folder/<language>``."""
    inputs = []
    for item in task.inputs:
        path = download_checked(s3, item.adapter_uri, item.adapter_digest, folder / item.language)
        inputs.append(
            AdapterInput(
                language=item.language,
                path=path,
                weight=item.weight,
                uri=item.adapter_uri,
                digest=item.adapter_digest,
                labels=tuple(item.labels) if item.labels else None,
                label_counts=item.label_counts,
            )
        )
    return inputs


def _download_reference(s3: RetryingStore, task: MergeTask, folder: Path) -> AdapterInput | None:
    """spec.trunk's adapter (digest-checked), which the inputs merge relative to; None without a trunk."""
    if task.reference is None:
        return None
    ref = task.reference
    path = download_checked(s3, ref.uri, ref.digest, folder)
    return AdapterInput(language="reference", path=path, uri=ref.uri, digest=ref.digest)


def _merge(
    task: MergeTask,
    base_dir: Path,
    inputs: Sequence[AdapterInput],
    method: str,
    parameters: dict[str, Any],
    out_dir: Path,
    device: torch.device,
    reference: AdapterInput | None = None,
) -> MergeReport:
    """The merge itself, in the output format, rank and shard size the task asks for."""
    return merge_adapters(
        base_dir,
        inputs,
        method,
        parameters,
        task.output.format,
        task.output.rank,
        out_dir,
        shard_size_mb=task.output.shard_size_mb,
        device=device,
        max_relative_error=task.output.max_relative_error,
        max_rank=task.output.max_rank,
        reference=reference,
    )


def _evaluate(
    s3: RetryingStore,
    task: MergeTask,
    run_prefix: str,
    base_dir: Path,
    out_dir: Path,
    *,
    full_weights: bool,
    inputs: Sequence[AdapterInput],
    gate_examples: dict[str, list[Example]] | None,
    labels: Sequence[str] | None,
    device: torch.device,
    total_steps: int,
    cache: EvaluationCache,
) -> tuple[dict[str, Metrics], dict[str, Metrics], dict[str, Metrics]]:
    """The merged model, each expert alone and the base on every language's held-out examples; one record per
    language under the run's prefix. The base's and an expert's figures come from ``cache`` when an earlier merge
    evaluated the same model on the same examples. Returns (merged, expert, base) metrics by language."""
    languages = [
        LanguageInput(
            language=item.language,
            adapter_dir=adapter.path,
            # with a search: the gate's part of the held-out data, never an example the search validated on
            examples=gate_examples[item.language]
            if gate_examples is not None
            else load_eval_split(s3, item.dataset, max_examples=task.evaluation.max_examples, labels=labels),
            max_seq_length=item.max_seq_length,
        )
        for item, adapter in zip(task.inputs, inputs, strict=True)
    ]
    step = {item.language: 3 + i for i, item in enumerate(task.inputs)}
    # figures of the base and of each expert alone on the same examples, from an earlier merge (evalcache)
    base_keys: dict[str, str] = {}
    expert_keys: dict[str, str] = {}
    for item, adapter, lang in zip(task.inputs, inputs, languages, strict=True):
        common = {
            "base_digest": task.base_model.digest or task.base_model.uri,
            "examples": examples_digest(lang.examples),
            "max_seq_length": lang.max_seq_length,
            "max_examples": task.evaluation.max_examples,
            "labels": labels,
            "dtype": str(eval_dtype(device)),
            "device_type": device.type,
        }
        base_keys[item.language] = cache_key(adapter_digest=None, **common)
        expert_keys[item.language] = cache_key(adapter_digest=adapter.digest or item.adapter_digest, **common)
    known_base = cache.lookup("base", base_keys)
    known_experts = cache.lookup("expert", expert_keys)
    merged_metrics, expert_metrics, base_metrics = evaluate_merge(
        base_dir,
        out_dir,
        full_weights=full_weights,
        languages=languages,
        device=device,
        max_examples=task.evaluation.max_examples,
        labels=labels,
        on_language=lambda lang: _progress(s3, task, f"evaluating {lang}", step[lang], total_steps),
        known_base=known_base,
        known_experts=known_experts,
    )
    cache.store_new("base", base_keys, base_metrics, known_base)
    cache.store_new("expert", expert_keys, expert_metrics, known_experts)
    for item in task.inputs:
        s3.put_json(
            artifacts.merge_eval_uri(run_prefix, item.language),
            {
                "language": item.language,
                "merged": merged_metrics[item.language].model_dump(mode="json", exclude_none=True),
                "expert": expert_metrics[item.language].model_dump(mode="json", exclude_none=True),
                "base": base_metrics[item.language].model_dump(mode="json", exclude_none=True),
                "evaluated_at": utcnow(),
            },
        )
        log.info(
            "%s: merged eval loss %.4f, expert alone %.4f",
            item.language,
            merged_metrics[item.language].eval_loss or float("nan"),
            expert_metrics[item.language].eval_loss or float("nan"),
        )
    return merged_metrics, expert_metrics, base_metrics


def _manifest(
    task: MergeTask,
    method: str,
    parameters: dict[str, Any],
    report: MergeReport,
    *,
    model_uri: str,
    files: dict[str, tuple[int, str]],
    search: SearchRecord | None,
    merged_metrics: dict[str, Metrics],
    expert_metrics: dict[str, Metrics],
    base_metrics: dict[str, Metrics],
    evaluation_cached: list[str],
    timings: dict[str, float],
    cost: Cost,
    started_at: str,
) -> MergeManifest:
    """The record of this merge: what went in, what came out and where, how it scored, what it cost."""
    return MergeManifest(
        fingerprint=task.fingerprint,
        namespace=task.namespace,
        name=task.name,
        method=method,
        parameters=parameters,
        inputs=[
            MergeInputRecord(
                expert=i.expert,
                language=i.language,
                adapter_uri=i.adapter_uri,
                adapter_digest=i.adapter_digest,
                weight=next((float(r["weight"]) for r in report.inputs if r["language"] == i.language), i.weight),
                rank=next((r["rank"] for r in report.inputs if r["language"] == i.language), None),
            )
            for i in task.inputs
        ],
        base_model=task.base_model,
        output_format=report.output_format,
        output_rank=report.output_rank,
        model_uri=model_uri,
        model_digest=files_digest(files),
        files={k: FileEntry(size=s, sha256=h) for k, (s, h) in files.items()},
        module_errors=report.module_errors,
        module_ranks=report.module_ranks,
        head_support=report.head_support,
        reference=report.reference,
        search=search,
        evaluation=merged_metrics,
        expert_metrics=expert_metrics,
        base_metrics=base_metrics,
        evaluation_cached=sorted(evaluation_cached),
        timings={k: round(v, 4) for k, v in timings.items()},
        cost=cost,
        versions=library_versions(),
        image=task.image,
        started_at=started_at,
        finished_at=utcnow(),
    )


def _commit(
    s3: RetryingStore,
    task: MergeTask,
    manifest_uri: str,
    manifest: MergeManifest,
    report: MergeReport,
    total_steps: int,
) -> MergeManifest:
    """Commit ``manifest`` (``IfNoneMatch``); if another run committed first, that one stands. Returns the
    committed manifest, after the attempt's leftovers are cleaned up."""
    model_uri = manifest.model_uri
    try:
        s3.put_json(manifest_uri, manifest, if_none_match=True)
    except PreconditionFailed:
        committed = MergeManifest.model_validate(s3.get_json(manifest_uri))
        if committed.model_uri != model_uri:
            log.info("another run committed %s first; keeping it", manifest_uri)
        # else: our own put went through and only its response was lost (the retry found the object)
        _clean_up(s3, task, committed)
        return committed
    _clean_up(s3, task, manifest)
    _progress(s3, task, "done", total_steps, total_steps)
    log.info(
        "merge %s committed: %s (%s, max refactor error %.2e)",
        task.fingerprint,
        model_uri,
        report.output_format,
        report.max_error,
    )
    return manifest


def _search(
    task: MergeTask,
    store: ObjectStore,
    base_dir: Path,
    inputs: Sequence[AdapterInput],
    labels: Sequence[str] | None,
    device: torch.device,
    reference: AdapterInput | None = None,
) -> tuple[str, dict[str, Any], SearchRecord, dict[str, list[Example]]]:
    """Run spec.search on every language's validation split; returns the chosen method and parameters, the search's
    record and the quality gate's examples (disjoint from the validation ones)."""
    from langmerge_trainer.data import search_splits
    from langmerge_trainer.merge.search import CandidateEvaluator, describe, run_search

    assert task.search is not None
    splits = {
        item.language: search_splits(
            store,
            item.dataset,
            max_validation=task.search.validation_examples,
            max_gate=task.evaluation.max_examples,
            labels=labels,
        )
        for item in task.inputs
    }
    evaluator = CandidateEvaluator(
        base_dir,
        inputs,
        {lang: split.validation for lang, split in splits.items()},
        device=device,
        labels=labels,
        max_seq_length={item.language: item.max_seq_length for item in task.inputs},
        include_modules=task.parameters.get("include_modules") or [],
        exclude_modules=task.parameters.get("exclude_modules") or [],
        reference=reference,
    )
    try:
        result = run_search(
            evaluator,
            task.method,
            task.parameters,
            task.search,
            str(task.evaluation.metric),
            on_candidate=lambda n, scored: _progress(
                store, task, f"searching: candidate {n} ({scored.candidate.method})", 1, 3 + len(task.inputs)
            ),
        )
    finally:
        evaluator.close()
    result.validation = {
        lang: {"examples": len(split.validation), "source": split.source, "gate_examples": len(split.gate)}
        for lang, split in splits.items()
    }
    log.info("%s", describe(result))
    chosen = result.chosen.candidate
    return chosen.method, dict(chosen.parameters), result.record(), {lang: s.gate for lang, s in splits.items()}


def _clean_up(store: ObjectStore, task: MergeTask, committed: MergeManifest) -> None:
    """Delete the uploads of runs that did not commit (best effort: readers follow the manifest anyway)."""
    try:
        delete_stale_runs(store, task.output_uri, committed.model_uri)
    except Exception as err:
        log.warning("clean-up after the commit failed (leftovers stay in S3): %s", err)


#: Errors that a retry of the same task cannot fix.
NON_RETRYABLE: tuple[type[BaseException], ...] = (AdapterDigestMismatch, ValidationError, MergeError, DataError)


def is_retryable(err: BaseException) -> bool:
    return not isinstance(err, NON_RETRYABLE)


def record_failure(task: MergeTask, store: ObjectStore, err: BaseException) -> bool:
    """Write the failure record of ``task``'s attempt; a record S3 cannot take is reported, never raised."""
    record = failure_record(err, fingerprint=task.fingerprint, attempt=task.attempt, retryable=is_retryable(err))
    return report_failure(retrying(store), artifacts.failure_uri(task.output_uri, task.attempt), record, what="merge")


def main(argv: Sequence[str] | None = None) -> int:
    from langmerge_trainer.data import read_json_arg

    parser = argparse.ArgumentParser(prog="langmerge-trainer merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, help="the MergeTask as JSON, or @path to a file holding it")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        task = MergeTask.model_validate(read_json_arg(args.task))
    except (ValueError, OSError, ValidationError) as err:
        parser.print_usage(sys.stderr)
        log.error("--task is not a valid MergeTask: %s", err)
        write_termination_message(f"--task is not a valid MergeTask: {err}\n")
        return EXIT_USAGE
    store = ObjectStore.from_config()
    try:
        run_merge_task(task, store, device=args.device)
    except Exception as err:
        log.exception("merge failed")
        record_failure(task, store, err)
        return EXIT_FAILED if is_retryable(err) else EXIT_USER_ERROR
    return EXIT_OK
