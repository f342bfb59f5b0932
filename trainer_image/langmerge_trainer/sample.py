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

#: BCP-47 tag -> the corpus' folder name (every language folder of chatterbot-corpus with a BCP-47 tag).
CORPUS_LANGUAGES = {
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
    "mr": "marathi",
    "or": "oriya",
    "ta": "tamil",
    "te": "telugu",
    "th": "thai",
    "ur": "urdu",
    "yo": "yoruba",
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


def build_tiny_bert(
    out_dir: Path,
    texts: Iterable[str],
    *,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    vocab_size: int = 1024,
    seed: int = 0,
) -> Path:
    """Build and ``save_pretrained`` a tiny BERT encoder (a bare ``BertModel``, as encoders are usually published)
    with a BPE tokenizer that wraps each text in ``<s> ... </s>``: a base for sequence-classification tests."""
    import torch
    from tokenizers import processors
    from transformers import BertConfig, BertModel

    tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        special_tokens=[(bos, tokenizer.bos_token_id), (eos, tokenizer.eos_token_id)],
    )
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = BertModel(config)
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


#: Languages the sample's base model is pre-trained on: not the task's languages, so the experts have something to
#: learn and no evaluation example was seen in pre-training.
PRETRAIN_LANGUAGES = ("en", "fr", "de")


def pretrain(
    model_dir: Path,
    texts: Sequence[str],
    *,
    steps: int,
    batch_size: int = 16,
    seq: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> float:
    """A short full-parameter causal-LM pre-training of the tiny model, so it is a (small) language model rather than
    random weights. Returns the final training loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    blocks = [stream[i : i + seq] for i in range(0, len(stream) - seq, seq)]
    if not blocks:
        raise ValueError("not enough pre-training text")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    loss_value = float("nan")
    for step in range(steps):
        idx = torch.randint(len(blocks), (batch_size,), generator=generator)
        batch = torch.tensor([blocks[i] for i in idx.tolist()])
        lr_now = lr * min(1.0, (step + 1) / 20) * (1 - step / steps)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
    model.save_pretrained(model_dir)
    return loss_value


def _split_update(pairs: Sequence[Pair], update_topics: int) -> tuple[list[Pair], list[Pair]]:
    """Hold back the last ``update_topics`` topic files: they arrive later as the maintenance update."""
    names = sorted({p.topic for p in pairs})
    held = set(names[-update_topics:]) if update_topics > 0 else set()
    return [p for p in pairs if p.topic not in held], [p for p in pairs if p.topic in held]


def seed_main(argv: Sequence[str] | None = None) -> int:
    """``langmerge-trainer sample``: build the sample base model and datasets and upload them to S3."""
    import argparse
    import tempfile

    from langmerge.store import ObjectStore

    parser = argparse.ArgumentParser(prog="langmerge-trainer sample", description=seed_main.__doc__)
    parser.add_argument("--base-uri", required=True, help="s3:// prefix for the base model")
    parser.add_argument("--data-uri", required=True, help="s3:// prefix; each language's data goes to <prefix>/<lang>/")
    parser.add_argument("--updates-uri", help="s3:// prefix for the held-back maintenance data")
    parser.add_argument("--languages", default="es,it,pt")
    parser.add_argument("--updated-language", default="pt", help="the language whose data grows later")
    parser.add_argument("--update-topics", type=int, default=3, help="topic files held back for the update")
    parser.add_argument("--hidden-size", type=int, default=96)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    args = parser.parse_args(list(argv) if argv is not None else None)

    import torch

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    languages = [x.strip() for x in args.languages.split(",") if x.strip()]
    store = ObjectStore.from_config()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        texts = sample_texts([*languages, *PRETRAIN_LANGUAGES])
        build_tiny_llama(
            model_dir,
            texts,
            hidden_size=args.hidden_size,
            intermediate_size=args.hidden_size * 2,
            num_hidden_layers=args.layers,
            vocab_size=args.vocab_size,
        )
        if args.pretrain_steps > 0:
            pre_texts = [
                t for lang in PRETRAIN_LANGUAGES for p in corpus_pairs(lang) for t in (p.prompt + p.completion,)
            ]
            loss = pretrain(model_dir, pre_texts, steps=args.pretrain_steps)
            print(
                f"base model pre-trained on {', '.join(PRETRAIN_LANGUAGES)} text for {args.pretrain_steps} steps "
                f"(final loss {loss:.2f})"
            )
        files = store.upload_dir(model_dir, args.base_uri)
        print(f"base model: {len(files)} files -> {args.base_uri}")
        for lang in languages:
            pairs = corpus_pairs(lang)
            initial, update = _split_update(pairs, args.update_topics) if lang == args.updated_language else (pairs, [])
            path = write_jsonl(initial, Path(tmp) / lang / "part-0.jsonl")
            store.upload_file(path, f"{args.data_uri.rstrip('/')}/{lang}/part-0.jsonl")
            line = f"{lang}: {len(initial)} examples -> {args.data_uri.rstrip('/')}/{lang}/"
            if update and args.updates_uri:
                upath = write_jsonl(update, Path(tmp) / lang / "part-update.jsonl")
                store.upload_file(upath, f"{args.updates_uri.rstrip('/')}/{lang}/part-update.jsonl")
                line += f" (+{len(update)} held back for the maintenance update)"
            print(line)
    return 0
