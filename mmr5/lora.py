"""LoRA written by hand: low-rank adapters on the language model's linear layers, everything else frozen.

Pipeline: data -> processor -> [model] -> sampler -> rewards -> ppo; lora.py adapts a built model for training.
`add_lora` swaps each targeted `nn.Linear` of the decoder (`model.model.*`; never the vision tower, never
`lm_head`, as peft's "all-linear" and the MM-R5 release) for a `LoRALinear` that keeps the original as `.base`.
Only the adapters train (SFT: rank 8, alpha 32; RL: rank 64, alpha 128). PPO's frozen reference policy is the
same model under `lora_disabled` (no second copy of the weights). Training checkpoints hold only
`lora_state_dict` + `lora_config` (safetensors + JSON); `merge_lora` folds the adapters into the base weights so
`save_pretrained` writes a plain checkpoint that HF transformers and vLLM load.

Adapter parameters are float32 whatever the base dtype: the updates B@A are tiny next to W, and bf16 adapters
would lose them to rounding (the optimizer state is float32 too). The input is cast to float32 for the adapter
path and its output back to the base output's dtype; under autocast both matmuls run in the autocast dtype.
"""
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """base(x) + B(A(dropout(x))) * alpha/r, with A [r, in] kaiming-uniform and B [out, r] zero: at init the
    layer computes exactly what the base layer does."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as the LoRA paper / peft
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank
        self.enabled = True  # False: the base layer alone (the reference policy); see `lora_disabled`
        self.train(base.training)  # a new module starts in train mode: in an eval model, dropout would be live

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        h = F.linear(F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (h * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with B@A*scaling added to its weight (computed in float32, stored in the base dtype)."""
        w = self.base.weight
        w.copy_((w.float() + (self.lora_B @ self.lora_A) * self.scaling).to(w.dtype))
        return self.base


def _lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 32, targets: str = "all-linear",
             dropout: float = 0.0) -> list[str]:
    """Wrap the targeted decoder Linears in place, freeze every other parameter; returns the wrapped names.

    `targets`: "all-linear" (q, k, v, o, gate, up, down of every decoder layer) or comma-separated suffixes such
    as "q_proj,v_proj", matched at a "." boundary against names inside `model.model`.
    """
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    if _lora_modules(model):
        raise ValueError("the model already has LoRA adapters (merge_lora them first)")
    suffixes = None if targets == "all-linear" else [s.strip() for s in targets.split(",") if s.strip()]
    chosen = [n for n, m in model.model.named_modules() if isinstance(m, nn.Linear)
              and (suffixes is None or any(n == s or n.endswith("." + s) for s in suffixes))]
    if not chosen:
        raise ValueError(f"LoRA targets {targets!r} match no nn.Linear in the language model (model.model)")
    model.requires_grad_(False)
    for name in chosen:
        parent, _, attr = name.rpartition(".")
        owner = model.model.get_submodule(parent)
        setattr(owner, attr, LoRALinear(getattr(owner, attr), rank, alpha, dropout))
    model.lora_settings = dict(rank=rank, alpha=alpha, targets=targets, dropout=dropout)
    return ["model." + n for n in chosen]


@contextmanager
def lora_disabled(model: nn.Module):
    """Every adapter off inside the block (the base model: PPO's reference policy), back as before after it.

    Run the reference forward under `torch.no_grad()`: with gradient checkpointing, a backward outside the block
    would recompute the layers with the adapters on again.
    """
    modules = [m for _, m in _lora_modules(model)]
    before = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, on in zip(modules, before):
            m.enabled = on


def merge_lora(model: nn.Module) -> list[str]:
    """Fold each adapter into its base weight and put the plain nn.Linear back; returns the merged names."""
    names = []
    for name, m in _lora_modules(model):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, m.merged())
        names.append(name)
    if names:
        del model.lora_settings
    return names
