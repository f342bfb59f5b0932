"""Training throughput: our LoRA loop (``langmerge_trainer.train.TrainingLoop``) against a plain transformers + peft
loop, on the same model, data and batch size, in one process.

The plain loop is what a short script does: shuffled batches padded to their longest example,
``model(input_ids, attention_mask, labels).loss``, ``backward``, ``torch.optim.AdamW``. Ours adds length-grouped (or
packed) batches, the output head applied only where a completion token is predicted, and fused AdamW on CUDA. Both
count the same tokens (non-padding input tokens) and use bf16 autocast on CUDA, fp32 on CPU. The rounds alternate
(plain, ours, plain, ours, ...) so that a shared machine's noise hits both.

    python benchmarks/trainer_throughput.py                         # tiny Llama on CPU
    python benchmarks/trainer_throughput.py --shape qwen-0.5b --batch 8 --seq-len 2048 --rank 64 --all-linear
    python benchmarks/trainer_throughput.py --shape llama-8b --batch 4 --seq-len 2048 --rank 64 --all-linear

``--shape llama-8b`` and ``qwen-0.5b`` build random-weight models from their published configurations (no download).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for sub in ("operator", "trainer_image"):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))

from langmerge.api.expert import Lora, Training  # noqa: E402
from langmerge_trainer.evaluate import IGNORE, Encoded, autocast_context, pad_batch, peft_compat  # noqa: E402
from langmerge_trainer.train import TrainingLoop, attach_lora  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_config(shape: str) -> Any:
    """A transformers config of the given shape (random weights are built from it)."""
    from transformers import LlamaConfig, Qwen2Config

    if shape == "tiny":
        return LlamaConfig(
            vocab_size=2048,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        )
    if shape == "qwen-0.5b":  # Qwen2.5-0.5B
        return Qwen2Config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        )
    if shape == "llama-8b":  # Llama-3.1-8B
        return LlamaConfig(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown shape {shape!r}")


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(model_config(shape), dtype=dtype)  # type: ignore[no-untyped-call]
    return model


def synthetic_examples(
    n: int, *, seq_len: int, spread: float, prompt_share: float, vocab: int, seed: int
) -> list[Encoded]:
    """``n`` examples with lengths uniform in [seq_len * (1 - spread), seq_len]; the first ``prompt_share`` of each
    is prompt (no loss)."""
    gen = torch.Generator().manual_seed(seed)
    low = max(8, int(seq_len * (1 - spread)))
    items = []
    for _ in range(n):
        length = int(torch.randint(low, seq_len + 1, (1,), generator=gen))
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        cut = max(1, int(length * prompt_share))
        items.append(Encoded(input_ids=tuple(ids), labels=tuple([IGNORE] * cut + ids[cut:])))
    return items


@dataclass
class Figures:
    name: str
    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    peak_memory_gb: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainLoop:
    """A plain loop: shuffled, padded batches, the model's own loss, AdamW."""

    def __init__(self, model: Any, items: list[Encoded], batch: int, lr: float, device: torch.device, seed: int):
        self.model, self.items, self.batch, self.device = model, items, batch, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def step(self) -> int:
        if len(self.order) < self.batch:
            self.order = torch.randperm(len(self.items), generator=self.gen).tolist()
        chosen, self.order = self.order[: self.batch], self.order[self.batch :]
        batch = pad_batch([self.items[i] for i in chosen], 0).to(self.device)
        self.model.train()
        with autocast_context(self.device):
            loss = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return int(batch.tokens)


class OurLoop:
    def __init__(self, model: Any, items: list[Encoded], training: Training, device: torch.device):
        self.loop = TrainingLoop(model, items, training, pad_token_id=0, device=device)

    def step(self) -> int:
        if self.loop.done:
            self.loop.step = 0
        return int(self.loop.train_step().tokens)


def measure(step: Callable[[], int], steps: int, warmup: int, device: torch.device, fig: Figures) -> None:
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(steps):
        tokens += step()
    sync(device)
    fig.seconds += time.perf_counter() - t0
    fig.tokens += tokens
    fig.steps += steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        fig.peak_memory_gb = max(fig.peak_memory_gb or 0.0, peak)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["tiny", "qwen-0.5b", "llama-8b"], default="tiny")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--batch", type=int, default=16, help="examples per optimiser step (both loops)")
    parser.add_argument("--seq-len", type=int, default=64, help="longest example, in tokens")
    parser.add_argument("--length-spread", type=float, default=0.75, help="lengths uniform in [seq*(1-x), seq]")
    parser.add_argument("--prompt-share", type=float, default=0.5, help="share of each example that is prompt")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--all-linear", action="store_true", help="adapters on all linear layers (default q,v)")
    parser.add_argument("--steps", type=int, default=30, help="measured steps per loop and round")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per loop and round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (plain, ours, ...)")
    parser.add_argument("--batching", choices=["length-grouped", "packed", "shuffled"], default="length-grouped")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.shape, device, dtype)
    targets = ALL_LINEAR if args.all_linear else ["q_proj", "v_proj"]
    lora = Lora(rank=args.rank, alpha=2 * args.rank, dropout=0.0, target_modules=targets)
    torch.manual_seed(0)
    model = attach_lora(model, lora, gradient_checkpointing=args.gradient_checkpointing)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    per_round = (args.steps + args.warmup) * args.batch
    items = synthetic_examples(
        max(per_round, 4 * args.batch),
        seq_len=args.seq_len,
        spread=args.length_spread,
        prompt_share=args.prompt_share,
        vocab=model.config.vocab_size,
        seed=1,
    )
    training = Training(
        epochs=max(1, args.rounds),
        batch_size=args.batch,
        learning_rate=1e-4,
        max_seq_length=args.seq_len,
        warmup_ratio=0.0,
        batching=args.batching,
        gradient_checkpointing=args.gradient_checkpointing,
    )

    def reset() -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in initial:
                    p.copy_(initial[n])

    plain_fig, ours_fig = Figures("plain transformers+peft"), Figures("langmerge TrainingLoop")
    with peft_compat():
        for _round in range(args.rounds):
            reset()
            plain = PlainLoop(model, items, args.batch, 1e-4, device, seed=_round)
            measure(plain.step, args.steps, args.warmup, device, plain_fig)
            del plain
            reset()
            ours = OurLoop(model, items, training, device)
            measure(ours.step, args.steps, args.warmup, device, ours_fig)
            del ours

    ratio = ours_fig.tokens_per_second / plain_fig.tokens_per_second if plain_fig.tokens_per_second else 0.0
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(
        f"shape={args.shape} device={device_name} dtype={dtype} batch={args.batch} seq_len={args.seq_len} "
        f"rank={args.rank} targets={','.join(targets)} batching={args.batching} steps={args.steps}x{args.rounds}"
    )
    for fig in (plain_fig, ours_fig):
        memory = f"  peak {fig.peak_memory_gb:.1f} GiB" if fig.peak_memory_gb is not None else ""
        print(
            f"  {fig.name:<26} {fig.tokens_per_second:>12,.0f} tokens/s  ({fig.tokens:,} tokens in {fig.seconds:.2f}s){memory}"
        )
    print(f"  ratio ours/plain: {ratio:.2f}x")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "device": device_name,
                    "plain": {**asdict(plain_fig), "tokens_per_second": plain_fig.tokens_per_second},
                    "ours": {**asdict(ours_fig), "tokens_per_second": ours_fig.tokens_per_second},
                    "ratio": ratio,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
