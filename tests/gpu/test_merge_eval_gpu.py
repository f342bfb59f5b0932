"""The merge Job's evaluation on CUDA: bf16 where the GPU supports it, one model on the device, the same figures as
float32 on the CPU within bf16's precision (skipped where there is no GPU)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest


def _adapters(base_dir: Path, out: Path) -> list[Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from langmerge_trainer.evaluate import peft_compat
    from langmerge_trainer.merge.engine import AdapterInput

    inputs = []
    for i, language in enumerate(("es", "it")):
        torch.manual_seed(i)
        with peft_compat():
            model = get_peft_model(
                AutoModelForCausalLM.from_pretrained(str(base_dir)),
                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
            )
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.05)
        model.save_pretrained(str(out / language))
        inputs.append(AdapterInput(language=language, path=out / language, weight=0.5))
    return inputs


@pytest.mark.parametrize("output_format", ["peft-adapter", "full-weights"])
def test_merge_evaluation_on_cuda(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output_format: str
) -> None:
    import torch

    from langmerge_trainer.data import Example
    from langmerge_trainer.merge import evaluation
    from langmerge_trainer.merge.engine import merge_adapters
    from langmerge_trainer.sample import corpus_pairs

    inputs = _adapters(tiny_model_dir, tmp_path / "adapters")
    merged_dir = tmp_path / "merged"
    merge_adapters(
        tiny_model_dir,
        inputs,
        "linear",
        {"weights": {}, "include_modules": [], "exclude_modules": []},
        output_format,
        None,
        merged_dir,
        device="cpu",
    )
    languages = [
        evaluation.LanguageInput(
            a.language,
            a.path,
            [Example(prompt=p.prompt, completion=p.completion) for p in corpus_pairs(a.language)[:24]],
            64,
        )
        for a in inputs
    ]
    loaded: list[Any] = []
    original = evaluation.load_model

    def recording(folder: Path, device: torch.device) -> Any:
        model = original(folder, device)
        loaded.append((next(model.parameters()).dtype, next(model.parameters()).device.type))
        return model

    monkeypatch.setattr(evaluation, "load_model", recording)
    torch.cuda.reset_peak_memory_stats()
    full = output_format == "full-weights"
    on_gpu = evaluation.evaluate_merge(
        tiny_model_dir, merged_dir, full_weights=full, languages=languages, device=torch.device("cuda")
    )
    peak = torch.cuda.max_memory_allocated()
    expected_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert loaded and all(entry == (expected_dtype, "cuda") for entry in loaded)
    assert len(loaded) == (2 if full else 1)  # one base; the full merged weights only after it is released
    model_bytes = sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))  # float32 on disk
    assert peak < model_bytes * 2, f"peak GPU memory {peak} vs a float32 model of {model_bytes}"
    on_cpu = evaluation.evaluate_merge(
        tiny_model_dir, merged_dir, full_weights=full, languages=languages, device=torch.device("cpu")
    )
    for gpu_figures, cpu_figures in zip(on_gpu, on_cpu, strict=True):
        for language, metrics in gpu_figures.items():
            assert metrics.eval_loss is not None and math.isfinite(metrics.eval_loss)
            assert metrics.eval_loss == pytest.approx(cpu_figures[language].eval_loss, rel=0.03)
