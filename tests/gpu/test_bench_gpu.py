"""``langmerge bench --device cuda`` (bf16): the quick benchmark on the GPU, every stage on the device (skipped where
there is no GPU). The full run is sized for <= 8 minutes on one H200 (``langmerge bench --device cuda``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_quick_bench_on_cuda(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "langmerge.cli", "bench", "--quick", "--device", "cuda", "--output", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["run"]["device"] == "cuda" and record["run"]["dtype"] == "bfloat16"
    for w in record["workloads"]:
        for run in w["runs"]:
            # the trainer's own ledger says where each run trained
            devices = {c["device"] for c in run["cost"]["experts"].values()} | {run["cost"]["joint"]["device"]}
            assert devices and all(d != "cpu" for d in devices), devices
            assert all(c["gpu_seconds"] > 0 for c in run["cost"]["experts"].values())
    assert (tmp_path / "report.md").is_file() and (tmp_path / "topic-quality.png").is_file()
