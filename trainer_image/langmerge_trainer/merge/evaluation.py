"""The merge Job's evaluation, with one model in memory.

The quality gate compares, per language, the merged model with that language's expert alone, on the same held-out
examples. Loading a model per comparison holds two at once (the merged model, and the base again under each
expert's adapter). Here the base is loaded once and the LoRA adapters are swapped on it:

* each expert: its adapter loaded onto the base, evaluated, deleted again;
* a merged PEFT adapter: one more adapter on the same base, kept while the experts come and go;
* merged full weights: evaluated last, loaded once the base has been released;
* the base alone, first, before any adapter is attached: the floor no published merge may fall below.

On a GPU that supports it the model is loaded in bfloat16 straight onto the device, on CPU in float32 (the figures
then match the trainer's own evaluation of each expert bit for bit).

Sequence classifiers (``labels`` given) load through AutoModelForSequenceClassification; each adapter carries its own
classifier head (PEFT keeps one copy per adapter name, swapped with the adapter), and the figures are accuracy,
macro-F1 and the loss over the labels (:mod:`langmerge_trainer.classify`).

Memory of the evaluation, for an N-parameter base: N x 2 bytes (bf16, GPU memory; little host memory, the weights
are loaded onto the device as they are read) or N x 4 bytes (float32, CPU), plus the adapters in use (two at most)
and one batch's activations (the output head runs in chunks: :mod:`langmerge_trainer.evaluate`). Before, it held two
models: twice that. The benchmark ``benchmarks/merge_eval_memory.py`` measures both against the model's size.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from langmerge.api.expert import Metrics
from langmerge_trainer.data import Example
from langmerge_trainer.evaluate import evaluate_examples, load_tokenizer, peft_compat

log = logging.getLogger(__name__)

#: Adapter names on the shared base (PEFT adapter names must not contain ".").
MERGED = "merged"
EXPERT = "expert"


class MergeFigures(NamedTuple):
    """Per-language figures of one merge's evaluation."""

    merged: dict[str, Metrics]
    experts: dict[str, Metrics]
    #: The base model before fine-tuning, on the same examples.
    base: dict[str, Metrics]


@dataclass(frozen=True)
class LanguageInput:
    """One language to evaluate: its expert's adapter folder and its held-out examples."""

    language: str
    adapter_dir: Path
    examples: Sequence[Example]
    #: The expert's training.maxSeqLength: evaluation truncates the same way training did.
    max_seq_length: int = 1024


def eval_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU that supports it, else float32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(folder: Path, device: torch.device, labels: Sequence[str] | None = None) -> Any:
    """A causal LM (or, with ``labels``, a sequence classifier) for evaluation: in :func:`eval_dtype`, placed on
    ``device`` while it is read."""
    from transformers import AutoModelForCausalLM

    if labels is not None:
        from langmerge_trainer.classify import load_classifier, pad_token

        model: Any = load_classifier(
            folder, labels, device, pad_token_id=pad_token(load_tokenizer(folder)), dtype=eval_dtype(device)
        )
        model.eval()
        return model
    kwargs: dict[str, Any] = {"dtype": eval_dtype(device)}
    if device.type == "cuda":
        kwargs["device_map"] = str(device)
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    if device.type != "cuda":
        model = model.to(device)
    model.eval()
    return model


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def _tokenizer(folder: Path, base_dir: Path, cache: dict[Path, Any]) -> Any:
    """The folder's own tokenizer when it carries one, else the base's (loaded once each)."""
    source = folder if _has_tokenizer(folder) else base_dir
    if source not in cache:
        cache[source] = load_tokenizer(source)
    return cache[source]


def _collect() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate_merge(
    base_dir: Path,
    merged_dir: Path,
    *,
    full_weights: bool,
    languages: Sequence[LanguageInput],
    device: torch.device,
    max_examples: int | None = None,
    labels: Sequence[str] | None = None,
    on_language: Callable[[str], None] = lambda language: None,
    known_base: Mapping[str, Metrics] | None = None,
    known_experts: Mapping[str, Metrics] | None = None,
) -> MergeFigures:
    """Per-language metrics of the merged model, of each expert alone and of the base model before fine-tuning (the
    gate's floor): ``(merged, experts, base)``.

    ``merged_dir`` holds a PEFT adapter, or full merged weights when ``full_weights``. ``labels``: the experts are
    sequence classifiers over these labels (the base then has its freshly initialised head). ``on_language`` is
    called before each language's first evaluation (progress). ``known_base`` and ``known_experts``: figures already
    known for those languages on the same examples (:mod:`langmerge_trainer.merge.evalcache`); those models are not
    evaluated (nor an expert's adapter loaded) again.
    """
    from peft import PeftModel

    def evaluate(model: Any, tokenizer: Any, examples: Sequence[Example], **kwargs: Any) -> Metrics:
        if labels is not None:
            from langmerge_trainer.classify import evaluate_labelled

            return evaluate_labelled(model, tokenizer, examples, labels, **kwargs)
        return evaluate_examples(model, tokenizer, examples, **kwargs)

    tokenizers: dict[Path, Any] = {}
    merged: dict[str, Metrics] = {}
    experts: dict[str, Metrics] = {}
    base: dict[str, Metrics] = dict(known_base or {})
    known = dict(known_experts or {})
    model: Any = load_model(base_dir, device, labels)
    for item in languages:  # the base alone, before any adapter is attached: the floor no merge may fall below
        if item.language in base:
            continue
        base[item.language] = evaluate(
            model,
            _tokenizer(base_dir, base_dir, tokenizers),
            item.examples,
            max_seq_length=item.max_seq_length,
            max_examples=max_examples,
        )
    wrapped = False
    previous: str | None = None
    with peft_compat():
        if not full_weights:
            model = PeftModel.from_pretrained(model, str(merged_dir), adapter_name=MERGED)
            wrapped = True
        for index, item in enumerate(languages):
            on_language(item.language)
            kwargs = {"max_seq_length": item.max_seq_length, "max_examples": max_examples}
            if item.language in known:
                experts[item.language] = known[item.language]
                if not full_weights:
                    merged[item.language] = evaluate(
                        model, _tokenizer(merged_dir, base_dir, tokenizers), item.examples, **kwargs
                    )
                continue
            name = f"{EXPERT}{index}"
            if wrapped:
                model.load_adapter(str(item.adapter_dir), adapter_name=name)
            else:
                model = PeftModel.from_pretrained(model, str(item.adapter_dir), adapter_name=name)
                wrapped = True
            model.set_adapter(name)
            if previous is not None:  # one expert adapter at a time (never the last adapter left: PEFT needs one)
                model.delete_adapter(previous)
                previous = None
            experts[item.language] = evaluate(
                model, _tokenizer(item.adapter_dir, base_dir, tokenizers), item.examples, **kwargs
            )
            if full_weights:
                previous = name
            else:
                model.set_adapter(MERGED)
                model.delete_adapter(name)
                merged[item.language] = evaluate(
                    model, _tokenizer(merged_dir, base_dir, tokenizers), item.examples, **kwargs
                )
    model = None
    _collect()
    if full_weights:
        # The experts are done and the base is gone: the merged weights are the only model in memory.
        model = load_model(merged_dir, device, labels)
        tokenizer = _tokenizer(merged_dir, base_dir, tokenizers)
        for item in languages:
            kwargs = {"max_seq_length": item.max_seq_length, "max_examples": max_examples}
            merged[item.language] = evaluate(model, tokenizer, item.examples, **kwargs)
        model = None
        _collect()
    return MergeFigures(merged, experts, base)
