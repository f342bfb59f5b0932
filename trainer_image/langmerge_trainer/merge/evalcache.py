"""The merge Job's evaluation cache: figures of a model that does not change between merges.

Every merge's gate evaluates the merged model, each expert alone and the base model on each language's held-out
examples. Between two merges of one MergedModel usually one expert changed (a maintenance retrain): the base and the
other experts are the same bytes on the same examples, so their figures are too. They are kept under the
MergedModel's output (``<output>/evaluations/<key>.json``, the operator names the prefix in the task) and read back
instead of evaluating again.

The key is a SHA-256 over everything the figures depend on: the base model's digest, the adapter's digest (none for
the base alone), the examples themselves (their text, in order), the truncation, the example cap, a classifier's
label list, the dtype and device type the evaluation ran in, and :data:`VERSION` (raised whenever the evaluation code
changes what it computes). A merged model is never looked up: it is new every time.

The cache is an optimisation only: an entry that cannot be read or parsed is evaluated again (and written over), and
a failed write is logged and ignored. Entries are small JSON records; they are kept as long as the output prefix.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from langmerge import artifacts
from langmerge.api.expert import Metrics
from langmerge.store import MalformedRecord
from langmerge_trainer.data import Example
from langmerge_trainer.s3retry import RetryingStore

log = logging.getLogger(__name__)

#: Raise when the evaluation code changes its figures for the same model and examples (old entries then miss).
VERSION = 1


def examples_digest(examples: Sequence[Example]) -> str:
    """A digest of the examples' content, in order (where they were read from is not part of it)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.completion], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def cache_key(
    *,
    base_digest: str,
    adapter_digest: str | None,
    examples: str,
    max_seq_length: int,
    max_examples: int | None,
    labels: Sequence[str] | None,
    dtype: str,
    device_type: str,
) -> str:
    """The entry's name: a digest of everything the figures depend on (``examples``: :func:`examples_digest`)."""
    parts: dict[str, Any] = {
        "version": VERSION,
        "base": base_digest,
        "adapter": adapter_digest,
        "examples": examples,
        "max_seq_length": max_seq_length,
        "max_examples": max_examples,
        "labels": list(labels) if labels is not None else None,
        "dtype": dtype,
        "device": device_type,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass
class EvaluationCache:
    """Entries under ``prefix`` (None: no cache, every lookup misses and nothing is written). ``hits`` names what
    this run read back (``base:<language>``, ``expert:<language>``), for the manifest."""

    store: RetryingStore
    prefix: str | None
    hits: list[str] = field(default_factory=list)

    def lookup(self, kind: str, keys: Mapping[str, str]) -> dict[str, Metrics]:
        """``kind`` ("base" or "expert") figures by language, for the languages whose entry (``keys``: language ->
        :func:`cache_key`) is there and readable."""
        found = {lang: m for lang, key in keys.items() if (m := self._get(key, f"{kind}:{lang}")) is not None}
        self.hits.extend(f"{kind}:{lang}" for lang in found)
        return found

    def store_new(
        self, kind: str, keys: Mapping[str, str], figures: Mapping[str, Metrics], known: Mapping[str, Metrics]
    ) -> None:
        """Write the figures of every language that was evaluated (not in ``known``)."""
        for lang, key in keys.items():
            if lang not in known:
                self._put(key, f"{kind}:{lang}", figures[lang])

    def _uri(self, key: str) -> str:
        assert self.prefix is not None
        return artifacts.join(self.prefix, f"{key}.json")

    def _get(self, key: str, what: str) -> Metrics | None:
        if self.prefix is None:
            return None
        try:
            record = self.store.get_json_or_none(self._uri(key))
            return None if record is None else Metrics.model_validate(record["metrics"])
        except (KeyError, TypeError, ValueError, ValidationError, MalformedRecord) as err:
            log.warning("evaluation cache entry %s (%s) is unreadable (%s): evaluating again", key, what, err)
            return None

    def _put(self, key: str, what: str, metrics: Metrics) -> None:
        if self.prefix is None:
            return
        record = {"what": what, "metrics": metrics.model_dump(mode="json", exclude_none=True), "version": VERSION}
        try:
            self.store.put_json(self._uri(key), record)
        except Exception as err:  # an optimisation: the merge goes on without the entry
            log.warning("could not write evaluation cache entry %s (%s): %s", key, what, err)
