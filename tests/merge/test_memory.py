"""The streaming bound: a full-weights merge never holds the whole model.

Measured in a fresh process (a long-lived one can reuse freed heap without growing its resident set, which would
hide a violation), with the kernel's resident high-water mark reset before each step. A control step in the same
process holds the whole model and must exceed the bound: the measurement can see a violation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from langmerge_trainer.merge.memory import reset_peak_rss

MiB = 2**20
ROWS, COLS = 1024, 2048  # bf16: 4 MiB per weight
LAYERS = 24  # 96 MiB of weights
PER_SHARD = 2  # 8 MiB shards
RANK = 8

SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from safetensors.torch import load_file
from langmerge_trainer.merge.engine import AdapterInput, merge_adapters
from langmerge_trainer.merge.memory import PeakMemory

root = Path(sys.argv[1])
base = root / "base"
inputs = [AdapterInput(lang, root / lang) for lang in ("es", "it", "pt")]
def params(**kw):
    return {"weights": {}, "include_modules": [], "exclude_modules": [], **kw}
# warm-up: lazy imports and first-use allocations do not count
merge_adapters(base, inputs, "linear", params(include_modules=["layers\\.0\\."]), "full-weights", None, root / "warm")
out = {}
r = merge_adapters(base, inputs, "linear", params(), "full-weights", None, root / "linear", shard_size_mb=8)
out["linear"] = r.peak_rss_bytes
r = merge_adapters(base, inputs, "ties", params(density=0.5, lambda_=1.0), "full-weights", None, root / "ties", shard_size_mb=8)
out["ties"] = r.peak_rss_bytes
out["ties_estimate"] = r.estimated_peak_bytes
with PeakMemory() as m:
    held = {}  # what a non-streaming merge does: every base tensor in memory at once
    for shard in sorted(base.glob("*.safetensors")):
        held.update({k: v.clone() for k, v in load_file(shard).items()})
out["control"] = m.growth
print(json.dumps(out))
"""


def write_checkpoint(root: Path) -> tuple[int, int]:
    """A synthetic sharded bf16 checkpoint and three rank-8 adapters; returns (largest shard, adapters) bytes."""
    g = torch.Generator().manual_seed(0)
    base = root / "base"
    base.mkdir()
    weight_map: dict[str, str] = {}
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(LAYERS)]
    shards = [names[i : i + PER_SHARD] for i in range(0, LAYERS, PER_SHARD)]
    largest = 0
    for index, shard in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: torch.randn(ROWS, COLS, generator=g).to(torch.bfloat16) for n in shard}, base / file)
        largest = max(largest, (base / file).stat().st_size)
        weight_map.update(dict.fromkeys(shard, file))
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (base / "config.json").write_text("{}")
    adapters = 0
    for lang in ("es", "it", "pt"):
        folder = root / lang
        folder.mkdir()
        tensors = {}
        for n in names:
            module = n.removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(RANK, COLS, generator=g) * 0.01
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(ROWS, RANK, generator=g) * 0.01
        save_file(tensors, folder / "adapter_model.safetensors")
        config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": ["up_proj"]}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        adapters += (folder / "adapter_model.safetensors").stat().st_size
    return largest, adapters


def test_full_weights_merge_stays_within_largest_shard_plus_adapters(tmp_path: Path) -> None:
    if not reset_peak_rss():
        pytest.skip("the kernel does not let this process reset its resident high-water mark (/proc/self/clear_refs)")
    largest_shard, adapters = write_checkpoint(tmp_path)
    total = LAYERS * ROWS * COLS * 2
    constant = 16 * MiB
    bound = largest_shard + adapters + constant
    assert total > 3 * bound  # holding the model (or even a third of it) would break the bound
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"peak RSS growth (MiB): { {k: round(v / MiB, 1) for k, v in peaks.items()} }; bound {bound / MiB:.1f}")
    # the control holds the whole model: the measurement sees it, and it breaks the bound
    assert peaks["control"] >= 0.9 * total
    assert peaks["control"] > bound
    # the streaming merge: one tensor at a time
    assert peaks["linear"] <= bound
    # TIES is not low rank: it also holds the current module's merged update in float32
    module_fp32 = ROWS * COLS * 4
    assert peaks["ties"] <= largest_shard + adapters + module_fp32 + constant
    assert peaks["ties"] <= peaks["ties_estimate"] + constant
