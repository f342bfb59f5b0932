"""Evaluation on completion tokens, and the encoding and forward pass it shares with training.

An example becomes ``[bos] prompt completion [eos]``; only the completion and the end-of-sequence token are predicted
(labels ``-100`` elsewhere). Metrics (:class:`langmerge.api.expert.Metrics`): mean cross-entropy over completion
tokens, its perplexity, teacher-forced token accuracy (argmax) and exact match (every completion token right).

The forward pass (:func:`completion_hidden`) runs the decoder once and applies the output head only at the positions
that carry a label, in chunks: for a large vocabulary this skips most of the logits a plain ``model(...).logits`` call
would compute and keep in memory. Models whose head does more than a linear map fall back to the plain call.

Public entry points for other modules: :func:`load_for_eval`, :func:`evaluate_examples`, :func:`evaluate_language`.
The ``evaluate`` CLI verb is :func:`cli_main`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from langmerge.api.expert import Dataset, Metrics
from langmerge.artifacts import utcnow
from langmerge.store import ObjectStore
from langmerge_trainer.data import Example, limit_examples, load_eval_split, read_json_arg
from langmerge_trainer.modelcache import ensure_model

log = logging.getLogger(__name__)

IGNORE = -100
#: Model types whose causal-LM forward is exactly ``lm_head(decoder(...).last_hidden_state)``.
PLAIN_HEAD_MODEL_TYPES = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo", "olmo2", "gemma"}
)
#: Rows of hidden states sent through the output head at once.
HEAD_CHUNK_ROWS = 4096


# -- encoding -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    """One tokenised example: ``input_ids`` and ``labels`` (``-100`` where nothing is predicted)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def completion_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def encode_example(tokenizer: Any, example: Example, max_seq_length: int) -> Encoded:
    """Tokenise prompt and completion apart (so the label boundary is exact) and fit them into ``max_seq_length``.

    A too-long example keeps the end of its prompt and the start of its completion; the completion keeps at least
    half of the budget, so every example has something to predict.
    """
    prompt = list(tokenizer(example.prompt, add_special_tokens=False)["input_ids"])
    completion = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    completion += eos
    budget = max_seq_length - len(bos)
    if len(prompt) + len(completion) > budget:
        keep_completion = min(len(completion), max(budget - len(prompt), budget // 2))
        completion = completion[:keep_completion]
        keep_prompt = budget - keep_completion
        prompt = prompt[len(prompt) - keep_prompt :] if keep_prompt > 0 else []
    input_ids = bos + prompt + completion
    labels = [IGNORE] * (len(bos) + len(prompt)) + completion
    return Encoded(input_ids=tuple(input_ids), labels=tuple(labels))


def encode_examples(tokenizer: Any, examples: Sequence[Example], max_seq_length: int) -> list[Encoded]:
    return [encode_example(tokenizer, e, max_seq_length) for e in examples]


def pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


@dataclass
class Batch:
    """Tensors of one forward pass. Padded batches carry an attention mask; packed ones carry position ids."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    #: Tokens that are not padding.
    tokens: int = 0

    def to(self, device: torch.device) -> Batch:
        return Batch(
            input_ids=self.input_ids.to(device),
            labels=self.labels.to(device),
            attention_mask=None if self.attention_mask is None else self.attention_mask.to(device),
            position_ids=None if self.position_ids is None else self.position_ids.to(device),
            tokens=self.tokens,
        )


def pad_batch(items: Sequence[Encoded], pad_token_id: int) -> Batch:
    """Right-pad examples to the longest one."""
    width = max(len(item) for item in items)
    ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item)
        ids[row, :n] = torch.tensor(item.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(item.labels, dtype=torch.long)
        mask[row, :n] = 1
    return Batch(input_ids=ids, labels=labels, attention_mask=mask, tokens=int(mask.sum()))


# -- the forward pass -------------------------------------------------------------------------------------------------
def causal_lm(model: nn.Module) -> Any:
    """The transformers causal LM inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def has_plain_head(model: nn.Module) -> bool:
    """Whether logits are just the output head applied to the decoder's last hidden state."""
    lm = causal_lm(model)
    config = lm.config
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return False
    return not any(getattr(config, attr, None) for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"))


@dataclass
class HeadInputs:
    """What the output head needs at the labelled positions of a batch."""

    #: Hidden states (or, in the fallback, logits) at positions whose next token is predicted: ``[N, H]``.
    hidden: torch.Tensor
    #: The token to predict at each of those positions: ``[N]``.
    targets: torch.Tensor
    #: The batch row each position belongs to: ``[N]``.
    rows: torch.Tensor
    #: Maps ``hidden`` rows to logits.
    head: Callable[[torch.Tensor], torch.Tensor]


def completion_hidden(model: nn.Module, batch: Batch) -> HeadInputs:
    """Run the decoder and keep only the positions that predict a label (shifted by one)."""
    lm = causal_lm(model)
    inputs: dict[str, Any] = {"input_ids": batch.input_ids, "use_cache": False}
    if batch.attention_mask is not None:
        inputs["attention_mask"] = batch.attention_mask
    if batch.position_ids is not None:
        inputs["position_ids"] = batch.position_ids
    keep = batch.labels[:, 1:] != IGNORE
    targets = batch.labels[:, 1:][keep]
    rows = torch.arange(batch.labels.shape[0], device=keep.device).unsqueeze(1).expand_as(keep)[keep]
    if has_plain_head(model):
        hidden = lm.get_decoder()(**inputs).last_hidden_state
        head: Callable[[torch.Tensor], torch.Tensor] = lm.get_output_embeddings()
    else:
        hidden = lm(**inputs).logits

        def head(logits: torch.Tensor) -> torch.Tensor:
            return logits

    return HeadInputs(hidden=hidden[:, :-1][keep], targets=targets, rows=rows, head=head)


def _chunk_loss(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor) -> Any:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def completion_loss_sum(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's completion tokens, and how many there are (training).

    The head runs in chunks of :data:`HEAD_CHUNK_ROWS` rows; when there is more than one chunk, each chunk's logits
    are recomputed in the backward pass instead of being kept, so peak memory does not grow with the batch.
    """
    inputs = completion_hidden(model, batch)
    count = int(inputs.targets.numel())
    if count == 0:
        return inputs.hidden.sum() * 0.0, 0
    if count <= HEAD_CHUNK_ROWS:
        return _chunk_loss(inputs.head, inputs.hidden, inputs.targets), count
    total: torch.Tensor | None = None
    for start in range(0, count, HEAD_CHUNK_ROWS):
        part = checkpoint(
            _chunk_loss,
            inputs.head,
            inputs.hidden[start : start + HEAD_CHUNK_ROWS],
            inputs.targets[start : start + HEAD_CHUNK_ROWS],
            use_reentrant=False,
        )
        total = part if total is None else total + part
    assert total is not None
    return total, count


# -- devices and loading ------------------------------------------------------------------------------------------------
def pick_device(name: str | None = None) -> torch.device:
    """``name`` if given, else the first CUDA device when there is one, else the CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast_context(device: torch.device) -> Any:
    """bf16 autocast on CUDA (fp32 LoRA weights meet bf16 activations); nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: Path, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or default_dtype(device))
    return model.to(device)


@contextmanager
def peft_compat() -> Iterator[None]:
    """Silence one known FutureWarning: peft 0.21 reads ``model.is_gradient_checkpointing``, which transformers 5.x
    deprecates (in favour of ``is_activation_checkpointing``) when wrapping any model. Nothing else is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def load_for_eval(
    base_dir: Path,
    *,
    adapter_dir: Path | None = None,
    model_dir: Path | None = None,
    device: torch.device | None = None,
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer): the base, the base with a PEFT adapter, or a full merged model folder.

    The tokenizer comes from the adapter or model folder when it carries one, else from the base.
    """
    if adapter_dir is not None and model_dir is not None:
        raise ValueError("give an adapter or a full model, not both")
    device = device or pick_device()
    weights = model_dir or base_dir
    model = load_causal_lm(weights, device)
    if adapter_dir is not None:
        from peft import PeftModel

        with peft_compat():
            model = PeftModel.from_pretrained(model, str(adapter_dir))
    tokenizer_dir = next((d for d in (adapter_dir, model_dir) if d is not None and _has_tokenizer(d)), base_dir)
    model.eval()
    return model, load_tokenizer(tokenizer_dir)


# -- metrics ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompletionScores:
    """Per-example figures on completion tokens, in the order the examples were given: what :class:`Metrics` are
    computed from, kept so that models can be compared example by example (paired, e.g. a bootstrap)."""

    #: Summed cross-entropy over each example's completion tokens.
    loss_sums: tuple[float, ...]
    #: Completion tokens of each example.
    tokens: tuple[int, ...]
    #: Completion tokens predicted right (teacher forcing, argmax) per example.
    correct: tuple[int, ...]

    def metrics(self) -> Metrics:
        examples = len(self.tokens)
        tokens = sum(self.tokens)
        if tokens == 0:
            return Metrics(examples=examples)
        loss = math.fsum(self.loss_sums) / tokens
        return Metrics(
            eval_loss=loss,
            perplexity=math.exp(min(loss, 700.0)),
            token_accuracy=sum(self.correct) / tokens,
            exact_match=sum(1 for c, t in zip(self.correct, self.tokens, strict=True) if c == t) / examples,
            examples=examples,
        )


def score_encoded(
    model: nn.Module, items: Sequence[Encoded], *, pad_token_id: int, batch_size: int = 8
) -> CompletionScores:
    """Per-example loss sums, token counts and right tokens (batched, no gradients, length-sorted to pad little)."""
    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: (len(items[i]), i))
    loss_sums = [0.0] * len(items)
    tokens = [0] * len(items)
    correct = [0] * len(items)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast_context(device):
            for start in range(0, len(order), batch_size):
                indices = order[start : start + batch_size]
                batch = pad_batch([items[i] for i in indices], pad_token_id).to(device)
                inputs = completion_hidden(model, batch)
                row_loss = torch.zeros(len(indices), dtype=torch.float64, device=device)
                row_hits = torch.zeros(len(indices), dtype=torch.long, device=device)
                row_tokens = torch.zeros(len(indices), dtype=torch.long, device=device)
                for lo in range(0, inputs.targets.numel(), HEAD_CHUNK_ROWS):
                    logits = inputs.head(inputs.hidden[lo : lo + HEAD_CHUNK_ROWS]).float()
                    targets = inputs.targets[lo : lo + HEAD_CHUNK_ROWS]
                    rows = inputs.rows[lo : lo + HEAD_CHUNK_ROWS]
                    losses = F.cross_entropy(logits, targets, reduction="none")
                    row_loss.index_add_(0, rows, losses.double())
                    row_hits.index_add_(0, rows, (logits.argmax(dim=-1) == targets).long())
                    row_tokens.index_add_(0, rows, torch.ones_like(rows))
                for j, i in enumerate(indices):
                    loss_sums[i] = float(row_loss[j])
                    tokens[i] = int(row_tokens[j])
                    correct[i] = int(row_hits[j])
    finally:
        model.train(was_training)
    return CompletionScores(loss_sums=tuple(loss_sums), tokens=tuple(tokens), correct=tuple(correct))


def evaluate_encoded(model: nn.Module, items: Sequence[Encoded], *, pad_token_id: int, batch_size: int = 8) -> Metrics:
    """Metrics over already encoded examples (:func:`score_encoded`, summed)."""
    return score_encoded(model, items, pad_token_id=pad_token_id, batch_size=batch_size).metrics()


def evaluate_examples(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_seq_length: int = 1024,
    batch_size: int = 8,
    max_examples: int | None = None,
) -> Metrics:
    """Metrics of ``model`` on ``examples`` (at most ``max_examples``, chosen by content hash)."""
    chosen = limit_examples(examples, max_examples)
    items = encode_examples(tokenizer, chosen, max_seq_length)
    return evaluate_encoded(model, items, pad_token_id=pad_id(tokenizer), batch_size=batch_size)


def score_examples(
    model: nn.Module, tokenizer: Any, examples: Sequence[Example], *, max_seq_length: int = 1024, batch_size: int = 8
) -> CompletionScores:
    """Per-example figures of ``model`` on ``examples``, in their order."""
    items = encode_examples(tokenizer, examples, max_seq_length)
    return score_encoded(model, items, pad_token_id=pad_id(tokenizer), batch_size=batch_size)


@dataclass
class EvalResult:
    metrics: Metrics
    base_metrics: Metrics | None = None

    def record(self, **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "evaluation", "metrics": self.metrics.model_dump(mode="json", exclude_none=True)}
        if self.base_metrics is not None:
            out["base_metrics"] = self.base_metrics.model_dump(mode="json", exclude_none=True)
        out.update({k: v for k, v in extra.items() if v is not None})
        out["evaluated_at"] = utcnow()
        return out


def evaluate_language(
    store: ObjectStore,
    *,
    base_uri: str,
    dataset: Dataset,
    base_digest: str | None = None,
    adapter_uri: str | None = None,
    model_uri: str | None = None,
    with_base: bool = False,
    max_examples: int | None = 512,
    max_seq_length: int = 1024,
    batch_size: int = 8,
    device: torch.device | None = None,
) -> EvalResult:
    """Evaluate the base (+ the adapter under ``adapter_uri``, or the full model under ``model_uri``) on the eval split
    of ``dataset``. ``with_base`` also evaluates the base alone (with an adapter: by disabling it).
    """
    examples = load_eval_split(store, dataset, max_examples=max_examples)
    base_dir = ensure_model(store, base_uri, base_digest)
    with tempfile.TemporaryDirectory(prefix="langmerge-eval-") as tmp:
        adapter_dir = model_dir = None
        if adapter_uri:
            adapter_dir = Path(tmp) / "adapter"
            if not store.download_prefix(adapter_uri, adapter_dir):
                raise FileNotFoundError(f"no adapter files under {adapter_uri}")
        if model_uri:
            model_dir = ensure_model(store, model_uri)
        model, tokenizer = load_for_eval(base_dir, adapter_dir=adapter_dir, model_dir=model_dir, device=device)
        kwargs: dict[str, Any] = {"max_seq_length": max_seq_length, "batch_size": batch_size}
        metrics = evaluate_examples(model, tokenizer, examples, **kwargs)
        base_metrics = None
        if with_base:
            if adapter_dir is not None:
                with model.disable_adapter():
                    base_metrics = evaluate_examples(model, tokenizer, examples, **kwargs)
            elif model_dir is not None:
                base_model, base_tokenizer = load_for_eval(base_dir, device=device)
                base_metrics = evaluate_examples(base_model, base_tokenizer, examples, **kwargs)
            else:
                base_metrics = metrics
    return EvalResult(metrics=metrics, base_metrics=base_metrics)


# -- CLI ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="langmerge-trainer evaluate",
        description="Evaluate a base model (+ adapter, or a merged model) on a language's eval split.",
    )
    parser.add_argument("--base-model", required=True, help="s3:// prefix of the base model folder")
    parser.add_argument("--base-digest", help="digest of the base model (cache key); default: its listing digest")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--adapter", help="s3:// prefix of a PEFT adapter folder")
    which.add_argument("--model", help="s3:// prefix of a full (merged) model folder")
    parser.add_argument(
        "--dataset",
        required=True,
        help='the language\'s dataset as JSON (the LanguageExpert spec.dataset, e.g. {"uri": "s3://..."}) or @file',
    )
    parser.add_argument("--output", required=True, help="s3:// URI of the metrics JSON to write")
    parser.add_argument("--language", help="language tag recorded in the output")
    parser.add_argument("--with-base", action="store_true", help="also evaluate the base model alone")
    parser.add_argument("--max-examples", type=int, default=512)
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    return parser


def cli_main(argv: Sequence[str], store: ObjectStore | None = None) -> int:
    """The ``evaluate`` verb. Exit status 0 on success, 2 on a usage error (other errors propagate)."""
    parser = build_parser()
    args = parser.parse_args(list(argv))
    try:
        dataset = Dataset.model_validate(read_json_arg(args.dataset))
    except (ValueError, OSError) as err:
        parser.print_usage()
        log.error("--dataset: %s", err)
        return 2
    store = store or ObjectStore.from_config()
    result = evaluate_language(
        store,
        base_uri=args.base_model,
        base_digest=args.base_digest,
        dataset=dataset,
        adapter_uri=args.adapter,
        model_uri=args.model,
        with_base=args.with_base,
        max_examples=args.max_examples,
        max_seq_length=args.max_seq_length,
        batch_size=args.batch_size,
        device=pick_device(args.device),
    )
    record = result.record(
        language=args.language,
        base_model=args.base_model,
        adapter=args.adapter,
        model=args.model,
        dataset=dataset.model_dump(mode="json", exclude_none=True),
    )
    store.put_json(args.output, record)
    log.info("evaluation written to %s: %s", args.output, json.dumps(record["metrics"]))
    return 0
