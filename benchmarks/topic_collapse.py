"""Why the benchmark's topic classifier sometimes collapses (issue 21, item 2): the joint topic model of
``langmerge bench`` (multilingual-e5-small + LoRA; it, ja, ko, uk, zh; the topics every default language has;
``bench/cli.py`` ``build_workload``: LoRA r 8, alpha 16, dropout 0.05 on query/key/value/dense, 4 epochs, lr 2e-3,
batch 8, 64 tokens, warm-up 6%), trained with the trainer's own pieces (``prepare_training`` + ``TrainingLoop``, as
``run_train_task`` does, without S3), one process, one thread, and judged on the validation split with
``langmerge_trainer.collapse``. Variants:

* ``base``: the recipe. The classifier reads ``tanh(h_CLS)`` through the converted identity pooler
  (``langmerge_trainer/models/e5.py``), although multilingual-e5 was pre-trained for mean pooling.
* ``mean``: the same, with the pooler replaced by the masked mean of the last hidden states (no tanh).

Besides accuracy and macro-F1 it prints how alike the pooled features of the validation inputs are (mean pairwise
cosine, mean per-dimension standard deviation), at initialisation and after training.

Measured 2026-12-08 on this 2-core machine (two runs at a time, ~130 CPU-s each; validation: 374 examples, 6
topics; one example = 0.27 points):

    variant  seed  collapsed                                   accuracy  macro-F1  pooled cos / spread after
    base     0     no                                            81.8      71.6      0.29 / 0.200
    base     1     no                                            78.1      71.1      0.30 / 0.198
    base     2     yes: predicts emotion for 374 of 374 (100%)   40.4       9.6      1.00 / 0.0001
    base     3     no                                            81.3      71.4      0.31 / 0.198
    base     4     no                                            80.0      72.2      0.29 / 0.200
    base     5     no                                            79.1      66.4      0.28 / 0.201
    mean     0     no                                            78.6      69.8      0.29 / 0.205
    mean     1     no                                            78.3      72.0      0.33 / 0.201
    mean     2     no                                            77.8      71.9      0.31 / 0.202
    mean     3     no                                            81.0      69.5      0.33 / 0.201
    mean     4     no                                            79.1      72.5      0.34 / 0.203
    mean     5     no                                            77.8      71.4      0.35 / 0.200

At initialisation the pooled features are nearly the same for every input: mean cosine 0.90 and per-dimension
spread 0.056 for tanh(h_CLS), 0.82 and 0.101 for the mean. Seed 2 of the recipe is the benchmark's collapsed joint
model (the same 374 of 374): its training loss never fell (1.60 in the first tenth of the steps, 1.64 in the last)
and its pooled features ended identical for every input (cosine 1.000, spread 0.0001), without tanh saturating.
Collapses: 1 of 6 with the recipe, 0 of 6 with mean pooling; on the five seeds both trained, mean pooling was 1.1
points lower in accuracy (per seed -3.2 to +0.3) and 0.5 points higher in macro-F1. Six seeds cannot tell a 1-in-6
rate from 0: inconclusive on the counts.

    python benchmarks/topic_collapse.py --variant base --seeds 0,1,2
    python benchmarks/topic_collapse.py --variant mean --seeds 2 --json mean-2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from langmerge.api.expert import LanguageExpertSpec
from langmerge_trainer.bench.cli import TOPIC_MAX_TRAIN, choose_topics
from langmerge_trainer.bench.workloads import topic_data
from langmerge_trainer.collapse import classifier_verdict
from langmerge_trainer.data import Example, LoadedData, label_counts, parse_jsonl
from langmerge_trainer.models.e5 import ensure_converted
from langmerge_trainer.train import TrainingLoop, prepare_training

#: The joint model's languages in the order the benchmark's S3 prefix lists their files (the data order depends on it).
LANGUAGES = ("it", "ja", "ko", "uk", "zh")
#: Every default topic language, for the choice of topics (fa is the benchmark's new language).
TOPIC_LANGUAGES = (*LANGUAGES, "fa")


def examples(rows: Sequence[tuple[str, list[dict[str, str]]]], labels: Sequence[str]) -> list[Example]:
    """The examples the trainer reads from the benchmark's files (one JSONL object per language)."""
    out: list[Example] = []
    for language, lines in rows:
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines).encode()
        out += parse_jsonl(body, source=language, labels=labels)[0]
    return out


def spec_for(labels: Sequence[str], seed: int) -> LanguageExpertSpec:
    return LanguageExpertSpec.model_validate(
        {
            "language": "it",
            "task": "topic",
            "taskType": "sequence-classification",
            "labels": list(labels),
            "baseModel": {"uri": "s3://bench/e5"},
            "dataset": {"uri": "s3://bench/train", "evalUri": "s3://bench/validation"},
            "lora": {"rank": 8, "alpha": 16, "dropout": 0.05, "targetModules": ["query", "key", "value", "dense"]},
            "training": {
                "epochs": 4,
                "learningRate": 2e-3,
                "batchSize": 8,
                "maxSeqLength": 64,
                "warmupRatio": 0.06,
                "seed": seed,
            },
            "resources": {"gpus": 0},
        }
    )


class PooledFeatures:
    """Records what the classifier head reads during evaluation; with ``mean``, makes it the masked mean."""

    def __init__(self, model: Any, *, mean: bool) -> None:
        bert = model.base_model.model.bert
        self.model = model
        self.mask: torch.Tensor | None = None
        self.seen: list[torch.Tensor] = []
        pool = self.mean_pool if mean else bert.pooler.forward
        bert.register_forward_pre_hook(self.grab_mask, with_kwargs=True)

        def pooled(hidden_states: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = pool(hidden_states)
            if not self.model.training:
                self.seen.append(out.detach())
            return out

        bert.pooler.forward = pooled

    def grab_mask(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        self.mask = kwargs.get("attention_mask")

    def mean_pool(self, hidden_states: torch.Tensor) -> torch.Tensor:
        assert self.mask is not None
        mask = self.mask.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def stats(self) -> dict[str, float]:
        """Mean pairwise cosine and mean per-dimension standard deviation of the features seen since the last call."""
        features = torch.cat(self.seen)
        self.seen.clear()
        unit = torch.nn.functional.normalize(features, dim=-1)
        off_diagonal = ~torch.eye(len(unit), dtype=torch.bool)
        return {
            "mean_cos": round((unit @ unit.T)[off_diagonal].mean().item(), 4),
            "spread": round(features.std(0).mean().item(), 4),
        }


def run(variant: str, seed: int, max_train: int = TOPIC_MAX_TRAIN) -> dict[str, Any]:
    torch.set_num_threads(1)
    labels, _note = choose_topics(list(TOPIC_LANGUAGES), None)
    data = {lang: topic_data(lang, labels, max_train=max_train) for lang in LANGUAGES}
    train = examples([(lang, data[lang].train) for lang in LANGUAGES], labels)
    validation = examples([(lang, data[lang].validation or data[lang].test) for lang in LANGUAGES], labels)
    spec = spec_for(labels, seed)
    wall0, cpu0 = time.monotonic(), time.process_time()
    device = torch.device("cpu")
    loaded = LoadedData(train=train, eval=validation, skipped_lines=0, files=[])
    prepared = prepare_training(spec, ensure_converted(), loaded, device, seed=seed)
    model = prepared.model
    features = PooledFeatures(model, mean=variant == "mean")
    with torch.no_grad(), model.disable_adapter():
        base_metrics = prepared.evaluate(model)
    at_start = features.stats()
    loop = TrainingLoop(
        model,
        prepared.train_items,
        spec.training,
        pad_token_id=prepared.pad_token_id,
        device=device,
        objective=prepared.objective,
    )
    losses = []
    while not loop.done:
        losses.append(loop.train_step().loss)
    metrics = prepared.evaluate(model)
    after = features.stats()
    verdict = classifier_verdict(
        metrics.predictions,
        gold=label_counts(validation, labels),
        eval_loss=metrics.eval_loss,
        prior=label_counts(train, labels),
    )
    tenth = max(1, len(losses) // 10)
    return {
        "variant": variant,
        "seed": seed,
        "collapsed": verdict.reason if verdict.collapsed else None,
        "accuracy": metrics.accuracy,
        "macro_f1": metrics.macro_f1,
        "eval_loss": metrics.eval_loss,
        "base_accuracy": base_metrics.accuracy,
        "predictions": metrics.predictions,
        "steps": loop.total_steps,
        "train_loss_by_tenth": [
            round(sum(losses[i : i + tenth]) / len(losses[i : i + tenth]), 3) for i in range(0, len(losses), tenth)
        ],
        "pooled_at_start": at_start,
        "pooled_after": after,
        "wall_seconds": round(time.monotonic() - wall0, 1),
        "cpu_seconds": round(time.process_time() - cpu0, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--variant", choices=["base", "mean"], default="base")
    p.add_argument("--seeds", default="0,1,2,3,4,5")
    p.add_argument(
        "--max-train", type=int, default=TOPIC_MAX_TRAIN, help="training rows per language (the benchmark's: 200)"
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        r = run(args.variant, seed, args.max_train)
        results.append(r)
        after = r["pooled_after"]
        print(
            f"{r['variant']:5} seed {seed}: {r['collapsed'] or 'not collapsed'}; accuracy {100 * r['accuracy']:.1f}, "
            f"macro-F1 {100 * r['macro_f1']:.1f}; pooled cos {after['mean_cos']:.2f}, spread {after['spread']:.4f}; "
            f"{r['cpu_seconds']:.0f} CPU-s",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
