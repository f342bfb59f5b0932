"""chatterbot-corpus (BSD licence) as the benchmark reads it: language folders, topic files, conversations.

Topic names differ between some language folders (Spanish ``psicologia``, Bengali ``emotions``...): they are mapped to
one name (:data:`TOPIC_ALIASES`), so a topic is the same label in every language.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml

from langmerge_trainer.sample import CORPUS_LANGUAGES, corpus_dir

#: BCP-47 tag -> chatterbot-corpus folder, for the languages the workloads can use.
CORPUS_FOLDERS = CORPUS_LANGUAGES

#: Topic files named differently in a language's folder -> the name used everywhere.
TOPIC_ALIASES = {
    "spanish": {
        "IA": "ai",
        "dinero": "money",
        "emociones": "emotion",
        "perfilbot": "botprofile",
        "psicologia": "psychology",
        "origen": "origin",
    },
    "bengali": {"emotions": "emotion", "computer": "computers"},
    "persian": {"profile": "botprofile"},
    "dutch": {"sport": "sports"},
    "thai": {"greeting": "greetings"},
    "hindi": {"coversations": "conversations"},
}


def topic_files(language: str) -> dict[str, Path]:
    """Topic name (after :data:`TOPIC_ALIASES`) -> the language's YAML file."""
    folder = CORPUS_FOLDERS[language]
    aliases = TOPIC_ALIASES.get(folder, {})
    out: dict[str, Path] = {}
    for path in sorted((corpus_dir() / folder).glob("*.yml")):
        name = aliases.get(path.stem, path.stem)
        if name in out:
            raise ValueError(f"chatterbot-corpus {folder}: two files are topic {name}")
        out[name] = path
    return out


def topics(language: str) -> list[str]:
    return sorted(topic_files(language))


def conversations(language: str, topic: str) -> list[list[str]]:
    """The conversations of one topic file (empty if the language has none)."""
    path = topic_files(language).get(topic)
    if path is None:
        return []
    return [list(turns) for turns in _read(path)]


@cache
def _read(path: Path) -> tuple[tuple[str, ...], ...]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    out = []
    for conv in doc.get("conversations") or []:
        turns = tuple(str(t).strip() for t in conv if t is not None and str(t).strip())
        if turns:
            out.append(turns)
    return tuple(out)
