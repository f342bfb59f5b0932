"""TSV-Merge, Iso-C and Iso-CTS: properties that follow from their definitions (the dense references of the papers'
code are in ``test_methods.py``), then end to end through the engine and the local merge CLI in both output formats."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from merge_helpers import PEFT_DEPRECATION, make_adapters, model_with_deltas, peft_deltas, ref_merge

from langmerge.merge_catalogue import METHODS
from langmerge_trainer.merge.engine import AdapterInput, merge_adapters
from langmerge_trainer.merge.method_math import (
    LoraUpdate,
    LowRankDelta,
    get_method,
    iso_cts_split,
    procrustes,
    tsv_ranks,
)

MODULE = "model.layers.0.self_attn.q_proj"
SPECTRAL = ("tsv", "iso_c", "iso_cts")


def updates_of(
    ranks: Sequence[int] = (2, 3, 4),
    weights: Sequence[float] = (0.5, 1.0, 2.0),
    shape: tuple[int, int] = (24, 20),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[LoraUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [
        LoraUpdate(
            B=torch.randn(shape[0], r, generator=g).to(dtype),
            A=torch.randn(r, shape[1], generator=g).to(dtype),
            scale=0.5 + 0.25 * i,
            weight=w,
            key=f"l{i}",
        )
        for i, (r, w) in enumerate(zip(ranks, weights, strict=True))
    ]


def merge(method: str, updates: Sequence[LoraUpdate], **given: Any) -> LowRankDelta:
    impl = get_method(method)
    merged = impl.merge(MODULE, updates, impl.resolve(given))
    assert isinstance(merged, LowRankDelta)
    return merged


def dense(u: LoraUpdate) -> torch.Tensor:
    return u.weight * u.scale * (u.B.double() @ u.A.double())


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> bool:
    return bool(torch.allclose(got.double(), want.double(), atol=rtol * float(want.abs().max()), rtol=0))


# -- the catalogue ---------------------------------------------------------------------------------------------------


def test_the_catalogue_declares_them_low_rank_exact_with_the_papers_defaults() -> None:
    assert get_method("tsv").resolve({}) == {"sv_fraction": 1.0, "lambda_": 1.0}
    assert get_method("iso_c").resolve({}) == {"lambda_": 1.0}
    assert get_method("iso_cts").resolve({}) == {"common_space_fraction": 0.8, "lambda_": 1.0}
    assert all(METHODS[m].low_rank_exact and get_method(m).low_rank_exact for m in SPECTRAL)
    for method, bad in (
        ("tsv", {"sv_fraction": 0.0}),
        ("tsv", {"sv_fraction": 1.5}),
        ("iso_cts", {"common_space_fraction": 0}),
    ):
        with pytest.raises(ValueError, match="a number in \\(0, 1\\]"):
            get_method(method).resolve(bad)
    with pytest.raises(ValueError, match="do not apply to method 'iso_c'"):
        get_method("iso_c").resolve({"common_space_fraction": 0.5})
    with pytest.raises(ValueError, match="do not apply to method 'tsv'"):
        get_method("tsv").resolve({"density": 0.5})


# -- TSV-Merge -------------------------------------------------------------------------------------------------------


def test_tsv_of_one_update_with_fraction_1_is_that_update_scaled_by_lambda() -> None:
    (one,) = updates_of(ranks=(5,), weights=(1.5,))
    assert close(merge("tsv", [one]).dense(), dense(one))
    assert close(merge("tsv", [one], lambda_=0.7).dense(), 0.7 * dense(one))
    # a smaller fraction keeps the top components: the best rank-2 approximation (floor(0.5 * 5) = 2)
    U, S, Vh = torch.linalg.svd(dense(one))
    assert close(merge("tsv", [one], sv_fraction=0.5).dense(), U[:, :2] @ torch.diag(S[:2]) @ Vh[:2])


def test_tsv_of_updates_with_orthogonal_directions_is_their_weighted_sum() -> None:
    """Updates on disjoint rows and columns do not interfere: orthogonalising changes nothing."""
    g = torch.Generator().manual_seed(1)
    updates = []
    for i, (r, w) in enumerate(((2, 0.5), (3, 1.0), (2, 2.0))):
        B = torch.zeros(30, r)
        A = torch.zeros(r, 24)
        B[10 * i : 10 * i + 10] = torch.randn(10, r, generator=g)
        A[:, 8 * i : 8 * i + 8] = torch.randn(r, 8, generator=g)
        updates.append(LoraUpdate(B, A, scale=1.0 + i, weight=w, key=f"l{i}"))
    total = sum(dense(u) for u in updates)
    assert isinstance(total, torch.Tensor)
    assert close(merge("tsv", updates).dense(), total)
    assert close(merge("tsv", updates, lambda_=1.4).dense(), 1.4 * total)
    # the same updates with overlapping directions interfere: TSV is not their sum
    overlapping = updates_of()
    assert not close(merge("tsv", overlapping).dense(), sum(dense(u) for u in overlapping), rtol=1e-2)  # type: ignore[arg-type]


def test_tsv_singular_vectors_are_orthonormal_and_keep_the_tasks_singular_values() -> None:
    """``U_perp diag(S) V_perp^T`` with orthonormal ``U_perp`` and ``V_perp``: the merge's singular values are exactly
    the kept singular values of the weighted updates (times lambda), and its factors are ``U_perp diag(lambda S)``
    and ``V_perp^T``."""
    updates = updates_of()
    merged = merge("tsv", updates, lambda_=1.3)
    kept = torch.cat([torch.linalg.svdvals(dense(u))[:k] for u, k in zip(updates, (2, 3, 4), strict=True)])
    want = torch.sort(1.3 * kept, descending=True).values
    assert torch.allclose(torch.linalg.svdvals(merged.dense().double())[: len(want)], want, rtol=1e-5)
    columns = merged.B.double() / merged.B.double().norm(dim=0)
    assert torch.allclose(columns.T @ columns, torch.eye(9, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(merged.A.double() @ merged.A.double().T, torch.eye(9, dtype=torch.float64), atol=1e-6)


def test_tsv_ranks_follow_the_paper_s_share_of_the_module() -> None:
    assert tsv_ranks([16, 16, 16], 1.0, 4096, 4096) == [16, 16, 16]  # LoRA: every component
    assert tsv_ranks([16, 8], 0.5, 4096, 1024) == [8, 4]
    assert tsv_ranks([768] * 8, 1.0, 768, 3072) == [96] * 8  # a full-rank task matrix: min(rows, cols) / N
    assert tsv_ranks([3, 1, 0], 0.1, 64, 64) == [1, 1, 0]  # at least one of an update with support
    assert sum(tsv_ranks([9, 9, 9], 1.0, 20, 24)) <= 20


def test_procrustes_is_the_svd_polar_factor_and_stays_in_the_range() -> None:
    g = torch.Generator().manual_seed(2)
    M = torch.randn(40, 9, generator=g, dtype=torch.float64)
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    got = procrustes(M)
    assert torch.allclose(got, P @ Qh, atol=1e-10)
    assert torch.allclose(got.T @ got, torch.eye(9, dtype=torch.float64), atol=1e-10)
    # rank-deficient: the same directions twice; nothing outside the range of M is added
    U = torch.linalg.qr(torch.randn(40, 3, generator=g, dtype=torch.float64))[0]
    twice = procrustes(torch.cat([U, U], dim=1))
    assert torch.allclose(U @ (U.T @ twice), twice, atol=1e-10)
    assert torch.allclose(twice, torch.cat([U, U], dim=1) / 2**0.5, atol=1e-10)


def test_tsv_of_an_update_given_twice_is_the_update_once() -> None:
    """Two languages with exactly the same update: their shared directions count once (task arithmetic doubles
    them), and no direction outside the update appears."""
    (one,) = updates_of(ranks=(4,), weights=(1.0,))
    twin = LoraUpdate(one.B, one.A, one.scale, 1.0, "twin")
    assert close(merge("tsv", [one, twin]).dense(), dense(one))


# -- Iso-C and Iso-CTS -----------------------------------------------------------------------------------------------


def test_iso_c_has_a_flat_spectrum_at_the_mean_of_the_sum_s_over_its_directions() -> None:
    updates = updates_of()
    total = sum(dense(u) for u in updates)
    assert isinstance(total, torch.Tensor)
    U, S, _ = torch.linalg.svd(total)
    rank = 2 + 3 + 4
    merged = merge("iso_c", updates, lambda_=1.5).dense().double()
    values = torch.linalg.svdvals(merged)
    assert torch.allclose(values[:rank], torch.full((rank,), 1.5 * float(S[:rank].mean()), dtype=torch.float64))
    assert float(values[rank]) < 1e-5 * float(values[0])  # no direction the sum does not have
    assert close(U[:, :rank] @ (U[:, :rank].T @ merged), merged)  # the sum's own directions
    assert merge("iso_c", updates).rank == rank


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_one_update_becomes_its_isotropic_version(method: str) -> None:
    (one,) = updates_of(ranks=(6,), weights=(1.0,))
    U, S, Vh = torch.linalg.svd(dense(one))
    assert close(merge(method, [one]).dense(), float(S[:6].mean()) * U[:, :6] @ Vh[:6])


def test_iso_cts_with_the_whole_rank_common_is_iso_c() -> None:
    updates = updates_of()
    iso_c = merge("iso_c", updates, lambda_=1.2).dense()
    assert close(merge("iso_cts", updates, common_space_fraction=1.0, lambda_=1.2).dense(), iso_c)
    # a task-specific share replaces the sum's weakest directions: another, still isotropic merge of the same rank
    cts = merge("iso_cts", updates, common_space_fraction=0.5).dense().double()
    assert not close(cts, iso_c, rtol=1e-2)
    values = torch.linalg.svdvals(cts)
    assert torch.allclose(values[:9], values[:9].mean().expand(9), rtol=1e-5)
    assert float(values[9]) < 1e-5 * float(values[0])


def test_iso_cts_split_follows_the_paper() -> None:
    assert iso_cts_split(768, 8, 0.8) == (616, 19)  # a ViT-B layer: int(614.4) = 614, round(154 / 8) = 19
    assert iso_cts_split(48, 3, 0.8) == (39, 3)  # three rank-16 LoRAs
    assert iso_cts_split(18, 3, 1.0) == (18, 0)
    assert iso_cts_split(8, 3, 0.1) == (2, 2)  # at least one common direction
    assert iso_cts_split(8, 1, 0.8) == (6, 2)
    assert iso_cts_split(0, 3, 0.8) == (0, 0)


# -- every method ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", SPECTRAL)
def test_deterministic_and_independent_of_order_and_factorisation(method: str) -> None:
    """The same inputs give bit-identical factors; the updates' order and how each is factorised (signs, any
    invertible mixing of its rank) do not change the merged update."""
    updates = updates_of()
    first = merge(method, updates)
    again = merge(method, updates)
    assert torch.equal(first.B, again.B) and torch.equal(first.A, again.A)
    assert close(merge(method, list(reversed(updates))).dense(), first.dense(), rtol=1e-4)
    g = torch.Generator().manual_seed(9)
    mixed = []
    for u in updates:
        R = torch.randn(u.rank, u.rank, generator=g, dtype=torch.float64) + 3 * torch.eye(u.rank, dtype=torch.float64)
        mixed.append(
            LoraUpdate(
                (-u.B.double() @ R).float(), (torch.linalg.inv(R) @ -u.A.double()).float(), u.scale, u.weight, u.key
            )
        )
    assert close(merge(method, mixed).dense(), first.dense(), rtol=1e-4)


@pytest.mark.parametrize("method", SPECTRAL)
@pytest.mark.parametrize("shape", [(24, 20), (16, 40)])
def test_shapes_and_dtypes(method: str, shape: tuple[int, int]) -> None:
    updates = updates_of(shape=shape, dtype=torch.bfloat16)
    merged = merge(method, updates)
    assert merged.B.dtype == merged.A.dtype == torch.float32
    assert merged.B.shape == (shape[0], merged.rank) and merged.A.shape == (merged.rank, shape[1])
    assert 1 <= merged.rank <= sum(u.rank for u in updates)
    assert bool(torch.isfinite(merged.dense()).all())


@pytest.mark.parametrize("method", SPECTRAL)
def test_weights_scale_and_weight_0_leaves_an_update_out(method: str) -> None:
    updates = updates_of()
    doubled = [LoraUpdate(u.B, u.A, u.scale, 2 * u.weight, u.key) for u in updates]
    assert close(merge(method, doubled).dense(), 2 * merge(method, updates).dense(), rtol=1e-4)
    without = [LoraUpdate(u.B, u.A, u.scale, 0.0 if i == 1 else u.weight, u.key) for i, u in enumerate(updates)]
    assert close(merge(method, without).dense(), merge(method, [updates[0], updates[2]]).dense(), rtol=1e-4)
    with pytest.raises(ValueError, match="every adapter has weight 0"):
        merge(method, [LoraUpdate(u.B, u.A, u.scale, 0.0, u.key) for u in updates])


@pytest.mark.parametrize("method", SPECTRAL)
def test_an_untrained_update_merges_to_zero(method: str) -> None:
    """B = 0 (PEFT's initialisation): no direction has support, the merge is zero, nothing is NaN."""
    zero = [LoraUpdate(torch.zeros(24, 4), torch.randn(4, 20), 2.0, 1.0, "l0")]
    merged = merge(method, zero)
    assert merged.rank == 1 and not bool(merged.dense().any())
    # next to a trained one, it takes no share of the rank
    (trained,) = updates_of(ranks=(3,), weights=(1.0,))
    assert close(merge(method, [trained, *zero]).dense(), merge(method, [trained]).dense(), rtol=1e-4)


# -- end to end ------------------------------------------------------------------------------------------------------

WEIGHTS = {"es": 0.5, "it": 1.0, "pt": 2.0}
EXTRA = {
    "tsv": {"sv_fraction": 0.5, "lambda_": 1.2},
    "iso_c": {"lambda_": 1.3},
    "iso_cts": {"common_space_fraction": 0.6, "lambda_": 1.0},
}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(tiny_model_dir, tmp_path_factory.mktemp("spectral-adapters"))


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(3, 43).reshape(2, 20)).logits.double()


@pytest.mark.filterwarnings(PEFT_DEPRECATION)
@pytest.mark.parametrize("method", SPECTRAL)
def test_engine_both_formats_match_the_reference(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path, method: str
) -> None:
    """Full weights are base + the reference merge of PEFT's own updates; the PEFT adapter (rank auto) is exact,
    each module at most the sum of its input ranks, and loads to the same logits."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    deltas = {lang: peft_deltas(tiny_model_dir, path) for lang, path in adapter_dirs.items()}
    p = {"weights": dict(WEIGHTS), "include_modules": [], "exclude_modules": [], **EXTRA[method]}
    resolved = get_method(method).resolve(p)
    want: dict[str, torch.Tensor] = {}
    for module in sorted({m for per in deltas.values() for m in per}):
        langs = [lang for lang in WEIGHTS if module in deltas[lang]]
        want[module] = ref_merge(
            method, [deltas[lang][module] for lang in langs], [WEIGHTS[x] for x in langs], resolved
        )
    inputs = [AdapterInput(lang, path) for lang, path in adapter_dirs.items()]

    full = merge_adapters(tiny_model_dir, inputs, method, p, "full-weights", None, tmp_path / "full")
    assert full.method_parameters == resolved and full.max_error == 0.0
    before = load_file(tiny_model_dir / "model.safetensors")
    after: dict[str, torch.Tensor] = {}
    for shard in (tmp_path / "full").glob("model-*.safetensors"):
        after.update(load_file(shard))
    for module, delta in want.items():
        key = f"{module.removeprefix('base_model.model.')}.weight"
        assert close(after[key].double() - before[key].double(), delta, rtol=1e-4), module

    adapter = merge_adapters(tiny_model_dir, inputs, method, p, "peft-adapter", "auto", tmp_path / "adapter")
    assert adapter.max_error == 0.0 and adapter.module_ranks["model.layers.0.self_attn.k_proj"] <= 8
    assert max(adapter.module_ranks.values()) <= 18  # q_proj: 4 + 8 + 6
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    reference = logits(model_with_deltas(tiny_model_dir, want))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    for got in (logits(loaded.eval()), logits(AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval())):
        assert float((got - reference).abs().max()) <= 1e-4 * float(reference.abs().max())
    assert float((reference - logits(base)).abs().max()) > 1e-2  # the merge changes the model


@pytest.mark.filterwarnings(PEFT_DEPRECATION)
def test_the_local_merge_config_accepts_them(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``langmerge merge CONFIG OUT``: camelCase parameters, the plan, a merge; a parameter of another method is
    refused with the accepted ones named."""
    from langmerge.artifacts import MANIFEST, MergeManifest
    from langmerge_trainer.merge.cli import main

    base = {
        "baseModel": str(tiny_model_dir),
        "adapters": [{"language": lang, "path": str(path)} for lang, path in adapter_dirs.items()],
    }
    cases = {
        "tsv": {"svFraction": 0.5, "lambda": 1.1},
        "iso_c": {"lambda": 1.3, "weights": {"it": 0.5}},
        "iso_cts": {"commonSpaceFraction": 0.7},
    }
    for method, parameters in cases.items():
        config = tmp_path / f"{method}.yaml"
        config.write_text(yaml.safe_dump({**base, "method": method, "parameters": parameters}))
        assert main([str(config), str(tmp_path / method), "--dry-run", "--no-progress"]) == 0
        assert f"method:      {method} " in capsys.readouterr().out
    out = tmp_path / "out"
    assert main([str(tmp_path / "iso_cts.yaml"), str(out), "--no-progress", "--cache", str(tmp_path / "c")]) == 0
    manifest = MergeManifest.model_validate_json((out / MANIFEST).read_text())
    assert manifest.method == "iso_cts" and manifest.parameters["common_space_fraction"] == 0.7
    assert manifest.parameters["lambda_"] == 1.0 and max(manifest.module_errors.values()) == 0.0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**base, "method": "iso_c", "parameters": {"svFraction": 0.5}}))
    assert main([str(bad), str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "parameters svFraction do not apply to method 'iso_c' (it accepts: " in capsys.readouterr().err
