"""``langmerge try`` on CUDA: the models load onto the GPU (bf16 where supported) and answer; the answers' losses
match the CPU's within bf16's precision (skipped where there is no GPU)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from langmerge.api.expert import Dataset
from langmerge.store import ObjectStore
from langmerge.tasks import TryLanguage, TryTask


def test_try_on_cuda(s3: ObjectStore, bucket: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from langmerge_trainer.evaluate import peft_compat
    from langmerge_trainer.sample import corpus_pairs
    from langmerge_trainer.tryout import run_try

    s3.upload_dir(tiny_model_dir, f"s3://{bucket}/base")
    rows = "".join(json.dumps(p.row(), ensure_ascii=False) + "\n" for p in corpus_pairs("es")[:40])
    s3.put_bytes(f"s3://{bucket}/data/es/part-0.jsonl", rows.encode())
    torch.manual_seed(0)
    with peft_compat():
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
    model.save_pretrained(tmp_path / "adapter")
    s3.upload_dir(tmp_path / "adapter", f"s3://{bucket}/adapter")
    task = TryTask(
        kind="MergedModel",
        namespace="ns",
        name="mm",
        revision=1,
        method="ties",
        base_uri=f"s3://{bucket}/base",
        merged_uri=f"s3://{bucket}/adapter",
        merged_format="peft-adapter",
        languages=[
            TryLanguage(
                language="es",
                expert="dialog-es",
                adapter_uri=f"s3://{bucket}/adapter",
                dataset=Dataset(uri=f"s3://{bucket}/data/es", evalFraction=0.3),
            )
        ],
        examples=2,
        max_new_tokens=4,
    )
    losses = {}
    for device in ("cuda", "cpu"):
        out = io.StringIO()
        assert run_try(task, s3, device=torch.device(device), out=out, err=io.StringIO()) == 0
        losses[device] = [float(x) for x in re.findall(r"\[loss (\d+\.\d\d)\]", out.getvalue())]
    assert len(losses["cuda"]) == 6 and len(losses["cpu"]) == 6  # 2 inputs x base, expert, merged
    for on_gpu, on_cpu in zip(losses["cuda"], losses["cpu"], strict=True):
        assert abs(on_gpu - on_cpu) <= 0.05 * on_cpu
