"""The streaming engine on a tiny Llama with three real PEFT adapters: both output formats, loaded back and run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from merge_helpers import PEFT_DEPRECATION, make_adapters, model_with_deltas, peft_deltas, ref_merge

from langmerge_trainer.merge import engine
from langmerge_trainer.merge.engine import AdapterInput, MergeError, merge_adapters
from langmerge_trainer.merge.safetensors_io import read_header

pytestmark = pytest.mark.filterwarnings(PEFT_DEPRECATION)

WEIGHTS = {"es": 0.5, "it": 1.0, "pt": 2.0}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(tiny_model_dir, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def deltas(tiny_model_dir: Path, adapter_dirs: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    """language -> module -> the update as PEFT computes it."""
    return {lang: peft_deltas(tiny_model_dir, path) for lang, path in adapter_dirs.items()}


@pytest.fixture(scope="module")
def sharded_base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model re-saved in several shards, in bfloat16 (the output must keep the dtype)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharded-bf16")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="300KB")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def inputs(adapter_dirs: dict[str, Path]) -> list[AdapterInput]:
    return [AdapterInput(lang, path) for lang, path in adapter_dirs.items()]


def params(**extra: Any) -> dict[str, Any]:
    return {"weights": dict(WEIGHTS), "include_modules": [], "exclude_modules": [], **extra}


def reference_deltas(
    deltas: dict[str, dict[str, torch.Tensor]], method: str, p: dict[str, Any]
) -> dict[str, torch.Tensor]:
    modules = sorted({m for per in deltas.values() for m in per})
    out = {}
    for module in modules:
        langs = [lang for lang in WEIGHTS if module in deltas[lang]]
        out[module] = ref_merge(
            method, [deltas[lang][module] for lang in langs], [WEIGHTS[lang] for lang in langs], p, module, langs
        )
    return out


def logits(model: Any) -> torch.Tensor:
    ids = torch.arange(3, 43).reshape(2, 20)
    with torch.no_grad():
        return model(ids).logits.double()


def assert_close_logits(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= rtol * scale, float((got - want).abs().max())


@pytest.mark.parametrize(
    ("method", "extra", "rank"),
    [
        ("linear", {}, None),
        ("cat", {}, None),
        ("knots", {"density": 0.6, "lambda_": 1.0, "knots_merge": "ties"}, None),
        ("tsv", {"sv_fraction": 1.0, "lambda_": 1.0}, None),
        ("iso_c", {"lambda_": 1.2}, None),
        ("iso_cts", {"common_space_fraction": 0.8, "lambda_": 1.0}, None),
        # not low rank: at rank 64 (= the smaller side of every module) the range finder captures it all
        ("ties", {"density": 0.5, "lambda_": 1.2}, 64),
        ("dare_ties", {"density": 0.7, "lambda_": 1.0, "seed": 3}, 64),
    ],
)
def test_peft_adapter_output_loads_and_matches_base_plus_merged_delta(
    tiny_model_dir: Path,
    adapter_dirs: dict[str, Path],
    deltas: dict[str, dict[str, torch.Tensor]],
    tmp_path: Path,
    method: str,
    extra: dict[str, Any],
    rank: int | None,
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    p = params(**extra)
    report = merge_adapters(tiny_model_dir, inputs(adapter_dirs), method, p, "peft-adapter", rank, out)
    config = json.loads((out / "adapter_config.json").read_text())
    if rank is None:  # auto, exact: each module keeps the sum of its input ranks (q_proj has all three: 4 + 8 + 6)
        assert report.output_rank == 18 and report.max_error == 0.0
        assert report.module_ranks["model.layers.0.self_attn.q_proj"] == 18
        assert report.module_ranks["model.layers.0.self_attn.k_proj"] == 8  # only it's adapter
        assert config["rank_pattern"] and config["rank_pattern"] == config["alpha_pattern"]
    else:
        assert set(report.module_ranks.values()) == {rank} and config["rank_pattern"] == {}
    assert config["r"] == config["lora_alpha"] and not config["use_rslora"]
    assert sorted(config["target_modules"]) == ["down_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    assert set(report.files) == {"adapter_model.safetensors", "adapter_config.json"}
    assert report.max_error < 1e-5
    got = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval())
    want = logits(model_with_deltas(tiny_model_dir, reference_deltas(deltas, method, p)))
    base = logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())
    assert float((want - base).abs().max()) > 100 * float((got - want).abs().max())  # the updates matter
    assert_close_logits(got, want)


def test_auto_rank_gives_each_module_the_smallest_rank_within_the_error_bound(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], deltas: dict[str, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    from langmerge_trainer.merge.lowrank import breakeven_rank
    from langmerge_trainer.merge.safetensors_io import SafetensorsReader

    p = params(density=1.0, lambda_=1.0)
    out = tmp_path / "auto"
    report = merge_adapters(
        tiny_model_dir,
        inputs(adapter_dirs),
        "ties",
        p,
        "peft-adapter",
        "auto",
        out,
        max_relative_error=0.05,
        max_rank=64,
    )
    errors, ranks = report.module_errors, report.module_ranks
    assert all(e <= 0.05 for e in errors.values())
    assert ranks["model.layers.0.self_attn.k_proj"] == 8  # one rank-8 adapter: exactly rank 8 (TIES of one update)
    q = "model.layers.0.self_attn.q_proj"
    assert ranks[q] > 18  # three adapters, TIES: not low rank; more than the inputs' ranks
    # the smallest: one rank less cannot meet the bound
    want = reference_deltas(deltas, "ties", p)[q]
    singular = torch.linalg.svdvals(want)
    tail = float(singular[ranks[q] - 1 :].square().sum().sqrt() / singular.square().sum().sqrt())
    assert tail > 0.05
    # the reported error is the written factors' error against the merged update
    with SafetensorsReader(out / "adapter_model.safetensors") as r:
        key = f"base_model.model.{q}"
        written = r.read(f"{key}.lora_B.weight").double() @ r.read(f"{key}.lora_A.weight").double()
    assert float((written - want).norm() / want.norm()) == pytest.approx(errors[q], rel=1e-3)
    # PEFT loads the per-module ranks (rank_pattern, alpha_pattern: scaling 1) and applies exactly what was written
    loaded = peft_deltas(tiny_model_dir, out)
    assert torch.allclose(loaded[q].double(), written, atol=1e-5)
    assert "model.layers.0.self_attn.k_proj" in loaded
    # the default cap is the break-even rank: a 64x64 module's adapter stops at 32
    assert breakeven_rank(64, 64) == 32


def test_an_adapter_beyond_the_error_bound_fails_with_the_worst_module_named(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from langmerge_trainer.merge.engine import RefactorBoundExceeded

    p = params(density=1.0, lambda_=1.0)
    out = tmp_path / "fixed"
    with pytest.raises(RefactorBoundExceeded) as fixed:
        merge_adapters(tiny_model_dir, inputs(adapter_dirs), "ties", p, "peft-adapter", 8, out)
    message = str(fixed.value)
    assert "output.maxRelativeError 0.01" in message and "at output.rank 8" in message
    assert "module model.layers." in message and "output.format: full-weights" in message
    assert not out.exists()  # nothing half-written
    with pytest.raises(RefactorBoundExceeded, match=r"raise output.maxRank \(now 4\)"):
        merge_adapters(tiny_model_dir, inputs(adapter_dirs), "ties", p, "peft-adapter", "auto", out, max_rank=4)
    # the old behaviour, a lossy adapter, only when asked for: a larger bound
    report = merge_adapters(
        tiny_model_dir, inputs(adapter_dirs), "ties", p, "peft-adapter", 8, out, max_relative_error=1.0
    )
    assert report.max_error > 0.01 and set(report.module_ranks.values()) == {8}


def test_full_weights_output_is_sharded_keeps_dtype_and_matches(
    sharded_base: Path,
    adapter_dirs: dict[str, Path],
    deltas: dict[str, dict[str, torch.Tensor]],
    tmp_path: Path,
) -> None:
    from transformers import AutoModelForCausalLM

    assert len(list(sharded_base.glob("*.safetensors"))) >= 3
    out = tmp_path / "full"
    p = params(density=0.5, lambda_=1.0)
    report = merge_adapters(
        sharded_base, inputs(adapter_dirs), "ties", p, "full-weights", None, out, shard_size_mb=0.25
    )
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file() and name in report.files
    for shard in shards:
        tensors, _ = read_header(shard)
        assert {t.dtype for t in tensors.values()} == {"BF16"}
    assert report.model_digest and all(len(sha) == 64 for _, sha in report.files.values())
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    reference = model_with_deltas(sharded_base, reference_deltas(deltas, "ties", p))
    # bf16 rounding of W + Delta is the only difference: at most one bf16 step apart
    ours = dict(merged.named_parameters())
    for name, param in reference.named_parameters():
        diff = (ours[name].double() - param.double()).abs()
        assert bool((diff <= param.double().abs() * 2**-7 + 1e-30).all()), name
    assert_close_logits(logits(merged.float()), logits(reference.float()))


def test_include_exclude_and_untouched_weights_pass_through_bit_exact(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    p = params(include_modules=[r"layers\.0\."], exclude_modules=["mlp"])
    report = merge_adapters(tiny_model_dir, inputs(adapter_dirs), "linear", p, "full-weights", None, tmp_path / "o")
    assert report.modules == [
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    assert "model.layers.1.self_attn.q_proj" in report.excluded_modules
    before = load_file(tiny_model_dir / "model.safetensors")
    after: dict[str, torch.Tensor] = {}
    for shard in (tmp_path / "o").glob("model-*.safetensors"):
        after.update(load_file(shard))
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{m}.weight" for m in report.modules}
    adapter = merge_adapters(tiny_model_dir, inputs(adapter_dirs), "linear", p, "peft-adapter", None, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == adapter.modules  # not the union: full names of exactly the merged modules


def test_a_failed_merge_leaves_nothing_behind(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("an earlier complete output")

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("disk full")

    monkeypatch.setattr(engine, "auto_lowrank_factors", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        merge_adapters(tiny_model_dir, inputs(adapter_dirs), "linear", params(), "peft-adapter", None, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]  # the old output is untouched


def test_bad_inputs_are_refused_with_a_message(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    ins = inputs(adapter_dirs)
    cases: list[tuple[dict[str, Any], str]] = [
        (params(weights={"fr": 1.0}), "without an adapter"),
        (params(exclude_modules=["."]), "no module"),
        (params(include_modules=["("]), "regular expression"),
        (params(density=0.5), "do not apply"),
    ]
    for p, message in cases:
        with pytest.raises(ValueError, match=message):
            merge_adapters(tiny_model_dir, ins, "linear", p, "peft-adapter", None, tmp_path / "x")
    with pytest.raises(MergeError, match="more than one adapter"):
        merge_adapters(tiny_model_dir, [*ins, ins[0]], "linear", params(), "peft-adapter", None, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_embedding_and_fan_in_fan_out_loras(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Embedding LoRA (PEFT's update is (B A)^T) on the Llama, and GPT-2's Conv1D layers (fan_in_fan_out)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(gpt2)
    cases = {
        "llama-embedding": (
            tiny_model_dir,
            {
                "es": {"r": 4, "lora_alpha": 4, "target_modules": ["embed_tokens", "q_proj"]},
                "it": {"r": 2, "lora_alpha": 8, "target_modules": ["embed_tokens"]},
            },
        ),
        "gpt2-conv1d": (
            gpt2,
            {
                "es": {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True},
                "it": {"r": 3, "lora_alpha": 3, "target_modules": ["c_attn"], "fan_in_fan_out": True},
            },
        ),
    }
    for case, (base, specs) in cases.items():
        dirs = make_adapters(base, tmp_path / case, specs, gain=5.0)
        per_lang = {lang: peft_deltas(base, path) for lang, path in dirs.items()}
        ins = [AdapterInput(lang, path, weight=w) for (lang, path), w in zip(dirs.items(), (0.75, 0.25), strict=True)]
        p = {"weights": {}, "include_modules": [], "exclude_modules": []}
        want_deltas = {}
        for module in sorted({m for d in per_lang.values() for m in d}):
            langs = [lang for lang in dirs if module in per_lang[lang]]
            weights = [0.75 if lang == "es" else 0.25 for lang in langs]
            want_deltas[module] = ref_merge("linear", [per_lang[lang][module] for lang in langs], weights, p)
        want = logits(model_with_deltas(base, want_deltas))
        merge_adapters(base, ins, "linear", p, "peft-adapter", None, tmp_path / f"{case}-adapter")
        merge_adapters(base, ins, "linear", p, "full-weights", None, tmp_path / f"{case}-full")
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / f"{case}-adapter")
        assert_close_logits(logits(adapter.eval()), want)
        assert_close_logits(logits(AutoModelForCausalLM.from_pretrained(tmp_path / f"{case}-full").eval()), want)
    # GPT-2 ties wte to the output head: merging an embedding update into the weights would change the head too
    tied = make_adapters(gpt2, tmp_path / "tied", {"es": {"r": 2, "lora_alpha": 2, "target_modules": ["wte"]}})
    with pytest.raises(MergeError, match="ties its input embeddings"):
        merge_adapters(gpt2, [AdapterInput("es", tied["es"])], "linear", p, "full-weights", None, tmp_path / "t")
