"""PPO with a critic for a vision-language policy: GAE, a value head, KL to a frozen reference, the fused reward.

Pipeline: data -> processor -> model -> lora -> sampler -> rewards -> [ppo]. train_ppo.py samples a rollout
(sampler) and scores it (rewards); `make_experience` and `ppo_update` below are the whole algorithm, top to bottom.

Per response token t of row i (T tokens, `mask` marks the real ones, the last real one is the stop token):
    logp_t      = log pi(a_t | s_t)              the policy that sampled the rollout ("old")
    ref_t       = log pi_ref(a_t | s_t)          the frozen reference (LoRA: the same model, adapters off)
    V_t         = value head on the hidden state that predicts a_t (prompt positions are never read)
    r_t         = -beta * (logp_t - ref_t)  +  [t = last] * clip(score_i)      (kl_in="reward", classic RLHF)
    delta_t     = r_t + gamma * V_{t+1} - V_t ;  A_t = delta_t + gamma * lam * A_{t+1} ;  R_t = A_t + V_t
    loss        = E_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))          ratio_t = pi / pi_old
                + vf_coef * 0.5 * E_t max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, +-eps_v) - R_t)^2)
                - entropy_coef * E_t H_t  [+ beta * E_t k3_t when kl_in="loss"]
E_t is the mean over all real response tokens of the minibatch. `advantage="grpo"` is the MM-R5 release's
recipe instead: A_i = (score_i - mean_group) / (std_group + 1e-4) on every token of row i, no critic, k3 in the loss.
Every forward over a rollout runs each prompt once and its group's responses on that prompt's KV cache
(`shared_prompt_states`): the prompt is most of each sequence, and minibatches are whole groups.
"""
import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from mmr5.lora import lora_disabled
from mmr5.model import KVCache, Qwen2VL
from mmr5.sampler import Rollout


@dataclass
class PPOConfig:
    advantage: str = "gae"  # "gae" (critic + GAE) or "grpo" (group-normalised scores, no critic)
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2  # policy ratio clip (eps)
    value_clip: float = 0.2  # value clip around the rollout's values (eps_v)
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    kl_coef: float = 0.05  # beta (the release's GRPO: 0.04)
    kl_in: str = "reward"  # "reward": k1 in every token's reward; "loss": k3 in the loss
    target_kl: float | None = None  # adaptive beta (Ziegler et al. 2019) aiming at this KL per sequence
    kl_horizon: int = 10000
    epochs: int = 2  # passes over each rollout (the release: 2 iterations)
    minibatch_size: int = 8  # rows per optimizer step
    micro_batch_size: int = 8  # rows per forward (gradient accumulation inside a minibatch)
    max_log_ratio: float = 20.0  # log-ratios are clamped to +-this before exp(): no inf, no NaN
    reward_clip: float = 10.0
    grad_clip: float = 1.0


class ValueHead(nn.Module):
    """V(s) = w . h + b on the last hidden state, zero at init: the critic starts neutral. It is attached as
    `model.value_head` (of the policy, or of a separate critic model), so DDP / FSDP treat it as part of the model."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h):
        return self.linear(h.to(self.linear.weight.dtype)).squeeze(-1)


# ---- the pieces, each checked on its own in tests/test_ppo.py ----

def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x, mask, reduce=None, eps: float = 1e-8):
    """(x - mean) / std over the real tokens (of every rank, with `reduce` summing over ranks); padding stays 0."""
    reduce = reduce or (lambda v: v)
    count = max(1.0, reduce(float(mask.sum())))
    mean = reduce(float((x * mask).sum())) / count
    var = reduce(float((((x - mean) ** 2) * mask).sum())) / count
    return (x - mean) * (1.0 / (var + eps) ** 0.5) * mask


def kl_estimate(logp, ref_logp, kind: str, max_log_ratio: float = 20.0):
    """Per-token estimators of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL divergence"):
    k1 = log r, k2 = (log r)^2 / 2, k3 = 1/r - 1 + log r, with log r = logp - ref_logp clamped."""
    log_ratio = (logp - ref_logp).clamp(-max_log_ratio, max_log_ratio)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}")


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation over each row's real tokens (a prefix of the row); -> (A, R = A + V)."""
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        m = mask[:, t].to(rewards.dtype)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * m
        next_value, next_advantage = values[:, t] * m, advantages[:, t]
    return advantages, (advantages + values) * mask


def group_advantages(scores, group_size: int, eps: float = 1e-4):
    """The release's GRPO advantage: each score against the other samples of its prompt (unbiased std, as TRL)."""
    groups = scores.view(-1, group_size)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
    return ((groups - groups.mean(dim=1, keepdim=True)) / (std + eps)).flatten()


def policy_loss(logp, old_logp, advantages, mask, clip: float, max_log_ratio: float = 20.0):
    """Clipped surrogate; also the share of clipped tokens and approx-KL(old || new) for logging."""
    log_ratio = (logp - old_logp).clamp(-max_log_ratio, max_log_ratio)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(ratio - 1 - log_ratio, mask)
    return loss, clip_frac, approx_kl


def value_loss(values, old_values, returns, mask, clip: float):
    """Clipped value loss: the new prediction may not profit from moving more than `clip` from the old one."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def explained_variance(values, returns, mask) -> float:
    """1 - Var(R - V) / Var(R): 1 is a perfect critic, 0 no better than a constant."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    err = returns - values
    var_e = masked_mean((err - masked_mean(err, mask)) ** 2, mask)
    return float(1 - var_e / var_r) if var_r > 0 else 0.0


class AdaptiveKL:
    """beta <- beta * (1 + clip(KL / target - 1, +-0.2) * n / horizon) (Ziegler et al. 2019); fixed when no target."""

    def __init__(self, value: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n_steps: int):
        if self.target:
            self.value *= 1 + min(max(kl / self.target - 1, -0.2), 0.2) * n_steps / self.horizon


# ---- a rollout turned into training data ----

@dataclass
class Experience:
    input_ids: torch.Tensor  # [R, L + T] prompt (left padded) + response (right padded)
    attention_mask: torch.Tensor  # [R, L + T]
    prompt_ids: torch.Tensor  # [P, L] each prompt once (row i answers prompt group[i])
    prompt_mask: torch.Tensor  # [P, L]
    prompt_len: int  # L: response token t sits at column L + t, predicted by the hidden state at L + t - 1
    mask: torch.Tensor  # [R, T] real response tokens
    group: torch.Tensor  # [R] the prompt each row answers
    features: list  # per prompt: its pages' vision features (computed once, reused by every forward)
    grids: list  # per prompt: its image_grid_thw rows
    scores: torch.Tensor  # [R] fused reward
    old_logp: torch.Tensor = None
    ref_logp: torch.Tensor = None
    old_values: torch.Tensor = None
    advantages: torch.Tensor = None
    returns: torch.Tensor = None

    @property
    def tokens(self):
        return self.input_ids[:, self.prompt_len:]

    def inputs(self, rows):
        """Model inputs for a subset of rows (features and grids gathered per row's prompt)."""
        prompts = self.group[rows].tolist()
        return dict(input_ids=self.input_ids[rows], attention_mask=self.attention_mask[rows],
                    image_features=torch.cat([self.features[p] for p in prompts]),
                    image_grid_thw=torch.cat([self.grids[p] for p in prompts]))


@torch.no_grad()
def encode_pages(model: Qwen2VL, batch: dict) -> tuple[list, list]:
    """Vision features of a prompt batch, split per prompt (rows own consecutive images, in order)."""
    grid = batch["image_grid_thw"]
    features = model.visual(batch["pixel_values"].to(model.device), grid)
    per_image = (grid.prod(-1) // model.config.vision.spatial_merge_size ** 2).tolist()
    per_row = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    out_f, out_g, start_token, start_image = [], [], 0, 0
    for tokens in per_row:
        count, acc = 0, 0
        while acc < tokens:
            acc += per_image[start_image + count]
            count += 1
        out_f.append(features[start_token:start_token + tokens])
        out_g.append(grid[start_image:start_image + count])
        start_token, start_image = start_token + tokens, start_image + count
    return out_f, out_g


def response_forward(model: Qwen2VL, exp: Experience, rows, logprobs=True, values=False, forward=None):
    """(log pi(a_t), entropy_t, V_t) for the response tokens of `rows`; None for what is not asked.

    V comes from `model.value_head`. `forward` is the module to run (a DDP wrapper; the model itself by default).
    When one forward gives both log-probs and values (the value head on the policy's own trunk, `--critic shared`),
    the value loss trains the head only, never the trunk: measured on the demo, its gradient there drives the
    policy's entropy up (0.07 -> 0.2 nats per token in 20 steps) and its KL to the reference with it, long before the
    critic predicts anything. A separate critic model is trained whole.
    """
    device = model.device
    run = forward or model
    L, T = exp.prompt_len, exp.mask.shape[1]
    if model.model.gradient_checkpointing and model.training:  # checkpointed layers cannot fill a shared cache
        inputs = exp.inputs(rows)
        hidden = run(**{k: v.to(device) if k != "image_grid_thw" else v for k, v in inputs.items()},
                     logits=False).hidden_states
        h = hidden[:, L - 1:L + T - 1]  # the states that predict response tokens 0..T-1
    else:
        h = shared_prompt_states(model, run, exp, rows)
    v = model.value_head(h.detach() if logprobs else h).float() if values else None
    if not logprobs:
        return None, None, v
    logits = model.lm_head(h).float()
    all_logp = logits.log_softmax(-1)
    logp = all_logp.gather(-1, exp.tokens[rows].to(device)[..., None])[..., 0]
    entropy = -(all_logp.exp() * all_logp).sum(-1)
    return logp, entropy, v


def shared_prompt_states(model: Qwen2VL, run, exp: Experience, rows) -> torch.Tensor:
    """The hidden states that predict response tokens 0..T-1 of `rows` [R, T, hidden], each prompt run once.

    A group's responses share their prompt (most of each sequence: ~300 of ~400 tokens in the demo), so the prompts
    of `rows` are run once each into a KV cache, and the responses then run on top of their prompt's keys and
    values, exactly as the sampler decoded them. Gradients flow through the cache into the prompt's layers. Measured
    on the demo (16 rows, 4 prompts): forward + backward 2.5x faster than repeating the prompt in every row.
    """
    device = model.device
    L, T = exp.prompt_len, exp.mask.shape[1]
    prompts, local = exp.group[rows].unique(return_inverse=True)  # local: each row's prompt among `prompts`
    ids, mask = exp.prompt_ids[prompts].to(device), exp.prompt_mask[prompts].to(device)
    grid = torch.cat([exp.grids[p] for p in prompts.tolist()])
    features = torch.cat([exp.features[p] for p in prompts.tolist()]).to(device)
    positions, deltas = model.rope_positions(ids, mask, grid)
    cache = KVCache(model.config.text, len(prompts), L + T - 1, model.dtype, device)
    prompt_h = run(ids, mask, image_features=features, image_grid_thw=grid, position_ids=positions, cache=cache,
                   logits=False).hidden_states
    local = local.to(device)
    last_prompt_state = prompt_h[local, -1:]  # predicts response token 0
    if T == 1:
        return last_prompt_state
    cache = cache.select(local)  # each row reads its own prompt's keys and values
    keys = torch.cat([mask[local], exp.mask[rows][:, :T - 1].to(device, mask.dtype)], 1)
    start = (mask.sum(1) + deltas)[local]  # M-RoPE position of response token 0, as in the sampler
    positions = (start[:, None] + torch.arange(T - 1, device=device)).expand(3, -1, -1)
    response_h = run(exp.tokens[rows][:, :T - 1].to(device), keys, position_ids=positions, cache=cache,
                     logits=False).hidden_states
    return torch.cat([last_prompt_state, response_h], 1)


def chunks(rows: torch.Tensor, size: int):
    return [rows[i:i + size] for i in range(0, len(rows), size)]


@torch.no_grad()
def make_experience(policy: Qwen2VL, prompt_batch: dict, pages: tuple[list, list], rollout: Rollout,
                    scores: torch.Tensor, group_size: int, cfg: PPOConfig, kl_coef: float,
                    critic: Qwen2VL | None = None, reference: Qwen2VL | None = None, reduce=None) -> Experience:
    """Old log-probs, reference log-probs, values, per-token rewards and advantages for one rollout.

    `pages` is `encode_pages(policy, prompt_batch)` (the vision tower is frozen in PPO, so the sampler and every
    forward here share it). `reference=None` means the policy with its LoRA adapters off; values come from
    `(critic or policy).value_head`. Scores are per row (row i answers prompt i // group_size). `reduce` sums a
    number over torchrun ranks, so advantages are whitened over the whole global rollout.
    """
    R, L = rollout.tokens.shape[0], prompt_batch["input_ids"].shape[1]
    group = torch.arange(R) // group_size
    features, grids = pages
    mask = rollout.mask.cpu()
    exp = Experience(
        input_ids=torch.cat([prompt_batch["input_ids"][group], rollout.tokens.cpu()], 1),
        attention_mask=torch.cat([prompt_batch["attention_mask"][group], mask.long()], 1),
        prompt_ids=prompt_batch["input_ids"].cpu(), prompt_mask=prompt_batch["attention_mask"].cpu(),
        prompt_len=L, mask=mask, group=group, features=features, grids=grids,
        scores=scores.float().clamp(-cfg.reward_clip, cfg.reward_clip))
    gae_mode = cfg.advantage == "gae"
    old, ref, old_values = [], [], []
    for rows in chunks(torch.arange(R), cfg.micro_batch_size):
        logp, _, values = response_forward(policy, exp, rows, values=gae_mode and critic is None)
        if gae_mode and critic is not None:
            values = response_forward(critic, exp, rows, logprobs=False, values=True)[2]
        if reference is None:
            with lora_disabled(policy):
                ref.append(response_forward(policy, exp, rows)[0].cpu())
        else:
            ref.append(response_forward(reference, exp, rows)[0].cpu())
        old.append(logp.cpu())
        old_values.append(values.cpu() if values is not None else torch.zeros_like(logp.cpu()))
    exp.old_logp, exp.ref_logp, exp.old_values = torch.cat(old), torch.cat(ref), torch.cat(old_values)
    m = mask.float()
    if gae_mode:
        rewards = torch.zeros_like(exp.old_logp)
        if cfg.kl_in == "reward":  # r_t = -beta * k1_t at every token ...
            rewards -= kl_coef * kl_estimate(exp.old_logp, exp.ref_logp, "k1", cfg.max_log_ratio) * m
        last = (mask.sum(1) - 1).clamp(min=0)  # ... + the sequence's score at its last real token
        rewards[torch.arange(R), last] += exp.scores * mask.any(1)
        exp.old_values *= m
        advantages, exp.returns = gae(rewards, exp.old_values, m, cfg.gamma, cfg.lam)
        exp.advantages = masked_whiten(advantages, m, reduce)
    elif cfg.advantage == "grpo":
        exp.advantages = group_advantages(exp.scores, group_size)[:, None] * m
        exp.returns = torch.zeros_like(m)
    else:
        raise ValueError(f"unknown advantage estimator {cfg.advantage!r} (gae or grpo)")
    return exp


def ppo_update(policy: Qwen2VL, exp: Experience, optimizer: torch.optim.Optimizer, params: list, cfg: PPOConfig,
               kl_coef: float, critic: Qwen2VL | None = None, value_only: bool = False,
               generator: torch.Generator | None = None, forwards: dict | None = None, reduce=None,
               world: int = 1) -> dict:
    """`cfg.epochs` passes over the rollout in shuffled minibatches; one optimizer step per minibatch.

    `value_only` trains just the critic (critic warm-up). A minibatch whose loss or gradient is not finite is
    skipped (no step) and counted in `skipped`. Under torchrun each rank passes its share of the rollout, its
    DDP/FSDP `forwards` ({"policy": ..., "critic": ...}), `reduce` (sum over ranks) and `world`: an optimizer step
    then covers the union of every rank's minibatch, token-mean over all of them.
    """
    reduce = reduce or (lambda x: x)
    forwards = forwards or {}
    gae_mode = cfg.advantage == "gae"
    stats = {k: [] for k in ("policy_loss", "value_loss", "entropy", "clip_frac", "approx_kl", "kl_loss")}
    skipped = 0
    device = policy.device
    for _ in range(cfg.epochs):
        # Shuffled whole groups, so a micro-batch runs each prompt once for all of its responses.
        groups = torch.randperm(int(exp.group.max()) + 1, generator=generator).tolist()
        order = torch.cat([(exp.group == g).nonzero()[:, 0] for g in groups])
        for minibatch in chunks(order, cfg.minibatch_size):
            n_tokens = max(1.0, reduce(float(exp.mask[minibatch].sum())))
            finite = True
            micro = chunks(minibatch, cfg.micro_batch_size)
            for i, rows in enumerate(micro):
                m = exp.mask[rows].to(device).float()
                logp, entropy, values = response_forward(policy, exp, rows, values=gae_mode and critic is None,
                                                         forward=forwards.get("policy"))
                loss = torch.zeros((), device=device)
                if gae_mode:
                    if critic is not None:
                        values = response_forward(critic, exp, rows, logprobs=False, values=True,
                                                  forward=forwards.get("critic"))[2]
                    v_loss = value_loss(values, exp.old_values[rows].to(device), exp.returns[rows].to(device), m,
                                        cfg.value_clip)
                    loss = loss + cfg.vf_coef * v_loss
                    stats["value_loss"].append(v_loss.item())
                if not value_only:
                    pg_loss, clip_frac, approx_kl = policy_loss(logp, exp.old_logp[rows].to(device),
                                                                exp.advantages[rows].to(device), m, cfg.clip,
                                                                cfg.max_log_ratio)
                    ent = masked_mean(entropy, m)
                    loss = loss + pg_loss - cfg.entropy_coef * ent
                    if cfg.kl_in == "loss":
                        kl = masked_mean(kl_estimate(logp, exp.ref_logp[rows].to(device), "k3", cfg.max_log_ratio), m)
                        loss = loss + kl_coef * kl
                        stats["kl_loss"].append(kl.item())
                    stats["policy_loss"].append(pg_loss.item())
                    stats["entropy"].append(ent.item())
                    stats["clip_frac"].append(clip_frac.item())
                    stats["approx_kl"].append(approx_kl.item())
                if reduce(float(not torch.isfinite(loss))) > 0:  # every rank skips together
                    finite = False
                    break
                # Token-mean over the global minibatch; DDP/FSDP average gradients over ranks, hence * world.
                weight = m.sum() / n_tokens * world
                last = i == len(micro) - 1
                syncs = [forwards[k].no_sync() for k in ("policy", "critic")
                         if not last and hasattr(forwards.get(k), "no_sync")]
                with contextlib.ExitStack() as stack:
                    for ctx in syncs:
                        stack.enter_context(ctx)
                    (loss * weight).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
            if finite and torch.isfinite(grad_norm):
                optimizer.step()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
    out = {k: sum(v) / len(v) for k, v in stats.items() if v}
    out["skipped"] = skipped
    return out
