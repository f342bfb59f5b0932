"""The data of the README's walkthrough "Add a language to the running sample" ships as a file: it is exactly the
corpus' dialog for that language, and the trainer accepts it with both splits non-empty."""

from __future__ import annotations

import json
from pathlib import Path

from langmerge.api.expert import Dataset, LanguageExpertSpec
from langmerge.dev.demo import ADDED_DATA_FILE, ADDED_LANGUAGE, DEFAULT_LAYOUT, LANGUAGES, sample_expert
from langmerge_trainer.data import parse_jsonl, split_examples
from langmerge_trainer.sample import corpus_pairs

ROOT = Path(__file__).resolve().parents[2]


def test_the_added_language_file_is_the_corpus_dialog() -> None:
    path = ROOT / ADDED_DATA_FILE
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    expected = [pair.row() for pair in corpus_pairs(ADDED_LANGUAGE)]
    assert rows == expected, (
        f"{ADDED_DATA_FILE} differs from chatterbot-corpus; regenerate it with langmerge_trainer.sample.write_jsonl("
        f"corpus_pairs({ADDED_LANGUAGE!r}), path)"
    )


def test_the_trainer_reads_the_added_language_file_with_both_splits() -> None:
    spec = LanguageExpertSpec.model_validate(sample_expert(ADDED_LANGUAGE)["spec"])
    assert ADDED_LANGUAGE not in LANGUAGES
    assert spec.dataset.uri == f"{DEFAULT_LAYOUT.data_uri}/{ADDED_LANGUAGE}"
    examples, skipped = parse_jsonl((ROOT / ADDED_DATA_FILE).read_bytes(), source=ADDED_DATA_FILE)
    assert skipped == 0 and len(examples) > 100
    dataset: Dataset = spec.dataset
    train, held_out = split_examples(examples, dataset.eval_fraction)
    assert len(held_out) >= 20 and len(train) > 5 * len(held_out)
