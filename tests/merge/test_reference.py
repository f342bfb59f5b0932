"""Merging relative to a reference adapter (the trunk the experts branched from): ``Delta_t + M(Delta_i - Delta_t)``,
against the methods' definitions on dense updates; a weighted average is unchanged by it; a reference that does not
fit the inputs is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from merge_helpers import PEFT_DEPRECATION, make_adapters, peft_deltas, ref_merge

from langmerge_trainer.merge.engine import AdapterInput, MergeError, merge_adapters

pytestmark = pytest.mark.filterwarnings(PEFT_DEPRECATION)

SPEC = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
WEIGHTS = {"es": 1.0, "it": 2.0, "pt": 1.0}


@pytest.fixture(scope="module")
def trunk_and_branches(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    specs = {name: dict(SPEC) for name in ("trunk", "es", "it", "pt")}
    return make_adapters(tiny_model_dir, tmp_path_factory.mktemp("trunk"), specs)


def _merged_deltas(base: Path, out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    merged: dict[str, torch.Tensor] = {}
    for shard in out.glob("*.safetensors"):
        merged.update(load_file(shard))
    base_weights: dict[str, torch.Tensor] = {}
    for shard in base.glob("*.safetensors"):
        base_weights.update(load_file(shard))
    return {
        k: (merged[k].double() - base_weights[k].double())
        for k in base_weights
        if k.endswith(("q_proj.weight", "v_proj.weight"))
    }


@pytest.mark.parametrize(
    ("method", "extra"), [("ties", {"density": 0.5, "lambda_": 1.0}), ("task_arithmetic", {"lambda_": 0.7})]
)
def test_a_trunk_is_subtracted_before_the_method_and_added_once(
    tiny_model_dir: Path, trunk_and_branches: dict[str, Path], tmp_path: Path, method: str, extra: dict[str, Any]
) -> None:
    paths = trunk_and_branches
    deltas = {name: peft_deltas(tiny_model_dir, path) for name, path in paths.items()}
    inputs = [AdapterInput(lang, paths[lang]) for lang in WEIGHTS]
    p = {"weights": dict(WEIGHTS), "include_modules": [], "exclude_modules": [], **extra}
    out = tmp_path / "with-trunk"
    report = merge_adapters(
        tiny_model_dir,
        inputs,
        method,
        p,
        "full-weights",
        None,
        out,
        reference=AdapterInput("trunk", paths["trunk"], uri="s3://b/trunk", digest="d"),
    )
    assert report.reference == {"uri": "s3://b/trunk", "digest": "d"}
    got = _merged_deltas(tiny_model_dir, out)
    merge_adapters(tiny_model_dir, inputs, method, p, "full-weights", None, tmp_path / "plain")
    plain = _merged_deltas(tiny_model_dir, tmp_path / "plain")
    differs = False
    for module, trunk in deltas["trunk"].items():
        key = f"{module.removeprefix('base_model.model.')}.weight"
        relative = [deltas[lang][module].double() - trunk.double() for lang in WEIGHTS]
        want = trunk.double() + ref_merge(method, relative, list(WEIGHTS.values()), p, module, list(WEIGHTS))
        assert torch.allclose(got[key], want, atol=1e-5, rtol=1e-4), module
        differs |= not torch.allclose(plain[key], want, atol=1e-4)
    assert differs  # the reference changes what these methods produce


def test_a_weighted_average_is_unchanged_by_the_reference(
    tiny_model_dir: Path, trunk_and_branches: dict[str, Path], tmp_path: Path
) -> None:
    paths = trunk_and_branches
    inputs = [AdapterInput(lang, paths[lang]) for lang in WEIGHTS]
    p = {"weights": dict(WEIGHTS), "include_modules": [], "exclude_modules": []}
    merge_adapters(
        tiny_model_dir,
        inputs,
        "linear",
        p,
        "full-weights",
        None,
        tmp_path / "a",
        reference=AdapterInput("trunk", paths["trunk"]),
    )
    merge_adapters(tiny_model_dir, inputs, "linear", p, "full-weights", None, tmp_path / "b")
    a, b = _merged_deltas(tiny_model_dir, tmp_path / "a"), _merged_deltas(tiny_model_dir, tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # as a PEFT adapter the average with the trunk stays exact (rank auto keeps the factors' true rank)
    report = merge_adapters(
        tiny_model_dir,
        inputs,
        "linear",
        p,
        "peft-adapter",
        "auto",
        tmp_path / "c",
        reference=AdapterInput("trunk", paths["trunk"]),
    )
    assert report.max_error < 1e-5


def test_a_reference_without_the_merged_modules_is_refused(
    tiny_model_dir: Path, trunk_and_branches: dict[str, Path], tmp_path: Path
) -> None:
    other = make_adapters(tiny_model_dir, tmp_path / "other", {"trunk": {**SPEC, "target_modules": ["q_proj"]}})
    inputs = [AdapterInput(lang, trunk_and_branches[lang]) for lang in WEIGHTS]
    p = {"weights": dict(WEIGHTS), "include_modules": [], "exclude_modules": []}
    with pytest.raises(MergeError, match="the reference adapter \\(the trunk\\) has no update of it"):
        merge_adapters(
            tiny_model_dir,
            inputs,
            "ties",
            p,
            "full-weights",
            None,
            tmp_path / "x",
            reference=AdapterInput("trunk", other["trunk"]),
        )
