"""PPO with a critic for a vision-language policy: GAE, a value head, KL to a frozen reference, the fused reward.

Pipeline: data -> processor -> model -> sampler -> rewards -> [ppo]. train_ppo.py samples a rollout
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
E_t is `loss_agg`: "token", the mean over all real response tokens of the minibatch (DAPO; long responses weigh
more), or "sequence", each response's token mean, then the mean over responses (every response counts once).
`advantage="grpo"` is the MM-R5 release's recipe instead: A_i = (score_i - mean_group) / (std_group + 1e-4) on every
token of row i, no critic, k3 in the loss, "sequence" aggregation (its grpo_trainer.py, line 769).
`advantage="reinforce"` is the objective above with no critic (REINFORCE++, Hu 2025): V = 0, lam = 1, so A_t is the
return-to-go of r_t, whitened over the batch (one baseline for the whole batch), and there is no value loss.
Every forward over a rollout runs each prompt once and its group's responses on that prompt's KV cache
(`shared_prompt_states`): the prompt is most of each sequence, and minibatches are whole groups.
"""
import argparse
import contextlib
from dataclasses import dataclass, field, fields, replace

import torch

from mmr5.lora import lora_disabled
from mmr5.model import KVCache, Qwen2VL
from mmr5.sampler import Rollout


def setting(default, help: str, **flag):
    """A PPOConfig field with its --help text (and argparse extras such as choices): the one place a default lives."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class PPOConfig:
    """Every PPO / GRPO setting with its default; train_ppo.py makes one flag of each field."""
    # rollouts and rewards
    steps: int = setting(100, "PPO steps (rollout + update)")
    prompts_per_step: int = setting(8, "queries per rollout")
    samples: int = setting(4, "responses per query (the release: 4)")
    temperature: float = setting(1.0, "sampling temperature (the release: 1.0)")
    max_new_tokens: int = setting(1024, "response budget (the release: 2048)")
    w_rerank: float = setting(1.0, "weight of the rerank reward")
    w_format: float = setting(1.0, "weight of the format reward")
    w_think: float = setting(0.0, "weight of the think reward (our extension)")
    reward_clip: float = setting(10.0, "clip sequence scores to +-this")
    # the estimator and its losses
    advantage: str = setting("gae", "PPO with a critic; the release's GRPO; or PPO with no critic, the whitened "
                             "return-to-go of the score and the per-token KL penalty (REINFORCE++: on the demo, 6 "
                             "critic-free runs learned about as much per policy update as PPO with the critic, at "
                             "GRPO's cost a step: ahead of GRPO at step 10, level at 50)",
                             choices=["gae", "grpo", "reinforce"])
    critic: str = setting("separate", "a value head on a separate copy of the starting model (a trunk of its own; "
                          "with its defaults, told the labels and the greedy answer's reward, replaying, a median "
                          "0.58 / 0.69 of the demo's return variance explained over all tokens / at the last token, 3 "
                          "seeds), or on the policy's detached states (shared: about 0 there, but no second model in "
                          "memory)",
                          choices=["shared", "separate"])
    critic_labels: bool | None = setting(None, "the separate critic is told which pages are relevant (PageMarks: a "
                                         "learned mark on each page id of its input; the policy never sees them; "
                                         "default: on with --advantage gae and --critic separate). The demo "
                                         "without --critic-greedy, median explained variance all / last token: "
                                         "with the default replay 0.37 / 0.78 (6 seeds); without replay 0.26 / "
                                         "0.47 (3); with neither 0.14 / 0.24 (6)",
                                         action=argparse.BooleanOptionalAction)
    critic_greedy: bool | None = setting(None, "the separate critic is also told the fused reward of the current "
                                         "policy's greedy response to each prompt (one greedy generation per prompt "
                                         "and step, a rollout from the prompt as VinePPO's values are; a function of "
                                         "the prompt and the policy alone, so the baseline stays unbiased; default: "
                                         "on with --advantage gae and --critic separate). The demo, median explained "
                                         "variance all / last token: 0.65 / 0.78 with it, 0.37 / 0.78 without (with "
                                         "replay 2 and --prompt-baseline critic, 3 and 6 seeds)",
                                         action=argparse.BooleanOptionalAction)
    score_baseline: str = setting("none", "gae: subtract from each score the mean score of its prompt's samples "
                                  "before GAE (group: the critic then predicts only how a response differs from its "
                                  "prompt's average, which it can read from the response)", choices=["none", "group"])
    prompt_baseline: str = setting("batch", "gae: what the policy's advantages take as a prompt's expected return: "
                                   "the batch's mean of the critic's values at the responses' first tokens (batch: "
                                   "A_t = GAE_t + V(s_0) - mean V(s_0): the critic assigns credit within a response, "
                                   "and a prompt the policy does better on than the batch's average is reinforced, "
                                   "a worse one pushed away from), or the critic's value there. The demo, held-out "
                                   "rerank at steps 20 / 50 (3 seeds): batch 0.712 / 0.750, critic 0.665 / 0.650 "
                                   "(the critic told the greedy answer's reward sees ~no difference between a "
                                   "near-deterministic policy's samples), GRPO 0.637 / 0.719",
                                   choices=["batch", "critic"])
    kl_coef: float = setting(0.05, "beta: weight of KL(policy || reference) (the release's GRPO: 0.04)")
    kl_in: str | None = setting(None, "k1 per token in the reward, or k3 in the loss (default: reward for gae and "
                                "reinforce, loss for grpo)", choices=["reward", "loss"], type=str)
    target_kl: float | None = setting(None, "adapt beta toward this KL per sequence (default: fixed beta)",
                                      type=float)
    kl_horizon: int = setting(10000, "horizon of the adaptive KL controller")
    gamma: float = setting(1.0, "GAE discount")
    lam: float = setting(0.95, "GAE lambda of the policy's advantages (VC-PPO, a pretrained 7B critic: 0.95-0.99 "
                         "best, 1.0 worst; the demo, whose critic explains ~0.3: 1.0 learned faster)")
    lam_critic: float = setting(1.0, "GAE lambda of the critic's value targets (decoupled GAE, VC-PPO: 1.0, the "
                                "Monte-Carlo return, unbiased by the critic's own errors)")
    lam_alpha: float = setting(0.0, "if > 0, VAPO's length-adaptive policy lambda 1 - 1/(alpha * response length) "
                               "instead of --lam (VAPO: 0.05)")
    clip: float = setting(0.2, "policy ratio clip (eps)")
    value_clip: float = setting(0.2, "value prediction clip around the rollout's values (eps_v)")
    vf_coef: float = setting(0.5, "value loss weight")
    entropy_coef: float = setting(0.0, "entropy bonus weight")
    max_log_ratio: float = setting(20.0, "log-ratios are clamped to +-this before exp(): no inf, no NaN")
    loss_agg: str | None = setting(None, "average each response's tokens, then the responses (every response "
                                   "counts once: the release's GRPO, TRL's loss_type='grpo'), or all tokens of a "
                                   "minibatch (long responses weigh more: DAPO) (default: sequence for grpo, token "
                                   "for gae and reinforce)", choices=["sequence", "token"], type=str)
    # optimisation
    epochs: int = setting(2, "passes over each rollout (the release: 2)")
    minibatch_size: int = setting(8, "rollout rows per optimizer step")
    micro_batch_size: int = setting(4, "rows per forward (gradient accumulation)")
    lr: float = setting(1e-5, "learning rate (the release: 1e-5 with LoRA r64)")
    anneal_lr: bool = setting(False, "the policy's learning rate falls linearly from --lr to 0 over --steps (cleanrl's "
                              "anneal_lr; the critic's stays at --critic-lr)", action=argparse.BooleanOptionalAction)
    critic_lr: float | None = setting(None, "learning rate of the value head (and of a separate critic model); "
                                      "default 10x --lr (VAPO: the critic faster than the actor; V starts at the "
                                      "first rollout's mean return, so this only has to learn the differences)",
                                      type=float)
    critic_warmup: int = setting(10, "value pretraining: at most the first N steps train only the critic, on the "
                                 "starting policy's returns (VAPO: 50); it ends early once the critic's explained "
                                 "variance on each new rollout, before it trains on it, stops rising (the demo: "
                                 "ends at step ~6 while still ~0; the critic starts explaining from step ~9)")
    critic_warmup_patience: int = setting(5, "value pretraining ends after this many steps without a new best "
                                          "explained variance")
    critic_replay: int | None = setting(None, "after each update the critic also takes one value-only pass over "
                                        "each of the last N earlier rollouts (their returns, its values refreshed "
                                        "first; kept in the checkpoints), as PPG's auxiliary phase does (default: 3 "
                                        "with --critic separate, else 0). The demo with its defaults (3 seeds): 3 "
                                        "explains 0.58 / 0.69 (all / last token; lowest 0.51 / 0.66), 2 0.56 / 0.66 "
                                        "(lowest 0.53 / 0.61); held-out rerank at step 50 0.750, 0.720; a step "
                                        "~13 s, ~12 s",
                                        type=int)
    grad_clip: float = setting(1.0, "clip the gradient norm (0 = off)")

    def __post_init__(self):
        positive = ("steps", "prompts_per_step", "samples", "max_new_tokens", "epochs", "minibatch_size",
                    "micro_batch_size")
        bad = [name for name in positive if getattr(self, name) <= 0]
        if bad:
            raise ValueError(f"--{bad[0].replace('_', '-')} must be positive")
        self.critic_lr = self.critic_lr if self.critic_lr is not None else 10 * self.lr
        if self.lr <= 0 or self.critic_lr <= 0 or self.temperature < 0 or self.kl_coef < 0 or self.clip <= 0:
            raise ValueError("--lr, --critic-lr and --clip must be positive, --temperature and --kl-coef non-negative")
        separate = self.advantage == "gae" and self.critic == "separate"
        self.critic_labels = separate if self.critic_labels is None else self.critic_labels
        self.critic_greedy = separate if self.critic_greedy is None else self.critic_greedy
        if self.critic_greedy and not separate:
            raise ValueError("--critic-greedy needs --advantage gae and --critic separate")
        self.critic_replay = (3 if separate else 0) if self.critic_replay is None else self.critic_replay
        if self.critic_labels and not separate:
            raise ValueError("--critic-labels needs --advantage gae and --critic separate (the policy must not see "
                             "the labels)")
        if self.critic_replay < 0:
            raise ValueError("--critic-replay must be >= 0")
        if self.advantage == "grpo" and self.samples < 2:
            raise ValueError("--advantage grpo compares samples of one prompt: --samples must be >= 2")
        self.kl_in = self.kl_in or ("loss" if self.advantage == "grpo" else "reward")
        self.loss_agg = self.loss_agg or ("sequence" if self.advantage == "grpo" else "token")
        if self.loss_agg not in AGGREGATIONS:
            raise ValueError(f"unknown loss aggregation {self.loss_agg!r} (sequence or token)")


# ---- the pieces, each checked on its own in tests/test_ppo.py ----

def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def sequence_mean(x, mask):
    """Each response's mean over its real tokens, then the mean over responses that have any: every response counts
    once however long (the release's GRPO loss; TRL's loss_type="grpo")."""
    lengths = mask.sum(1)
    return ((x * mask).sum(1) / lengths.clamp(min=1)).sum() / (lengths > 0).sum().clamp(min=1)


# aggregation -> (the mean of a loss term over a batch [R, T], the count that mean divides by)
AGGREGATIONS = {"token": (masked_mean, lambda mask: mask.sum()),
                "sequence": (sequence_mean, lambda mask: (mask.sum(1) > 0).sum())}


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


def gae(rewards, values, mask, gamma: float, lam):
    """Generalised advantage estimation over each row's real tokens (a prefix of the row); -> (A, R = A + V).
    `lam` is a number or one per row [R] (length-adaptive)."""
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


def outcome(scores, group_size: int, cfg: PPOConfig):
    """The reward GAE sees at a response's last token: its score, less its prompt's mean score with
    `--score-baseline group` (how hard a prompt is, a critic must read from the pages; how a response differs from
    its siblings, from the response)."""
    if cfg.score_baseline == "group":
        groups = scores.view(-1, group_size)
        return (groups - groups.mean(dim=1, keepdim=True)).flatten()
    return scores


def policy_loss(logp, old_logp, advantages, mask, clip: float, max_log_ratio: float = 20.0, mean=masked_mean):
    """Clipped surrogate; also the share of clipped tokens and approx-KL(old || new) for logging, each a `mean`."""
    log_ratio = (logp - old_logp).clamp(-max_log_ratio, max_log_ratio)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = mean((clipped > unclipped).float(), mask)
        approx_kl = mean(ratio - 1 - log_ratio, mask)
    return loss, clip_frac, approx_kl


def value_loss(values, old_values, returns, mask, clip: float, mean=masked_mean):
    """Clipped value loss: the new prediction may not profit from moving more than `clip` from the old one."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def explained_variance(values, returns, mask) -> float | None:
    """1 - Var(R - V) / Var(R): 1 is a perfect critic, 0 no better than a constant; None when the returns do not
    vary (nothing to explain: a ratio of two rounding errors)."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    err = returns - values
    var_e = masked_mean((err - masked_mean(err, mask)) ** 2, mask)
    return float(1 - var_e / var_r) if var_r > 1e-8 else None


def last_token(mask):
    """Each row's last real token (where its return is already decided), as a mask like `mask`."""
    lengths = mask.sum(1, keepdim=True)
    return mask.bool() & (mask.cumsum(1) == lengths) & (lengths > 0)


def spread(scores, reduce=None) -> float:
    """The standard deviation of the scores over the whole global rollout (every rank's, with `reduce`)."""
    reduce = reduce or (lambda v: v)
    count = max(1.0, reduce(float(scores.numel())))
    mean = reduce(float(scores.sum())) / count
    return (reduce(float(((scores - mean) ** 2).sum())) / count) ** 0.5


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
    prompt_marks: torch.Tensor = None  # [P, L, 2] the critic's PageMarks labels (--critic-labels/greedy), or None
    marks: torch.Tensor = None  # [R, T, 2] the same on the response tokens

    @property
    def tokens(self):
        return self.input_ids[:, self.prompt_len:]

    def page_labels(self, model: Qwen2VL, rows, cols: slice | None = None, prompt: bool = False):
        """The PageMarks labels of `rows` (prompt rows when `prompt`; columns `cols`) for `model`'s forward, or None:
        only a critic built with --critic-labels or --critic-greedy reads them."""
        if getattr(model, "page_marks", None) is None or self.marks is None:
            return None
        return (self.prompt_marks if prompt else self.marks)[rows][:, cols or slice(None)].to(model.device)

    def inputs(self, rows):
        """Model inputs for a subset of rows (features and grids gathered per row's prompt)."""
        prompts = self.group[rows].tolist()
        return dict(input_ids=self.input_ids[rows], attention_mask=self.attention_mask[rows],
                    image_features=torch.cat([self.features[p] for p in prompts]),
                    image_grid_thw=torch.cat([self.grids[p] for p in prompts]))


@torch.no_grad()
def encode_pages(model: Qwen2VL, batch: dict) -> tuple[list, list]:
    """Vision features and image_grid_thw rows of a prompt batch, split per prompt (`images_per_row`)."""
    grid = batch["image_grid_thw"]
    features = model.visual(batch["pixel_values"].to(model.device), grid)
    per_row = batch["images_per_row"].tolist()
    tokens_per_row = (grid.prod(-1) // model.config.vision.spatial_merge_size ** 2).split(per_row)
    return list(features.split([int(t.sum()) for t in tokens_per_row])), list(grid.split(per_row))


def response_forward(model: Qwen2VL, exp: Experience, rows, logprobs=True, values=False, forward=None,
                     entropy: str | None = None):
    """(log pi(a_t), entropy_t, V_t) for the response tokens of `rows`; None for what is not asked.
    `entropy` is "grad" (a loss term), "detached" (logged only: no graph, no backward through a [rows, T, vocab]
    product) or None.

    V comes from `model.value_head`. `forward` is the module to run (a DDP wrapper; the model itself by default).
    When one forward gives both log-probs and values (the value head on the policy's own trunk, `--critic shared`),
    the value loss trains the head only, never the trunk: its gradient there drives the policy's entropy and KL up
    long before the critic predicts anything (bench/README.md). A separate critic model is trained whole.
    """
    device = model.device
    run = forward or model
    # Only the columns some row of `rows` uses: rollouts are padded to their longest prompt and longest response.
    T_all = exp.mask.shape[1]
    T = max(1, int(exp.mask[rows].sum(1).max()))
    first = int(exp.prompt_mask[exp.group[rows]].any(0).int().argmax())
    L = exp.prompt_len - first
    if model.model.gradient_checkpointing and model.training:  # checkpointed layers cannot fill a shared cache
        inputs = exp.inputs(rows)
        cols = slice(first, exp.prompt_len + T)
        labels = None
        if (marks := exp.page_labels(model, rows)) is not None:
            labels = torch.cat([exp.page_labels(model, exp.group[rows], prompt=True), marks], 1)[:, cols]
        hidden = run(inputs["input_ids"][:, cols].to(device), inputs["attention_mask"][:, cols].to(device),
                     image_features=inputs["image_features"].to(device), image_grid_thw=inputs["image_grid_thw"],
                     logits=False, page_labels=labels).hidden_states
        h = hidden[:, L - 1:L + T - 1]  # the states that predict response tokens 0..T-1
    else:
        h = shared_prompt_states(model, run, exp, rows, first, T)
    pad = lambda x: torch.nn.functional.pad(x, (0, T_all - T))  # noqa: E731 (zeros past every row's last token)
    v = pad(model.value_head(h.detach() if logprobs else h).float()) if values else None
    if not logprobs:
        return None, None, v
    logits = model.lm_head(h).float()
    all_logp = logits.log_softmax(-1)
    logp = all_logp.gather(-1, exp.tokens[rows][:, :T].to(device)[..., None])[..., 0]
    if entropy is None:
        return pad(logp), None, v
    with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
        p_logp = all_logp if entropy == "grad" else all_logp.detach()
        ent = pad(-(p_logp.exp() * p_logp).sum(-1))
    return pad(logp), ent, v


def shared_prompt_states(model: Qwen2VL, run, exp: Experience, rows, first: int, T: int) -> torch.Tensor:
    """The hidden states that predict response tokens 0..T-1 of `rows` [R, T, hidden], each prompt run once from
    column `first` (the left padding no prompt of `rows` uses is skipped).

    A group's responses share their prompt (most of each sequence: ~300 of ~400 tokens in the demo), so the prompts
    of `rows` are run once each into a KV cache, and the responses then run on top of their prompt's keys and
    values, exactly as the sampler decoded them. Gradients flow through the cache into the prompt's layers; this is
    several times faster than repeating the prompt in every row (bench/README.md).
    """
    device = model.device
    L = exp.prompt_len - first
    prompts, local = exp.group[rows].unique(return_inverse=True)  # local: each row's prompt among `prompts`
    ids, mask = exp.prompt_ids[prompts, first:].to(device), exp.prompt_mask[prompts, first:].to(device)
    grid = torch.cat([exp.grids[p] for p in prompts.tolist()])
    features = torch.cat([exp.features[p] for p in prompts.tolist()]).to(device)
    positions, deltas = model.rope_positions(ids, mask, grid)
    cache = KVCache(model.config.text, len(prompts), L + T - 1, model.dtype, device)
    labels = exp.page_labels(model, prompts, slice(first, None), prompt=True)
    prompt_h = run(ids, mask, image_features=features, image_grid_thw=grid, position_ids=positions, cache=cache,
                   logits=False, page_labels=labels).hidden_states
    local = local.to(device)
    last_prompt_state = prompt_h[local, -1:]  # predicts response token 0
    if T == 1:
        return last_prompt_state
    cache = cache.select(local)  # each row reads its own prompt's keys and values
    keys = torch.cat([mask[local], exp.mask[rows][:, :T - 1].to(device, mask.dtype)], 1)
    start = (mask.sum(1) + deltas)[local]  # M-RoPE position of response token 0, as in the sampler
    positions = (start[:, None] + torch.arange(T - 1, device=device)).expand(3, -1, -1)
    response_h = run(exp.tokens[rows][:, :T - 1].to(device), keys, position_ids=positions, cache=cache,
                     logits=False, page_labels=exp.page_labels(model, rows, slice(0, T - 1))).hidden_states
    return torch.cat([last_prompt_state, response_h], 1)


def chunks(rows: torch.Tensor, size: int):
    return [rows[i:i + size] for i in range(0, len(rows), size)]


@torch.no_grad()
def make_experience(policy: Qwen2VL, prompt_batch: dict, pages: tuple[list, list], rollout: Rollout,
                    scores: torch.Tensor, group_size: int, cfg: PPOConfig, kl_coef: float,
                    critic: Qwen2VL | None = None, reference: Qwen2VL | None = None, reduce=None,
                    relevant: list[set] | None = None, greedy: torch.Tensor | None = None) -> Experience:
    """Old log-probs, reference log-probs, values, per-token rewards and advantages for one rollout.

    `pages` is `encode_pages(policy, prompt_batch)` (the vision tower is frozen in PPO, so the sampler and every
    forward here share it). `reference=None` means the policy with its LoRA adapters off; values come from
    `(critic or policy).value_head`. Scores are per row (row i answers prompt i // group_size). `reduce` sums a
    number over torchrun ranks, so advantages are whitened over the whole global rollout. What a critic with
    `page_marks` is told: `relevant`, each prompt's relevant page ids (--critic-labels), and `greedy`, the fused
    reward of the policy's greedy response to each prompt (--critic-greedy).
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
    if (marks := getattr(critic, "page_marks", None)) is not None:
        prompt_labels, labels = torch.full(exp.prompt_ids.shape, -1), torch.full(exp.tokens.shape, -1)
        if cfg.critic_labels:
            if relevant is None:
                raise ValueError("a critic told the labels (--critic-labels) needs each prompt's relevant pages")
            counts = [len(g) for g in grids]  # each prompt's number of pages
            prompt_labels = marks.labels(exp.prompt_ids, relevant, counts, prompt=True)
            labels = marks.labels(exp.tokens, [relevant[g] for g in group], [counts[g] for g in group], prompt=False)
        bins = None
        if marks.greedy is not None:
            if greedy is None:
                raise ValueError("a critic told the greedy score (--critic-greedy) needs each prompt's greedy reward")
            bins = marks.bins(greedy, cfg.w_rerank + cfg.w_format + cfg.w_think)
        exp.prompt_marks = marks.with_bins(prompt_labels, bins)
        exp.marks = marks.with_bins(labels, None if bins is None else bins[group])
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
    if cfg.advantage in ("gae", "reinforce"):
        rewards = torch.zeros_like(exp.old_logp)
        if cfg.kl_in == "reward":  # r_t = -beta * k1_t at every token ...
            rewards -= kl_coef * kl_estimate(exp.old_logp, exp.ref_logp, "k1", cfg.max_log_ratio) * m
        last = (mask.sum(1) - 1).clamp(min=0)  # ... + the sequence's score at its last real token
        rewards[torch.arange(R), last] += outcome(exp.scores, group_size, cfg) * mask.any(1)
        exp.old_values *= m
        if gae_mode:  # Decoupled GAE (VC-PPO): the policy's lambda for advantages, lam_critic for value targets.
            lam = (1 - 1 / (cfg.lam_alpha * mask.sum(1).clamp(min=1))).clamp(0, 1) if cfg.lam_alpha > 0 else cfg.lam
            advantages, _ = gae(rewards, exp.old_values, m, cfg.gamma, lam)
            if cfg.prompt_baseline == "batch":  # + V(s_0) - mean V(s_0): the whitening below takes the mean off
                advantages += exp.old_values[:, :1] * m
            exp.returns = gae(rewards, exp.old_values, m, cfg.gamma, cfg.lam_critic)[1]
        else:  # REINFORCE++: the return-to-go itself (V = 0, lam = 1); whitening below is its batch baseline.
            advantages = gae(rewards, torch.zeros_like(rewards), m, cfg.gamma, 1.0)[0]
            exp.returns = torch.zeros_like(m)
        # Equal returns everywhere carry no signal: whitening would turn the critic's noise into unit-scale updates.
        equal = spread(rewards.sum(1), reduce) < 1e-6
        exp.advantages = torch.zeros_like(advantages) if equal else masked_whiten(advantages, m, reduce)
    elif cfg.advantage == "grpo":
        exp.advantages = group_advantages(exp.scores, group_size)[:, None] * m
        exp.returns = torch.zeros_like(m)
    else:
        raise ValueError(f"unknown advantage estimator {cfg.advantage!r} (gae, grpo or reinforce)")
    return exp


def micro_batch_loss(policy: Qwen2VL, exp: Experience, rows, cfg: PPOConfig, kl_coef: float, stats: dict,
                     critic: Qwen2VL | None = None, value_only: bool = False, forwards: dict | None = None):
    """The objective of the module docstring on one micro-batch, each term a `cfg.loss_agg` mean over its rows
    (appended to `stats`). `value_only` leaves the policy's terms out."""
    forwards = forwards or {}
    device = policy.device
    mean = AGGREGATIONS[cfg.loss_agg][0]
    m = exp.mask[rows].to(device).float()
    gae_mode = cfg.advantage == "gae"
    if not value_only or critic is None:  # a separate critic pretrains without the policy's forward
        logp, entropy, values = response_forward(policy, exp, rows, values=gae_mode and critic is None,
                                                 forward=forwards.get("policy"),
                                                 entropy="grad" if cfg.entropy_coef else "detached")
    loss = torch.zeros((), device=device)
    if gae_mode:
        if critic is not None:
            values = response_forward(critic, exp, rows, logprobs=False, values=True,
                                      forward=forwards.get("critic"))[2]
        v_loss = value_loss(values, exp.old_values[rows].to(device), exp.returns[rows].to(device), m,
                            cfg.value_clip, mean)
        loss = loss + cfg.vf_coef * v_loss
        stats["value_loss"].append(v_loss.item())
    if not value_only:
        pg_loss, clip_frac, approx_kl = policy_loss(logp, exp.old_logp[rows].to(device),
                                                    exp.advantages[rows].to(device), m, cfg.clip,
                                                    cfg.max_log_ratio, mean)
        ent = mean(entropy, m)
        loss = loss + pg_loss - cfg.entropy_coef * ent
        if cfg.kl_in == "loss":
            kl = mean(kl_estimate(logp, exp.ref_logp[rows].to(device), "k3", cfg.max_log_ratio), m)
            loss = loss + kl_coef * kl
            stats["kl_loss"].append(kl.item())
        stats["policy_loss"].append(pg_loss.item())
        stats["entropy"].append(ent.item())
        stats["clip_frac"].append(clip_frac.item())
        stats["approx_kl"].append(approx_kl.item())
    return loss


def backward(loss: torch.Tensor, forwards: dict, sync: bool):
    """loss.backward(); unless `sync`, DDP's gradient all-reduce is held back (one per optimizer step, on its last
    micro-batch)."""
    with contextlib.ExitStack() as stack:
        for name in ("policy", "critic"):
            if not sync and hasattr(forwards.get(name), "no_sync"):
                stack.enter_context(forwards[name].no_sync())
        loss.backward()


def ppo_update(policy: Qwen2VL, exp: Experience, optimizer: torch.optim.Optimizer, params: list, cfg: PPOConfig,
               kl_coef: float, critic: Qwen2VL | None = None, value_only: bool = False,
               generator: torch.Generator | None = None, forwards: dict | None = None, reduce=None,
               world: int = 1) -> dict:
    """`cfg.epochs` passes over the rollout in shuffled minibatches; one optimizer step per minibatch.

    `value_only` trains just the critic (value pretraining; a separate critic then runs without the policy's
    forward). A minibatch whose loss or gradient is not finite is skipped (no step) and counted in `skipped`.
    Under torchrun each rank passes its share of the rollout, its DDP/FSDP `forwards` ({"policy": ..., "critic":
    ...}), `reduce` (sum over ranks) and `world`: an optimizer step then covers the union of every rank's
    minibatch, each term aggregated (`cfg.loss_agg`) over all of them: every micro-batch's mean is weighted by its
    share of the global minibatch's tokens or responses.
    """
    reduce = reduce or (lambda x: x)
    forwards = forwards or {}
    count = AGGREGATIONS[cfg.loss_agg][1]
    stats = {k: [] for k in ("loss", "policy_loss", "value_loss", "entropy", "clip_frac", "approx_kl", "kl_loss")}
    skipped = minibatches = 0
    for _ in range(cfg.epochs):
        # Shuffled whole groups, so a micro-batch runs each prompt once for all of its responses.
        groups = torch.randperm(int(exp.group.max()) + 1, generator=generator).tolist()
        order = torch.cat([(exp.group == g).nonzero()[:, 0] for g in groups])
        for minibatch in chunks(order, cfg.minibatch_size):
            minibatches += 1
            n_units = max(1.0, reduce(float(count(exp.mask[minibatch].float()))))
            finite, total = True, 0.0
            micro = chunks(minibatch, cfg.micro_batch_size)
            for i, rows in enumerate(micro):
                loss = micro_batch_loss(policy, exp, rows, cfg, kl_coef, stats, critic, value_only, forwards)
                if reduce(float(not torch.isfinite(loss))) > 0:  # every rank skips together
                    finite = False
                    break
                # This micro-batch's share of the global minibatch; DDP/FSDP average gradients over ranks: * world.
                weighted = loss * (count(exp.mask[rows].to(loss.device).float()) / n_units * world)
                backward(weighted, forwards, sync=i == len(micro) - 1)
                total += weighted.item()
            if finite:  # the whole objective of this optimizer step (every rank agrees on `finite`)
                stats["loss"].append(reduce(total) / world)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
            if finite and torch.isfinite(grad_norm):
                optimizer.step()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
    out = {k: sum(v) / len(v) for k, v in stats.items() if v}
    out["skipped"], out["minibatches"] = skipped, minibatches
    return out


def replay_critic(policy: Qwen2VL, buffer: list, optimizer: torch.optim.Optimizer, params: list, cfg: PPOConfig,
                  critic: Qwen2VL | None = None, generator: torch.Generator | None = None,
                  forwards: dict | None = None, reduce=None, world: int = 1) -> dict:
    """`--critic-replay`: one value-only pass over each earlier rollout in `buffer` (oldest first). Its returns are
    the Monte-Carlo ones it was sampled with (lam_critic 1); its old values are refreshed first, so the value clip
    bounds each step around what the critic predicts now, not what it predicted then."""
    model = critic or policy
    one_pass = replace(cfg, epochs=1)
    losses = []
    for exp in buffer:
        model.eval()
        with torch.no_grad():
            exp.old_values = torch.cat([response_forward(model, exp, rows, logprobs=False, values=True)[2].cpu()
                                        for rows in chunks(torch.arange(len(exp.group)), cfg.micro_batch_size)])
            exp.old_values *= exp.mask
        model.train()
        stats = ppo_update(policy, exp, optimizer, params, one_pass, 0.0, critic, value_only=True,
                           generator=generator, forwards=forwards, reduce=reduce, world=world)
        losses.append(stats["value_loss"])
    return {"replay_value_loss": sum(losses) / len(losses)} if losses else {}


def buffer_tensors(buffer: list) -> dict[str, torch.Tensor]:
    """--critic-replay's rollouts as flat CPU tensors for a checkpoint, so a resumed run replays what the
    uninterrupted one would have: `{i}.{field}` (lists as `{i}.{field}.{prompt}`)."""
    out = {}
    for i, exp in enumerate(buffer):
        for f in fields(Experience):
            value = getattr(exp, f.name)
            if isinstance(value, list):
                out.update({f"{i}.{f.name}.{p}": t for p, t in enumerate(value)})
            elif value is not None:
                out[f"{i}.{f.name}"] = torch.as_tensor(value)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def buffer_from_tensors(tensors: dict[str, torch.Tensor], device) -> list:
    """The inverse of `buffer_tensors`; page features go to `device`, where `encode_pages` left them."""
    buffer = []
    while f"{len(buffer)}.prompt_len" in tensors:
        i = len(buffer)
        kw = {f.name: tensors.get(f"{i}.{f.name}") for f in fields(Experience)}
        kw["prompt_len"] = int(kw["prompt_len"])
        for name in ("features", "grids"):
            kw[name] = [tensors[f"{i}.{name}.{p}"] for p in range(len(kw["prompt_ids"]))]
        kw["features"] = [t.to(device) for t in kw["features"]]
        buffer.append(Experience(**kw))
    return buffer
