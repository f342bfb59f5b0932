"""The mergekit 0.1.5 cross-check as figures: the cases of ``tests/merge/test_mergekit_parity.py``, measured the same
way (``tests/merge/mergekit_helpers.py``), printed as a Markdown table instead of asserted on.

Not a timed test: run it by hand (about a minute on one CPU core) and paste the table into ``docs/merge-methods.md``.

    .venv/bin/python benchmarks/mergekit_parity.py

Deterministic cases: per module, the largest |langmerge - mergekit| entry of the merged update, relative to
max(1, the largest |entry| of mergekit's update) (the tests' bound: 1e-6, one float32 rounding of ``W + D``).
Random cases (DARE, DELLA), over the tests' seeds on both sides: the mean share of entries kept, the mean norm of the
merged update relative to the plain weighted sum, and the smallest cosine over modules between the two mean merged
updates (the tests' bounds: kept share within 0.02, norm ratio within 3%, cosine > 0.8).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for sub in ("tests/merge", "trainer_image", "operator"):
    sys.path.insert(0, str(ROOT / sub))


def _mergekit_settings(method: str, per_model: list[dict[str, Any]], shared: dict[str, Any]) -> str:
    own = {k: v for k, v in per_model[0].items() if k != "weight"}
    settings = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in {**own, **shared}.items())
    return f"`{method}`" + (f" {{{settings}}}" if settings else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # mergekit's own deprecation warnings (numpy.core, torch_dtype)

    import torch
    from mergekit_helpers import (
        DETERMINISTIC,
        RANDOM,
        SEEDS,
        build_tiny_models,
        case_id,
        measure_deterministic,
        measure_random,
    )

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mergekit-parity-") as tmp:
        root = Path(tmp)
        tiny = build_tiny_models(root / "models")
        print(
            f"mergekit {version('mergekit')}, torch {version('torch')}; tiny Llama (hidden 32), 3 rank-4 task vectors "
            f"on 3 modules, weights 0.5/1.0/1.5 (1/1/1 for sce and model_stock)\n"
        )
        print("| langmerge | mergekit 0.1.5 | max abs diff / max(scale, 1) | max abs diff | scale |")
        print("| --- | --- | --- | --- | --- |")
        for i, case in enumerate(DETERMINISTIC):
            f = measure_deterministic(tiny, root / f"det-{i}", case)
            worst = max(f.max_abs_diff, key=lambda m: f.max_abs_diff[m] / max(f.scale[m], 1.0))
            print(
                f"| `{case_id(case)}` | {_mergekit_settings(case[2], case[3], case[4])} | {f.worst_relative:.1e} "
                f"| {f.max_abs_diff[worst]:.1e} | {f.scale[worst]:.3f} |"
            )
        print(
            f"\n| langmerge = mergekit 0.1.5 (over {SEEDS} seeds) | kept share: ours / mergekit | norm ratio: ours / "
            "mergekit | min cosine of the mean updates |"
        )
        print("| --- | --- | --- | --- |")
        for i, case in enumerate(RANDOM):
            r = measure_random(tiny, root / f"rnd-{i}", case)
            print(
                f"| `{case_id(case)}` | {r.kept_ours:.4f} / {r.kept_mergekit:.4f} | {r.ratio_ours:.4f} / "
                f"{r.ratio_mergekit:.4f} ({r.ratio_ours / r.ratio_mergekit - 1:+.2%}) | {min(r.cosine.values()):.4f} |"
            )
    print(f"\n({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
