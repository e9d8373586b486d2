"""Rollouts: batched generation with a pre-allocated KV cache, group sampling, CUDA/bf16 or CPU/fp32 alike.

Pipeline: data -> processor -> model -> [sampler] -> rewards -> ppo.
One prefill runs the vision tower and the prompt once per prompt; with `n` samples per prompt (GRPO/PPO groups)
the prompt's cache is then copied n ways instead of recomputed. Decoding feeds one token per row per step, each
at its row's own M-RoPE position (prompt max position + 1 + step), and checks for stop tokens only every
`check_every` steps so the GPU is not synchronised per token; finished rows are then dropped from the batch.
"""
from dataclasses import dataclass

import torch

from mmr5.model import KVCache, Qwen2VL


@dataclass
class Rollout:
    tokens: torch.Tensor  # [R, T] generated ids (R = prompts * n, row r from prompt r // n); pad_id after the end
    mask: torch.Tensor  # [R, T] bool: real generated tokens, the stop token included
    texts: list[str]  # decoded responses, special tokens skipped
    finished: torch.Tensor  # [R] bool: the row ended on a stop token (not cut at max_new_tokens)

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(1)


def sampling_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; filtered-out tokens get -inf."""
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # tokens whose predecessors already cover top_p; the first stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def race_noise(rows: int, vocab: int, temperature: float, generator, device) -> torch.Tensor | None:
    """E ~ Exp(1) (as -log U) per row and token, for `pick`'s exponential race; None when greedy."""
    if temperature == 0:
        return None
    return torch.rand((rows, vocab), generator=generator, device=device).log_().neg_()


def pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, race: torch.Tensor | None,
         banned: torch.Tensor) -> torch.Tensor:
    """Next token per row [R] from float32 logits [R, V].

    `race` is `race_noise`'s draw (drawn outside, so that a compiled step uses the eager path's random stream).
    `banned` ids are never picked: vision placeholders, which mean "an image goes here" and have none behind them.
    """
    allowed = logits.index_fill(-1, banned, float("-inf"))
    if temperature == 0:
        return allowed.argmax(-1)
    # exp of log_softmax rather than softmax: a fixed seed's samples depend on these exact bits
    probs = sampling_logits(allowed, temperature, top_k, top_p).log_softmax(-1).exp()
    # The exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) (= -log U) picks i with probability p_i. It is what
    # torch.multinomial does for one sample, at a fraction of its cost on a CPU (bench/README.md).
    return (probs / race).argmax(-1)


class Decoded:
    """The rollout being written: generated ids (pad_id once a row has stopped), which are real, which rows stopped."""

    def __init__(self, rows: int, max_new_tokens: int, pad_id: int, stop_ids: torch.Tensor):
        device = stop_ids.device
        self.tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
        self.mask = torch.zeros(rows, max_new_tokens, dtype=torch.bool, device=device)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.pad_id, self.stop_ids = pad_id, stop_ids

    def write(self, rows, step: int, token: torch.Tensor):
        """`token` [len(rows)] is step `step` of `rows` (indices into the outputs, or a slice)."""
        done = self.finished[rows]
        self.tokens[rows, step] = torch.where(done, self.pad_id, token)
        self.mask[rows, step] = ~done
        self.finished[rows] = done | torch.isin(token, self.stop_ids)


def prefill(model: Qwen2VL, batch: dict, cache: KVCache, image_features=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts into `cache` -> (next-token logits [B, V] float32, M-RoPE position of the first new token [B])."""
    device = model.device
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    pixel_values, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
    if pixel_values is not None:
        pixel_values = pixel_values.to(device, non_blocking=True)
    positions, deltas = model.rope_positions(input_ids, attention_mask, grid)
    logits = model(input_ids, attention_mask, pixel_values, grid, position_ids=positions, cache=cache, keep_last=1,
                   image_features=image_features).logits[:, -1].float()
    return logits, attention_mask.sum(1) + deltas


def decode_eager(model: Qwen2VL, cache: KVCache, logits, next_position, prompt_mask, out: Decoded, sample,
                 check_every: int, keep_going=None):
    """Decode on the growing cache: one token per row per step; rows that have stopped leave the batch.

    `logits` [R, V] predict each row's first new token, which sits at M-RoPE position `next_position` [R];
    `prompt_mask` [R, L] marks the prompt's real tokens; `sample(logits) -> tokens` picks.
    """
    R, L = prompt_mask.shape
    steps = out.tokens.shape[1]
    keys = torch.cat([prompt_mask, prompt_mask.new_ones(R, steps)], 1)  # [R, L + steps]: what each row may read
    rows = torch.arange(R, device=prompt_mask.device)  # the rows still decoding, as indices into the outputs
    token = sample(logits)
    for step in range(steps):
        out.write(rows, step, token)
        if step == steps - 1:
            break
        if (step + 1) % check_every == 0:  # the only host synchronisation: drop rows that have stopped
            active = ~out.finished[rows]
            any_active = bool(active.any())
            if not (keep_going(any_active) if keep_going else any_active):
                break
            if any_active and not bool(active.all()):
                keep = active.nonzero()[:, 0]
                rows, cache, next_position, token = rows[keep], cache.select(keep), next_position[keep], token[keep]
        position = (next_position + step).view(1, -1, 1).expand(3, -1, 1)  # [3, rows, 1]: t, h, w alike
        logits = model(token[:, None], keys[rows, : L + step + 1], position_ids=position, cache=cache,
                       keep_last=1).logits[:, -1].float()
        token = sample(logits)


def decode_one_token(model: Qwen2VL, token, position, keys, cache: KVCache, race, sampling: dict) -> torch.Tensor:
    """One static-shape step, the forward and the sampling math: what `decode_static` compiles into one graph."""
    logits = model.decode_step(token[:, None], position, keys, cache).float()
    return pick(logits, race=race, **sampling)


def decode_static(model: Qwen2VL, cache: KVCache, logits, next_position, prompt_mask, out: Decoded, sampling: dict,
                  noise, check_every: int, keep_going=None):
    """Decode with static shapes: every row runs every step over every cache slot (masked until written), so
    torch.compile builds one graph for `decode_one_token` and reuses it at each step.

    Arguments as `decode_eager`'s, with the sampling settings apart: `pick`'s keywords and `noise(rows)`, its race.
    """
    R, L = prompt_mask.shape
    steps = out.tokens.shape[1]
    slots = cache.k[0].shape[2]  # prompt + steps, rounded up by `generate`
    keys = torch.cat([prompt_mask.bool(), torch.zeros(R, slots - L, dtype=torch.bool, device=prompt_mask.device)], 1)
    new_slots = torch.arange(L, L + steps, device=prompt_mask.device)
    # On a CPU, inductor's C++ wrapper (no Python between kernels) and autotuned GEMMs make the step faster
    # (bench/README.md); GPUs keep the default options.
    options = {"cpp_wrapper": True, "max_autotune": True} if prompt_mask.device.type == "cpu" else None
    step_fn = torch.compile(decode_one_token, dynamic=False, options=options)
    token = pick(logits, race=noise(R), **sampling)
    for step in range(steps):
        out.write(slice(None), step, token)  # all rows, always: a plain slice instead of index gathers and scatters
        if step == steps - 1:
            break
        if (step + 1) % check_every == 0:  # the only host synchronisation
            any_active = bool((~out.finished).any())
            if not (keep_going(any_active) if keep_going else any_active):
                break
        position = (next_position + step).view(1, -1, 1).expand(3, -1, 1)  # [3, R, 1]: t, h, w alike
        keys[:, L + step] = True
        cache.index = new_slots[step:step + 1]  # where the token just picked goes
        token = step_fn(model, token, position, keys, cache, noise(R), sampling)


@torch.no_grad()
def generate(model: Qwen2VL, processor, batch: dict, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, n: int = 1, stop_ids=None, generator: torch.Generator | None = None,
             check_every: int = 8, compile: bool = False, keep_going=None, image_features=None) -> Rollout:
    """Sample `n` responses per prompt of a left-padded `batch` (as `Processor.rerank_inputs` builds it).

    `image_features` (the vision tower's output for the batch's images) is used instead of running the tower on
    `pixel_values`. Vision placeholder tokens are never generated (HF's generate may emit them). Greedy when
    temperature == 0. `stop_ids` defaults to `<|im_end|>` and `<|endoftext|>` ([] never stops). The generator (on
    the model's device) makes sampling reproducible. `compile=True` runs each step under torch.compile with static
    shapes (`decode_static`: the cache rounded up to a multiple of 128 slots, every row decodes to the end), so a
    graph is built once per batch shape (seconds to a minute on a CPU: bench/README.md) and reused while prompts stay
    in that length bucket. `keep_going(any_row_active) -> bool` lets FSDP ranks agree to decode until every rank is
    done (their forwards are collectives, so all must take the same number of steps).
    """
    if max_new_tokens < 1 or n < 1:
        raise ValueError(f"max_new_tokens and n must be >= 1 (got {max_new_tokens}, {n})")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_p={top_p}, top_k={top_k}")
    device = model.device
    stop_ids = (processor.im_end_id, processor.endoftext_id) if stop_ids is None else stop_ids
    stop_ids = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    # A generated <|image_pad|> would be taken for an image slot by any later forward over the text (PPO's).
    banned = torch.tensor([processor.image_pad_id, processor.vision_start_id, processor.vision_end_id], device=device)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, banned=banned)
    vocab = model.config.text.vocab_size

    def noise(rows):  # the exponential race's draw for `rows` rows, from the one random stream
        return race_noise(rows, vocab, temperature, generator, device)

    def sample(logits):
        return pick(logits, race=noise(len(logits)), **sampling)

    B, L = batch["input_ids"].shape
    slots = -(-(L + max_new_tokens) // 128) * 128 if compile else L + max_new_tokens
    cache = KVCache(model.config.text, B, slots, model.dtype, device)
    logits, next_position = prefill(model, batch, cache, image_features)
    prompt_mask = batch["attention_mask"].to(device)
    if n > 1:  # group sampling: copy the prompt's cache n ways instead of recomputing it
        cache = cache.repeat_interleave(n)
        logits, next_position = logits.repeat_interleave(n, 0), next_position.repeat_interleave(n)
        prompt_mask = prompt_mask.repeat_interleave(n, 0)
    out = Decoded(B * n, max_new_tokens, processor.pad_id, stop_ids)
    if compile:
        decode_static(model, cache, logits, next_position, prompt_mask, out, sampling, noise, check_every, keep_going)
    else:
        decode_eager(model, cache, logits, next_position, prompt_mask, out, sample, check_every, keep_going)
    texts = [processor.decode(t[m].tolist()) for t, m in zip(out.tokens.cpu(), out.mask.cpu())]
    return Rollout(out.tokens, out.mask, texts, out.finished)
