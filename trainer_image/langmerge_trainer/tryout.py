"""``langmerge-trainer try --task <json>``: what a merged model (and the base, and each expert) answers.

The operator side (``langmerge try``, :mod:`langmerge.tryout`) resolves NAME into a :class:`langmerge.tasks.TryTask`.
Here the models are loaded from S3 the way a serving process loads them: the base model folder through
``AutoModelForCausalLM.from_pretrained``, a published PEFT adapter on top of it through ``PeftModel.from_pretrained``
(each expert as one more named adapter on the same base, switched per request; the base alone with the adapters
disabled), full merged weights through ``from_pretrained`` of their own folder. Folders are cached in the model
cache (``LANGMERGE_MODEL_CACHE``), with progress on stderr while they download.

For each language it prints a few held-out inputs of the expert's data (or the ``--input`` texts) with the expected
answer and the greedy generation of each model (base, the language's own expert, the merged model) one under the
other. A prompt is encoded as in training: the beginning-of-sequence token, then the prompt's tokens.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from langmerge.store import ObjectStore
from langmerge.tasks import TryLanguage, TryTask
from langmerge_trainer.data import Example, load_eval_split, read_json_arg
from langmerge_trainer.evaluate import evaluate_examples, load_tokenizer, peft_compat, pick_device
from langmerge_trainer.merge.evaluation import load_model
from langmerge_trainer.modelcache import cache_root, ensure_model, is_complete

log = logging.getLogger(__name__)

MERGED = "merged"
#: Shown for an answer with no text (the model ended it at once).
EMPTY = "(empty answer)"
#: Width of the row labels ("input", "expected", "base", ...).
LABEL_WIDTH = 10


# -- progress -----------------------------------------------------------------------------------------------------------
def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


@dataclass
class Progress:
    """Progress lines on a stream: a self-updating line on a terminal, a line every few seconds elsewhere."""

    stream: TextIO
    interval: float = 5.0
    tty: bool = field(init=False)

    def __post_init__(self) -> None:
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def say(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def fetch(self, store: ObjectStore, what: str, uri: str, digest: str | None = None) -> Path:
        """The local folder of the S3 folder ``uri`` (through the model cache), saying what it downloads."""
        objects = store.list_objects(uri)
        if not objects:
            raise FileNotFoundError(f"{what}: no objects under {uri}")
        total = sum(o.size for o in objects)
        if digest is None:
            digest, _count = store.prefix_digest(uri)
        if is_complete(cache_root() / digest):
            self.say(f"{what}: cached ({len(objects)} files, {human_size(total)})")
            return ensure_model(store, uri, digest, verify=False)
        self.say(f"{what}: downloading {len(objects)} files, {human_size(total)} from {uri}")
        start = time.monotonic()
        landed: dict[str, int] = {}
        shown = start

        def advance(key: str, size: int) -> None:
            nonlocal shown
            landed[key] = size
            done = sum(landed.values())
            now = time.monotonic()
            if self.tty:
                self.stream.write(f"\r  {human_size(done)} / {human_size(total)} ({100 * done / max(total, 1):.0f}%)")
                self.stream.flush()
            elif now - shown >= self.interval:
                self.say(f"  {human_size(done)} / {human_size(total)} ({100 * done / max(total, 1):.0f}%)")
                shown = now

        folder = ensure_model(store, uri, digest, progress=advance)
        if self.tty:
            self.stream.write("\r")
        self.say(f"{what}: {human_size(total)} in {time.monotonic() - start:.1f}s")
        return folder


# -- generation ---------------------------------------------------------------------------------------------------------
def one_line(text: str) -> str:
    return " ".join(text.split())


def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` (encoded as in training: BOS, then the prompt's tokens), as one line."""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
    return one_line(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))


def classify(model: Any, tokenizer: Any, text: str, labels: Sequence[str], max_seq_length: int) -> str:
    """The predicted label of ``text`` and its probability, e.g. ``science (0.83)`` (tokenised as in training)."""
    encoded = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_seq_length, return_tensors="pt")
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(
            input_ids=encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device)
        ).logits.float()
    probabilities = torch.softmax(logits[0], dim=-1)
    best = int(probabilities.argmax())
    return f"{labels[best]} ({float(probabilities[best]):.2f})"


@dataclass
class Case:
    """One input of one language and what each model answered."""

    language: str
    prompt: str
    expected: str | None
    #: The language's training.maxSeqLength (inputs are truncated to it, as in training).
    max_seq_length: int = 1024
    #: The held-out example itself (None for ``--input`` texts).
    example: Example | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    #: Causal LMs: each model's mean cross-entropy on the expected answer's tokens (as the evaluation computes it).
    losses: dict[str, float] = field(default_factory=dict)


def cases_for(store: ObjectStore, task: TryTask, language: TryLanguage) -> list[Case]:
    length = language.max_seq_length
    if task.inputs:
        return [Case(language.language, text, None, length) for text in task.inputs]
    if language.dataset is None:
        return []
    examples = load_eval_split(store, language.dataset, max_examples=task.examples, labels=task.labels)
    return [Case(language.language, e.prompt, one_line(e.completion), length, e) for e in examples]


@dataclass
class Answers:
    """Puts each model's answers into the cases: generated text, or a classifier's label and probability."""

    task: TryTask
    tokenizer: Any
    say: Callable[[str], None]

    def answer(self, model: Any, case: Case) -> str:
        if self.task.labels is not None:
            return classify(model, self.tokenizer, case.prompt, self.task.labels, case.max_seq_length)
        return generate(model, self.tokenizer, case.prompt, self.task.max_new_tokens)

    def run(self, model: Any, cases: Sequence[Case], key: str, what: str) -> None:
        """Each case's answer from ``model`` under ``key``, once per distinct input (``--input`` texts are shown
        under every language; the base and the merged model answer them the same way each time)."""
        distinct = list({(case.prompt, case.max_seq_length): case for case in cases}.values())
        self.say(f"{'classifying' if self.task.labels else 'generating'}: {what} ({len(distinct)} input(s))")
        answers = {(c.prompt, c.max_seq_length): self.answer(model, c) for c in distinct}
        for case in cases:
            case.outputs[key] = answers[(case.prompt, case.max_seq_length)]
            if self.task.labels is None and case.example is not None:
                metrics = evaluate_examples(model, self.tokenizer, [case.example], max_seq_length=case.max_seq_length)
                if metrics.eval_loss is not None:
                    case.losses[key] = metrics.eval_loss


def run_try(
    task: TryTask,
    store: ObjectStore,
    *,
    device: torch.device | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Load, answer, print. Returns 0."""
    from peft import PeftModel

    out = out or sys.stdout
    progress = Progress(err or sys.stderr)
    device = device or pick_device()
    by_language = {lang.language: cases_for(store, task, lang) for lang in task.languages}
    every = [c for cases in by_language.values() for c in cases]

    base_dir = progress.fetch(store, "base model", task.base_uri, task.base_digest)
    adapters: dict[str, Path] = {}
    if "expert" in task.show:
        for lang in task.languages:
            if lang.adapter_uri and by_language[lang.language]:
                adapters[lang.language] = progress.fetch(
                    store, f"expert {lang.expert} ({lang.language})", lang.adapter_uri
                )
    merged_dir = None
    if "merged" in task.show and task.merged_uri:
        merged_dir = progress.fetch(store, f"merged model (revision {task.revision})", task.merged_uri)
    full_weights = task.merged_format == "full-weights"
    answers = Answers(task, load_tokenizer(base_dir), progress.say)
    merged_what = f"merged revision {task.revision}"

    # The base, then every adapter on it: the experts one at a time, the merged adapter beside them.
    model: Any = load_model(base_dir, device, task.labels)
    with peft_compat():
        if "base" in task.show:
            answers.run(model, every, "base", "base model")
        wrapped = False
        if merged_dir is not None and not full_weights:
            model = PeftModel.from_pretrained(model, str(merged_dir), adapter_name=MERGED)
            wrapped = True
        previous: str | None = None
        for lang in task.languages:
            if lang.language not in adapters:
                continue
            name = f"expert_{lang.language.replace('-', '_')}"
            if wrapped:
                model.load_adapter(str(adapters[lang.language]), adapter_name=name)
            else:
                model = PeftModel.from_pretrained(model, str(adapters[lang.language]), adapter_name=name)
                wrapped = True
            model.set_adapter(name)
            if previous is not None:
                model.delete_adapter(previous)
            answers.run(model, by_language[lang.language], "expert", f"expert {lang.expert}")
            previous = name
        if merged_dir is not None and not full_weights:
            model.set_adapter(MERGED)
            if previous is not None:
                model.delete_adapter(previous)
            answers.run(model, every, "merged", merged_what)
    model = None
    gc.collect()
    if merged_dir is not None and full_weights:
        # Full merged weights: loaded once the base is released (one model in memory at a time).
        model = load_model(merged_dir, device, task.labels)
        answers.run(model, every, "merged", merged_what)
        model = None
        gc.collect()
    out.write(render(task, by_language))
    out.flush()
    return 0


# -- output -------------------------------------------------------------------------------------------------------------
def heading(task: TryTask) -> list[str]:
    if task.kind == "MergedModel":
        first = (
            f"MergedModel {task.namespace}/{task.name}, revision {task.revision} ({task.method}, {task.merged_format})"
        )
        lines = [first, f"  merged: {task.merged_uri}"]
    else:
        lines = [f"LanguageExpert {task.namespace}/{task.name}"]
    lines.append(f"  base:   {task.base_uri}")
    source = "your inputs" if task.inputs else f"{task.examples} held-out example(s) per language"
    if task.labels is not None:
        how = f"sequence classification over {', '.join(task.labels)}: predicted label (probability)"
        if "base" in task.show:
            how += "; the base has the label set's untrained head"
    else:
        how = f"greedy decoding, at most {task.max_new_tokens} new tokens"
        if not task.inputs:
            how += "; [loss]: the model's mean cross-entropy on the expected answer's tokens"
    lines.append(f"{how}; {source}")
    return lines


def render(task: TryTask, by_language: dict[str, list[Case]]) -> str:
    lines = ["", *heading(task)]
    labels = {
        "base": "base",
        "expert": "expert",
        "merged": "merged" if task.revision is None else f"merged r{task.revision}",
    }
    for lang in task.languages:
        cases = by_language.get(lang.language, [])
        title = f"== {lang.language}"
        if lang.expert:
            title += f" · expert {lang.expert}"
        if not task.inputs and lang.dataset is not None:
            title += f" · held-out split of {lang.dataset.uri}"
        if lang.figures:
            figures = ", ".join(f"{k} {v:.3f}" for k, v in lang.figures.items())
            title += f" · {task.metric} {figures}"
        lines += ["", title]
        if lang.note:
            lines.append(f"   ({lang.note})")
        for index, case in enumerate(cases, start=1):
            rows = [("input", one_line(case.prompt))]
            if case.expected is not None:
                rows.append(("expected", case.expected))
            for key in task.show:
                if key in case.outputs:
                    loss = f"  [loss {case.losses[key]:.2f}]" if key in case.losses else ""
                    rows.append((labels[key], (case.outputs[key] or EMPTY) + loss))
            prefix = f"[{index}] "
            for number, (label, text) in enumerate(rows):
                lead = prefix if number == 0 else " " * len(prefix)
                lines.append(f"{lead}{label.ljust(LABEL_WIDTH)} {text or EMPTY}")
    return "\n".join(lines) + "\n"


# -- CLI ----------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str]) -> int:
    from pydantic import ValidationError

    parser = argparse.ArgumentParser(prog="langmerge-trainer try", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, help="the TryTask as JSON, or @path to a file holding it")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(list(argv))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress lines say what loads; no bar per model
    hf_logging.set_verbosity_error()  # e.g. no load report for the base's fresh classifier head (expected)
    try:
        task = TryTask.model_validate(read_json_arg(args.task))
    except (ValueError, OSError, ValidationError) as err:
        print(f"langmerge-trainer try: --task is not a valid TryTask: {err}", file=sys.stderr)
        return 2
    return run_try(task, ObjectStore.from_config(), device=pick_device(args.device))
