"""Plain dense reference implementations of the merge methods (written for clarity, not speed) and tiny adapters."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from langmerge_trainer.merge.sparsify import dare_keep_mask, derive_seed

#: peft 0.21 reads a property that transformers 5.24 deprecated; the warning is raised inside peft, not our code.
PEFT_DEPRECATION = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"


def ref_trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top int(density*n) entries by magnitude, ties broken by lower flat index (a stable full sort)."""
    k = t.numel() if density >= 1 else int(density * t.numel())
    flat = t.flatten()
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[:k]] = True
    return (flat * keep).reshape(t.shape)


def ref_ties(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Elect each entry's sign by weighted mass, then the weighted mean of the entries that agree with it."""
    T = torch.stack(list(tensors))
    w = torch.tensor(weights, dtype=T.dtype).reshape(-1, *([1] * (T.dim() - 1)))
    elected = torch.where((w * T).sum(0) >= 0, 1.0, -1.0).to(T.dtype)
    agree = (torch.sign(T) == elected) & (T != 0)
    num = (w * T * agree).sum(0)
    den = (w * agree).sum(0)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1), 0)


def ref_dare(t: torch.Tensor, density: float, seed: int, module: str, key: str) -> torch.Tensor:
    keep = dare_keep_mask(t.shape, density, derive_seed(seed, module, key))
    return t * keep / density


def ref_merge(
    method: str,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    params: dict[str, Any],
    module: str = "",
    keys: Sequence[str] = (),
) -> torch.Tensor:
    """The merged update of dense ``deltas`` (float64), straight from each method's definition."""
    D = [d.double() for d in deltas]
    w = list(weights)
    lam = float(params.get("lambda_", 1.0))
    density = float(params.get("density", 1.0))
    seed = int(params.get("seed", 0))
    weighted = [wi * d for wi, d in zip(w, D, strict=True)]
    if method == "linear":
        return torch.stack(weighted).sum(0) / sum(w)
    if method in ("task_arithmetic", "cat"):
        return lam * torch.stack(weighted).sum(0)
    if method == "magnitude_prune":
        return lam * torch.stack([wi * ref_trim(d, density) for wi, d in zip(w, D, strict=True)]).sum(0)
    if method == "ties":
        return lam * ref_ties([ref_trim(d, density) for d in D], w)
    if method == "dare_linear":
        dropped = [wi * ref_dare(d, density, seed, module, k) for wi, d, k in zip(w, D, keys, strict=True)]
        return lam * torch.stack(dropped).sum(0)
    if method == "dare_ties":
        return lam * ref_ties([ref_dare(d, density, seed, module, k) for d, k in zip(D, keys, strict=True)], w)
    if method == "knots":
        # KnOTS as the paper describes it: SVD of the concatenated updates, coordinates S V_i^T, merge, map back.
        U, sv, Vh = torch.linalg.svd(torch.cat(D, dim=1), full_matrices=False)
        support = sv > sv[0] * 1e-7
        U, sv, Vh = U[:, support], sv[support], Vh[support]
        n = D[0].shape[1]
        X = [sv[:, None] * Vh[:, i * n : (i + 1) * n] for i in range(len(D))]
        if params["knots_merge"] == "ties":
            merged = ref_ties([ref_trim(x, density) for x in X], w)
        else:
            merged = torch.stack([wi * x for wi, x in zip(w, X, strict=True)]).sum(0) / sum(w)
        return lam * (U @ merged)
    if method in ("tsv", "iso_c", "iso_cts"):
        return lam * ref_spectral(method, weighted, params)
    raise AssertionError(method)


def ref_nonzero_svd(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dense SVD of ``d`` with only the singular values above 1e-5 of the largest: the rest is the rounding noise
    of a low-rank update (PEFT's updates are float32 products)."""
    U, sv, Vh = torch.linalg.svd(d, full_matrices=False)
    r = int((sv > sv[0] * 1e-5).sum()) if float(sv[0]) > 0 else 0
    return U[:, :r], sv[:r], Vh[:r]


def ref_polar(M: torch.Tensor) -> torch.Tensor:
    """The papers' orthogonalisation, literally: ``P Q^T`` from the SVD ``M = P S Q^T``."""
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    return P @ Qh


def ref_spectral(method: str, weighted: Sequence[torch.Tensor], params: dict[str, Any]) -> torch.Tensor:
    """TSV-Merge, Iso-C and Iso-CTS as the papers' reference code computes them on dense task matrices (here the
    weighted updates ``w_i D_i``), with the spectrum restricted to its non-zero part (LoRA updates are low rank)."""
    rows, cols = weighted[0].shape
    n = len(weighted)
    if method == "tsv":
        cap = max(1, min(rows, cols) // n)
        parts = []
        for d in weighted:
            U, sv, Vh = ref_nonzero_svd(d)
            k = min(cap, max(1, int(params["sv_fraction"] * len(sv) + 1e-9)))
            parts.append((U[:, :k], sv[:k], Vh[:k]))
        U = ref_polar(torch.cat([p[0] for p in parts], dim=1))
        Vh = ref_polar(torch.cat([p[2] for p in parts], dim=0))
        return U @ torch.diag(torch.cat([p[1] for p in parts])) @ Vh
    U, sv, Vh = ref_nonzero_svd(torch.stack(list(weighted)).sum(0))
    if method == "iso_c":
        return sv.mean() * U @ Vh
    # iso_cts: the paper's split of the rank between the common and the task-specific subspaces
    rank = len(sv)
    common = int(rank * params["common_space_fraction"])
    per_task = min(round((rank - common) / n), (rank - 1) // n)
    common = rank - per_task * n
    Uc, sc, Vhc = U[:, :common], sv[:common], Vh[:common]
    us, ss, vs = [Uc], [sc], [Vhc]
    for d in weighted:
        Ut, st, Vht = ref_nonzero_svd(d - Uc @ Uc.T @ d) if per_task else (Uc[:, :0], sc[:0], Vhc[:0])
        us.append(Ut[:, :per_task])
        ss.append(st[:per_task])
        vs.append(Vht[:per_task])
    flat = torch.cat(ss).mean()
    return flat * ref_polar(torch.cat(us, dim=1)) @ ref_polar(torch.cat(vs, dim=0))


#: Three adapters that exercise PEFT's scaling rules: plain, rsLoRA, rank and alpha patterns; overlapping modules.
ADAPTER_SPECS: dict[str, dict[str, Any]] = {
    "es": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "it": {"r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": ["q_proj", "k_proj", "down_proj"]},
    "pt": {
        "r": 6,
        "lora_alpha": 6,
        "target_modules": ["q_proj", "v_proj", "up_proj"],
        "rank_pattern": {"up_proj": 2},
        "alpha_pattern": {"v_proj": 3},
    },
}


def make_adapters(
    base_dir: Path, out_dir: Path, specs: dict[str, dict[str, Any]] | None = None, gain: float = 20.0
) -> dict[str, Path]:
    """Random LoRA adapters (nonzero B) on the base model, saved with PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for i, (language, spec) in enumerate((specs or ADAPTER_SPECS).items()):
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **spec))
        with torch.no_grad():  # PEFT's random init is small; make the updates matter in the forward pass
            for name, p in peft_model.named_parameters():
                if "lora_B" in name or "lora_embedding_B" in name:
                    p.mul_(gain)
        paths[language] = out_dir / language
        peft_model.save_pretrained(paths[language], save_embedding_layers=False)
    return paths


def peft_deltas(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Each module's update as PEFT itself computes it (``get_delta_weight``): an independent reference."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    out = {}
    with torch.no_grad():
        for name, module in model.base_model.model.named_modules():
            if isinstance(module, LoraLayer) and ("default" in module.lora_A or "default" in module.lora_embedding_A):
                out[name] = module.get_delta_weight("default").detach().clone()
    return out


def model_with_deltas(base_dir: Path, deltas: dict[str, torch.Tensor]) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        modules = dict(model.named_modules())
        for name, delta in deltas.items():
            weight = modules[name].weight
            weight.copy_((weight.double() + delta.double()).to(weight.dtype))
    return model.eval()


def make_tiny_encoder(out_dir: Path, kind: str = "bert", hidden: int = 16) -> Path:
    """A bare tiny encoder (``BertModel`` or ``RobertaModel``) saved with ``save_pretrained``: a classifier's base."""
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    sizes: dict[str, Any] = {
        "vocab_size": 64,
        "hidden_size": hidden,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": hidden * 2,
        "max_position_embeddings": 40,
    }
    torch.manual_seed(0)
    model = BertModel(BertConfig(**sizes)) if kind == "bert" else RobertaModel(RobertaConfig(pad_token_id=1, **sizes))
    model.save_pretrained(out_dir)
    return out_dir


def make_classifier_adapters(
    base_dir: Path, out_dir: Path, languages: Sequence[str], num_labels: int, gain: float = 5.0
) -> dict[str, Path]:
    """Random LoRA adapters with a trained-looking classifier head (PEFT ``modules_to_save``), one per language."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    paths = {}
    for i, language in enumerate(languages):
        torch.manual_seed(200 + i)
        model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
            init_lora_weights=False,
        )
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(gain)
                if "modules_to_save" in name:  # every expert's head differs (as trained heads do)
                    p.copy_(torch.randn_like(p))
        paths[language] = out_dir / language
        peft_model.save_pretrained(paths[language])
    return paths
