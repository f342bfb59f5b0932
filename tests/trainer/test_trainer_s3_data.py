"""Reading data from the real S3: all *.jsonl under a prefix, skip-invalid counts, the stable split, eval-only reads."""

from __future__ import annotations

import pytest
from trainer_helpers import new_bucket, put_jsonl, sample_pairs

from langmerge.api.expert import Dataset
from langmerge.store import ObjectStore
from langmerge_trainer.data import DataError, load_dataset, load_eval_split


def test_appending_data_never_moves_old_examples(s3: ObjectStore) -> None:
    bucket = new_bucket(s3)
    uri = f"s3://{bucket}/data/es"
    pairs = sample_pairs("es", 300)
    put_jsonl(s3, f"{uri}/b-old.jsonl", [p.row() for p in pairs[:150]])
    s3.put_bytes(f"{uri}/README.md", b"not data")  # only *.jsonl is read
    dataset = Dataset(uri=uri, eval_fraction=0.2)
    before = load_dataset(s3, dataset)
    assert len(before.train) + len(before.eval) == 150 and 10 < len(before.eval) < 50

    # New data in a file that sorts first, plus the old file rewritten in reverse order.
    put_jsonl(s3, f"{uri}/a-new.jsonl", [p.row() for p in pairs[150:]])
    put_jsonl(s3, f"{uri}/b-old.jsonl", [p.row() for p in reversed(pairs[:150])])
    after = load_dataset(s3, dataset)
    assert len(after.train) + len(after.eval) == 300
    old = {(p.prompt, p.completion) for p in pairs[:150]}
    assert {(e.prompt, e.completion) for e in after.eval} & old == {(e.prompt, e.completion) for e in before.eval}
    assert {(e.prompt, e.completion) for e in after.train} & old == {(e.prompt, e.completion) for e in before.train}
    assert load_eval_split(s3, dataset) == after.eval
    assert len(load_eval_split(s3, dataset, max_examples=5)) == 5


def test_skip_invalid_lines_counts_them(s3: ObjectStore) -> None:
    bucket = new_bucket(s3)
    uri = f"s3://{bucket}/data/it"
    rows: list[object] = [p.row() for p in sample_pairs("it", 40)]
    rows[3] = "{broken"
    rows[7] = {"prompt": "ciao"}
    put_jsonl(s3, f"{uri}/x.jsonl", rows)
    s3.put_bytes(f"{uri}/y.jsonl", b'{"prompt": "a", "completion": " b"}\n\xff\xfe\n')
    with pytest.raises(DataError, match=r"x\.jsonl, line 4: invalid JSON"):
        load_dataset(s3, Dataset(uri=uri))
    loaded = load_dataset(s3, Dataset(uri=uri, skip_invalid_lines=True, eval_fraction=0.3))
    assert loaded.skipped_lines == 3
    assert len(loaded.train) + len(loaded.eval) == 39
    assert loaded.files == [f"{uri}/x.jsonl", f"{uri}/y.jsonl"]


def test_explicit_eval_prefix(s3: ObjectStore) -> None:
    bucket = new_bucket(s3)
    pairs = sample_pairs("pt", 30)
    put_jsonl(s3, f"s3://{bucket}/train/a.jsonl", [p.row() for p in pairs[:20]])
    put_jsonl(s3, f"s3://{bucket}/eval/a.jsonl", [p.row() for p in pairs[20:]])
    dataset = Dataset(uri=f"s3://{bucket}/train", eval_uri=f"s3://{bucket}/eval")
    loaded = load_dataset(s3, dataset)
    assert len(loaded.train) == 20 and len(loaded.eval) == 10
    assert load_eval_split(s3, dataset) == loaded.eval
    with pytest.raises(DataError, match="no valid eval examples"):
        load_dataset(s3, Dataset(uri=f"s3://{bucket}/train", eval_uri=f"s3://{bucket}/nothing"))
