"""CUDA gives the CPU's results (DARE's masks included): run where a GPU is present, skipped with a reason elsewhere."""

from __future__ import annotations

import pytest
import torch

from langmerge_trainer.merge.lowrank import refactor_lowrank
from langmerge_trainer.merge.method_math import LoraUpdate, get_method
from langmerge_trainer.merge.sparsify import dare_keep_mask, topk_keep_mask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: run where a GPU is present")


def updates(device: str) -> list[LoraUpdate]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i, r in enumerate((4, 8, 6)):
        B, A = torch.randn(300, r, generator=g), torch.randn(r, 260, generator=g)
        out.append(LoraUpdate(B.to(device), A.to(device), 0.5 + i, weight=1.0 + i, key=f"l{i}"))
    return out


@pytest.mark.parametrize(
    ("method", "given"),
    [
        ("ties", {"density": 0.3}),
        ("dare_ties", {"density": 0.5, "seed": 11}),
        ("dare_linear", {"density": 0.4, "seed": 2}),
        ("knots", {"density": 0.7}),
        ("linear", {}),
        ("tsv", {"sv_fraction": 0.5}),
        ("iso_c", {}),
        ("iso_cts", {"common_space_fraction": 0.6}),
    ],
)
def test_cuda_matches_cpu(method: str, given: dict[str, object]) -> None:
    impl = get_method(method)
    p = impl.resolve(given)
    cpu = impl.merge("m", updates("cpu"), p).dense()
    gpu = impl.merge("m", updates("cuda"), p).dense().cpu()
    assert torch.allclose(cpu, gpu, rtol=1e-4, atol=1e-4 * float(cpu.abs().max()))


def test_masks_are_identical_on_cuda() -> None:
    key = 0x1234_5678_9ABC_DEF0
    assert torch.equal(dare_keep_mask((513, 1000), 0.3, key), dare_keep_mask((513, 1000), 0.3, key, "cuda").cpu())
    values = torch.randn(400_000).abs()
    assert torch.equal(topk_keep_mask(values, 80_000), topk_keep_mask(values.cuda(), 80_000).cpu())
    B, A = torch.randn(500, 12), torch.randn(12, 400)
    f_cpu, f_gpu = refactor_lowrank(B, A, 5), refactor_lowrank(B.cuda(), A.cuda(), 5)
    assert f_cpu.rel_error == pytest.approx(f_gpu.rel_error, rel=1e-4)
