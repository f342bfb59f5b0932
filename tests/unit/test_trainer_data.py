"""Pure parts of the trainer's data reading: row validation, chat rendering, the stable split (no torch needed)."""

from __future__ import annotations

import json
import random

import pytest

from langmerge_trainer.data import (
    CHAT_ANSWER_HEADER,
    DataError,
    Example,
    eval_score,
    examples_digest,
    limit_examples,
    parse_jsonl,
    parse_row,
    split_examples,
)


def test_prompt_completion_rows() -> None:
    assert parse_row({"prompt": "Hi", "completion": " there", "id": 3}) == ("Hi", " there")
    assert parse_row({"prompt": "", "completion": "x"}) == ("", "x")


def test_chat_rows_render_the_turns_before_the_answer() -> None:
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hola"},
            {"role": "assistant", "content": "Hola!"},
            {"role": "user", "content": "Que tal?"},
            {"role": "assistant", "content": "Bien."},
        ]
    }
    prompt, completion = parse_row(row)
    assert completion == "Bien."
    assert prompt == (
        "<|system|>\nBe brief.\n<|user|>\nHola\n<|assistant|>\nHola!\n<|user|>\nQue tal?\n" + CHAT_ANSWER_HEADER
    )


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ([1, 2], "expected a JSON object"),
        ({"text": "x"}, 'expected "prompt" and "completion"'),
        ({"prompt": "a"}, '"completion" is missing'),
        ({"completion": "a"}, '"prompt" is missing'),
        ({"prompt": "a", "completion": None}, '"completion" must be a string, got null'),
        ({"prompt": 1, "completion": "b"}, '"prompt" must be a string'),
        ({"prompt": "a", "completion": "  "}, '"completion" is empty'),
        ({"prompt": "a", "completion": "b", "messages": []}, "not both"),
        ({"messages": []}, "non-empty list"),
        ({"messages": ["hi"]}, "messages[0] must be an object"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role must be one of"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content must be a string"),
        ({"messages": [{"role": "user"}]}, "messages[0].content is missing"),
        ({"messages": [{"content": "x"}]}, "messages[0].role is missing"),
        ({"messages": [{"role": "user", "content": "x"}]}, "last message must be the assistant's"),
        ({"messages": [{"role": "assistant", "content": ""}]}, "last assistant message is empty"),
    ],
)
def test_invalid_rows_say_why(row: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        parse_row(row)


def test_bad_line_names_source_and_line() -> None:
    body = b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "a"\n'
    with pytest.raises(DataError) as caught:
        parse_jsonl(body, source="s3://b/x.jsonl")
    assert str(caught.value).startswith("s3://b/x.jsonl, line 3: invalid JSON")
    assert caught.value.source == "s3://b/x.jsonl" and caught.value.line == 3


def test_lines_split_on_newlines_only_and_bad_utf8_is_a_bad_line() -> None:
    odd = json.dumps({"prompt": "a\u2028b", "completion": "c\u0085"}, ensure_ascii=False).encode()
    body = b"\xef\xbb\xbf" + odd + b"\r\n" + b"\xff\n" + odd + b"\n"
    examples, skipped = parse_jsonl(body, source="s", skip_invalid=True)
    assert skipped == 1 and [e.line for e in examples] == [1, 3]
    assert examples[0].prompt == "a\u2028b"
    with pytest.raises(DataError, match="line 2: not valid UTF-8"):
        parse_jsonl(body, source="s")


def _examples(n: int, tag: str = "") -> list[Example]:
    return [Example(prompt=f"{tag}prompt {i}", completion=f" answer {i}") for i in range(n)]


def test_split_depends_on_content_only() -> None:
    examples = _examples(2000)
    train, held_out = split_examples(examples, 0.1)
    assert 150 < len(held_out) < 250 and len(train) + len(held_out) == 2000
    shuffled = examples[:]
    random.Random(0).shuffle(shuffled)
    more = shuffled + _examples(500, tag="new ")
    _train2, held_out2 = split_examples(more, 0.1)
    assert set(held_out) == set(held_out2) - set(_examples(500, tag="new "))
    # Where an example came from does not matter.
    moved = Example(prompt="prompt 1", completion=" answer 1", source="s3://other/file.jsonl", line=99)
    assert eval_score(moved) == eval_score(examples[1]) and moved == examples[1]


def test_split_fractions_nest() -> None:
    examples = _examples(500)
    _t, small = split_examples(examples, 0.05)
    _t, large = split_examples(examples, 0.2)
    assert set(small) <= set(large)


def test_limit_and_digest_ignore_order() -> None:
    examples = _examples(50)
    assert limit_examples(examples, 10) == limit_examples(list(reversed(examples)), 10)
    assert len(limit_examples(examples, 10)) == 10 and limit_examples(examples, None) == examples
    assert examples_digest(examples) == examples_digest(reversed(examples))
    assert examples_digest(examples) != examples_digest(examples[1:])
