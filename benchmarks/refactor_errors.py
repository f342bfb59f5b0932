"""How far a merge written as a PEFT adapter is from the merge itself, on the sample's own adapters.

Not a timed test: run it by hand (a few minutes on CPU; it starts its own local S3 and API server) and read the table.

    .venv/bin/python benchmarks/refactor_errors.py

It builds the sample exactly as ``langmerge up`` does (``langmerge-trainer sample``: the tiny Llama, 96 wide, 2
layers, pre-trained; the es/it/pt dialog data), trains the three experts with the settings of
``examples/sample/experts.yaml`` (LoRA rank 8), and merges them into a PEFT adapter several ways: TIES and DARE-TIES at
rank 8 (before ``output.rank: auto``, the default was the largest input rank), with ``rank: auto`` and the default
bound and cap, and with the cap raised to the model's width; ``linear`` for reference (exact at the sum of the input
ranks). Per merge: the relative Frobenius error of the written update against the merged update, max and mean over
the modules, and the ranks, or the failure message when the bound cannot be met.

Measured 2026-12-02 on the 2-core development machine (14 modules; about 3 minutes in all):

| merge -> PEFT adapter | max rel. error | mean rel. error | ranks (min-max, mean) |
| --- | --- | --- | --- |
| ties d=1.0, rank 8 (the old default) | 0.5590 | 0.4608 | 8-8, 8.0 |
| ties d=1.0, rank auto (default bound 0.01, default cap) | fails: "... module model.layers.0.self_attn.k_proj has relative error 0.155 at rank 32, the upper bound for this 48x96 module; 14 of 14 modules exceed the bound ..." | | |
| ties d=1.0, rank auto, maxRank 96 | 0.0098 | 0.0033 | 48-96, 79.8 |
| dare_ties d=0.5, rank 8 (the old default) | 0.7295 | 0.6493 | 8-8, 8.0 |
| dare_ties d=0.5, rank auto, maxRank 96 | 0.0089 | 0.0024 | 48-96, 80.6 |
| linear, rank auto | 0 | 0 | 24-24, 24.0 |
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "trainer_image"))
sys.path.insert(0, str(ROOT / "operator"))

COMMON: dict[str, Any] = {"weights": {}, "include_modules": [], "exclude_modules": []}
#: (label, method, parameters, output.rank, extra merge_adapters arguments)
MERGES: list[tuple[str, str, dict[str, Any], int | str, dict[str, Any]]] = [
    ("ties d=1.0, rank 8 (the old default)", "ties", {"density": 1.0, "lambda_": 1.0}, 8, {"max_relative_error": 1.0}),
    ("ties d=1.0, rank auto (default bound 0.01, default cap)", "ties", {"density": 1.0, "lambda_": 1.0}, "auto", {}),
    ("ties d=1.0, rank auto, maxRank 96", "ties", {"density": 1.0, "lambda_": 1.0}, "auto", {"max_rank": 96}),
    (
        "dare_ties d=0.5, rank 8 (the old default)",
        "dare_ties",
        {"density": 0.5, "lambda_": 1.0, "seed": 0},
        8,
        {"max_relative_error": 1.0},
    ),
    (
        "dare_ties d=0.5, rank auto, maxRank 96",
        "dare_ties",
        {"density": 0.5, "lambda_": 1.0, "seed": 0},
        "auto",
        {"max_rank": 96},
    ),
    ("linear, rank auto", "linear", {}, "auto", {}),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()

    import torch
    import yaml

    from langmerge.api.expert import LanguageExpertSpec
    from langmerge.artifacts import BaseModelIdentity
    from langmerge.dev.controlplane import ControlPlane
    from langmerge.fingerprint import training_fingerprint
    from langmerge.store import ObjectStore
    from langmerge.tasks import TrainTask
    from langmerge_trainer.merge.engine import AdapterInput, MergeError, merge_adapters
    from langmerge_trainer.sample import seed_main
    from langmerge_trainer.train import run_train_task

    torch.set_num_threads(args.threads)
    specs = [
        LanguageExpertSpec.model_validate(doc["spec"])
        for doc in yaml.safe_load_all((ROOT / "examples" / "sample" / "experts.yaml").read_text())
        if doc and doc.get("kind") == "LanguageExpert"
    ]
    base_uri = specs[0].base_model.uri
    data_root = specs[0].dataset.uri.rsplit("/", 1)[0]
    with tempfile.TemporaryDirectory(prefix="refactor-errors-") as tmp:
        work = Path(tmp)
        plane = ControlPlane(work / "cp", controller_manager=False)
        endpoints = plane.start()
        try:
            os.environ.update(endpoints.env())
            store = ObjectStore.from_config()
            for uri in (base_uri, data_root, "s3://artifacts"):
                store.ensure_bucket(uri.removeprefix("s3://").split("/", 1)[0])
            seed_main(["--base-uri", base_uri, "--data-uri", data_root])
            base_digest, _ = store.prefix_digest(base_uri)
            base_dir = work / "base"
            store.download_prefix(base_uri, base_dir)
            inputs = []
            for spec in specs:
                data_digest, _ = store.prefix_digest(spec.dataset.uri)
                fp = training_fingerprint(
                    spec, base_model_digest=base_digest, data_digest=data_digest, eval_data_digest=None, image="bench"
                )
                started = time.monotonic()
                manifest = run_train_task(
                    TrainTask(
                        fingerprint=fp,
                        output_uri=f"s3://artifacts/experts/{spec.language}/{fp}",
                        namespace="default",
                        name=f"dialog-{spec.language}",
                        spec=spec,
                        base_model=BaseModelIdentity(uri=base_uri, digest=base_digest),
                        data_digest=data_digest,
                    ),
                    store,
                    device="cpu",
                )
                print(f"trained {spec.language} (LoRA rank {spec.lora.rank}) in {time.monotonic() - started:.0f} s")
                adapter_dir = work / "adapters" / spec.language
                store.download_prefix(manifest.adapter_uri, adapter_dir)
                inputs.append(AdapterInput(spec.language, adapter_dir))
        finally:
            plane.stop()

        print("\n| merge -> PEFT adapter | max rel. error | mean rel. error | ranks (min-max, mean) | modules |")
        print("| --- | --- | --- | --- | --- |")
        for i, (label, method, params, rank, extra) in enumerate(MERGES):
            try:
                report = merge_adapters(
                    base_dir, inputs, method, {**COMMON, **params}, "peft-adapter", rank, work / "out" / str(i), **extra
                )
            except MergeError as err:
                print(f"| {label} | fails: {err} | | | |")
                continue
            errors, ranks = list(report.module_errors.values()), list(report.module_ranks.values())
            print(
                f"| {label} | {max(errors):.4f} | {sum(errors) / len(errors):.4f} | {min(ranks)}-{max(ranks)}, "
                f"{sum(ranks) / len(ranks):.1f} | {len(errors)} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
