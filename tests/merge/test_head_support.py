"""Classifier heads merge row by row, by label support: an expert that never saw a label does not vote on its row.

An expert trained on data without label k has trained its head row k only to push k down, so averaging the heads with
the language weights erases k from the merged model. With the experts' label counts (``AdapterInput.label_counts``,
from their adapter manifests) row k is the average of the experts' rows k weighted by ``w_i * n_ik`` (language weight
times training examples of k); without counts, or for a label no expert saw, the merge averages with the language
weights as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from merge_helpers import PEFT_DEPRECATION, make_classifier_adapters, make_tiny_encoder
from safetensors.torch import load_file

from langmerge_trainer.merge.engine import AdapterInput, MergeError, MergeReport, merge_adapters

pytestmark = pytest.mark.filterwarnings(PEFT_DEPRECATION)

LABELS = ("art", "money", "psychology")
#: nl never saw psychology.
COUNTS = {
    "en": {"art": 30, "money": 20, "psychology": 10},
    "nl": {"art": 25, "money": 40, "psychology": 0},
    "zh": {"art": 5, "money": 10, "psychology": 30},
}
WEIGHTS = {"en": 1.0, "nl": 2.0, "zh": 0.5}


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def adapters(bert_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_classifier_adapters(bert_base, tmp_path_factory.mktemp("cls-adapters"), list(COUNTS), len(LABELS))


def _inputs(adapters: dict[str, Path], counts: dict[str, dict[str, int]] | None = COUNTS) -> list[AdapterInput]:
    return [
        AdapterInput(lang, path, labels=LABELS, label_counts=counts[lang] if counts is not None else None)
        for lang, path in adapters.items()
    ]


def _heads(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Head tensors of an adapter by their model name (``classifier.weight``)."""
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for key, tensor in tensors.items():
        if ".lora_" in key:
            continue
        out[key.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")] = tensor
    return out


def _output_heads(out: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The merged head tensors, from a PEFT adapter output or full weights."""
    found: dict[str, torch.Tensor] = {}
    for shard in out.glob("*.safetensors"):
        for key, tensor in load_file(str(shard)).items():
            name = key.removeprefix("base_model.model.")
            if name in names:
                found[name] = tensor
    assert sorted(found) == sorted(names), sorted(found)
    return found


def plain_average(heads: dict[str, dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    """The language-weighted average, computed as the engine always did (same order, same float32 operations)."""
    total = float(sum(WEIGHTS.values()))
    acc: torch.Tensor | None = None
    for lang in COUNTS:
        value = heads[lang][name].to(torch.float32) * (WEIGHTS[lang] / total)
        acc = value if acc is None else acc + value
    assert acc is not None
    return acc


def support_average(
    heads: dict[str, dict[str, torch.Tensor]], name: str, counts: dict[str, dict[str, int]]
) -> torch.Tensor:
    """Row k: sum_i w_i n_ik H_i[k] / sum_i w_i n_ik (float64 reference); the plain average where no expert saw k."""
    plain = plain_average(heads, name).double()
    rows = []
    for k, label in enumerate(LABELS):
        support = sum(WEIGHTS[lang] * counts[lang][label] for lang in COUNTS)
        if support == 0:
            rows.append(plain[k])
            continue
        rows.append(
            sum(WEIGHTS[lang] * counts[lang][label] / support * heads[lang][name][k].double() for lang in COUNTS)
        )
    return torch.stack(rows)


def _merge(
    base: Path, inputs: list[AdapterInput], method: str, fmt: str, out: Path, **extra: Any
) -> tuple[MergeReport, dict[str, torch.Tensor]]:
    parameters = {"weights": dict(WEIGHTS), "include_modules": [], "exclude_modules": [], **extra}
    report = merge_adapters(base, inputs, method, parameters, fmt, None, out, device="cpu", max_relative_error=1.0)
    return report, _output_heads(out, ["classifier.weight", "classifier.bias"])


@pytest.mark.parametrize("fmt", ["peft-adapter", "full-weights"])
@pytest.mark.parametrize("method", ["ties", "linear"])
def test_a_label_one_expert_never_saw_takes_its_head_row_from_the_experts_that_saw_it(
    bert_base: Path, adapters: dict[str, Path], tmp_path: Path, method: str, fmt: str
) -> None:
    heads = {lang: _heads(path) for lang, path in adapters.items()}
    extra = {"density": 1.0} if method == "ties" else {}
    report, merged = _merge(bert_base, _inputs(adapters), method, fmt, tmp_path / "out", **extra)
    psychology = LABELS.index("psychology")
    for name in ("classifier.weight", "classifier.bias"):
        expected = support_average(heads, name, COUNTS)
        torch.testing.assert_close(merged[name].double(), expected, atol=1e-6, rtol=1e-6)
        # nl (the largest weight) has no say on the psychology row: it differs from the plain average there
        row = merged[name][psychology]
        assert not torch.allclose(row, plain_average(heads, name)[psychology], atol=1e-3)
        nl_free = (1.0 * 10 * heads["en"][name][psychology] + 0.5 * 30 * heads["zh"][name][psychology]) / (10 + 15)
        torch.testing.assert_close(row, nl_free, atol=1e-6, rtol=1e-6)
    # Who contributed to which row is reported (and lands in the merge manifest).
    assert report.head_support == {
        "art": {"en": 30, "nl": 25, "zh": 5},
        "money": {"en": 20, "nl": 40, "zh": 10},
        "psychology": {"en": 10, "zh": 30},
    }


@pytest.mark.parametrize("fmt", ["peft-adapter", "full-weights"])
def test_without_label_counts_the_heads_are_the_language_weighted_average_as_before(
    bert_base: Path, adapters: dict[str, Path], tmp_path: Path, fmt: str
) -> None:
    heads = {lang: _heads(path) for lang, path in adapters.items()}
    report, merged = _merge(bert_base, _inputs(adapters, counts=None), "ties", fmt, tmp_path / "out", density=1.0)
    for name in ("classifier.weight", "classifier.bias"):
        assert torch.equal(merged[name], plain_average(heads, name)), name
    assert report.head_support is None


def test_an_expert_without_counts_among_experts_with_counts_keeps_the_language_weighted_average(
    bert_base: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    """An older expert's manifest has no counts: whether it saw a label is unknown, so no row is support-weighted."""
    heads = {lang: _heads(path) for lang, path in adapters.items()}
    inputs = [
        AdapterInput(lang, path, labels=LABELS, label_counts=None if lang == "zh" else COUNTS[lang])
        for lang, path in adapters.items()
    ]
    report, merged = _merge(bert_base, inputs, "linear", "peft-adapter", tmp_path / "out")
    assert torch.equal(merged["classifier.weight"], plain_average(heads, "classifier.weight"))
    assert report.head_support is None


def test_a_label_no_expert_saw_keeps_the_language_weighted_average_for_its_row(
    bert_base: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    counts = {lang: {**c, "psychology": 0} for lang, c in COUNTS.items()}
    heads = {lang: _heads(path) for lang, path in adapters.items()}
    report, merged = _merge(bert_base, _inputs(adapters, counts), "linear", "full-weights", tmp_path / "out")
    psychology = LABELS.index("psychology")
    for name in ("classifier.weight", "classifier.bias"):
        torch.testing.assert_close(merged[name].double(), support_average(heads, name, counts), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(merged[name][psychology], plain_average(heads, name)[psychology])
    assert report.head_support is not None and report.head_support["psychology"] == {}


def test_counts_that_do_not_fit_the_label_list_are_refused(
    bert_base: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    counts = {lang: dict(c) for lang, c in COUNTS.items()}
    counts["nl"]["movies"] = 3
    with pytest.raises(MergeError, match="nl: label counts name 'movies'"):
        _merge(bert_base, _inputs(adapters, counts), "linear", "peft-adapter", tmp_path / "out")
    counts["nl"] = {"art": -1}
    with pytest.raises(MergeError, match="nl: label counts must be >= 0"):
        _merge(bert_base, _inputs(adapters, counts), "linear", "peft-adapter", tmp_path / "out")


def test_only_head_tensors_with_a_row_per_label_are_support_weighted(tmp_path: Path) -> None:
    """A RoBERTa head has a dense layer (hidden x hidden) before its output projection (labels x hidden): the dense
    layer keeps the language-weighted average, the projection merges row by row."""
    base = make_tiny_encoder(tmp_path / "roberta", kind="roberta")
    adapters = make_classifier_adapters(base, tmp_path / "adapters", list(COUNTS), len(LABELS))
    heads = {lang: _heads(path) for lang, path in adapters.items()}
    names = [
        "classifier.dense.weight",
        "classifier.dense.bias",
        "classifier.out_proj.weight",
        "classifier.out_proj.bias",
    ]
    assert sorted(heads["en"]) == sorted(names)
    parameters = {"weights": dict(WEIGHTS), "include_modules": [], "exclude_modules": []}
    merge_adapters(base, _inputs(adapters), "linear", parameters, "peft-adapter", None, tmp_path / "out", device="cpu")
    merged = _output_heads(tmp_path / "out", names)
    for name in names:
        if "out_proj" in name:
            torch.testing.assert_close(
                merged[name].double(), support_average(heads, name, COUNTS), atol=1e-6, rtol=1e-6
            )
        else:
            assert torch.equal(merged[name], plain_average(heads, name)), name
