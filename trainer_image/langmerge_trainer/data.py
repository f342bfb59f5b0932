"""Reading a language's training data from S3: JSONL parsing, validation, and the stable train/eval split.

Every ``*.jsonl`` object under the dataset prefix is read through :class:`langmerge.store.ObjectStore`, in key order.
For a causal LM each line is one example, either ``{"prompt": ..., "completion": ...}`` or a chat row
``{"messages": [{"role": ..., "content": ...}, ...]}`` whose last turn is the assistant's: the turns before it are
rendered into the prompt with a small fixed template (:func:`render_chat_prompt`) and the last turn is the completion.
For a sequence classifier (``labels`` given) each line is ``{"text": ..., "label": ...}`` with the label one of the
expert's labels; the :class:`Example` then holds the text in ``prompt`` and the label in ``completion``.

The eval split is chosen per example by a sha256 of the example's content alone (:func:`eval_score`), so it does not
depend on file names, line order or the other examples: appending data never moves an old example between the splits.
An explicit ``eval_uri`` replaces the hash split (then all of ``uri`` is training data).

What was read is digested the way the operator digests its listing (:func:`langmerge.fingerprint.objects_digest`
over relative key, size and ETag of each ``*.jsonl`` object), from the responses of the reads themselves: the
trainer can tell when the data changed between the operator's listing and its own reading.

This module does not import torch: the merge Job and tools can use it cheaply.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langmerge.api.expert import Dataset
from langmerge.fingerprint import objects_digest
from langmerge.store import ObjectStore, prefix_key, split_uri

log = logging.getLogger(__name__)

#: The object suffix read from a dataset prefix.
SUFFIX = ".jsonl"
#: Roles a chat row may use.
ROLES = ("system", "user", "assistant")
#: How each chat turn before the answer is rendered into the prompt; the prompt ends with :data:`CHAT_ANSWER_HEADER`.
CHAT_TURN_TEMPLATE = "<|{role}|>\n{content}\n"
CHAT_ANSWER_HEADER = "<|assistant|>\n"
#: Longest reason quoted from a bad line in an error message.
_QUOTE = 80


class DataError(ValueError):
    """The training data cannot be used (a bad line, no examples, an empty split). A retry cannot fix it."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.source = source
        self.line = line


@dataclass(frozen=True)
class Example:
    """One prompt -> completion pair (a classifier's example: text -> label). ``source`` and ``line`` say where it
    came from (not part of its identity)."""

    prompt: str
    completion: str
    source: str = field(default="", compare=False)
    line: int = field(default=0, compare=False)

    @property
    def text(self) -> str:
        """A classification example's text."""
        return self.prompt

    @property
    def label(self) -> str:
        """A classification example's label."""
        return self.completion

    @property
    def content_hash(self) -> str:
        """sha256 of the example's content: the identity used by the split and the data digests."""
        payload = json.dumps([self.prompt, self.completion], ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class LoadedData:
    """The examples of one dataset, split."""

    train: list[Example]
    eval: list[Example]
    #: Lines skipped as invalid (only with ``skip_invalid_lines``), over the training and eval prefixes.
    skipped_lines: int
    #: The objects read, as s3:// URIs.
    files: list[str]
    #: Digest of the ``*.jsonl`` objects read under ``uri`` (the operator's listing digest, over what was read).
    data_digest: str = ""
    #: The same for ``eval_uri`` (None without one).
    eval_data_digest: str | None = None

    @property
    def eval_digest(self) -> str:
        return examples_digest(self.eval)


def render_chat_prompt(turns: Sequence[tuple[str, str]]) -> str:
    """The prompt of a chat row: every turn before the answer in the fixed template, then the answer header."""
    return "".join(CHAT_TURN_TEMPLATE.format(role=role, content=content) for role, content in turns) + (
        CHAT_ANSWER_HEADER
    )


def _describe(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= _QUOTE else text[: _QUOTE - 3] + "..."


def parse_row(row: Any) -> tuple[str, str]:
    """Validate one decoded JSON row; returns (prompt, completion). Raises ``ValueError`` with the reason."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    has_messages = "messages" in row
    has_pair = "prompt" in row or "completion" in row
    if has_messages and has_pair:
        raise ValueError('a row has either "messages" or "prompt"/"completion", not both')
    if has_messages:
        return _parse_messages(row["messages"])
    if not has_pair:
        raise ValueError('expected "prompt" and "completion" (or "messages")')
    for name in ("prompt", "completion"):
        if name not in row:
            raise ValueError(f'"{name}" is missing')
    prompt, completion = row["prompt"], row["completion"]
    if not isinstance(prompt, str):
        raise ValueError(f'"prompt" must be a string, got {_describe(prompt)}')
    if not isinstance(completion, str):
        raise ValueError(f'"completion" must be a string, got {_describe(completion)}')
    if not completion.strip():
        raise ValueError('"completion" is empty')
    return prompt, completion


def parse_labelled_row(row: Any, labels: Sequence[str]) -> tuple[str, str]:
    """Validate one decoded classification row ``{"text": ..., "label": ...}``; returns (text, label)."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "text" not in row or "label" not in row:
        raise ValueError('expected "text" and "label" (this expert is a sequence classifier)')
    text, label = row["text"], row["label"]
    if not isinstance(text, str):
        raise ValueError(f'"text" must be a string, got {_describe(text)}')
    if not text.strip():
        raise ValueError('"text" is empty')
    if not isinstance(label, str) or label not in labels:
        raise ValueError(f"label {_describe(label)} is not one of the expert's labels: {', '.join(labels)}")
    return text, label


def _parse_messages(messages: Any) -> tuple[str, str]:
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object with role and content")
        for name in ("role", "content"):
            if name not in message:
                raise ValueError(f"messages[{i}].{name} is missing")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {_describe(role)}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {_describe(content)}")
        turns.append((role, content))
    last_role, answer = turns[-1]
    if last_role != "assistant":
        raise ValueError(f"the last message must be the assistant's answer, got role {last_role!r}")
    if not answer.strip():
        raise ValueError("the last assistant message is empty")
    return render_chat_prompt(turns[:-1]), answer


def parse_jsonl(
    body: bytes, *, source: str, skip_invalid: bool = False, labels: Sequence[str] | None = None
) -> tuple[list[Example], int]:
    """Parse one JSONL object. Blank lines are ignored. Returns the examples and the count of lines skipped.

    Lines are split on newline bytes only (a JSON string may hold U+2028 and friends). A bad line raises
    :class:`DataError` naming ``source``, the 1-based line number and the reason, unless ``skip_invalid`` (then it is
    logged and counted). With ``labels`` the lines are classification rows (:func:`parse_labelled_row`).
    """
    examples: list[Example] = []
    skipped = 0
    for number, raw in enumerate(body.split(b"\n"), start=1):
        try:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"not valid UTF-8 at byte {err.start}") from None
            if number == 1:
                text = text.removeprefix("\ufeff")
            text = text.strip()
            if not text:
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"invalid JSON: {err.msg} at column {err.colno}") from None
            prompt, completion = parse_row(row) if labels is None else parse_labelled_row(row, labels)
        except ValueError as err:
            message = f"{source}, line {number}: {err}"
            if not skip_invalid:
                raise DataError(message, source=source, line=number) from None
            log.warning("skipping invalid line: %s", message)
            skipped += 1
            continue
        examples.append(Example(prompt=prompt, completion=completion, source=source, line=number))
    return examples, skipped


def jsonl_uris(store: ObjectStore, uri: str) -> list[str]:
    """The ``*.jsonl`` objects under the prefix ``uri``, sorted by key."""
    bucket, key = split_uri(uri)
    base = prefix_key(key)
    keys = sorted(o.key for o in store.iter_objects(uri) if o.key.endswith(SUFFIX) and o.key != base)
    return [f"s3://{bucket}/{k}" for k in keys]


def read_examples(
    store: ObjectStore,
    uri: str,
    *,
    skip_invalid: bool = False,
    read: list[tuple[str, int, str]] | None = None,
    labels: Sequence[str] | None = None,
) -> tuple[list[Example], int, list[str]]:
    """Every example under the prefix ``uri``: (examples in key and line order, lines skipped, files read).

    ``read`` collects (key relative to ``uri``, size, ETag) of each object as its read returned it. With ``labels``
    the lines are classification rows.
    """
    files = jsonl_uris(store, uri)
    base = len(prefix_key(split_uri(uri)[1]))
    examples: list[Example] = []
    skipped = 0
    for file_uri in files:
        body, etag = store.get_bytes(file_uri)
        if read is not None:
            read.append((split_uri(file_uri)[1][base:], len(body), etag))
        rows, bad = parse_jsonl(body, source=file_uri, skip_invalid=skip_invalid, labels=labels)
        examples.extend(rows)
        skipped += bad
    return examples, skipped, files


def eval_score(example: Example) -> float:
    """A number in [0, 1) from the example's content hash: examples scoring below the eval fraction are held out."""
    return int(example.content_hash[:16], 16) / float(1 << 64)


def is_eval(example: Example, fraction: float) -> bool:
    return eval_score(example) < fraction


def split_examples(examples: Sequence[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """(train, eval) by :func:`is_eval`; order within each split is the input order."""
    train: list[Example] = []
    held_out: list[Example] = []
    for example in examples:
        (held_out if is_eval(example, fraction) else train).append(example)
    return train, held_out


def examples_digest(examples: Iterable[Example]) -> str:
    """Order-independent digest of a multiset of examples (by content)."""
    h = hashlib.sha256()
    for content in sorted(e.content_hash for e in examples):
        h.update(content.encode())
    return h.hexdigest()[:16]


def label_counts(examples: Iterable[Example], labels: Sequence[str]) -> dict[str, int]:
    """Examples per label, every label of ``labels`` listed in its order (0 where the examples have none): what a
    classifier expert's head saw of each label, recorded in its adapter manifest for the merge."""
    counts = dict.fromkeys(labels, 0)
    for example in examples:
        if example.label in counts:
            counts[example.label] += 1
    return counts


def load_dataset(store: ObjectStore, dataset: Dataset, *, labels: Sequence[str] | None = None) -> LoadedData:
    """Read and split a language's data (classification rows when ``labels`` is given). Raises :class:`DataError`
    for bad lines, no data or an empty split."""
    read: list[tuple[str, int, str]] = []
    examples, skipped, files = read_examples(
        store, dataset.uri, skip_invalid=dataset.skip_invalid_lines, read=read, labels=labels
    )
    eval_read: list[tuple[str, int, str]] = []
    if not files:
        raise DataError(f"no *{SUFFIX} objects under {dataset.uri}")
    if not examples:
        raise DataError(f"no valid examples in the {len(files)} *{SUFFIX} object(s) under {dataset.uri}")
    if dataset.eval_uri:
        train = examples
        held_out, eval_skipped, eval_files = read_examples(
            store, dataset.eval_uri, skip_invalid=dataset.skip_invalid_lines, read=eval_read, labels=labels
        )
        skipped += eval_skipped
        files += eval_files
        if not held_out:
            raise DataError(f"no valid eval examples under {dataset.eval_uri}")
    else:
        train, held_out = split_examples(examples, dataset.eval_fraction)
        if not held_out:
            raise DataError(
                f"none of the {len(examples)} examples under {dataset.uri} fell into the eval split "
                f"(evalFraction {dataset.eval_fraction}): add data, raise evalFraction or set evalUri"
            )
    if not train:
        raise DataError(f"the training split of {dataset.uri} is empty")
    log.info(
        "data: %d train, %d eval examples from %d file(s), %d line(s) skipped",
        len(train),
        len(held_out),
        len(files),
        skipped,
    )
    return LoadedData(
        train=train,
        eval=held_out,
        skipped_lines=skipped,
        files=files,
        data_digest=objects_digest(read),
        eval_data_digest=objects_digest(eval_read) if dataset.eval_uri else None,
    )


def load_eval_split(
    store: ObjectStore, dataset: Dataset, *, max_examples: int | None = None, labels: Sequence[str] | None = None
) -> list[Example]:
    """Only the held-out examples of a language (what the merge Job evaluates on), at most ``max_examples``.

    With ``eval_uri`` it reads only that prefix; otherwise the hash split of ``uri``. The first ``max_examples`` are
    taken in eval-score order, which is as stable as the split itself: appended data adds examples, it never swaps
    the ones already chosen out unless they score higher.
    """
    if dataset.eval_uri:
        held_out, _skipped, _files = read_examples(
            store, dataset.eval_uri, skip_invalid=dataset.skip_invalid_lines, labels=labels
        )
        source = dataset.eval_uri
    else:
        examples, _skipped, _files = read_examples(
            store, dataset.uri, skip_invalid=dataset.skip_invalid_lines, labels=labels
        )
        _train, held_out = split_examples(examples, dataset.eval_fraction)
        source = dataset.uri
    if not held_out:
        raise DataError(f"no eval examples for {source}")
    return limit_examples(held_out, max_examples)


def limit_examples(examples: Sequence[Example], max_examples: int | None) -> list[Example]:
    """At most ``max_examples`` examples, chosen by eval score (independent of file order)."""
    if max_examples is None or len(examples) <= max_examples:
        return list(examples)
    return sorted(examples, key=lambda e: (eval_score(e), e.content_hash))[:max_examples]


def is_search_validation(example: Example) -> bool:
    """Half of a held-out split, by a hash of the example's content independent of :func:`eval_score`: the half a
    merge search validates on when the expert has no ``validationUri`` (the quality gate uses the other half)."""
    digest = hashlib.sha256(f"search-validation\0{example.content_hash}".encode()).hexdigest()
    return int(digest[:16], 16) < 1 << 63


@dataclass(frozen=True)
class SearchSplits:
    """A language's examples for a merge search and its quality gate: disjoint by content."""

    validation: list[Example]
    gate: list[Example]
    #: Where the validation examples come from (recorded in the merge manifest).
    source: str


def search_splits(
    store: ObjectStore,
    dataset: Dataset,
    *,
    max_validation: int | None = None,
    max_gate: int | None = None,
    labels: Sequence[str] | None = None,
) -> SearchSplits:
    """Validation examples for a merge search and the quality gate's examples, never sharing an example.

    With ``dataset.validation_uri``: every example under it (less any that also occur in the held-out split) for
    validation, the held-out split for the gate, as without a search. Without it: the held-out split is halved by
    :func:`is_search_validation`.
    """
    held_out = load_eval_split(store, dataset, labels=labels)
    if dataset.validation_uri:
        gate_hashes = {e.content_hash for e in held_out}
        found, _skipped, _files = read_examples(
            store, dataset.validation_uri, skip_invalid=dataset.skip_invalid_lines, labels=labels
        )
        validation = [e for e in found if e.content_hash not in gate_hashes]
        gate = held_out
        source = dataset.validation_uri
    else:
        validation = [e for e in held_out if is_search_validation(e)]
        gate = [e for e in held_out if not is_search_validation(e)]
        source = "half of the held-out split (no validationUri)"
    if not validation or not gate:
        where = dataset.validation_uri or dataset.eval_uri or dataset.uri
        raise DataError(
            f"{where}: a merge search needs validation examples and gate examples for every language "
            f"({len(validation)} validation, {len(gate)} gate): set dataset.validationUri or add held-out data"
        )
    return SearchSplits(limit_examples(validation, max_validation), limit_examples(gate, max_gate), source)


def read_json_arg(value: str) -> Any:
    """A JSON command-line value, or ``@path`` to read it from a file."""
    text = Path(value[1:]).read_text(encoding="utf-8") if value.startswith("@") else value
    return json.loads(text)
