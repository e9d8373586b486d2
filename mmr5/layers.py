"""Building blocks the vision tower and the language model share: norms, linears, MLPs, rotary helpers.

Pipeline: data -> processor -> [model] -> sampler -> rewards -> ppo; model.py is built from config.py, layers.py,
vision.py and weights.py (this file: layers).
"""
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Variance in float32, normalised value cast back to the input dtype, then scaled (as the reference)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear that computes a few rows on the CPU as (W @ x^T)^T.

    Decoding sends a handful of rows through every weight, and CPU sgemm reads a transposed weight (x @ W^T, what
    F.linear does) slowly in that shape (bench/README.md). Same result up to float rounding; many rows (prefill,
    training), small weights and GPUs take F.linear.
    """

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if x.device.type != "cpu" or rows > 64 or self.weight.numel() < 2**18:
            return F.linear(x, self.weight, self.bias)
        y = (self.weight @ x.reshape(rows, -1).T).T.reshape(*x.shape[:-1], -1).contiguous()
        return y if self.bias is None else y + self.bias


ACTIVATIONS = {
    "silu": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): the LM's MLP (no bias) and Qwen2.5-VL's vision MLP (with bias)."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=bias)
        self.up_proj = Linear(dim, hidden, bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.act is F.silu and not torch.is_grad_enabled():  # inference: in place, no [tokens, hidden] temporaries
            return self.down_proj(F.silu(gate, inplace=True).mul_(up))
        return self.down_proj(self.act(gate) * up)


class MLP(nn.Module):
    """fc2(act(fc1(x))): Qwen2-VL's vision MLP."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    """1 / theta^(2i/dim) for i < dim/2: the rotary frequencies, computed on the fly (no buffers to load)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
