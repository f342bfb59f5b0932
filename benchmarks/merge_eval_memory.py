"""Merge-Job evaluation memory: peak resident memory of the per-language evaluation against one model's size.

Not a timed test: run it by hand and read the ratios.

    python benchmarks/merge_eval_memory.py                          # ~94M-parameter Llama, 3 languages, both formats
    python benchmarks/merge_eval_memory.py --layers 12 --format full-weights

The merge Job evaluates, per language, the merged model and that language's expert alone on the same examples.
Two ways are measured, each in a fresh process (CPU, float32), on the same base, adapters, merge output and examples:

* before: the merged model loaded whole (base + merged adapter, or the full merged weights), then per language the
  base loaded again under the expert's adapter (``langmerge_trainer.evaluate.load_for_eval``), as the merge Job did;
* after: :func:`langmerge_trainer.merge.evaluation.evaluate_merge`, what the merge Job does now: one base, the
  adapters swapped on it; full merged weights loaded only once the base is released.

Peak memory is the growth of the resident set over the evaluation (``/proc/self/clear_refs`` + ``VmHWM``), after
torch, transformers and peft are imported, reported in MiB and as a multiple of the base model's size (its
safetensors bytes). The figures of both ways are compared too: they must be the same evaluation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "trainer_image"))
sys.path.insert(0, str(ROOT / "operator"))

LANGUAGES = ("es", "it", "pt")
FORMATS = ("peft-adapter", "full-weights")
MIB = 1 << 20


def build(work: Path, args: argparse.Namespace) -> None:
    """Base model, one random LoRA adapter per language, both merge outputs and the examples, under ``work``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from langmerge_trainer.evaluate import peft_compat
    from langmerge_trainer.merge.engine import AdapterInput, merge_adapters
    from langmerge_trainer.sample import build_tiny_llama, corpus_pairs, sample_texts

    base_dir = build_tiny_llama(
        work / "base",
        sample_texts(LANGUAGES),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=4,
    )
    inputs = []
    for i, language in enumerate(LANGUAGES):
        torch.manual_seed(i)
        with peft_compat():
            model = get_peft_model(
                AutoModelForCausalLM.from_pretrained(str(base_dir)),
                LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
            )
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.02)
        folder = work / "adapters" / language
        model.save_pretrained(str(folder))
        inputs.append(AdapterInput(language=language, path=folder, weight=1.0 / len(LANGUAGES)))
        del model
    for output_format in FORMATS:
        merge_adapters(
            base_dir,
            inputs,
            "linear",
            {"weights": {}, "include_modules": [], "exclude_modules": []},
            output_format,
            None,
            work / "merged" / output_format,
            device="cpu",
        )
    examples = {lang: [p.row() for p in corpus_pairs(lang)[: args.examples]] for lang in LANGUAGES}
    (work / "examples.json").write_text(json.dumps(examples))


def child(work: Path, way: str, output_format: str) -> dict[str, Any]:
    """One evaluation in this (fresh) process; its peak memory growth and figures."""
    import peft  # noqa: F401  (imported before the measurement starts, as in the Job)
    import torch
    import transformers  # noqa: F401

    from langmerge_trainer.data import Example
    from langmerge_trainer.evaluate import evaluate_examples, load_for_eval
    from langmerge_trainer.merge.evaluation import LanguageInput, evaluate_merge
    from langmerge_trainer.merge.memory import PeakMemory

    base_dir = work / "base"
    merged_dir = work / "merged" / output_format
    full = output_format == "full-weights"
    rows = json.loads((work / "examples.json").read_text())
    examples = {lang: [Example(prompt=r["prompt"], completion=r["completion"]) for r in rows[lang]] for lang in rows}
    device = torch.device("cpu")
    kwargs: dict[str, Any] = {"max_seq_length": 64}
    t0 = time.perf_counter()
    with PeakMemory() as memory:
        if way == "before":
            merged: dict[str, Any] = {}
            experts: dict[str, Any] = {}
            merged_model, merged_tok = load_for_eval(
                base_dir,
                adapter_dir=None if full else merged_dir,
                model_dir=merged_dir if full else None,
                device=device,
            )
            for lang in LANGUAGES:
                merged[lang] = evaluate_examples(merged_model, merged_tok, examples[lang], **kwargs)
                expert_model, expert_tok = load_for_eval(base_dir, adapter_dir=work / "adapters" / lang, device=device)
                experts[lang] = evaluate_examples(expert_model, expert_tok, examples[lang], **kwargs)
                del expert_model
            del merged_model
        else:
            languages = [LanguageInput(lang, work / "adapters" / lang, examples[lang], 64) for lang in LANGUAGES]
            merged, experts, _base = evaluate_merge(
                base_dir, merged_dir, full_weights=full, languages=languages, device=device
            )
    seconds = time.perf_counter() - t0
    return {
        "growth": memory.growth,
        "seconds": seconds,
        "merged": {k: v.eval_loss for k, v in merged.items()},
        "experts": {k: v.eval_loss for k, v in experts.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--examples", type=int, default=32, help="held-out examples per language")
    parser.add_argument("--format", choices=(*FORMATS, "both"), default="both")
    parser.add_argument("--child", nargs=3, metavar=("WORK", "WAY", "FORMAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        work, way, output_format = args.child
        print(json.dumps(child(Path(work), way, output_format)))
        return 0

    with tempfile.TemporaryDirectory(prefix="langmerge-eval-mem-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        build(work, args)
        model_bytes = sum(p.stat().st_size for p in (work / "base").glob("*.safetensors"))
        params = model_bytes // 4
        print(
            f"base: {params / 1e6:.0f}M parameters, {model_bytes / MIB:.0f} MiB float32 (setup {time.perf_counter() - t0:.0f}s)"
        )
        print(f"{'format':<13} {'way':<7} {'peak growth':>12} {'x model':>8} {'seconds':>8}")
        formats = FORMATS if args.format == "both" else (args.format,)
        for output_format in formats:
            results = {}
            for way in ("before", "after"):
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", str(work), way, output_format],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                results[way] = json.loads(proc.stdout.strip().splitlines()[-1])
                growth = results[way]["growth"]
                if growth is None:
                    print("peak resident memory cannot be measured on this system (/proc/self/clear_refs)")
                    return 1
                print(
                    f"{output_format:<13} {way:<7} {growth / MIB:>8.0f} MiB {growth / model_bytes:>8.2f} "
                    f"{results[way]['seconds']:>8.1f}"
                )
            drift = max(
                abs(results["before"][kind][lang] - results["after"][kind][lang])
                for kind in ("merged", "experts")
                for lang in LANGUAGES
            )
            print(f"{output_format:<13} same figures: max |eval loss before - after| = {drift:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
