"""Training with several processes: data-parallel (DDP) or fully sharded (FSDP2 ``fully_shard``) LoRA.

Two halves:

* **The launcher** (:func:`launch_main`, ``langmerge-trainer distributed [torchrun options] train --task ...``) is
  torchrun: it parses torchrun's own options (so the ``PET_*`` variables Kubeflow Trainer injects, ``PET_NNODES``,
  ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``, configure it as they configure
  torchrun) and starts the workers through torch's elastic launcher, as torchrun does. Unlike the ``torchrun``
  command, which exits 1 whatever its workers said, it keeps the trainer's exit statuses: a worker's user error (4)
  or usage error (2) is the launcher's status, so a Job's podFailurePolicy still fails the Job at once on them; 3
  when the workers stopped after a checkpoint (preemption, SIGTERM).
* **The workers** (:class:`World`): one process per device. Rank 0 alone writes to S3 (progress, checkpoints, the
  adapter, the manifest); every rank reads the same data (broadcast from rank 0, so all ranks train on exactly what
  rank 0 read), starts from the same adapter initialisation, and agrees on every decision (resume, stop, commit)
  through a collective. An error on rank 0 reaches the other ranks as :class:`PeerFailed` (they record nothing).

The global batch of one optimiser step is ``training.batchSize`` per process x the number of processes; each
process takes every n-th row of a step, and the loss is the token-level mean over the whole global step, so N
processes with batch b train what one process with batch N x b trains (up to float rounding).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from langmerge.constants import EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE, EXIT_USER_ERROR

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds a collective may wait for the other ranks before it fails (a stuck peer fails the attempt).
ENV_TIMEOUT = "LANGMERGE_DISTRIBUTED_TIMEOUT_SECONDS"
DEFAULT_TIMEOUT_SECONDS = 1800.0
#: Verbs the launcher can run on every worker.
LAUNCHABLE_VERBS = ("train",)

DDP = "ddp"
FSDP = "fsdp"


class PeerFailed(Exception):
    """Another rank (rank 0) failed at a step all ranks take together; it records the failure."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


# -- the launcher --------------------------------------------------------------------------------------------------------
def exit_status(codes: Sequence[int]) -> int:
    """The launcher's exit status from its failed workers' exit statuses (negative: killed by a signal).

    An error no retry can fix on any rank wins (4, then 2): the other ranks were stopped because of it. Then a
    preemption (every failed rank stopped after a checkpoint, or was stopped by the launcher). Anything else: 1.
    """
    if EXIT_USER_ERROR in codes:
        return EXIT_USER_ERROR
    if EXIT_USAGE in codes:
        return EXIT_USAGE
    if codes and all(c in (EXIT_PREEMPTED, -signal.SIGTERM) for c in codes) and EXIT_PREEMPTED in codes:
        return EXIT_PREEMPTED
    return EXIT_FAILED


def split_launch_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``[torchrun options] <verb> [verb options]`` -> (torchrun options, worker argv starting with the verb)."""
    args = list(argv)
    for index, arg in enumerate(args):
        if arg in LAUNCHABLE_VERBS:
            return args[:index], args[index:]
    raise ValueError(f"no verb to run on the workers (one of {', '.join(LAUNCHABLE_VERBS)}) in {args!r}")


def launch_main(argv: Sequence[str]) -> int:
    """``langmerge-trainer distributed [torchrun options] train --task ...``: torchrun, keeping exit statuses."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    try:
        launcher_args, worker_args = split_launch_args(argv)
    except ValueError as err:
        log.error("%s", err)
        return EXIT_USAGE
    parser = get_args_parser()
    parser.prog = "langmerge-trainer distributed"
    args = parser.parse_args([*launcher_args, "--module", "langmerge_trainer", *worker_args])
    log.info(
        "launching %s on %s node(s) x %s process(es) (node rank %s)",
        worker_args[0],
        args.nnodes,
        args.nproc_per_node,
        getattr(args, "node_rank", 0),
    )
    try:
        run(args)
    except ChildFailedError as err:
        codes = [failure.exitcode for failure in err.failures.values()]
        status = exit_status(codes)
        log.error("workers failed with exit statuses %s: exit %d", codes, status)
        return status
    except SignalException as err:
        log.warning("stopped by %s: the workers checkpointed and stopped", err.sigval)
        return EXIT_PREEMPTED
    return EXIT_OK


# -- the workers ---------------------------------------------------------------------------------------------------------
@dataclass
class World:
    """This process's place among the training processes (one process: rank 0 of 1, every collective a no-op)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    #: Device of the collectives' tensors (CUDA for NCCL, CPU for gloo).
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: Whether another attempt may succeed where rank 0 failed with this error (the trainer's rule, which it sets:
    #: this module never imports the trainer), told to the other ranks in :class:`PeerFailed`.
    retryable: Callable[[BaseException], bool] = lambda err: True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """The element-wise sum of ``values`` over all ranks."""
        if not self.distributed:
            return [float(v) for v in values]
        import torch.distributed as dist

        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.tolist()]

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        return self.all_sum([1.0 if flag else 0.0])[0] > 0

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box: list[Any] = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        result: T = box[0]
        return result

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def on_main(self, fn: Callable[[], T], *, what: str) -> T:
        """Run ``fn`` on rank 0 only and hand its result to every rank. An exception on rank 0 is re-raised there
        and becomes :class:`PeerFailed` on the others (so no rank waits forever at the next collective)."""
        if not self.distributed:
            return fn()
        outcome: tuple[bool, Any, bool] | None = None
        error: BaseException | None = None
        if self.is_main:
            try:
                outcome = (True, fn(), True)
            except BaseException as err:
                error = err
                outcome = (False, f"{what} failed on rank 0: {type(err).__name__}: {err}", self.retryable(err))
        shared = self.broadcast(outcome)
        assert shared is not None
        if error is not None:
            raise error
        ok, payload, retryable = shared
        if not ok:
            raise PeerFailed(str(payload), retryable)
        result: T = payload
        return result

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()


SINGLE = World()


def env_world_size(env: dict[str, str] | None = None) -> int:
    """``WORLD_SIZE`` as torchrun sets it for its workers (1 when unset)."""
    source = os.environ if env is None else env
    return int(source.get("WORLD_SIZE", "1") or 1)


def die_with_parent() -> None:
    """Linux: be killed when the launcher dies. torch's launcher starts each worker in a session of its own, so a
    launcher killed outright (SIGKILL after a grace period) would otherwise leave its workers running."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() == 1:  # the launcher died before we asked
            os._exit(EXIT_FAILED)


def timeout_seconds() -> float:
    raw = os.environ.get(ENV_TIMEOUT, "").strip()
    return float(raw) if raw else DEFAULT_TIMEOUT_SECONDS


def init_world(device_name: str | None = None) -> tuple[World, torch.device]:
    """Join the process group torchrun's variables describe (``WORLD_SIZE`` > 1), else a one-process world.

    The device: ``cuda:<LOCAL_RANK>`` when CUDA is there (NCCL), else the CPU (gloo); ``device_name`` overrides it.
    """
    from langmerge_trainer.evaluate import pick_device

    size = env_world_size()
    if size <= 1:
        return SINGLE, pick_device(device_name)
    import torch.distributed as dist

    die_with_parent()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name:
        device = torch.device(device_name)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_seconds()))
    log.info("rank %d of %d (local rank %d) on %s, backend %s", rank, size, local_rank, device, backend)
    comm = device if backend == "nccl" else torch.device("cpu")
    return World(rank=rank, size=size, local_rank=local_rank, device=comm), device


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer (what FSDP shards one by one): the modules whose class the model names
    in ``_no_split_modules``, else the children of the first ``nn.ModuleList``."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(lists[0]) if lists else []


class LossModule(nn.Module):
    """The training objective as a module: ``forward(batch)`` is ``loss_fn(model, batch)``'s summed loss.

    The trainer's loss runs the decoder and the output head itself (in chunks, to bound memory) rather than the
    model's ``forward``; DDP and FSDP2 hook into the forward of the module they wrap, so they wrap this one."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, int]]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        loss_sum, _count = self.loss_fn(self.model, batch)
        return loss_sum


def wrap_model(
    model: nn.Module,
    parallelism: str,
    world: World,
    device: torch.device,
    loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, int]],
) -> nn.Module:
    """What the training loop runs with several processes: the objective (:class:`LossModule`) in DDP, or sharded by
    FSDP2 (every decoder block its own unit, the rest, embeddings and head, the root's). One process: ``model``."""
    if not world.distributed:
        return model
    objective = LossModule(model, loss_fn)
    if parallelism == FSDP:
        from torch.distributed.fsdp import fully_shard

        for block in decoder_blocks(model):
            fully_shard(block)
        fully_shard(objective)
        # The root initialises its blocks at its first forward; evaluation runs the blocks before any (the base
        # model's figures), so initialise now. (No public call does it: torch's own tests use this one.)
        objective._get_fsdp_state()._lazy_init()
        return objective
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(objective, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside the DDP and :class:`LossModule` wrappings (FSDP2 shards in place)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    if isinstance(model, LossModule):
        model = model.model
    return model


@contextlib.contextmanager
def gathered_root(running: nn.Module) -> Iterator[None]:
    """With FSDP2: the root's parameters (embeddings, head: everything outside the decoder blocks) gathered while
    the model is used outside the root's forward (evaluation); the blocks gather their own as they run. Every rank
    must take part. Nothing to do otherwise."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(running, FSDPModule):
        yield
        return
    running.unshard()
    try:
        yield
    finally:
        running.reshard()


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are FSDP2 shards (their full values need a collective)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's full value (a collective for an FSDP2 shard: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.full_tensor()
    return tensor


def load_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full value into a parameter (into this rank's shard for an FSDP2 parameter)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            shard = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(value.to(param.device))


def split_rows(rows: Sequence[T], world: World, parts: int) -> list[list[T]]:
    """This rank's rows of one global step (every ``world.size``-th), in ``parts`` micro-batches of near-equal size
    (some may be empty when a step has fewer rows than ranks x parts)."""
    mine = list(rows[world.rank :: world.size])
    size, extra = divmod(len(mine), parts)
    out, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        out.append(mine[start:end])
        start = end
    return out


def micro_batch_count(rows: int, world: World, accumulation: int) -> int:
    """Micro-batches per rank in a step of ``rows`` rows: the same on every rank (each runs as many forwards)."""
    return max(1, min(accumulation, math.ceil(rows / world.size)))
