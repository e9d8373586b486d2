"""Qwen2-VL / Qwen2.5-VL in plain PyTorch: vision tower + Qwen2 decoder with M-RoPE.

Pipeline: data -> processor -> [model] -> sampler -> rewards -> ppo; built from config.py, layers.py, vision.py and
weights.py.
The processor turns pages into `pixel_values` [patches, 3*2*14*14] plus `image_grid_thw`, and the prompt into
`input_ids` where every image is a run of `<|image_pad|>` tokens (one per 2x2 block of patches). Here the vision
tower encodes the patches, the merged features replace the `<|image_pad|>` embeddings, and the decoder runs with
3-stream (temporal, height, width) rotary positions. Module names follow the released checkpoints
(`visual.*`, `model.*`, `lm_head`), so a state_dict maps one to one onto the safetensors keys.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmr5.config import Config, TextConfig
from mmr5.layers import GatedMLP, Linear, RMSNorm, inv_freq, rotate_half
from mmr5.vision import VisionTransformer
from mmr5.weights import load_into, save_state

# ----------------------------------------------------------------------------------------------------------------
# Language model


class KVCache:
    """Pre-allocated keys and values, one [batch, kv_heads, slots, head_dim] pair per layer.

    `update` is the one place they are written. Growing (`index` None): a forward's T new positions go to slots
    [seen, seen + T) and attention reads [0, seen + T); the last layer's write advances `seen` by T. Static
    (`index`, a tensor of T slots, set by the caller): the new positions go there and attention reads every slot,
    masked; shapes then never change from step to step, which torch.compile and CUDA graphs need.
    """

    def __init__(self, cfg: TextConfig, batch: int, slots: int, dtype, device):
        hd = cfg.hidden_size // cfg.num_attention_heads
        shape = (batch, cfg.num_key_value_heads, slots, hd)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.seen = 0
        self.index = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `layer`'s keys and values for the new positions [B, kv_heads, T, hd]; -> the keys and values to
        attend over."""
        if self.index is not None:
            self.k[layer].index_copy_(2, self.index, k)
            self.v[layer].index_copy_(2, self.index, v)
            return self.k[layer], self.v[layer]
        end = self.seen + k.shape[2]
        self.k[layer][:, :, self.seen:end] = k
        self.v[layer][:, :, self.seen:end] = v
        if layer == len(self.k) - 1:
            self.seen = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def repeat_interleave(self, n: int) -> "KVCache":
        """Each row n times in a row (group sampling: the prompt's cache is computed once, shared n ways)."""
        new = object.__new__(KVCache)
        new.k = [k.repeat_interleave(n, dim=0) for k in self.k]
        new.v = [v.repeat_interleave(n, dim=0) for v in self.v]
        new.seen, new.index = self.seen, None
        return new

    def select(self, rows: torch.Tensor) -> "KVCache":
        """Keep only `rows` (finished rows are dropped from the decode batch)."""
        new = object.__new__(KVCache)
        new.k = [k[rows] for k in self.k]
        new.v = [v[rows] for v in self.v]
        new.seen, new.index = self.seen, None
        return new


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = cfg.hidden_size // cfg.num_attention_heads
        self.q_proj = Linear(cfg.hidden_size, self.heads * self.hd, bias=True)
        self.k_proj = Linear(cfg.hidden_size, self.kv_heads * self.hd, bias=True)
        self.v_proj = Linear(cfg.hidden_size, self.kv_heads * self.hd, bias=True)
        self.o_proj = Linear(self.heads * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, keep: int | None = None):
        """Self-attention; with `keep`, keys and values for all T positions but queries (and so outputs) for the
        last `keep` only."""
        B, T, _ = x.shape
        k = self.k_proj(x).view(B, T, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.hd).transpose(1, 2)  # k, v: [B, kv_heads, T, hd]
        k = k * cos + rotate_half(k) * sin  # cos/sin: [B, 1, T, hd]
        Q = T
        if keep:
            x, cos, sin, Q = x[:, -keep:], cos[:, :, -keep:], sin[:, :, -keep:], keep
            if mask is None:  # the last `keep` queries of a plain causal sequence
                mask = attention_mask_4d(torch.ones(B, T, dtype=torch.bool, device=x.device), keep)
            else:
                mask = mask[:, :, -keep:]
        q = self.q_proj(x).view(B, Q, self.heads, self.hd).transpose(1, 2)  # [B, heads, Q, hd]
        q = q * cos + rotate_half(q) * sin
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # [B, kv_heads, keys so far (or every slot), hd]
        if mask is None:  # no padding, no cache: plain causal
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, Q, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False)

    def forward(self, x, cos, sin, mask, cache, keep: int | None = None):
        """With `keep`, only the last `keep` positions come out (their keys and values still go to the cache)."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, keep)
        x = h.add_(x[:, -keep:] if keep else x)  # residuals added into the fresh branch outputs, as in the vision
        return self.mlp(self.post_attention_layernorm(x)).add_(x)


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def mrope(self, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE: frequency j rotates by the t, h or w position as `mrope_section` assigns it. -> [B, 1, L, hd]."""
        cfg = self.cfg
        hd = cfg.hidden_size // cfg.num_attention_heads
        freqs = position_ids[..., None].float() * inv_freq(hd, cfg.rope_theta, position_ids.device)  # [3, B, L, hd/2]
        chunks = freqs.split(cfg.mrope_section, dim=-1)
        freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)  # [B, L, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)  # float32 math, cast to the model dtype as the reference

    def forward(self, x, position_ids, mask, cache, keep: int | None = None):
        """Final hidden states [B, T, hidden]; with `keep`, of the last `keep` positions only: the last layer then
        runs its queries, output projection and MLP for them alone. Nothing else reads the last layer's other
        outputs (the cache holds each layer's keys and values, made from that layer's input), so a prefill that
        keeps one position's logits saves most of a layer (HF computes it for every position)."""
        cos, sin = self.mrope(position_ids, x.dtype)
        for i, layer in enumerate(self.layers):
            last = keep if i == len(self.layers) - 1 else None
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, cos, sin, mask, None, last, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, last)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------------------------
# The whole model


def rope_positions(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, attention_mask: torch.Tensor | None,
                   image_token_id: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3-stream positions [3, B, L] for text + images, and each row's decoding offset ("rope delta") [B].

    Per row, pads dropped: text advances all three streams by one per token; an image with merged grid (h', w')
    starting at s gets t = s, h = s + i, w = s + j, and the text after it resumes at s + max(h', w'). A token
    generated k steps after the prompt sits at max_position + 1 + k = (prompt_len + k) + delta.
    Pads get position 0 (they are masked out). Images are taken from `image_grid_thw` in row order.
    """
    B, L = input_ids.shape
    positions = torch.zeros(3, B, L, dtype=torch.long)
    deltas = torch.zeros(B, dtype=torch.long)
    ids_cpu = input_ids.cpu()
    valid = attention_mask.bool().cpu() if attention_mask is not None else torch.ones(B, L, dtype=torch.bool)
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    for b in range(B):
        ids = ids_cpu[b][valid[b]]
        is_image = (ids == image_token_id).tolist()
        pieces, pos, i, n = [], 0, 0, len(is_image)
        while i < n:
            j = i
            while j < n and is_image[j] == is_image[i]:
                j += 1
            if not is_image[i]:
                pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
                pos += j - i
            else:
                k = i
                while k < j:  # a run of image tokens may hold several images back to back
                    try:
                        t, h, w = next(grids)
                    except StopIteration:
                        raise ValueError("the prompts hold more <|image_pad|> runs than image_grid_thw has images") from None
                    h, w = h // merge, w // merge
                    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
                    pieces.append(torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + pos)
                    pos += max(h, w)
                    k += t * h * w
            i = j
        row = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
        positions[:, b, valid[b]] = row
        deltas[b] = (row.max() + 1 - n) if n else 0
    return positions.to(input_ids.device), deltas.to(input_ids.device)


def check_device(device) -> None:
    """A one-line ValueError for a device string torch does not know or this machine does not have (torch's own
    errors come from deep inside the first tensor moved there)."""
    if device is None:  # torch's default device
        return
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {str(device)!r} (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: no CUDA GPU is available to this torch ({torch.__version__})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def attention_mask_4d(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """[B, K] key validity -> [B, 1, q_len, K] boolean mask: causal (queries are the last q_len keys) and no pads.

    A query that would see no key at all (a left pad) is let see itself, so SDPA never softmaxes an empty row.
    """
    K = attention_mask.shape[1]
    keys = torch.arange(K, device=attention_mask.device)
    queries = torch.arange(K - q_len, K, device=attention_mask.device)
    causal = keys[None, :] <= queries[:, None]  # [q_len, K]
    mask = causal[None] & attention_mask.bool()[:, None, :]
    mask = mask | (keys[None, None, :] == queries[None, :, None])
    return mask[:, None]


class Output(NamedTuple):
    logits: torch.Tensor | None  # [B, L or keep_last, vocab] in the model dtype; None when logits=False
    hidden_states: torch.Tensor  # [B, L or keep_last, hidden] after the final norm: what the value head reads


class Qwen2VL(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.visual = VisionTransformer(cfg.vision, cfg.is_qwen2_5)
        self.model = TextModel(cfg.text)
        self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def set_gradient_checkpointing(self, on: bool = True):
        self.visual.gradient_checkpointing = self.model.gradient_checkpointing = on

    def rope_positions(self, input_ids, attention_mask=None, image_grid_thw=None):
        return rope_positions(input_ids, image_grid_thw, attention_mask, self.config.image_token_id,
                              self.config.vision.spatial_merge_size)

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, image_features=None) -> torch.Tensor:
        """Token embeddings with each `<|image_pad|>` replaced by its merged vision feature.

        `image_features` (the vision tower's output, [image tokens, hidden]) may be given instead of pixel_values:
        PPO encodes a rollout's pages once and reuses them for every forward over its responses.
        """
        x = self.model.embed_tokens(input_ids)
        if image_features is None and pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("pixel_values given without image_grid_thw")
            image_features = self.visual(pixel_values, image_grid_thw.cpu())
        if image_features is None:
            return x
        slots = input_ids == self.config.image_token_id
        n = int(slots.sum())
        if n != image_features.shape[0]:
            raise ValueError(f"the prompts hold {n} <|image_pad|> tokens but the images give {image_features.shape[0]} features")
        return x.masked_scatter(slots[..., None], image_features.to(x.dtype))

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                position_ids=None, cache: KVCache | None = None, keep_last: int | None = None, logits: bool = True,
                image_features=None, page_labels=None) -> Output:
        """Final hidden states and logits of every position, or of the last `keep_last` only (a prefill needs one).
        `logits=False` skips the LM head: callers that score a subset of positions run it on those themselves.
        `page_labels` [B, T, 2]: a critic's `self.page_marks` (mmr5.critic.PageMarks) adds its marks to the input
        embeddings here, inside the forward, where FSDP has its parameters gathered.

        With a cache, `attention_mask` covers every position so far (cached + new), as in HF, and `position_ids`
        must be given for decoding steps (prefill + offset; see `rope_positions`).
        """
        B, T = input_ids.shape
        x = self.embed(input_ids, pixel_values, image_grid_thw, image_features)
        if page_labels is not None:
            x = x + self.page_marks(page_labels).to(x.dtype)
        if position_ids is None:
            if cache is not None and cache.seen > 0:
                raise ValueError("decoding with a cache needs position_ids (prompt max position + 1 + step)")
            mask_for_pos = attention_mask[:, -T:] if attention_mask is not None else None
            position_ids, _ = self.rope_positions(input_ids, mask_for_pos, image_grid_thw)
        if cache is None and (attention_mask is None or bool(attention_mask.all())):
            mask = None  # no padding, no cache: SDPA's own causal path
        else:
            keys = attention_mask if attention_mask is not None else torch.ones(B, T + (cache.seen if cache else 0),
                                                                                dtype=torch.bool, device=x.device)
            mask = attention_mask_4d(keys.to(x.device), T)
        h = self.model(x, position_ids, mask, cache, keep_last if keep_last and keep_last < T else None)
        return Output(self.lm_head(h) if logits else None, h)

    def decode_step(self, input_ids, position_ids, key_mask, cache: KVCache) -> torch.Tensor:
        """Next-token logits [B, vocab] for one new token per row, written at `cache.index`; `key_mask` [B, slots]
        marks the slots each row may read (its prompt and the tokens decoded so far, this one included).

        Every shape is the same at every step (gpt-fast's static cache), so `torch.compile` builds one graph for the
        whole decode instead of one per key length. Only the sampler's `compile=True` path uses it.
        """
        h = self.model(self.model.embed_tokens(input_ids), position_ids, key_mask[:, None, None, :], cache)
        return self.lm_head(h[:, -1])

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu") -> "Qwen2VL":
        """Build on the meta device, then materialise each tensor straight from the safetensors files."""
        check_device(device)
        cfg = Config.from_file(path)
        with torch.device("meta"):
            model = cls(cfg)
        load_into(model, path, dtype=dtype, device=device, tied={"lm_head.weight"} if cfg.tie_word_embeddings else set())
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()

    def save_pretrained(self, path, max_shard_bytes: int = 5 * 2**30, side_files_from=None):
        """config.json + safetensors shards (+ index) in the released layout, written atomically; tokenizer and
        preprocessor files are copied from `side_files_from` (the directory the model came from)."""
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        config = self.config.to_dict()
        config["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        save_state(state, config, path, max_shard_bytes=max_shard_bytes, side_files_from=side_files_from)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    @classmethod
    def random(cls, cfg: Config, std: float = 0.02, seed: int = 0) -> "Qwen2VL":
        """A freshly initialised model (as HF does: normal(0, std) matrices, zero biases, unit norms)."""
        gen = torch.Generator().manual_seed(seed)
        model = cls(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif p.dim() == 1:
                    p.fill_(1.0)
                else:  # drawn on the CPU: the same weights on any device
                    p.copy_(torch.randn(p.shape, generator=gen, device="cpu") * std)
        return model
