"""Training one language's LoRA expert: :func:`run_train_task` turns a :class:`langmerge.tasks.TrainTask` into a
committed adapter under the task's ``output_uri``.

What a run does, in order:

1. If ``manifest.json`` exists the adapter is committed already: return it (idempotent; only leftovers of other
   runs are cleaned up).
2. Read and split the data (:mod:`langmerge_trainer.data`). If what was read differs from what the operator listed
   (the data changed in between), train on what was read, under the fingerprint of that data (a sibling prefix),
   and leave a ``DataChanged`` record for this attempt that tells the operator to list the data again
   (:meth:`_Run.follow_data`). Fetch the base model into the local cache
   (:mod:`langmerge_trainer.modelcache`), wrap it with a fresh LoRA adapter (seeded), evaluate the base alone. The
   attempt's seed (adapter initialisation, dropout, data order) is ``training.seed`` plus 1000 per earlier attempt of
   the fingerprint whose failure record says ``Collapsed`` (:func:`langmerge.artifacts.attempt_seed`); the manifest
   records it.
3. Resume from ``checkpoints/latest.json`` if a previous attempt left one, then run our own loop
   (:class:`TrainingLoop`): AdamW, linear warm-up and decay, gradient clipping, loss on completion tokens only, the
   token-level mean over each optimiser step whatever its split into micro-batches. Progress goes to
   ``progress.json``; a resumable checkpoint (adapter weights, optimiser, scheduler, RNG, step and data-order state)
   to ``checkpoints/step-<n>/`` with ``latest.json`` moved after it. On CPU a resumed run ends bit-identical to an
   uninterrupted one.
4. Evaluate, and judge the adapter on those figures (:mod:`langmerge_trainer.collapse`; off with
   ``training.collapseCheck: false``): a collapsed adapter is never committed. The attempt then raises
   :class:`Collapsed` (retryable: the next attempt trains with the next seed) and its checkpoints are deleted, so
   that no later attempt resumes the collapsed run.
5. Upload ``adapter_model.safetensors`` and ``adapter_config.json`` under this run's own prefix
   ``attempts/<n>-<run>/adapter/``, then commit ``manifest.json`` last with ``IfNoneMatch='*'``: it names exactly
   those files. A run that loses the commit to another keeps nothing (its own prefix is deleted). After the commit
   the checkpoints and other runs' uploads are deleted (``TrainTask.keep_checkpoints`` keeps the checkpoints).

S3 is reached through :class:`langmerge_trainer.s3retry.RetryingStore`: an S3 outage shorter than the retry budget
costs time, not the attempt. A periodic checkpoint that still cannot be written is skipped (training goes on).

Any failure writes a :class:`langmerge.artifacts.FailureRecord` and re-raises (:func:`is_retryable` tells whether
another attempt can help; the CLI maps that to its exit status). Preemption (SIGTERM, or the test hook
``LANGMERGE_TRAINER_STOP_AFTER_STEPS=N``) checkpoints and raises :class:`Preempted`: no failure record; rank 0
writes ``preemptions/attempt-<n>.json`` instead (deleted when the attempt trains again), from which the operator
tells a disrupted attempt from a failed one; the next attempt resumes.

Batching (``spec.training.batching``): ``batch_size`` is the number of examples (packed: sequences) per optimiser
step; ``gradient_accumulation_steps`` splits them into that many micro-batches, which saves memory without changing
the result (beyond float rounding).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import random
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from langmerge.api.expert import Batching, LanguageExpertSpec, Lora, Metrics, Training, TrainingResources
from langmerge.artifacts import (
    COLLAPSED,
    DATA_CHANGED,
    MANIFEST,
    PROGRESS,
    RESEED_STEP,
    AdapterManifest,
    CheckpointPointer,
    Cost,
    FailureRecord,
    FileEntry,
    PreemptionRecord,
    ProgressRecord,
    Versions,
    adapter_uri,
    attempt_prefix,
    attempt_seed,
    checkpoints_uri,
    failure_uri,
    join,
    new_run_id,
    preemption_uri,
    sibling_prefix,
    utcnow,
)
from langmerge.fingerprint import training_fingerprint
from langmerge.store import MalformedRecord, ObjectStore, PreconditionFailed, file_sha256, files_digest
from langmerge.tasks import TrainTask
from langmerge_trainer.branch import AdapterDigestMismatch, InitAdapterError, download_checked, load_init_adapter
from langmerge_trainer.collapse import adapter_verdict
from langmerge_trainer.data import DataError, LoadedData, label_counts, limit_examples, load_dataset
from langmerge_trainer.distributed import (
    SINGLE,
    PeerFailed,
    World,
    full_tensor,
    gathered_root,
    init_world,
    is_sharded,
    load_full,
    micro_batch_count,
    split_rows,
    unwrap,
    wrap_model,
)
from langmerge_trainer.evaluate import (
    IGNORE,
    Batch,
    Encoded,
    autocast_context,
    completion_loss_sum,
    default_dtype,
    encode_examples,
    evaluate_encoded,
    load_causal_lm,
    load_tokenizer,
    pad_batch,
    pad_id,
    peft_compat,
)
from langmerge_trainer.failures import failure_record, report_failure
from langmerge_trainer.modelcache import ModelDigestMismatch, ensure_model
from langmerge_trainer.runs import delete_stale_runs
from langmerge_trainer.s3retry import RetryingStore, retrying

log = logging.getLogger(__name__)

#: Test hook: checkpoint after this many optimiser steps, then stop as if preempted.
ENV_STOP_AFTER = "LANGMERGE_TRAINER_STOP_AFTER_STEPS"
#: Gradient norm clip (a fixed part of the algorithm, not a setting).
MAX_GRAD_NORM = 1.0
#: Length-grouped batching sorts windows of this many batches by length.
LENGTH_GROUP_WINDOW = 32
#: Evaluation examples per language: the same default as a MergedModel's ``evaluation.maxExamples``, and chosen the
#: same way, so an expert's figures and a merged model's figures are computed on the same examples.
EVAL_MAX_EXAMPLES = 512
#: The adapter files committed (peft also writes a README we do not keep).
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
LATEST = "latest.json"
CHECKPOINT_VERSION = 1
#: After a progress record could not be written, skip progress writes for this long (progress never holds up training).
PROGRESS_PAUSE_SECONDS = 30.0


class SpecError(ValueError):
    """The task's settings cannot work with this base model or data. A retry cannot fix it."""


class Preempted(Exception):
    """Training stopped early after saving a checkpoint; a new attempt resumes from it."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(f"preempted at step {step} ({reason}); checkpoint saved")
        self.step = step
        self.reason = reason


class Collapsed(Exception):
    """The trained adapter is collapsed (:mod:`langmerge_trainer.collapse`): it is not committed. Retryable: the
    next attempt of the fingerprint trains with another seed. Its name is the failure record's ``error_class``
    (:data:`langmerge.artifacts.COLLAPSED`), which the operator recognises."""

    def __init__(self, message: str, seed: int) -> None:
        super().__init__(message)
        self.seed = seed

    @classmethod
    def of(cls, reason: str, seed: int) -> Collapsed:
        """What collapsed (``reason``, the verdict's) and with which seed."""
        return cls(
            f"the trained adapter collapsed on its eval split with seed {seed}: {reason}; it was not committed "
            f"(a retry trains with seed {seed + RESEED_STEP})",
            seed,
        )


#: Errors that a retry of the same task cannot fix.
NON_RETRYABLE: tuple[type[BaseException], ...] = (
    DataError,
    SpecError,
    ModelDigestMismatch,
    ValidationError,
    AdapterDigestMismatch,
    InitAdapterError,
)


def is_retryable(err: BaseException) -> bool:
    """Whether another attempt at the same task may succeed where this one failed with ``err``."""
    if isinstance(err, PeerFailed):
        return err.retryable
    return not isinstance(err, NON_RETRYABLE)


# -- the data order -----------------------------------------------------------------------------------------------------
#: One optimiser step: rows of a batch, each row one example (or several, packed) by index into the training split.
Step = list[list[int]]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def plan_epoch(
    lengths: Sequence[int], *, epoch: int, seed: int, batch_size: int, batching: str, max_seq_length: int
) -> list[Step]:
    """The optimiser steps of one epoch, a pure function of the lengths, the seed and the epoch number."""
    gen = _epoch_generator(seed, epoch)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    if batching == Batching.SHUFFLED:
        return _chunks([[i] for i in order], batch_size)
    if batching == Batching.PACKED:
        rows: list[list[int]] = []
        row: list[int] = []
        used = 0
        for i in order:
            if row and used + lengths[i] > max_seq_length:
                rows.append(row)
                row, used = [], 0
            row.append(i)
            used += lengths[i]
        if row:
            rows.append(row)
        return _chunks(rows, batch_size)
    if batching == Batching.LENGTH_GROUPED:
        batches: list[list[int]] = []
        window = batch_size * LENGTH_GROUP_WINDOW
        for start in range(0, len(order), window):
            group = sorted(order[start : start + window], key=lambda i: -lengths[i])
            batches.extend(_chunks(group, batch_size))
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        # The batch holding the longest example goes first, so a batch that does not fit in memory fails at once.
        longest = max(range(len(shuffled)), key=lambda b: (max(lengths[i] for i in shuffled[b]), -b))
        shuffled.insert(0, shuffled.pop(longest))
        return [[[i] for i in batch] for batch in shuffled]
    raise SpecError(f"unknown batching {batching!r}")


def plan_training(lengths: Sequence[int], training: Training, processes: int = 1) -> list[list[Step]]:
    """Every epoch's steps. With several processes a step holds ``batch_size`` rows per process (the processes share
    each step's rows), so the plan is the plan of one process with ``processes`` x ``batch_size``."""
    return [
        plan_epoch(
            lengths,
            epoch=epoch,
            seed=training.seed,
            batch_size=training.batch_size * processes,
            batching=str(training.batching),
            max_seq_length=training.max_seq_length,
        )
        for epoch in range(training.epochs)
    ]


def plan_digest(plan: Sequence[Sequence[Step]]) -> str:
    return hashlib.sha256(json.dumps(plan, separators=(",", ":")).encode()).hexdigest()[:16]


def pack_batch(rows: Sequence[Sequence[Encoded]], pad_token_id: int) -> Batch:
    """Concatenate each row's examples into one sequence; position ids restart at every example, which makes
    transformers attend within each example only. Padding is a segment of its own; nothing is predicted across an
    example boundary."""
    width = max(sum(len(item) for item in row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    tokens = 0
    for r, row in enumerate(rows):
        offset = 0
        for item in row:
            n = len(item)
            ids[r, offset : offset + n] = torch.tensor(item.input_ids, dtype=torch.long)
            labels[r, offset : offset + n] = torch.tensor(item.labels, dtype=torch.long)
            labels[r, offset] = IGNORE
            positions[r, offset : offset + n] = torch.arange(n)
            offset += n
        tokens += offset
        positions[r, offset:] = torch.arange(width - offset)
    return Batch(input_ids=ids, labels=labels, position_ids=positions, tokens=tokens)


# -- the loop -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Objective:
    """What the loop optimises: how a micro-batch's rows of items become tensors, the summed loss of a batch and how
    many targets it has (the loss of a step is the sum over its micro-batches divided by the targets)."""

    collate: Callable[[list[list[Any]]], Batch]
    loss_sum: Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]
    targets: Callable[[Batch], int]


def causal_lm_objective(batching: str, pad_token_id: int) -> Objective:
    """Completion tokens of a causal LM: padded (or packed) rows, loss on completion tokens only."""

    def collate(rows: list[list[Any]]) -> Batch:
        if batching == Batching.PACKED:
            return pack_batch(rows, pad_token_id)
        return pad_batch([row[0] for row in rows], pad_token_id)

    return Objective(
        collate=collate,
        loss_sum=completion_loss_sum,
        targets=lambda batch: int((batch.labels[:, 1:] != IGNORE).sum()),
    )


@dataclass
class StepResult:
    loss: float
    tokens: int
    completion_tokens: int


def lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_steps``, then linear decay; factor for the update after ``step`` steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


class TrainingLoop:
    """Our LoRA training loop over encoded examples, resumable step by step (no S3 here: the benchmark uses it too)."""

    def __init__(
        self,
        model: nn.Module,
        items: Sequence[Any],
        training: Training,
        *,
        pad_token_id: int,
        device: torch.device,
        objective: Objective | None = None,
        world: World = SINGLE,
    ) -> None:
        """``model`` is what the loop runs: the model itself, or (several processes) its DDP or FSDP2 wrapping
        (:func:`langmerge_trainer.distributed.wrap_model`)."""
        self.model = model
        self.items = list(items)
        self.training = training
        self.pad_token_id = pad_token_id
        self.device = device
        self.objective = objective or causal_lm_objective(str(training.batching), pad_token_id)
        self.world = world
        self.plan = plan_training([len(item) for item in self.items], training, world.size)
        self.steps: list[tuple[int, int, Step]] = [
            (epoch, index, step) for epoch, steps in enumerate(self.plan) for index, step in enumerate(steps)
        ]
        self.total_steps = len(self.steps)
        self.plan_digest = plan_digest(self.plan)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=training.learning_rate,
            weight_decay=training.weight_decay,
            fused=device.type == "cuda",
        )
        warmup = math.ceil(training.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(warmup, self.total_steps))
        self.step = 0
        self.tokens_trained = 0

    def collate(self, rows: Sequence[Sequence[int]]) -> Batch:
        return self.objective.collate([[self.items[i] for i in row] for row in rows])

    def micro_batches(self, step: Step) -> list[Batch]:
        parts = max(1, math.ceil(len(step) / self.training.gradient_accumulation_steps))
        return [self.collate(rows) for rows in _chunks(step, parts)]

    def train_step(self) -> StepResult:
        """One optimiser step: the token-level mean loss over all its micro-batches."""
        if self.world.distributed:
            return self._train_step_distributed()
        _epoch, _index, step = self.steps[self.step]
        self.model.train()
        batches = self.micro_batches(step)
        targets = sum(self.objective.targets(b) for b in batches)
        loss_total = torch.zeros((), device=self.device)
        tokens = 0
        for batch in batches:
            batch = batch.to(self.device)
            with autocast_context(self.device):
                loss_sum, _count = self.objective.loss_sum(self.model, batch)
            (loss_sum / max(1, targets)).backward()
            loss_total += loss_sum.detach().float()  # stays on the device: one sync per step, below
            tokens += batch.tokens
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_trained += tokens
        return StepResult(loss=float(loss_total) / max(1, targets), tokens=tokens, completion_tokens=targets)

    def _train_step_distributed(self) -> StepResult:
        """One optimiser step of one of several processes: this rank's rows of the global step (every n-th), in as
        many micro-batches as every other rank runs (a rank with no rows left runs a real row with weight 0: FSDP's
        and DDP's collectives need every rank's forward and backward). The loss is the token-level mean over the
        global step: each rank scales its sum by processes / global targets, and DDP (or FSDP) averages gradients."""
        world = self.world
        _epoch, _index, step = self.steps[self.step]
        self.model.train()
        count = micro_batch_count(len(step), world, self.training.gradient_accumulation_steps)
        parts = split_rows(step, world, count)
        batches = [(self.collate(rows), True) if rows else (self.collate([step[0]]), False) for rows in parts]
        local_targets = sum(self.objective.targets(b) for b, live in batches if live)
        targets = int(world.all_sum([local_targets])[0])
        scale = world.size / max(1, targets)
        loss_total = torch.zeros((), device=self.device)
        tokens = 0
        for batch, live in batches:
            batch = batch.to(self.device)
            with autocast_context(self.device):
                loss_sum = self.model(batch)  # the objective inside DDP or FSDP2 (distributed.LossModule)
            (loss_sum * (scale if live else 0.0)).backward()
            if live:
                loss_total += loss_sum.detach().float()
                tokens += batch.tokens
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss, all_tokens = world.all_sum([float(loss_total), tokens])
        self.tokens_trained += int(all_tokens)
        return StepResult(loss=loss / max(1, targets), tokens=int(all_tokens), completion_tokens=targets)

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def data_state(self, step: int | None = None) -> dict[str, Any]:
        """Where in the data order the loop stands after ``step`` steps (default: now). The order itself is
        recomputed from the seed; the digest proves it is the same order."""
        step = self.step if step is None else step
        epoch, index = self.steps[step][:2] if step < self.total_steps else (self.training.epochs, 0)
        return {
            "epoch": epoch,
            "step_in_epoch": index,
            "plan_digest": self.plan_digest,
            "total_steps": self.total_steps,
        }

    # -- checkpoints --------------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights by name (of the model inside any DDP wrapping). With FSDP2 a collective: every rank
        calls it and gets the full values."""
        model = unwrap(self.model)
        return {n: full_tensor(p.detach()).cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}

    def _optimizer_state(self) -> dict[str, Any]:
        if not self.world.distributed:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(  # a collective; rank 0 gets the full state
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def save(self, folder: Path, extra: dict[str, Any]) -> None:
        """Write everything a resumed loop needs into ``folder``. With several processes every rank calls it (the
        weights and optimiser state are gathered) and rank 0 writes; each rank's random state is kept."""
        from safetensors.torch import save_file

        weights = self.trainable_state()
        optimizer = self._optimizer_state()
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        rngs = self.world.gather(rng)
        if not self.world.is_main:
            return
        folder.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(folder / "adapter.safetensors"))
        torch.save(optimizer, folder / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")
        torch.save(rng, folder / "rng.pt")
        for rank, state in enumerate(rngs[1:], start=1):
            torch.save(state, folder / f"rng-{rank}.pt")
        state = {
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "tokens_trained": self.tokens_trained,
            "data": self.data_state(),
            **extra,
        }
        (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))

    def load(self, folder: Path) -> dict[str, Any]:
        """Restore a checkpoint written by :meth:`save`; returns its ``state.json``."""
        from safetensors.torch import load_file

        state: dict[str, Any] = json.loads((folder / "state.json").read_text())
        weights = load_file(str(folder / "adapter.safetensors"))
        named = {n: p for n, p in unwrap(self.model).named_parameters() if p.requires_grad}
        if set(weights) != set(named):
            raise ValueError("checkpoint weights do not match the adapter's parameters")
        for name, tensor in weights.items():
            load_full(named[name], tensor)
        optimizer = torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=True)
        if self.world.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                self.model, self.optimizer, optimizer, options=StateDictOptions(full_state_dict=True)
            )
        else:
            self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        own = folder / (f"rng-{self.world.rank}.pt" if self.world.rank else "rng.pt")
        rng = torch.load(own if own.is_file() else folder / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = int(state["step"])
        self.tokens_trained = int(state["tokens_trained"])
        return state


# -- the task -----------------------------------------------------------------------------------------------------
def library_versions() -> Versions:
    import peft
    import transformers

    try:
        ours = metadata.version("langmerge")
    except metadata.PackageNotFoundError:
        ours = None
    return Versions(
        langmerge=ours,
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
        cuda=torch.version.cuda,
    )


def allocated_gpus(resources: TrainingResources, device: torch.device) -> int:
    """GPUs the run held: ``resources.gpus`` per node x ``resources.nodes`` on a GPU (what the cluster allocated
    and bills, whether or not every one was busy), none on CPU. Cost: GPU-seconds = GPUs x nodes x wall."""
    return resources.gpus * resources.nodes if device.type == "cuda" else 0


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lora_config(lora: Lora, *, classifier_heads: Sequence[str] = (), exclude: Sequence[str] = ()) -> Any:
    """The LoRA config of an expert: a causal LM, or (``classifier_heads`` given) a sequence classifier whose head
    modules train fully (``modules_to_save``) and whose ``exclude`` modules (pooler, head) get no adapter."""
    from peft import LoraConfig, TaskType

    extra: dict[str, Any] = {}
    if classifier_heads:
        extra = {"modules_to_save": list(classifier_heads), "exclude_modules": list(exclude) or None}
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int; a float alpha works (alpha / r)
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type=TaskType.SEQ_CLS if classifier_heads else TaskType.CAUSAL_LM,
        **extra,
    )


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute decoder-layer activations in the backward pass (non-reentrant: the frozen base needs no input
    gradients). transformers 5.x renamed ``gradient_checkpointing_enable``; older 5.x releases have only that name."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def attach_lora(model: Any, lora: Lora, *, gradient_checkpointing: bool = False, classifier: bool = False) -> Any:
    """Wrap a causal LM (or, with ``classifier``, a sequence classifier: its head trains fully) with a fresh LoRA
    adapter (initialised from the current torch seed)."""
    from peft import get_peft_model

    from langmerge_trainer.classify import excluded_from_lora, head_modules

    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    heads = head_modules(model) if classifier else []
    if classifier and not heads:
        raise SpecError(f"the sequence-classification model {type(model).__name__} has no classifier head module")
    config = lora_config(lora, classifier_heads=heads, exclude=excluded_from_lora(model) if classifier else ())
    try:
        with peft_compat():
            return get_peft_model(model, config)
    except ValueError as err:
        raise SpecError(f"LoRA targetModules {list(lora.target_modules)} do not fit the base model: {err}") from err


@dataclass
class Prepared:
    """A model with a fresh adapter, its encoded data and how to train and evaluate it (both task types)."""

    model: Any
    tokenizer: Any
    train_items: list[Any]
    eval_examples: list[Any]
    eval_items: list[Any]
    pad_token_id: int
    objective: Objective
    eval_batch_size: int
    classifier: bool
    #: A classifier's labels, in class order (None for a causal LM).
    labels: list[str] | None = None

    def evaluate(self, model: nn.Module) -> Metrics:
        """Metrics of ``model`` on the held-out items (causal LM: completion tokens; classifier: labels)."""
        if self.classifier:
            from langmerge_trainer.classify import evaluate_labelled_items

            return evaluate_labelled_items(
                model,
                self.eval_items,
                pad_token_id=self.pad_token_id,
                batch_size=self.eval_batch_size,
                labels=self.labels,
            )
        return evaluate_encoded(model, self.eval_items, pad_token_id=self.pad_token_id, batch_size=self.eval_batch_size)


def prepare_training(
    spec: LanguageExpertSpec,
    base_dir: Path,
    data: LoadedData,
    device: torch.device,
    *,
    seed: int | None = None,
    init_dir: Path | None = None,
) -> Prepared:
    """Seed, load the base (a causal LM or, for a classifier, the base with a label head), attach a fresh LoRA
    adapter and encode the data: everything a training run needs before its loop. ``seed`` overrides the spec's.
    ``init_dir``: a PEFT adapter folder (a trunk) whose factors and head the adapter starts from."""
    training = spec.training
    seed_everything(training.seed if seed is None else seed)
    tokenizer = load_tokenizer(base_dir)
    pad = pad_id(tokenizer)
    eval_examples = limit_examples(data.eval, EVAL_MAX_EXAMPLES)
    eval_batch = max(1, math.ceil(training.batch_size / training.gradient_accumulation_steps))
    if spec.is_classifier:
        from langmerge_trainer.classify import classification_loss_sum, encode_labelled, load_classifier, pad_labelled

        labels = list(spec.labels or [])
        model = load_classifier(base_dir, labels, device, pad_token_id=pad)
        model = attach_lora(model, spec.lora, gradient_checkpointing=training.gradient_checkpointing, classifier=True)
        if init_dir is not None:
            load_init_adapter(model, init_dir, what=f"the starting adapter ({init_dir.name})")
        objective = Objective(
            collate=lambda rows: pad_labelled([row[0] for row in rows], pad),
            loss_sum=classification_loss_sum,
            targets=lambda batch: int(batch.labels.numel()),
        )
        return Prepared(
            model=model,
            tokenizer=tokenizer,
            train_items=encode_labelled(tokenizer, data.train, labels, training.max_seq_length),
            eval_examples=eval_examples,
            eval_items=encode_labelled(tokenizer, eval_examples, labels, training.max_seq_length),
            pad_token_id=pad,
            objective=objective,
            eval_batch_size=eval_batch,
            classifier=True,
            labels=labels,
        )
    model = load_causal_lm(base_dir, device, default_dtype(device))
    model = attach_lora(model, spec.lora, gradient_checkpointing=training.gradient_checkpointing)
    if init_dir is not None:
        load_init_adapter(model, init_dir, what=f"the starting adapter ({init_dir.name})")
    return Prepared(
        model=model,
        tokenizer=tokenizer,
        train_items=encode_examples(tokenizer, data.train, training.max_seq_length),
        eval_examples=eval_examples,
        eval_items=encode_examples(tokenizer, eval_examples, training.max_seq_length),
        pad_token_id=pad,
        objective=causal_lm_objective(str(training.batching), pad),
        eval_batch_size=eval_batch,
        classifier=False,
    )


@contextmanager
def _sigterm_flag() -> Iterator[threading.Event]:
    """An event set by SIGTERM (Kubernetes' preemption notice) while training runs in the main thread."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        log.warning("SIGTERM: checkpointing after the current step")
        event.set()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class _Clock:
    wall0: float = field(default_factory=time.monotonic)
    cpu0: float = field(default_factory=time.process_time)
    #: Cost of earlier attempts (from the checkpoint resumed).
    wall_before: float = 0.0
    cpu_before: float = 0.0

    def wall(self) -> float:
        return self.wall_before + time.monotonic() - self.wall0

    def cpu(self) -> float:
        return self.cpu_before + time.process_time() - self.cpu0


class _Run:
    """One attempt at a training task."""

    def __init__(
        self,
        task: TrainTask,
        store: RetryingStore,
        device: torch.device,
        stop_after: int | None,
        world: World = SINGLE,
    ) -> None:
        self.task = task
        self.store = store
        self.device = device
        self.stop_after = stop_after
        #: The training processes: rank 0 alone writes to S3; every decision is taken together.
        self.world = world
        #: What this run trains and commits: the task's fingerprint, or that of the data it read (follow_data).
        self.fingerprint = task.fingerprint
        self.prefix = task.output_uri
        self.data_digests: tuple[str, str | None] = (task.data_digest, task.eval_data_digest)
        #: Why the run trains another fingerprint than the task's (None: it does not).
        self.data_changed: str | None = None
        self.listed_data_digest: str | None = None
        #: This run's own upload prefix: no other run writes there.
        self.run_prefix = attempt_prefix(self.prefix, task.attempt, new_run_id())
        #: This attempt's training seed (:meth:`attempt_seed`).
        self.seed = task.spec.training.seed
        self.clock = _Clock()
        self.started_at = utcnow()
        self._progress_paused_until = 0.0

    # -- S3 records
    def progress(self, stage: str, **fields: Any) -> None:
        """Best effort, without retries: progress never holds up or fails training. Rank 0 writes it."""
        if not self.world.is_main or time.monotonic() < self._progress_paused_until:
            return
        record = ProgressRecord(fingerprint=self.task.fingerprint, stage=stage, attempt=self.task.attempt, **fields)
        try:  # where the operator looks: the task's prefix
            self.store.inner.put_json(join(self.task.output_uri, PROGRESS), record)
        except Exception as err:
            self._progress_paused_until = time.monotonic() + PROGRESS_PAUSE_SECONDS
            log.warning("could not write progress (next try in %.0fs): %s", PROGRESS_PAUSE_SECONDS, err)

    def latest_uri(self) -> str:
        return join(checkpoints_uri(self.prefix), LATEST)

    def save_checkpoint(self, loop: TrainingLoop, work: Path) -> None:
        """Every rank takes part (the state is gathered); rank 0 uploads it and moves ``latest.json``."""
        folder = work / f"step-{loop.step}"
        loop.save(
            folder,
            {
                "fingerprint": self.fingerprint,
                "seed": self.seed,
                "wall_seconds": self.clock.wall(),
                "cpu_seconds": self.clock.cpu(),
                "started_at": self.started_at,
            },
        )
        if not self.world.is_main:
            return
        uri = join(checkpoints_uri(self.prefix), f"step-{loop.step}")
        self.store.upload_dir(folder, uri)
        previous = self.store.get_json_or_none(self.latest_uri())
        self.store.put_json(self.latest_uri(), CheckpointPointer(step=loop.step, uri=uri))
        if previous and previous.get("uri") and previous["uri"] != uri:
            self.store.delete_prefix(previous["uri"])
        log.info("checkpoint at step %d: %s", loop.step, uri)

    def stop_at_checkpoint(self, loop: TrainingLoop, work: Path, reason: str) -> None:
        """Save a checkpoint, record the preemption (rank 0) and raise :class:`Preempted` on every rank. No rank
        leaves before rank 0 has written both: the launcher stops the other workers as soon as one exits."""
        failed: Exception | None = None
        try:
            self.save_checkpoint(loop, work)
        except Exception as err:
            if not self.world.is_main:
                raise
            failed = err

        def record() -> None:
            if failed is not None:
                raise failed
            record_preemption(self.task, self.store, loop.step, reason)

        self.world.on_main(record, what="saving the checkpoint")
        raise Preempted(loop.step, reason)

    def periodic_checkpoint(self, loop: TrainingLoop, work: Path) -> None:
        """A checkpoint on the way: if S3 cannot take it even after retries, training goes on without it (a preempted
        attempt then resumes from an earlier one)."""
        try:
            self.save_checkpoint(loop, work)
        except Exception as err:
            log.error("checkpoint at step %d not saved, training goes on: %s", loop.step, err)

    def training_again(self) -> None:
        """This attempt trains (again): a preemption record an earlier run of it left (a restarted pod) no longer
        tells how the attempt ends. Rank 0 deletes it; one that cannot be deleted is only logged."""
        if not self.world.is_main:
            return
        uri = preemption_uri(self.task.output_uri, self.task.attempt)
        try:
            self.store.delete(uri)
        except Exception as err:  # best effort: training goes on
            log.warning("could not delete %s: %s", uri, err)

    def resume(self, loop: TrainingLoop, work: Path) -> int | None:
        """Resume from the latest checkpoint if it fits this task's data order. Rank 0 decides; every rank then
        loads the same checkpoint (each downloads it: the ranks may run on different nodes)."""
        folder = work / "resume"
        choice = self.world.on_main(lambda: self._checkpoint_to_resume(loop, folder), what="reading the checkpoint")
        if choice is None:
            return None
        uri, state = choice
        if not self.world.is_main:
            self.store.download_prefix(uri, folder)
        loop.load(folder)
        self.clock.wall_before = float(state.get("wall_seconds", 0.0))
        self.clock.cpu_before = float(state.get("cpu_seconds", 0.0))
        self.started_at = str(state.get("started_at", self.started_at))
        log.info("resumed from step %d of %d (%s)", loop.step, loop.total_steps, uri)
        return loop.step

    def _checkpoint_to_resume(self, loop: TrainingLoop, folder: Path) -> tuple[str, dict[str, Any]] | None:
        """The latest checkpoint (downloaded into ``folder``) and its state, if it fits this task's data order."""
        raw = self.store.get_json_or_none(self.latest_uri())
        if not raw:
            return None
        pointer = CheckpointPointer.model_validate(raw)
        self.store.download_prefix(pointer.uri, folder)
        state = json.loads((folder / "state.json").read_text()) if (folder / "state.json").is_file() else {}
        step = state.get("step")
        valid = (
            state.get("version") == CHECKPOINT_VERSION
            and state.get("fingerprint") == self.fingerprint
            and state.get("seed", self.task.spec.training.seed) == self.seed
            and isinstance(step, int)
            and 0 < step <= loop.total_steps
            and state.get("data") == loop.data_state(step)
        )
        if not valid:
            log.warning("checkpoint %s does not match this task's data order; starting from scratch", pointer.uri)
            return None
        return pointer.uri, state

    # -- the attempt
    def run(self) -> AdapterManifest:
        task, spec = self.task, self.task.spec
        world = self.world
        existing = world.on_main(self.committed, what="reading the manifest")
        if existing is not None:
            log.info("%s is committed already: nothing to do", join(self.prefix, MANIFEST))
            self.clean_up(existing)
            return existing
        self.seed = world.on_main(self.attempt_seed, what="reading the failure records")
        if spec.resources.processes() != world.size:
            log.warning(
                "the spec asks for %d training process(es) (nodes x GPUs), %d run",
                spec.resources.processes(),
                world.size,
            )
        self.progress("preparing")
        # Rank 0 reads the data and hands it to every rank: all train on exactly what was read.
        labels = spec.labels if spec.is_classifier else None
        data = world.on_main(lambda: load_dataset(self.store, spec.dataset, labels=labels), what="reading the data")
        if self.follow_data(data) and (existing := world.on_main(self.committed, what="reading the manifest")):
            log.info("the adapter of the data read is committed already (%s)", existing.adapter_uri)
            self.clean_up(existing)
            self.note_data_changed()
            return existing
        base_dir = ensure_model(self.store, spec.base_model.uri, task.base_model.digest)
        training = spec.training
        with tempfile.TemporaryDirectory(prefix="langmerge-init-") as init_tmp:
            init_dir = None
            if task.init_adapter is not None:  # every rank reads it: all start from the same weights
                source = task.init_adapter
                init_dir = download_checked(self.store, source.uri, source.digest, Path(init_tmp) / "trunk")
                log.info("starting from %s (%s, digest %s)", source.source or "an adapter", source.uri, source.digest)
            prepared = prepare_training(spec, base_dir, data, self.device, seed=self.seed, init_dir=init_dir)
        model = prepared.model
        eval_examples = prepared.eval_examples
        running = wrap_model(model, str(training.parallelism), world, self.device, prepared.objective.loss_sum)
        sharded = is_sharded(running)

        def evaluate() -> Metrics:
            # A sharded model evaluates on every rank (each block gathers its weights: a collective); otherwise
            # rank 0 evaluates alone.
            if sharded:
                with gathered_root(running):
                    return prepared.evaluate(model)
            return world.on_main(lambda: prepared.evaluate(model), what="evaluation")

        with model.disable_adapter():
            base_metrics = evaluate()
        log.info("base model on the eval split: %s", _fmt(base_metrics))

        loop = TrainingLoop(
            running,
            prepared.train_items,
            training.model_copy(update={"seed": self.seed}),  # the attempt's seed orders the data too
            pad_token_id=prepared.pad_token_id,
            device=self.device,
            objective=prepared.objective,
            world=world,
        )
        with tempfile.TemporaryDirectory(prefix="langmerge-train-") as tmp:
            work = Path(tmp)
            resumed_from = self.resume(loop, work)
            self.training_again()
            self.train(loop, work)
            self.progress("evaluating", step=loop.step, total_steps=loop.total_steps)
            metrics = evaluate()
            log.info("adapter on the eval split: %s", _fmt(metrics))
            train_counts = label_counts(data.train, spec.labels) if spec.is_classifier and spec.labels else None
            if training.collapse_check:
                world.on_main(
                    lambda: self.judge(metrics, base_metrics, eval_examples, train_counts), what="judging the adapter"
                )
            self.progress("committing", step=loop.step, total_steps=loop.total_steps)
            out = work / "adapter"
            # The config names the base by its S3 URI (not this pod's cache path), so the committed bytes do not
            # depend on where the base was cached. We never resize the vocabulary: no embedding layers to save
            # (and peft would otherwise look the URI up on a model hub).
            model.peft_config["default"].base_model_name_or_path = spec.base_model.uri
            full = loop.trainable_state() if sharded else None  # a collective: every rank gathers
            manifest = world.on_main(
                lambda: self.commit(
                    save_adapter(model, out, full),
                    metrics=metrics,
                    base_metrics=base_metrics,
                    data_counts=(len(data.train), len(eval_examples), data.skipped_lines),
                    loop=loop,
                    resumed_from=resumed_from,
                    label_counts=train_counts,
                ),
                what="committing the adapter",
            )
        self.note_data_changed()
        self.progress("done", step=loop.step, total_steps=loop.total_steps)
        return manifest

    def attempt_seed(self) -> int:
        """This attempt's seed, from the failure records of the task's attempts so far (rank 0).

        A record of this very attempt saying ``Collapsed`` was left by an earlier pod of the same Job (its
        ``backoffLimit`` starts another): training it again with the same seed would collapse again, so this raises
        :class:`Collapsed` at once, and the operator's next attempt gets the next seed."""
        task = self.task
        records: dict[int, FailureRecord] = {}
        for attempt in range(1, task.attempt + 1):
            uri = failure_uri(task.output_uri, attempt)
            try:
                record = self.store.get_record(uri, FailureRecord)
            except MalformedRecord as err:
                log.warning("%s; not counted for the seed", err)
                continue
            if record is not None:
                records[attempt] = record
        own = records.get(task.attempt)
        if own is not None and own.error_class == COLLAPSED:
            log.error("attempt %d collapsed already (%s): not training it again", task.attempt, own.message)
            raise Collapsed(own.message, own.seed if own.seed is not None else task.spec.training.seed)
        seed = attempt_seed(task.spec.training.seed, records, task.attempt)
        if seed != task.spec.training.seed:
            log.warning(
                "training with seed %d: spec seed %d + %d per earlier attempt that collapsed",
                seed,
                task.spec.training.seed,
                RESEED_STEP,
            )
        return seed

    def judge(
        self,
        metrics: Metrics,
        base_metrics: Metrics,
        eval_examples: Sequence[Any],
        train_counts: dict[str, int] | None,
    ) -> None:
        """Raise :class:`Collapsed` if the adapter is collapsed on its eval split (rank 0), after deleting this
        fingerprint's checkpoints: the next attempt, with another seed, must not resume the collapsed run."""
        spec = self.task.spec
        classifier = spec.is_classifier and bool(spec.labels)
        verdict = adapter_verdict(
            metrics,
            base_metrics,
            classifier=classifier,
            gold=label_counts(eval_examples, spec.labels or []) if classifier else None,
            prior=train_counts,
        )
        if not verdict.collapsed:
            return
        log.error("the adapter collapsed with seed %d: %s", self.seed, verdict.reason)
        try:
            deleted = self.store.delete_prefix(checkpoints_uri(self.prefix))
            log.info("deleted %d checkpoint object(s) of the collapsed run", deleted)
        except Exception as err:  # its seed no longer matches the next attempt's: it would not be resumed anyway
            log.warning("could not delete the collapsed run's checkpoints: %s", err)
        raise Collapsed.of(verdict.reason or "collapsed", self.seed)

    def follow_data(self, data: LoadedData) -> bool:
        """Compare what was read with what the operator listed. On a difference, train on what was read: under
        the fingerprint of that data when this trainer computes the task's fingerprint the way the operator did
        (True: the run moved to that fingerprint's prefix), else under the task's, the manifest recording both."""
        task = self.task
        read = (data.data_digest, data.eval_data_digest)
        listed = (task.data_digest, task.eval_data_digest)
        if read == listed:
            return False
        self.data_digests = read
        change = (
            f"the data under {task.spec.dataset.uri} changed after the operator listed it: digest "
            f"{_combined(listed)} when listed, {_combined(read)} when read"
        )
        if task.image is None or _fingerprint(task, listed) != task.fingerprint:
            log.warning("%s; training on what was read (the manifest records both digests)", change)
            self.listed_data_digest = task.data_digest
            return False
        self.fingerprint = _fingerprint(task, read)
        self.prefix = sibling_prefix(task.output_uri, self.fingerprint)
        self.run_prefix = attempt_prefix(self.prefix, task.attempt, new_run_id())
        self.data_changed = f"{change}; the adapter of the data read is fingerprint {self.fingerprint} ({self.prefix})"
        log.warning("%s; training fingerprint %s instead of %s", change, self.fingerprint, task.fingerprint)
        return True

    def note_data_changed(self) -> None:
        """Tell the operator (a record for this attempt of the task's fingerprint) to list the data again."""
        if self.data_changed is None or not self.world.is_main:
            return
        task = self.task
        record = FailureRecord(
            fingerprint=task.fingerprint,
            error_class=DATA_CHANGED,
            message=self.data_changed,
            retryable=True,
            attempt=task.attempt,
        )
        try:
            self.store.put_json(failure_uri(task.output_uri, task.attempt), record)
        except Exception as err:  # the operator then records the Job's end and retries: the retry finds the commit
            log.warning("could not record that the data changed: %s", err)

    def committed(self) -> AdapterManifest | None:
        raw = self.store.get_json_or_none(join(self.prefix, MANIFEST))
        return None if raw is None else AdapterManifest.model_validate(raw)

    def train(self, loop: TrainingLoop, work: Path) -> None:
        training = self.task.spec.training
        t_report = time.monotonic()
        t_attempt = time.monotonic()
        steps_at_start = loop.step
        tokens_since = 0
        losses: list[float] = []
        world = self.world
        with _sigterm_flag() as sigterm:
            while not loop.done:
                result = loop.train_step()
                tokens_since += result.tokens
                losses.append(result.loss)
                if not math.isfinite(result.loss):
                    raise FloatingPointError(f"training loss is {result.loss} at step {loop.step}")
                if loop.step % training.progress_every_steps == 0 or loop.done:
                    now = time.monotonic()
                    rate = (loop.step - steps_at_start) / max(now - t_attempt, 1e-9)
                    tps = tokens_since / max(now - t_report, 1e-9)
                    loss = sum(losses) / len(losses)
                    self.progress(
                        "training",
                        step=loop.step,
                        total_steps=loop.total_steps,
                        loss=loss,
                        tokens_per_second=tps,
                        eta_seconds=(loop.total_steps - loop.step) / rate if rate > 0 else None,
                    )
                    log.info("step %d/%d loss %.4f %.0f tokens/s", loop.step, loop.total_steps, loss, tps)
                    t_report, tokens_since, losses = now, 0, []
                stop = self.stop_after is not None and loop.step == self.stop_after and not loop.done
                if world.distributed:  # every rank stops after the same step, when any rank got SIGTERM
                    terminated = world.any(sigterm.is_set())
                    if terminated:
                        sigterm.set()
                if stop or (sigterm.is_set() and not loop.done):  # a finished run commits instead
                    self.stop_at_checkpoint(
                        loop, work, "SIGTERM" if sigterm.is_set() else f"{ENV_STOP_AFTER}={self.stop_after}"
                    )
                if loop.step % training.checkpoint_every_steps == 0 and not loop.done:
                    self.periodic_checkpoint(loop, work)

    def commit(
        self,
        folder: Path,
        *,
        metrics: Metrics,
        base_metrics: Metrics,
        data_counts: tuple[int, int, int],
        loop: TrainingLoop,
        resumed_from: int | None,
        label_counts: dict[str, int] | None = None,
    ) -> AdapterManifest:
        task, spec = self.task, self.task.spec
        manifest_uri = join(self.prefix, MANIFEST)
        existing = self.committed()
        if existing is not None:  # a concurrent attempt committed while we trained: keep its files
            log.warning("%s appeared while training; keeping the committed adapter", manifest_uri)
            self.clean_up(existing)
            return existing
        target = adapter_uri(self.run_prefix)
        files: dict[str, tuple[int, str]] = {}

        for name in ADAPTER_FILES:
            path = folder / name
            self.store.upload_file(path, join(target, name))
            files[name] = (path.stat().st_size, file_sha256(path))
        examples_train, examples_eval, skipped = data_counts
        gpus = allocated_gpus(spec.resources, self.device)
        wall = self.clock.wall()
        manifest = AdapterManifest(
            fingerprint=self.fingerprint,
            namespace=task.namespace,
            name=task.name,
            language=spec.language,
            task=spec.task,
            task_type=str(spec.task_type),
            labels=list(spec.labels) if spec.labels else None,
            label_counts=label_counts,
            base_model=task.base_model,
            data_digest=self.data_digests[0],
            eval_data_digest=self.data_digests[1],
            adapter_uri=target,
            adapter_digest=files_digest(files),
            files={name: FileEntry(size=size, sha256=sha) for name, (size, sha) in files.items()},
            lora=spec.lora.model_dump(mode="json"),
            training=spec.training.model_dump(mode="json"),
            metrics=metrics,
            base_metrics=base_metrics,
            examples_train=examples_train,
            examples_eval=examples_eval,
            skipped_lines=skipped,
            tokens_trained=loop.tokens_trained,
            steps=loop.step,
            cost=Cost(
                wall_seconds=wall,
                cpu_seconds=self.clock.cpu(),
                gpus=gpus,
                gpu_seconds=gpus * wall,
                device=device_name(self.device),
            ),
            versions=library_versions(),
            image=task.image,
            started_at=self.started_at,
            finished_at=utcnow(),
            resumed_from_step=resumed_from,
            init_adapter={"uri": task.init_adapter.uri, "digest": task.init_adapter.digest}
            if task.init_adapter is not None
            else None,
            requested_fingerprint=task.fingerprint if self.fingerprint != task.fingerprint else None,
            listed_data_digest=self.listed_data_digest,
            seed=self.seed,
        )
        try:
            self.store.put_json(manifest_uri, manifest, if_none_match=True)
        except PreconditionFailed:
            committed = self.committed()
            if committed is None:
                raise
            if committed.adapter_uri != target:
                log.warning("%s was committed by another run first; keeping its adapter", manifest_uri)
            # else: our own put went through and only its response was lost (the retry found the object)
            self.clean_up(committed)
            return committed
        log.info("committed %s (adapter %s)", manifest_uri, manifest.adapter_digest)
        self.clean_up(manifest)
        return manifest

    def clean_up(self, committed: AdapterManifest) -> None:
        """After the commit: delete the uploads of runs that did not commit and, unless the task keeps them, the
        checkpoints. Best effort: leftovers cost storage, not correctness (readers follow the manifest). Rank 0."""
        if not self.world.is_main:
            return
        try:
            delete_stale_runs(self.store, self.prefix, committed.adapter_uri)
            if not self.task.keep_checkpoints:
                deleted = self.store.delete_prefix(checkpoints_uri(self.prefix))
                if deleted:
                    log.info("deleted %d checkpoint object(s) under %s", deleted, checkpoints_uri(self.prefix))
        except Exception as err:
            log.warning("clean-up after the commit failed (leftovers stay in S3): %s", err)


def save_adapter(model: Any, folder: Path, full: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the PEFT adapter folder of ``model``: ``save_pretrained``, or, for FSDP2 shards, the gathered ``full``
    weights (from :meth:`TrainingLoop.trainable_state`) in the same files and names."""
    if full is None:
        model.save_pretrained(str(folder), save_embedding_layers=False)
    else:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        weights = get_peft_model_state_dict(model, state_dict=full, save_embedding_layers=False)
        tensors = {k: v.contiguous() for k, v in weights.items()}
        save_file(tensors, str(folder / "adapter_model.safetensors"), {"format": "pt"})
        model.peft_config["default"].save_pretrained(str(folder))
    # peft keeps target_modules as a set: its order in the file follows the process's string hashing. Sorted, the
    # same adapter has the same bytes (and digest) whichever process wrote it.
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def _combined(digests: tuple[str, str | None]) -> str:
    data, evaluation = digests
    return data if evaluation is None else f"{data}+{evaluation}"


def _fingerprint(task: TrainTask, digests: tuple[str, str | None]) -> str:
    """The training fingerprint of ``task`` on the data with ``digests``, as the operator computes it."""
    return training_fingerprint(
        task.spec,
        base_model_digest=task.base_model.digest,
        data_digest=digests[0],
        eval_data_digest=digests[1],
        image=task.image or "",
    )


def _fmt(metrics: Metrics) -> str:
    return json.dumps(metrics.model_dump(mode="json", exclude_none=True))


def stop_after_from_env() -> int | None:
    value = os.environ.get(ENV_STOP_AFTER, "").strip()
    return int(value) if value else None


def run_train_task(
    task: TrainTask,
    store: ObjectStore,
    *,
    device: torch.device | str | None = None,
    stop_after_steps: int | None = None,
) -> AdapterManifest:
    """Train, evaluate and commit the adapter of ``task``; return its manifest (the existing one if committed).

    Under the launcher (``langmerge-trainer distributed``, torchrun's variables set) each process is one rank of a
    DDP or FSDP2 run (:mod:`langmerge_trainer.distributed`); ``device`` then overrides the rank's device.

    ``store`` is used through :func:`langmerge_trainer.s3retry.retrying`. ``stop_after_steps`` (default:
    ``LANGMERGE_TRAINER_STOP_AFTER_STEPS``) checkpoints after that many steps and raises :class:`Preempted`. Any
    other exception is recorded at ``failures/attempt-<n>.json`` (and in the termination message) and re-raised.
    """
    if isinstance(device, torch.device):
        world, dev = SINGLE, device
    else:
        world, dev = init_world(device)
        world = replace(world, retryable=is_retryable)
    stop = stop_after_steps if stop_after_steps is not None else stop_after_from_env()
    s3 = retrying(store)
    try:
        return _Run(task, s3, dev, stop, world).run()
    except Preempted:
        raise
    except PeerFailed:
        raise  # rank 0 failed and records it
    except Exception as err:
        if world.is_main:
            record_failure(task, s3, err)
        else:
            log.error("rank %d failed; rank 0 records the attempt's failure", world.rank)
        raise
    finally:
        world.close()


def record_preemption(task: TrainTask, store: ObjectStore, step: int, reason: str) -> None:
    """Tell the operator that ``task``'s attempt stopped on a preemption notice after the checkpoint of ``step``: if
    its Job or TrainJob then fails, the attempt was disrupted and does not count against ``retry.limit``. Best
    effort."""
    record = PreemptionRecord(fingerprint=task.fingerprint, attempt=task.attempt, step=step, reason=reason)
    uri = preemption_uri(task.output_uri, task.attempt)
    try:
        store.put_json(uri, record)
    except Exception as err:  # best effort: the checkpoint is saved; the attempt may then count as failed
        log.error("could not write %s: %s", uri, err)


def record_failure(task: TrainTask, store: ObjectStore, err: BaseException) -> FailureRecord:
    """Write the failure record of ``task``'s attempt; a record S3 cannot take is reported, never raised."""
    record = failure_record(err, fingerprint=task.fingerprint, attempt=task.attempt, retryable=is_retryable(err))
    if isinstance(err, Collapsed):
        record.seed = err.seed
    report_failure(retrying(store), failure_uri(task.output_uri, task.attempt), record, what="training")
    return record
