"""The vision tower of Qwen2-VL / Qwen2.5-VL: pre-cut 14 px patches -> one LM-width feature per 2x2 patch block.

Pipeline: data -> processor -> [model] -> sampler -> rewards -> ppo; model.py is built from config.py, layers.py,
vision.py and weights.py (this file: vision).
A ViT with 2-D rotary positions (height, width). Qwen2-VL attends over whole images in every block; Qwen2.5-VL attends
inside windows of 112 px except in `fullatt_block_indexes`, and uses RMSNorm and gated MLPs. The merger turns each
2x2 block of neighbouring patches into one token of the language model's width.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmr5.layers import MLP, GatedMLP, Linear, RMSNorm, inv_freq, rotate_half


@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280  # D, the ViT width
    out_hidden_size: int = 3584  # the LM width the merger projects to
    num_heads: int = 16
    intermediate_size: int = 3420  # Qwen2-VL: embed_dim * mlp_ratio
    hidden_act: str = "silu"  # Qwen2-VL: quick_gelu
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    rope_theta: float = 10000.0
    window_size: int = 112  # Qwen2.5-VL only
    fullatt_block_indexes: list = field(default_factory=lambda: [7, 15, 23, 31])  # Qwen2.5-VL only
    tokens_per_second: int = 4  # videos only; kept so configs round-trip


def vision_patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(h, w) of every patch, in the processor's order: 2x2 merge blocks row-major, patches row-major inside."""
    out = []
    for t, h, w in grid_thw.tolist():
        hh = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        ww = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        hw = torch.stack([hh.permute(0, 2, 1, 3).flatten(), ww.permute(0, 2, 1, 3).flatten()], dim=-1)
        out.append(hw.repeat(t, 1))
    return torch.cat(out)


def vision_windows(grid_thw: torch.Tensor, cfg: VisionConfig) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL window attention: the order that groups merged tokens window by window, and window lengths.

    Each frame's merged grid (h/2, w/2) is cut into windows of `window_size/merge/patch` merged tokens per side
    (4 in the released model), counted from the top-left; windows at the right and bottom edges are smaller.
    Returns `window_index` (a permutation of all merged tokens) and the number of *patches* in each window.
    """
    side = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
    unit = cfg.spatial_merge_size ** 2
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // cfg.spatial_merge_size, w // cfg.spatial_merge_size
        ids = torch.arange(t * gh * gw).view(t, gh, gw)
        for f in range(t):
            for r0 in range(0, gh, side):
                for c0 in range(0, gw, side):
                    win = ids[f, r0:r0 + side, c0:c0 + side].flatten()
                    order.append(win + offset)
                    lengths.append(win.numel() * unit)
        offset += t * gh * gw
    return torch.cat(order), lengths


def segment_attention(q, k, v, lengths: list[int]) -> torch.Tensor:
    """Non-causal attention inside each contiguous segment of a packed [S, heads, hd] sequence.

    Segments of equal length are batched into one SDPA call with no mask (so the fast kernels apply); images or
    windows never see each other. When every segment has the same length (whole images of one size), a reshape
    groups them: no gather, no scatter.
    """
    if len(set(lengths)) == 1:
        qg, kg, vg = (x.view(len(lengths), lengths[0], *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        return F.scaled_dot_product_attention(qg, kg, vg).transpose(1, 2).reshape(q.shape)
    out = torch.empty_like(q)
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0).tolist()
    by_len: dict[int, list[int]] = {}
    for s, n in zip(starts, lengths):
        by_len.setdefault(n, []).append(s)
    for n, ss in by_len.items():
        idx = (torch.tensor(ss)[:, None] + torch.arange(n)).to(q.device)  # [G, n]
        qg, kg, vg = (x[idx].transpose(1, 2) for x in (q, k, v))  # [G, heads, n, hd]
        out[idx] = F.scaled_dot_product_attention(qg, kg, vg).transpose(1, 2)
    return out


def image_groups(grid_thw: torch.Tensor, cfg: VisionConfig, element_size: int, budget: int = 8 << 20) -> list:
    """`grid_thw` cut into runs of whole images whose widest activation (patches x max(3 D, MLP width)) fits in
    `budget` bytes; an image larger than that is a run of its own. 8 MB stays under the mmap threshold
    mmr5.distributed fixes (glibc's own moves up to 32 MB): such blocks are reused, not mapped afresh."""
    per_patch = max(3 * cfg.hidden_size, cfg.intermediate_size) * element_size
    groups, start, size = [], 0, 0
    for i, patches in enumerate(grid_thw.prod(-1).tolist()):
        if i > start and (size + patches) * per_patch > budget:
            groups.append(grid_thw[start:i])
            start, size = i, 0
        size += patches
    groups.append(grid_thw[start:])
    return groups


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # [Q all heads | K | V]
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, cos, sin, lengths):
        S = x.shape[0]
        q, k, v = self.qkv(x).view(S, 3, self.num_heads, -1).unbind(1)
        dtype = q.dtype  # the 2-D rotary is applied in float32, as the reference does
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(dtype)
        return self.proj(segment_attention(q, k, v, lengths).reshape(S, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, qwen2_5: bool):
        super().__init__()
        if qwen2_5:
            self.norm1, self.norm2 = RMSNorm(cfg.hidden_size, 1e-6), RMSNorm(cfg.hidden_size, 1e-6)
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=True)
        else:
            self.norm1, self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6), nn.LayerNorm(cfg.hidden_size, eps=1e-6)
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.attn = VisionAttention(cfg)

    def forward(self, x, cos, sin, lengths):
        # Residuals added into the branch outputs (fresh tensors no backward reads): one allocation less each
        x = self.attn(self.norm1(x), cos, sin, lengths).add_(x)
        return self.mlp(self.norm2(x)).add_(x)


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride == (2, 14, 14) and no bias; on pre-cut patches that is just a matmul."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        c, t, p = cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(cfg.hidden_size, c, t, p, p))  # the checkpoint's Conv3d shape

    def forward(self, pixel_values):
        w = self.proj.weight
        return F.linear(pixel_values.to(w.dtype), w.view(w.shape[0], -1))


class PatchMerger(nn.Module):
    """Norm, then each 2x2 block of neighbouring patches (4 consecutive rows) -> one LM-width token."""

    def __init__(self, cfg: VisionConfig, qwen2_5: bool):
        super().__init__()
        d = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6) if qwen2_5 else nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(Linear(d, d), nn.GELU(), Linear(d, cfg.out_hidden_size))
        self.d = d

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.d))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, qwen2_5: bool):
        super().__init__()
        self.cfg, self.qwen2_5 = cfg, qwen2_5
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg, qwen2_5) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, qwen2_5)
        self.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """[patches, 1176] -> [patches / 4, LM width], images in the order of `grid_thw`.

        Images never attend to each other, so on a CPU they are encoded a few at a time (`image_groups`): the same
        values, and no activation is large enough for glibc to map fresh pages for it, whose page faults cost more
        than filling a reused block (bench/README.md).
        """
        if pixel_values.device.type != "cpu":
            return self.encode(pixel_values, grid_thw)
        outs, start = [], 0
        for g in image_groups(grid_thw, self.cfg, self.patch_embed.proj.weight.element_size()):
            patches = int(g.prod(-1).sum())
            outs.append(self.encode(pixel_values[start:start + patches], g))
            start += patches
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        unit = cfg.spatial_merge_size ** 2
        x = self.patch_embed(pixel_values)
        hw = vision_patch_positions(grid_thw, cfg.spatial_merge_size).to(x.device)
        freqs = hw[..., None].float() * inv_freq(cfg.hidden_size // cfg.num_heads // 2, cfg.rope_theta, x.device)
        emb = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)  # [S, hd/2]: h frequencies then w frequencies
        emb = torch.cat([emb, emb], dim=-1)[:, None, :]  # [S, 1, hd], broadcast over heads
        cos, sin = emb.cos(), emb.sin()
        frames = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).tolist()
        lengths_full = lengths_window = frames  # Qwen2-VL: every block attends over whole frames
        if self.qwen2_5:  # regroup patches window by window (in whole 2x2 merge units), undone after the merger
            window_index, lengths_window = vision_windows(grid_thw, cfg)
            window_index = window_index.to(x.device)
            regroup = lambda z: z.view(-1, unit, *z.shape[1:])[window_index].flatten(0, 1)
            x, cos, sin = regroup(x), regroup(cos), regroup(sin)
        for i, block in enumerate(self.blocks):
            full = not self.qwen2_5 or i in cfg.fullatt_block_indexes
            lengths = lengths_full if full else lengths_window
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, lengths, use_reentrant=False)
            else:
                x = block(x, cos, sin, lengths)
        x = self.merger(x)
        if self.qwen2_5:
            x = x[torch.argsort(window_index)]
        return x
