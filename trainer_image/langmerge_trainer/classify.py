"""Sequence classification (``taskType: sequence-classification``): encoding, loss, metrics, loading a classifier.

A classifier expert is the base model loaded through ``AutoModelForSequenceClassification`` (encoders such as
BERT/XLM-R, or decoders, which classify from the last non-padding token) with a LoRA adapter on the base's linear
modules and a fully trained classifier head (PEFT ``modules_to_save``; ``classifier`` for encoders, ``score`` for
decoders). The pooler and the head are never LoRA targets: a ``targetModules`` entry such as ``dense`` would also
match ``bert.pooler.dense``, so those modules are excluded by name.

The head is initialised from a seed derived from the label set (:func:`head_seed`), not from the training seed, so
every expert of one label set starts from the same head. The merge combines heads whatever the method,
averaging each head's update from the shared initialisation like a linear merge: a head tensor with one row per label
merges row by row, row k weighted by each expert's language weight times its training examples of label k (the
adapter manifest's ``label_counts``), so an expert that never saw a label has no say on its row; rows no expert saw,
other head tensors, and merges where an expert's counts are unknown use the language weights, normalised to sum 1
(:func:`langmerge_trainer.merge.engine.merged_heads`). Experts with different label lists are never merged.

Metrics (:class:`langmerge.api.expert.Metrics`): cross-entropy over the labels (``evalLoss``), accuracy, and macro-F1
(F1 averaged over the labels that occur in the gold labels or the predictions), per language.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from langmerge.api.expert import Metrics
from langmerge_trainer.data import Example, limit_examples
from langmerge_trainer.evaluate import Batch, autocast_context, default_dtype, load_tokenizer, peft_compat

#: Names of classifier heads in transformers' sequence-classification models (what PEFT trains fully).
HEAD_MODULES = ("classifier", "score")
#: Module path components never given a LoRA adapter in a classifier (the pooler feeds the head; it stays as is).
NO_LORA_COMPONENTS = ("pooler",)


@dataclass(frozen=True)
class LabelledItem:
    """One tokenised classification example."""

    input_ids: tuple[int, ...]
    label: int

    def __len__(self) -> int:
        return len(self.input_ids)


def head_seed(labels: Sequence[str]) -> int:
    """The seed the classifier head is initialised from: a function of the label list only."""
    return int(hashlib.sha256(json.dumps(list(labels)).encode()).hexdigest()[:8], 16)


def encode_labelled(
    tokenizer: Any, examples: Sequence[Example], labels: Sequence[str], max_seq_length: int
) -> list[LabelledItem]:
    """Tokenise texts (with the tokenizer's special tokens, truncated to ``max_seq_length``); labels become indices."""
    index = {label: i for i, label in enumerate(labels)}
    if not examples:
        return []
    encoded = tokenizer(
        [e.text for e in examples], add_special_tokens=True, truncation=True, max_length=max_seq_length
    )["input_ids"]
    return [LabelledItem(tuple(ids), index[e.label]) for ids, e in zip(encoded, examples, strict=True)]


def pad_labelled(items: Sequence[LabelledItem], pad_token_id: int) -> Batch:
    """Right-pad texts to the longest one; ``labels`` holds one class index per row."""
    width = max(len(item) for item in items)
    ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, : len(item)] = torch.tensor(item.input_ids, dtype=torch.long)
        mask[row, : len(item)] = 1
    labels = torch.tensor([item.label for item in items], dtype=torch.long)
    return Batch(input_ids=ids, labels=labels, attention_mask=mask, tokens=int(mask.sum()))


def classifier_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return out.logits.float()


def classification_loss_sum(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's examples, and how many there are."""
    logits = classifier_logits(model, batch)
    return F.cross_entropy(logits, batch.labels, reduction="sum"), int(batch.labels.numel())


def macro_f1(gold: Sequence[int], predicted: Sequence[int]) -> float:
    """F1 averaged over the classes that occur in ``gold`` or ``predicted``."""
    classes = sorted(set(gold) | set(predicted))
    if not classes:
        return 0.0
    scores = []
    for c in classes:
        tp = sum(1 for g, p in zip(gold, predicted, strict=True) if g == c and p == c)
        fp = sum(1 for g, p in zip(gold, predicted, strict=True) if g != c and p == c)
        fn = sum(1 for g, p in zip(gold, predicted, strict=True) if g == c and p != c)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


@dataclass(frozen=True)
class LabelScores:
    """Per-example figures of a classifier, in the order the examples were given: what :class:`Metrics` are computed
    from, kept so that models can be compared example by example (paired, e.g. a bootstrap)."""

    #: Gold class index of each example.
    gold: tuple[int, ...]
    #: Predicted class index (argmax) of each example.
    predicted: tuple[int, ...]
    #: Cross-entropy of each example.
    losses: tuple[float, ...]

    def metrics(self, labels: Sequence[str] | None = None) -> Metrics:
        """Loss, accuracy, macro-F1 and (with ``labels``) how often each label was predicted."""
        n = len(self.gold)
        if n == 0:
            return Metrics(examples=0)
        loss = math.fsum(self.losses) / n
        predictions = None
        if labels is not None:
            predictions = {label: 0 for label in labels}
            for p in self.predicted:
                predictions[labels[p]] += 1
        return Metrics(
            eval_loss=loss,
            perplexity=math.exp(min(loss, 700.0)),
            accuracy=sum(1 for g, p in zip(self.gold, self.predicted, strict=True) if g == p) / n,
            macro_f1=macro_f1(self.gold, self.predicted),
            examples=n,
            predictions=predictions,
        )


def score_labelled_items(
    model: nn.Module, items: Sequence[LabelledItem], *, pad_token_id: int, batch_size: int = 16
) -> LabelScores:
    """Per-example gold label, prediction and loss (batched, no gradients, length-sorted)."""
    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: (len(items[i]), i))
    predicted = [0] * len(items)
    losses = [0.0] * len(items)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast_context(device):
            for start in range(0, len(order), batch_size):
                indices = order[start : start + batch_size]
                batch = pad_labelled([items[i] for i in indices], pad_token_id).to(device)
                logits = classifier_logits(model, batch)
                row_losses = F.cross_entropy(logits, batch.labels, reduction="none").tolist()
                for j, (i, p) in enumerate(zip(indices, logits.argmax(dim=-1).tolist(), strict=True)):
                    predicted[i] = int(p)
                    losses[i] = float(row_losses[j])
    finally:
        model.train(was_training)
    return LabelScores(gold=tuple(item.label for item in items), predicted=tuple(predicted), losses=tuple(losses))


def evaluate_labelled_items(
    model: nn.Module,
    items: Sequence[LabelledItem],
    *,
    pad_token_id: int,
    batch_size: int = 16,
    labels: Sequence[str] | None = None,
) -> Metrics:
    """Loss, accuracy and macro-F1 over encoded examples (:func:`score_labelled_items`); with ``labels``, also how
    often each label was predicted."""
    if not items:
        return Metrics(examples=0)
    return score_labelled_items(model, items, pad_token_id=pad_token_id, batch_size=batch_size).metrics(labels)


def score_labelled(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    labels: Sequence[str],
    *,
    max_seq_length: int = 512,
    batch_size: int = 16,
) -> LabelScores:
    """Per-example figures of a classifier on ``examples``, in their order."""
    items = encode_labelled(tokenizer, examples, labels, max_seq_length)
    return score_labelled_items(model, items, pad_token_id=pad_token(tokenizer), batch_size=batch_size)


def evaluate_labelled(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    labels: Sequence[str],
    *,
    max_seq_length: int = 512,
    batch_size: int = 16,
    max_examples: int | None = None,
) -> Metrics:
    """Metrics of a classifier on ``examples`` (at most ``max_examples``, chosen by content hash)."""
    chosen = limit_examples(examples, max_examples)
    items = encode_labelled(tokenizer, chosen, labels, max_seq_length)
    return evaluate_labelled_items(
        model, items, pad_token_id=pad_token(tokenizer), batch_size=batch_size, labels=labels
    )


def pad_token(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def load_classifier(
    path: Path,
    labels: Sequence[str],
    device: torch.device,
    *,
    pad_token_id: int | None,
    dtype: torch.dtype | None = None,
) -> Any:
    """The model under ``path`` with a sequence-classification head over ``labels``.

    A head missing from the checkpoint is initialised from :func:`head_seed` (the global RNG is left as it was).
    A checkpoint that already has a head for these labels (a merged full-weights model) loads it.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    id2label = dict(enumerate(labels))
    config = AutoConfig.from_pretrained(
        str(path), num_labels=len(labels), id2label=id2label, label2id={v: k for k, v in id2label.items()}
    )
    if getattr(config, "pad_token_id", None) is None and pad_token_id is not None:
        config.pad_token_id = pad_token_id  # decoders classify from the last token before padding
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(head_seed(labels))
        model: Any = AutoModelForSequenceClassification.from_pretrained(
            str(path), config=config, dtype=dtype or default_dtype(device)
        )
    return model.to(device)


def head_modules(model: nn.Module) -> list[str]:
    """The classifier head modules present in ``model`` (top-level names)."""
    names = {name for name, _ in model.named_children()}
    return [h for h in HEAD_MODULES if h in names]


def excluded_from_lora(model: nn.Module) -> list[str]:
    """Full names of modules that never get a LoRA adapter in a classifier: the pooler and the head."""
    heads = set(head_modules(model))
    out = []
    for name, _module in model.named_modules():
        parts = name.split(".")
        if name and (parts[0] in heads or any(p in NO_LORA_COMPONENTS for p in parts)):
            out.append(name)
    return out


def load_classifier_for_eval(
    base_dir: Path,
    labels: Sequence[str],
    *,
    adapter_dir: Path | None = None,
    model_dir: Path | None = None,
    device: torch.device | None = None,
) -> tuple[Any, Any]:
    """(classifier in eval mode, tokenizer): the base with a fresh head, the base + a PEFT adapter (which carries its
    head), or a full merged classifier folder."""
    from langmerge_trainer.evaluate import pick_device

    if adapter_dir is not None and model_dir is not None:
        raise ValueError("give an adapter or a full model, not both")
    device = device or pick_device()
    tokenizer = load_tokenizer(model_dir or base_dir)
    model = load_classifier(model_dir or base_dir, labels, device, pad_token_id=pad_token(tokenizer))
    if adapter_dir is not None:
        from peft import PeftModel

        with peft_compat():
            model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model, tokenizer
