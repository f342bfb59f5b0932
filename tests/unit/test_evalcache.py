"""The merge Job's evaluation cache key (langmerge_trainer.merge.evalcache): figures are reused only for the same
model on the same examples, evaluated the same way."""

from __future__ import annotations

from typing import Any

from langmerge_trainer.data import Example
from langmerge_trainer.merge.evalcache import cache_key, examples_digest

EXAMPLES = [Example("hola", " hola", source="a.jsonl", line=1), Example("adiós", " adiós", source="a.jsonl", line=2)]


def _key(**changed: Any) -> str:
    parts: dict[str, Any] = {
        "base_digest": "b1",
        "adapter_digest": "a1",
        "examples": examples_digest(EXAMPLES),
        "max_seq_length": 128,
        "max_examples": 512,
        "labels": None,
        "dtype": "torch.float32",
        "device_type": "cpu",
    }
    return cache_key(**{**parts, **changed})


def test_every_input_of_the_figures_is_in_the_key() -> None:
    same = _key()
    assert same == _key()
    changed = [
        _key(base_digest="b2"),
        _key(adapter_digest="a2"),
        _key(adapter_digest=None),  # the base alone
        _key(examples=examples_digest(EXAMPLES[:1])),
        _key(examples=examples_digest(list(reversed(EXAMPLES)))),
        _key(max_seq_length=64),
        _key(max_examples=100),
        _key(labels=["a", "b"]),
        _key(dtype="torch.bfloat16"),
        _key(device_type="cuda"),
    ]
    assert same not in changed and len(set(changed)) == len(changed)


def test_where_an_example_was_read_from_is_not_part_of_it() -> None:
    moved = [Example(e.prompt, e.completion, source="b.jsonl", line=e.line + 10) for e in EXAMPLES]
    assert examples_digest(moved) == examples_digest(EXAMPLES)
    assert examples_digest([Example("hola", " hola!"), EXAMPLES[1]]) != examples_digest(EXAMPLES)
