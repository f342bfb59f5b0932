"""Data-parallel LoRA training (DDP) with 2 processes against 1: tokens per second of the trainer's own loop
(``TrainingLoop`` under ``langmerge_trainer.distributed``, exactly what ``langmerge-trainer distributed`` runs), on the
same model and the same per-process batch.

Every configuration runs in fresh processes, started the way the Jobs start them: 1 process directly, N processes
through torch's elastic launcher (torchrun; gloo on CPU, NCCL on GPUs). Each measures ``--steps`` optimiser steps
after ``--warmup`` unmeasured ones and counts the global tokens of each step (all ranks). On a CPU machine the
processes share its cores; the figures compare

* 1 process x 1 thread (the baseline),
* 1 process x N threads (the same cores used by one process instead),
* N processes x 1 thread each (DDP),

and print the ratios. The 2-process run trains on 2 x batch examples per step: the ratio is throughput, not time to
a result (``tests/trainer/test_trainer_distributed.py`` shows the two train the same adapter as 1 process with twice
the batch).

Measured 2026-12-02 on this 2-core x86_64 machine (AMD EPYC, 2 vCPUs, torch CPU) with nothing else running, the
defaults (tiny Llama, batch 16 per process, seq_len <= 128, 30 steps after 3 warm-up, best of 2 rounds; 60 s):

    1 process x 1 thread           32,928 tokens/s   x1.00
    1 process x 2 threads          41,053 tokens/s   x1.25
    2 processes x 1 thread (DDP)   43,570 tokens/s   x1.32

On the same two cores, two DDP processes beat one process with two threads (x1.32 against x1.25 of the 1-thread
baseline; the all-reduce carries only the adapter's gradients). A run on the same machine under a load average of ~3.6
gave 28,650 / 13,728 / 24,732 tokens/s: on shared cores the figures say little. No GPU figures: no device was lent.

    python benchmarks/ddp_throughput.py                      # tiny Llama, CPU
    python benchmarks/ddp_throughput.py --shape small --json ddp.json
    python benchmarks/ddp_throughput.py --device cuda        # where GPUs are: N processes need N GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()


def _paths() -> None:
    for sub in ("operator", "trainer_image", "benchmarks"):
        if str(ROOT / sub) not in sys.path:
            sys.path.insert(0, str(ROOT / sub))


def model_config(shape: str) -> Any:
    from transformers import LlamaConfig

    sizes = {"tiny": (64, 128, 2, 4), "small": (256, 768, 4, 8)}
    hidden, inter, layers, heads = sizes[shape]
    return LlamaConfig(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def worker(args: argparse.Namespace) -> int:
    """One process of a measurement (rank 0 prints the figures as one JSON line)."""
    _paths()
    import torch
    from transformers import AutoModelForCausalLM

    from langmerge.api.expert import Lora, Training
    from langmerge_trainer.distributed import init_world, wrap_model
    from langmerge_trainer.evaluate import completion_loss_sum, peft_compat
    from langmerge_trainer.train import TrainingLoop, attach_lora
    from trainer_throughput import synthetic_examples

    world, device = init_world(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(model_config(args.shape), dtype=dtype)  # type: ignore[no-untyped-call]
    lora = Lora(rank=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    with peft_compat():
        model = attach_lora(model, lora)
    steps = args.warmup + args.steps
    items = synthetic_examples(
        steps * args.batch * world.size, seq_len=args.seq_len, spread=0.5, prompt_share=0.5, vocab=2048, seed=1
    )
    training = Training(epochs=1, batch_size=args.batch, max_seq_length=args.seq_len, warmup_ratio=0.0)
    running = wrap_model(model, "ddp", world, device, completion_loss_sum)
    loop = TrainingLoop(running, items, training, pad_token_id=0, device=device, world=world)
    for _ in range(args.warmup):
        loop.train_step()
    world.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(args.steps):
        tokens += loop.train_step().tokens  # the global step's tokens (summed over ranks)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    seconds = max(world.all_sum([seconds])[0] / world.size, 1e-9)
    if world.is_main:
        print(
            json.dumps(
                {"processes": world.size, "threads": torch.get_num_threads(), "tokens": tokens, "seconds": seconds}
            )
        )
    world.close()
    return 0


def run(args: argparse.Namespace, *, processes: int, threads: int) -> dict[str, Any]:
    """One measurement in fresh processes; its figures."""
    common = [
        "--worker",
        "--shape",
        args.shape,
        "--batch",
        str(args.batch),
        "--seq-len",
        str(args.seq_len),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    if args.device:
        common += ["--device", args.device] if processes == 1 or args.device != "cuda" else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LANGMERGE_LOG_LEVEL": "WARNING"}
    if processes == 1:
        cmd = [sys.executable, str(HERE), *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        cmd += [str(HERE), *common]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")
    line = next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{"))
    figures: dict[str, Any] = json.loads(line)
    figures["tokens_per_second"] = figures["tokens"] / figures["seconds"]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="examples per optimiser step per process")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="measured steps")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps")
    parser.add_argument("--rounds", type=int, default=2, help="repetitions of every configuration (interleaved)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    _paths()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    n = args.processes
    configs = {
        "1 process x 1 thread": (1, 1),
        f"1 process x {n} threads": (1, n),
        f"{n} processes x 1 thread (DDP)": (n, 1),
    }
    if device == "cuda":  # one GPU per process: threads do not matter
        configs = {"1 process (1 GPU)": (1, 1), f"{n} processes ({n} GPUs, DDP)": (n, 1)}
        if torch.cuda.device_count() < n:
            print(f"only {torch.cuda.device_count()} GPU(s): {n} processes need {n}; measuring 1 process only")
            configs = {"1 process (1 GPU)": (1, 1)}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for _round in range(args.rounds):
        for name, (processes, threads) in configs.items():
            results[name].append(run(args, processes=processes, threads=threads))
    best = {name: max(r["tokens_per_second"] for r in runs) for name, runs in results.items()}
    baseline = next(iter(best.values()))
    cpus = os.cpu_count()
    print(
        f"shape={args.shape} device={device} ({cpus} CPUs) batch={args.batch}/process seq_len<={args.seq_len} "
        f"steps={args.steps} (+{args.warmup} warm-up) rounds={args.rounds} (best of)"
    )
    for name, value in best.items():
        print(f"  {name:<32} {value:>10,.0f} tokens/s   x{value / baseline:.2f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "device": device, "best": best, "runs": results},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
