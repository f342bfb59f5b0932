"""The sample task and tiny models: real multilingual dialog text and a small Llama-style model built from a config.

No model hub is reachable at run time, so tests and the ``langmerge up`` demo build their base model here: a BPE
tokenizer trained on the task text with the ``tokenizers`` library and a randomly initialised Llama saved with
``save_pretrained``, then loaded through the same ``from_pretrained`` path production uses.

The text comes from ``chatterbot-corpus`` (BSD licence): dialog YAML files per language and topic. Each conversation
``[u1, u2, u3, ...]`` gives prompt/completion pairs (u1 -> u2, u2 -> u3, ...).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

#: BCP-47 tag -> the corpus' folder name.
CORPUS_LANGUAGES = {
    "en": "english",
    "de": "german",
    "fr": "french",
    "es": "spanish",
    "it": "italian",
    "pt": "portuguese",
    "nl": "dutch",
    "ru": "russian",
    "tr": "turkish",
    "id": "indonesian",
    "sv": "swedish",
}

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


@dataclass(frozen=True)
class Pair:
    prompt: str
    completion: str
    topic: str

    def row(self) -> dict[str, str]:
        return {"prompt": self.prompt, "completion": self.completion}


def corpus_dir() -> Path:
    import chatterbot_corpus

    return Path(chatterbot_corpus.__file__).parent / "data"


def topics(language: str) -> list[str]:
    folder = corpus_dir() / CORPUS_LANGUAGES[language]
    return sorted(p.stem for p in folder.glob("*.yml"))


def corpus_pairs(language: str, only_topics: Iterable[str] | None = None) -> list[Pair]:
    """Prompt/completion pairs of one language, in file order (deterministic)."""
    folder = corpus_dir() / CORPUS_LANGUAGES[language]
    wanted = set(only_topics) if only_topics is not None else None
    pairs: list[Pair] = []
    for path in sorted(folder.glob("*.yml")):
        if wanted is not None and path.stem not in wanted:
            continue
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations", []) or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            for a, b in itertools.pairwise(turns):
                pairs.append(Pair(prompt=a, completion=" " + b, topic=path.stem))
    return pairs


def write_jsonl(pairs: Sequence[Pair], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for pair in pairs:
            fh.write(json.dumps(pair.row(), ensure_ascii=False) + "\n")
    return path


def build_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tiny_llama(
    out_dir: Path,
    texts: Iterable[str],
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 2048,
    max_position_embeddings: int = 512,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Build and ``save_pretrained`` a tiny Llama-style causal LM and its tokenizer into ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def sample_texts(languages: Iterable[str]) -> list[str]:
    """All prompts and completions of the given languages (tokenizer training text)."""
    texts: list[str] = []
    for lang in languages:
        for pair in corpus_pairs(lang):
            texts.extend([pair.prompt, pair.completion])
    return texts
