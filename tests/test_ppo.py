"""The PPO pieces against their definitions, one make_experience + ppo_update on a tiny model, and the GRPO loss
and gradient against TRL's GRPOTrainer."""
import contextlib
import dataclasses
import math
import types
from collections import defaultdict

import pytest
import torch
from conftest import page_images

from mmr5.lora import add_lora
from mmr5.model import Qwen2VL
from mmr5.critic import PageMarks, ValueHead
from mmr5.ppo import (AdaptiveKL, Experience, PPOConfig, buffer_from_tensors, buffer_tensors, encode_pages,
                      explained_variance, gae, group_advantages, kl_estimate, last_token, make_experience, masked_mean,
                      masked_whiten, outcome, policy_loss, ppo_update, replay_critic, response_forward, sequence_mean,
                      value_loss)
from mmr5.processor import Processor
from mmr5.sampler import generate
from mmr5.weights import canonical_key


def random_masks(R, T, g):
    lengths = torch.randint(1, T + 1, (R,), generator=g)
    return torch.arange(T)[None] < lengths[:, None]


def test_gae_against_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    R, T, gamma, lam = 5, 9, 0.99, 0.9
    rewards, values = torch.randn(R, T, generator=g), torch.randn(R, T, generator=g)
    mask = random_masks(R, T, g)
    adv, ret = gae(rewards, values * mask, mask.float(), gamma, lam)
    for i in range(R):
        n = int(mask[i].sum())
        expected = [0.0] * n
        for t in range(n):  # A_t = sum_k (gamma lam)^k delta_{t+k}, the episode ending after token n-1
            total = 0.0
            for k in range(t, n):
                v_next = values[i, k + 1].item() if k + 1 < n else 0.0
                delta = rewards[i, k].item() + gamma * v_next - values[i, k].item()
                total += (gamma * lam) ** (k - t) * delta
            expected[t] = total
        assert torch.allclose(adv[i, :n], torch.tensor(expected), atol=1e-5)
        assert (adv[i, n:] == 0).all() and (ret[i, n:] == 0).all()
        assert torch.allclose(ret[i, :n], adv[i, :n] + values[i, :n], atol=1e-6)


def test_kl_estimators_match_their_definitions():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.25, 0.25, 0.5])
    logp, logq = p.log(), q.log()
    r = q / p  # the estimators are functions of q(x)/p(x) at samples x ~ p
    assert torch.allclose(kl_estimate(logp, logq, "k1"), -r.log())
    assert torch.allclose(kl_estimate(logp, logq, "k2"), 0.5 * r.log() ** 2)
    assert torch.allclose(kl_estimate(logp, logq, "k3"), (r - 1) - r.log())
    true_kl = (p * (logp - logq)).sum()
    for kind in ("k1", "k3"):  # unbiased: the expectation under p is the KL
        assert torch.allclose((p * kl_estimate(logp, logq, kind)).sum(), true_kl, atol=1e-6)
    extreme = kl_estimate(torch.tensor([0.0]), torch.tensor([-1e4]), "k3")
    assert torch.isfinite(extreme).all()  # the clamp keeps exp() finite


def test_policy_loss_hand_computed():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))  # ratios 1.5, 0.5, 1.0 (old logp = 0)
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    loss, clip_frac, _ = policy_loss(logp, old, adv, mask, clip=0.2)
    # token 1: max(-1.5, -1.2) = -1.2; token 2: max(-0.5, -0.8) = -0.5; token 3: max(2, 2) = 2
    assert math.isclose(loss.item(), (-1.2 - 0.5 + 2.0) / 3, rel_tol=1e-6)
    assert math.isclose(clip_frac.item(), 1 / 3, rel_tol=1e-6)


def test_gradient_is_zero_when_clipped_outward():
    logp = torch.log(torch.tensor([[1.5, 0.5]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0]])  # ratio 1.5 > 1.2 with A > 0; ratio 0.5 < 0.8 with A < 0: both clipped
    loss, _, _ = policy_loss(logp, torch.zeros(1, 2), adv, torch.ones(1, 2), clip=0.2)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(1, 2))
    logp2 = torch.log(torch.tensor([[1.5]])).requires_grad_(True)  # same ratio, A < 0 pulls it back: not clipped
    policy_loss(logp2, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1), clip=0.2)[0].backward()
    assert logp2.grad.item() == pytest.approx(1.5)


def test_value_loss_hand_computed():
    values, old, returns = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 1.0]])
    # token 1: unclipped (2-3)^2 = 1, clipped (1.2-3)^2 = 3.24 -> 3.24; token 2: 1 and 1
    loss = value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    assert math.isclose(loss.item(), 0.5 * (3.24 + 1.0) / 2, rel_tol=1e-6)


def test_group_advantages_and_whitening():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(scores, 4)
    std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std()  # unbiased, as TRL's GRPO
    assert torch.allclose(adv[:4], (torch.tensor([1.0, 0, 0, 0]) - 0.25) / (std + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))  # identical scores: no signal, not NaN
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    w = masked_whiten(x, m)
    assert w[m.bool()].mean().abs() < 1e-6 and w[~m.bool()].abs().max() == 0
    assert explained_variance(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]]), torch.ones(1, 2)) == 1.0


def test_adaptive_kl_moves_toward_target():
    ctl = AdaptiveKL(0.1, target=6.0, horizon=100)
    ctl.update(12.0, 10)  # too much KL: beta grows by at most 20% * 10/100
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(0.0, 10)
    assert ctl.value < 0.1 * 1.02
    fixed = AdaptiveKL(0.1, target=None, horizon=100)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1


@pytest.fixture(scope="module")
def rollout_setup(tiny_model_dirs):
    path = tiny_model_dirs["qwen2_5_vl"]
    model, proc = Qwen2VL.from_pretrained(path), Processor.from_pretrained(path)
    batch = proc.rerank_inputs(["red circle", "blue square"], [page_images(3), page_images(2, seed=4)])
    pages = encode_pages(model, batch)
    rollout = generate(model, proc, batch, max_new_tokens=12, n=2, generator=torch.Generator().manual_seed(0),
                       image_features=torch.cat(pages[0]))
    return model, path, batch, pages, rollout


def test_value_head_reads_the_response_positions(rollout_setup):
    model, _, batch, pages, rollout = rollout_setup
    model.value_head = head = ValueHead(model.config.text.hidden_size)
    torch.nn.init.normal_(head.linear.weight, std=0.1)
    exp = make_experience(model, batch, pages, rollout, torch.tensor([1.0, 0.0, 0.5, 0.2]), 2, PPOConfig(), 0.1,
                          reference=model)
    with torch.no_grad():
        hidden = model(exp.input_ids, exp.attention_mask, image_features=torch.cat([pages[0][g] for g in exp.group]),
                       image_grid_thw=torch.cat([pages[1][g] for g in exp.group])).hidden_states
        L = exp.prompt_len
        for t in range(exp.mask.shape[1]):
            expected = head(hidden[:, L - 1 + t]) * exp.mask[:, t]  # the state before token t: after the prompt
            assert torch.allclose(exp.old_values[:, t], expected, atol=1e-5)
        logp, _, _ = response_forward(model, exp, torch.arange(4))
        T = exp.mask.shape[1]  # the log-probs of one forward over prompt + response, no cache shared
        expected = model.lm_head(hidden[:, L - 1:L - 1 + T]).float().log_softmax(-1)
        expected = expected.gather(-1, exp.tokens[..., None])[..., 0]
    assert torch.allclose(logp * exp.mask, expected * exp.mask, atol=1e-4)
    assert torch.equal(exp.ref_logp * exp.mask, exp.old_logp * exp.mask)  # reference == policy here: KL 0


def policy_off_its_reference(path):
    """A fresh copy of the tiny model with perturbed LoRA adapters: the policy now differs from its reference (the
    base, adapters off), so the KL terms are not zero. Fresh, so the adapters do not leak into other tests."""
    model = Qwen2VL.from_pretrained(path)
    add_lora(model, rank=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_rewards_sit_on_the_last_token_and_kl_enters(rollout_setup):
    model, path, batch, pages, rollout = rollout_setup
    scores = torch.tensor([1.0, 0.0, 0.5, 0.2])
    cfg = PPOConfig(gamma=1.0, lam=1.0)
    model.value_head = ValueHead(64)
    torch.nn.init.zeros_(model.value_head.linear.weight)
    exp = make_experience(model, batch, pages, rollout, scores, 2, cfg, 0.0, reference=model)
    m = exp.mask.float()
    # V = 0, gamma = lam = 1, no KL: every token's return is the sequence's score
    assert torch.allclose(exp.returns, scores[:, None] * m)
    model = policy_off_its_reference(path)
    model.value_head = ValueHead(64)
    exp = make_experience(model, batch, pages, rollout, scores, 2, cfg, 0.5)
    k1 = (exp.old_logp - exp.ref_logp) * m
    assert k1.abs().sum() > 0
    expected = (scores[:, None] - 0.5 * (k1.flip(1).cumsum(1).flip(1))) * m  # reward-to-go of -beta*k1 + score
    assert torch.allclose(exp.returns, expected, atol=1e-4)


def test_reinforce_advantages_are_the_whitened_return_to_go(rollout_setup):
    """--advantage reinforce: no critic (the model has no value head), A_t = the batch-whitened return-to-go of the
    score and the per-token -beta * k1."""
    _, path, batch, pages, rollout = rollout_setup
    scores = torch.tensor([1.0, 0.0, 0.5, 0.2])
    model = policy_off_its_reference(path)
    cfg = PPOConfig(advantage="reinforce", lam=0.5)  # lam is the critic's business: not used here
    assert (cfg.kl_in, cfg.loss_agg) == ("reward", "token")
    exp = make_experience(model, batch, pages, rollout, scores, 2, cfg, 0.5)
    m = exp.mask.float()
    k1 = (exp.old_logp - exp.ref_logp) * m
    assert k1.abs().sum() > 0
    to_go = (scores[:, None] - 0.5 * (k1.flip(1).cumsum(1).flip(1))) * m
    assert torch.allclose(exp.advantages, masked_whiten(to_go, m), atol=1e-4)
    assert not exp.returns.any() and not exp.old_values.any()


def test_group_score_baseline_and_value_start(rollout_setup):
    """--score-baseline group: GAE's last-token reward is the score less its prompt's mean; start_at puts V there."""
    model, path, batch, pages, rollout = rollout_setup
    scores = torch.tensor([1.0, 0.0, 0.5, 0.2])
    cfg = PPOConfig(gamma=1.0, lam=1.0, score_baseline="group")
    model.value_head = ValueHead(64)
    torch.nn.init.zeros_(model.value_head.linear.weight)
    exp = make_experience(model, batch, pages, rollout, scores, 2, cfg, 0.0, reference=model)
    assert torch.allclose(exp.returns, torch.tensor([0.5, -0.5, 0.15, -0.15])[:, None] * exp.mask.float())
    assert torch.equal(outcome(scores, 2, PPOConfig()), scores)
    head = ValueHead(64)
    head.start_at(1.37)
    v = head(torch.randn(3, 5, 64))
    assert torch.allclose(v, torch.full_like(v, 1.37), atol=1e-3) and v.std() > 0  # at the mean, still not flat
    assert head.linear.weight.abs().max() > 0


def test_batch_prompt_baseline_moves_each_prompt_by_its_value_against_the_batch(rollout_setup):
    """--prompt-baseline batch: A_t = G_t - V(s_t) + V(s_0) - mean V(s_0) (lam 1), then whitened; the critic's own
    targets do not change."""
    model, path, batch, pages, rollout = rollout_setup
    torch.manual_seed(0)  # both prompts end in the same template tokens: a large head tells their V(s_0) apart
    model = policy_off_its_reference(path)
    model.value_head = ValueHead(64)
    torch.nn.init.normal_(model.value_head.linear.weight, std=5.0)
    scores = torch.tensor([1.0, 0.0, 0.5, 0.2])
    exps = {b: make_experience(model, batch, pages, rollout, scores, 2, PPOConfig(lam=1.0, prompt_baseline=b), 0.1)
            for b in ("critic", "batch")}
    m = exps["critic"].mask.float()
    values, returns = exps["critic"].old_values, exps["critic"].returns
    assert torch.equal(returns, exps["batch"].returns) and (values[0, 0] - values[2, 0]).abs() > 0.05
    assert torch.allclose(exps["critic"].advantages, masked_whiten(returns - values, m), atol=1e-5)
    shift = (values[:, 0] - values[:, 0].mean())[:, None] * m
    assert torch.allclose(exps["batch"].advantages, masked_whiten(returns - values + shift, m), atol=1e-5)


def test_ppo_update_moves_toward_advantage_and_guards_nan(rollout_setup):
    _, path, batch, pages, rollout = rollout_setup
    model = Qwen2VL.from_pretrained(path)
    add_lora(model, rank=4, alpha=8)
    model.value_head = ValueHead(64)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0])
    for advantage in ("gae", "grpo", "reinforce"):
        cfg = PPOConfig(advantage=advantage, epochs=3, minibatch_size=2, micro_batch_size=1)
        exp = make_experience(model, batch, pages, rollout, scores, 2, cfg, 0.01)
        stats = ppo_update(model, exp, opt, params, cfg, 0.01, generator=torch.Generator().manual_seed(0))
        assert stats["skipped"] == 0 and math.isfinite(stats["policy_loss"])
        with torch.no_grad():
            logp = response_forward(model, exp, torch.arange(4))[0]
        gain = ((logp - exp.old_logp) * exp.mask).sum(1)
        assert gain[0] > gain[1] and gain[2] > gain[3]  # rewarded samples became more likely than their siblings
    exp.advantages[0, 0] = float("nan")
    before = [p.detach().clone() for p in params]
    stats = ppo_update(model, exp, opt, params, PPOConfig(advantage="grpo", epochs=1, minibatch_size=4), 0.0)
    assert stats["skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, params))


def fresh_model_with_value_head(rollout_setup):
    """A fresh copy of the tiny model with a random value head, and its experience of the fixture's rollout."""
    _, path, batch, pages, rollout = rollout_setup
    model = Qwen2VL.from_pretrained(path)
    model.value_head = ValueHead(64)
    torch.nn.init.normal_(model.value_head.linear.weight, std=0.1)
    exp = make_experience(model, batch, pages, rollout, torch.tensor([1.0, 0.0, 0.5, 0.2]), 2, PPOConfig(), 0.0,
                          reference=model)
    return model, exp


def test_shared_value_head_does_not_train_the_policy_trunk(rollout_setup):
    """With the value head on the policy's trunk the value loss reaches the head only (its gradient there would move
    the policy); a separate critic model is trained whole."""
    model, exp = fresh_model_with_value_head(rollout_setup)
    m = exp.mask.float()
    _, _, values = response_forward(model, exp, torch.arange(4), values=True)  # shared: one forward, both outputs
    value_loss(values, exp.old_values, exp.returns + 1.0, m, clip=10.0).backward()
    assert model.value_head.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("value_head."))
    model.zero_grad(set_to_none=True)
    _, _, values = response_forward(model, exp, torch.arange(4), logprobs=False, values=True)  # a separate critic
    value_loss(values, exp.old_values, exp.returns + 1.0, m, clip=10.0).backward()
    assert model.model.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0


def policy_and_critic(path, lr: float):
    """A fresh policy, a separate critic with a value head, and one AdamW over both (seeded)."""
    torch.manual_seed(0)
    policy, critic = Qwen2VL.from_pretrained(path), Qwen2VL.from_pretrained(path)
    critic.value_head = ValueHead(64)
    params = [p for m in (policy, critic) for p in m.parameters() if p.requires_grad]
    return policy, critic, params, torch.optim.AdamW(params, lr=lr)


def test_value_pretraining_runs_no_policy_forward_with_a_separate_critic(rollout_setup):
    """value_only with a separate critic: the critic trains, the policy is neither run nor moved."""
    _, path, batch, pages, rollout = rollout_setup
    policy, critic, params, opt = policy_and_critic(path, lr=1e-3)
    cfg = PPOConfig(epochs=2, minibatch_size=2, micro_batch_size=2)
    exp = make_experience(policy, batch, pages, rollout, torch.tensor([1.0, 0.0, 0.5, 0.2]), 2, cfg, 0.0,
                          critic=critic, reference=policy)
    before = {n: p.detach().clone() for m in (policy, critic) for n, p in m.named_parameters()}
    calls = []
    policy.register_forward_hook(lambda *_: calls.append(1))
    stats = ppo_update(policy, exp, opt, params, cfg, 0.0, critic=critic, value_only=True)
    assert stats["minibatches"] == 4 and "policy_loss" not in stats and not calls
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())
    assert not torch.equal(critic.model.layers[0].mlp.down_proj.weight, before["model.layers.0.mlp.down_proj.weight"])


def test_critic_replay_trains_the_critic_on_earlier_rollouts(rollout_setup):
    """--critic-replay: value-only passes over earlier rollouts move the critic toward their returns, clipped around
    what it predicts now (values refreshed before each rollout's pass); the policy is neither run nor moved."""
    _, path, batch, pages, rollout = rollout_setup
    policy, critic, params, opt = policy_and_critic(path, lr=3e-3)
    cfg = PPOConfig(epochs=3, minibatch_size=2, micro_batch_size=1, critic_replay=2)
    exps = [make_experience(policy, batch, pages, rollout, torch.tensor(s), 2, cfg, 0.0, critic=critic,
                            reference=policy) for s in ([1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 0.2, 0.5])]
    stale = [e.old_values.clone() for e in exps]
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    calls = []
    policy.register_forward_hook(lambda *_: calls.append(1))
    stats = replay_critic(policy, exps, opt, params, cfg, critic, torch.Generator().manual_seed(0))
    assert math.isfinite(stats["replay_value_loss"]) and not calls
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())
    assert torch.allclose(exps[0].old_values, stale[0], atol=1e-6)  # refreshed before the critic moved
    assert not torch.allclose(exps[1].old_values, stale[1], atol=1e-4)  # refreshed after the pass over exps[0]

    def error(exp):
        with torch.no_grad():
            v = response_forward(critic, exp, torch.arange(4), logprobs=False, values=True)[2]
        return float(((v - exp.returns) ** 2 * exp.mask).sum())
    start = error(exps[0])
    for _ in range(10):
        replay_critic(policy, exps[:1], opt, params, cfg, critic)
    assert error(exps[0]) < 0.2 * start
    assert replay_critic(policy, [], opt, params, cfg, critic) == {}
    with pytest.raises(ValueError, match="critic-replay"):
        PPOConfig(critic_replay=-1)


def test_replay_buffer_survives_a_checkpoint_bit_for_bit(rollout_setup):
    """--critic-replay's rollouts go into checkpoints as flat tensors and come back exactly, dtypes and all."""
    _, path, batch, pages, rollout = rollout_setup
    policy, critic, params, opt = policy_and_critic(path, lr=3e-3)
    cfg = PPOConfig(epochs=1, minibatch_size=2, micro_batch_size=1)
    exps = [make_experience(policy, batch, pages, rollout, torch.tensor(s), 2, cfg, 0.0, critic=critic,
                            reference=policy) for s in ([1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 0.2, 0.5])]
    tensors = buffer_tensors(exps)
    assert all(t.device.type == "cpu" for t in tensors.values())
    restored = buffer_from_tensors(tensors, policy.device)
    assert len(restored) == 2 and buffer_from_tensors({}, policy.device) == []
    for a, b in zip(exps, restored):
        for f in dataclasses.fields(Experience):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if isinstance(x, list):
                assert len(x) == len(y) and all(torch.equal(u, v) and u.dtype == v.dtype for u, v in zip(x, y))
            elif isinstance(x, torch.Tensor):
                assert torch.equal(x, y) and x.dtype == y.dtype, f.name
            else:
                assert x == y, f.name


def test_a_separate_critic_is_told_the_labels_and_the_greedy_reward_and_replays_by_default():
    """The settings that made the demo's critic learn (bench/README.md) are what `--advantage gae` gives; they have
    no meaning without a separate critic, where labels would reach the policy."""
    assert (PPOConfig().critic_labels, PPOConfig().critic_replay) == (True, 3)
    for kw in ({"critic": "shared"}, {"advantage": "grpo"}, {"advantage": "reinforce"}):
        assert (PPOConfig(**kw).critic_labels, PPOConfig(**kw).critic_replay) == (False, 0)
    assert PPOConfig(critic_labels=False, critic_replay=0).critic_labels is False
    assert PPOConfig(critic="shared", critic_replay=2).critic_replay == 2
    with pytest.raises(ValueError, match="critic-labels"):
        PPOConfig(critic="shared", critic_labels=True)
    assert PPOConfig().critic_greedy and not PPOConfig(critic_greedy=False).critic_greedy
    for kw in ({"critic": "shared"}, {"advantage": "grpo"}, {"advantage": "reinforce"}):
        assert PPOConfig(**kw).critic_greedy is False
        with pytest.raises(ValueError, match="critic-greedy"):
            PPOConfig(critic_greedy=True, **kw)


def test_forward_skips_the_padding_its_rows_do_not_use(rollout_setup):
    """A forward over some rows runs only the columns they use (their prompts' left padding and responses' tail that
    the rollout's longer rows needed): the same log-probs, entropies and values as over the whole rollout, zeros past
    each row's end, on both the shared-prompt path and the checkpointed one."""
    model, exp = fresh_model_with_value_head(rollout_setup)
    assert exp.prompt_mask[1].sum() < exp.prompt_mask[0].sum()  # prompt 1 (rows 2, 3) is left padded
    exp.mask[2, 5:] = 0
    exp.mask[3, 3:] = 0  # rows 2 and 3 now end well before the rollout's last column
    m = exp.mask.float()
    for checkpointing in (False, True):
        model.set_gradient_checkpointing(checkpointing)
        model.train(checkpointing)
        with torch.no_grad():
            whole = response_forward(model, exp, torch.arange(4), values=True, entropy="detached")
            part = response_forward(model, exp, torch.tensor([2, 3]), values=True, entropy="detached")
        for a, b in zip(whole, part):
            assert b.shape == (2, exp.mask.shape[1])
            torch.testing.assert_close(a[2:] * m[2:], b * m[2:], atol=1e-5, rtol=1e-5)
            assert torch.equal(b[:, 5:], torch.zeros_like(b[:, 5:]))


def test_shared_prompt_forward_matches_one_row_per_response(rollout_setup):
    """Each prompt run once with its responses on its KV cache == the prompt repeated in every row (the path taken
    under gradient checkpointing): same log-probs, values and gradients, for rows of one or both groups."""
    model, exp = fresh_model_with_value_head(rollout_setup)
    m = exp.mask.float()
    for rows in (torch.tensor([3, 0, 2]), torch.tensor([1]), torch.arange(4)):
        results = []
        for checkpointing in (False, True):
            model.set_gradient_checkpointing(checkpointing)
            model.train()
            logp, entropy, values = response_forward(model, exp, rows, values=True, entropy="grad")
            ((logp * m[rows]).sum() + (values * m[rows]).sum() + (entropy * m[rows]).sum()).backward()
            results.append((logp * m[rows], values * m[rows], {n: p.grad.clone() for n, p in model.named_parameters()
                                                                if p.grad is not None}))
            model.zero_grad(set_to_none=True)
        (logp_a, values_a, grads_a), (logp_b, values_b, grads_b) = results
        torch.testing.assert_close(logp_a, logp_b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values_a, values_b, atol=1e-5, rtol=1e-5)
        assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
        for name in grads_a:
            torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-4, rtol=1e-4, msg=name)


def test_sequence_mean_counts_every_response_once():
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert sequence_mean(x, m).item() == pytest.approx((1.0 + 4.0) / 2)  # the empty row neither adds nor counts
    assert masked_mean(x, m).item() == pytest.approx((4 * 1.0 + 4.0) / 5)
    assert PPOConfig(advantage="grpo").loss_agg == "sequence" and PPOConfig().loss_agg == "token"
    with pytest.raises(ValueError, match="loss aggregation"):
        PPOConfig(loss_agg="sum")


class GradientRecorder:
    """Stands in for the optimizer: keeps each step's gradient instead of applying it."""

    def __init__(self, named_params):
        self.named_params, self.steps = named_params, []

    def step(self):
        self.steps.append({n: p.grad.clone() for n, p in self.named_params if p.grad is not None})

    def zero_grad(self, set_to_none=True):
        for _, p in self.named_params:
            p.grad = None


BETA, EPSILON, SCORES = 0.04, 0.2, torch.tensor([1.0, 0.0, 0.5, 0.2])


def grpo_batch(rollout_setup):
    """One fixed GRPO batch in float64: the fixture's rollout cut to responses of different lengths (12 / 2 / 7 / 4
    tokens, so the two aggregations differ), old and reference log-probs moved off the policy's (ratios get clipped,
    the KL is not zero), and group advantages. -> (policy, its path, the experience, its prompt batch)."""
    _, path, batch, _, rollout = rollout_setup
    model = Qwen2VL.from_pretrained(path, dtype=torch.float64)
    T = rollout.mask.shape[1]
    lengths = torch.tensor([T, 2, 7, 4]).clamp(max=T)
    rollout = dataclasses.replace(rollout, mask=rollout.mask & (torch.arange(T)[None] < lengths[:, None]))
    cfg = PPOConfig(advantage="grpo", kl_in="loss")
    exp = make_experience(model, batch, encode_pages(model, batch), rollout, SCORES, 2, cfg, BETA, reference=model)
    g = torch.Generator().manual_seed(1)
    m = exp.mask.double()
    exp.ref_logp = (exp.old_logp + 0.2 * torch.randn(exp.old_logp.shape, generator=g, dtype=torch.float64)) * m
    exp.old_logp = (exp.old_logp + 0.3 * torch.randn(exp.old_logp.shape, generator=g, dtype=torch.float64)) * m
    return model, path, exp, batch


def mmr5_loss_and_gradient(model, exp, loss_agg, micro_batch_size):
    """One ppo_update step over the whole batch (one minibatch, in micro-batches), its loss and gradient by name."""
    model.visual.requires_grad_(False)  # PPO runs on precomputed page features: the tower is frozen
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    recorder = GradientRecorder(named)
    cfg = PPOConfig(advantage="grpo", kl_in="loss", loss_agg=loss_agg, clip=EPSILON, epochs=1, minibatch_size=4,
                    micro_batch_size=micro_batch_size, grad_clip=0.0)
    stats = ppo_update(model, exp, recorder, [p for _, p in named], cfg, BETA,
                       generator=torch.Generator().manual_seed(0))
    assert stats["skipped"] == 0 and stats["clip_frac"] > 0  # some ratios are clipped: the clip is exercised
    return stats["loss"], recorder.steps[0]


def relative_error(ours: dict, reference: dict) -> float:
    assert ours.keys() == reference.keys() and len(ours) > 10
    return max((ours[k] - reference[k]).abs().max().item() / reference[k].abs().max().item() for k in ours)


def test_grpo_update_is_the_release_objective_however_micro_batched(rollout_setup):
    """ppo_update's loss and gradient under `sequence` are those of the release's loss on the whole batch at once,
    for micro-batches of 1, 3 (split 3 + 1) or 4 rows; `token` is the token mean (DAPO). The release's lines are
    copied from i2vec/MM-R5 (commit 0806019), src/rl/VLM-R1/src/open-r1-multimodal/src/open_r1/trainer/
    grpo_trainer.py, lines 752-769. Tolerance 1e-6: response_forward's log-probs are float32."""
    model, _, exp, _ = grpo_batch(rollout_setup)
    m = exp.mask.double()
    rows = torch.arange(4)
    logp = response_forward(model, exp, rows)[0]
    coef_1 = torch.exp(logp - exp.old_logp)  # the release's lines, on the same tensors
    coef_2 = torch.clamp(coef_1, 1 - EPSILON, 1 + EPSILON)
    advantages = group_advantages(SCORES.double(), 2).unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    per_token_kl = torch.exp(exp.ref_logp - logp) - (exp.ref_logp - logp) - 1
    per_token_loss = per_token_loss + BETA * per_token_kl
    expected = {"sequence": ((per_token_loss * m).sum(dim=1) / m.sum(dim=1)).mean(),  # line 769
                "token": (per_token_loss * m).sum() / m.sum()}
    for loss_agg, loss in expected.items():
        named = [(n, p) for n, p in model.named_parameters() if not n.startswith("visual.")]
        grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True)
        reference = dict(zip([n for n, _ in named], grads))
        for micro in (1, 3, 4):
            ours_loss, ours = mmr5_loss_and_gradient(model, exp, loss_agg, micro)
            assert ours_loss == pytest.approx(loss.item(), rel=1e-6), (loss_agg, micro)
            assert relative_error(ours, reference) < 1e-6, (loss_agg, micro)
    assert abs(expected["sequence"].item() - expected["token"].item()) > 1e-2 * abs(expected["token"].item())


def trl_loss_and_gradient(path, exp, batch, loss_type, tmp_path):
    """TRL's own GRPOTrainer._compute_loss (and its log-prob forward) on the HF model, on `exp` as TRL's inputs.

    The trainer is a stub holding the attributes those two methods read, set from a GRPOConfig as
    GRPOTrainer.__init__ sets them: building a real trainer needs TRL's processor, which needs torchvision."""
    from transformers import AutoModelForImageTextToText
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float64).train()
    model.model.visual.requires_grad_(False)
    add_fused_lm_head(model, temperature=1.0, outputs=("log_probs", "entropy"))  # as GRPOTrainer.__init__
    # use_bias_correction_kl (TRL 1.16's default: True) multiplies k3 by the ratio; the release's k3 is plain.
    args = GRPOConfig(output_dir=str(tmp_path), loss_type=loss_type, beta=BETA, epsilon=EPSILON, report_to="none",
                      use_cpu=True, bf16=False, use_bias_correction_kl=False)
    accelerator = types.SimpleNamespace(num_processes=1, is_main_process=True, autocast=contextlib.nullcontext,
                                        gather=lambda x: x, gather_for_metrics=lambda x: x,
                                        reduce=lambda x, reduction: x, sync_gradients=True)
    trainer = types.SimpleNamespace(
        args=args, model=model, accelerator=accelerator, loss_type=args.loss_type, beta=args.beta,
        epsilon_low=args.epsilon, epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        importance_sampling_level=args.importance_sampling_level, top_entropy_quantile=args.top_entropy_quantile,
        off_policy_mask_threshold=args.off_policy_mask_threshold, use_vllm=args.use_vllm, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    trainer._get_per_token_logps_and_entropies = types.MethodType(GRPOTrainer._get_per_token_logps_and_entropies,
                                                                  trainer)
    L = exp.prompt_len
    per_image = batch["image_grid_thw"].prod(-1).tolist()
    images_per_prompt = [len(g) for g in exp.grids]
    pixel_starts = torch.tensor([0] + per_image).cumsum(0).tolist()
    first_image = torch.tensor([0] + images_per_prompt).cumsum(0).tolist()
    pixels, grids = [], []
    for p in exp.group.tolist():  # each row carries its prompt's pages, as TRL's collated batch does
        a, b = first_image[p], first_image[p + 1]
        pixels.append(batch["pixel_values"][pixel_starts[a]:pixel_starts[b]])
        grids.append(batch["image_grid_thw"][a:b])
    image_token = Qwen2VL.from_pretrained(path).config.image_token_id
    inputs = dict(prompt_ids=exp.input_ids[:, :L], prompt_mask=exp.attention_mask[:, :L],
                  completion_ids=exp.tokens, completion_mask=exp.mask.long(),
                  pixel_values=torch.cat(pixels).double(), image_grid_thw=torch.cat(grids),
                  num_images=[images_per_prompt[p] for p in exp.group.tolist()],
                  mm_token_type_ids=(exp.input_ids == image_token).long(),
                  advantages=group_advantages(SCORES.double(), 2), old_per_token_logps=exp.old_logp,
                  ref_per_token_logps=exp.ref_logp, num_items_in_batch=exp.mask.sum())
    loss = GRPOTrainer._compute_loss(trainer, model, inputs)
    loss.backward()
    grads = {canonical_key(n): p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


@pytest.mark.parametrize("loss_agg,loss_type", [("sequence", "grpo"), ("token", "dapo")])
def test_grpo_loss_and_gradient_equal_trl(rollout_setup, tmp_path, loss_agg, loss_type):
    """On one fixed batch (same weights, prompts, completions, old and reference log-probs, advantages), mmr5's GRPO
    loss and gradient, in micro-batches of 3 + 1 rows, equal TRL's GRPOTrainer loss (loss_type "grpo" = the
    release's sequence aggregation, "dapo" = token) with the release's beta 0.04 and clip 0.2, to 1e-5 relative."""
    pytest.importorskip("trl", reason="TRL is the peer reference: pip install -r requirements-test.txt")
    model, path, exp, batch = grpo_batch(rollout_setup)
    trl_loss, trl_grads = trl_loss_and_gradient(path, exp, batch, loss_type, tmp_path)
    ours_loss, ours = mmr5_loss_and_gradient(model, exp, loss_agg, micro_batch_size=3)
    assert ours_loss == pytest.approx(trl_loss, rel=1e-5)
    assert relative_error(ours, trl_grads) < 1e-5


def test_page_marks_label_each_page_id(rollout_setup):
    """Marks on the prompt's "Image k:" slots and on every in-range id a response writes (all digits of "12"), 1 for
    a relevant page, 0 for another, -1 elsewhere (the template's example "Image 1", a query's numbers, id 0)."""
    path = rollout_setup[1]
    proc = Processor.from_pretrained(path)
    marks = PageMarks(8, proc.token_texts())
    texts = marks.texts

    def marked(ids, relevant, pages, prompt):
        labels = marks.labels(torch.tensor([ids]), [relevant], [pages], prompt)[0].tolist()
        runs, current = [], None
        for token, label in zip(ids, labels):
            if label >= 0:
                current = current or ["", label]
                current[0] += texts[token].strip()
                runs.append(current) if len(current[0]) == len(texts[token].strip()) else None
            else:
                current = None
        return [tuple(r) for r in runs]

    prompt = proc.encode(proc.rerank_prompt("the 2 red circles of 2019", 12))
    assert marked(prompt, {2, 12}, 12, True) == [(str(k), int(k in (2, 12))) for k in range(1, 13)]
    response = proc.encode("<think>Image 12 and image 3 match, 0 and 13 do not</think><answer>[12, 3, 1]</answer>")
    assert marked(response, {2, 12}, 12, False) == [("12", 1), ("3", 0), ("12", 1), ("3", 0), ("1", 0)]
    assert marked(response, {3}, 5, False) == [("3", 1), ("3", 1), ("1", 0)]  # 12 is no page of 5
    v = torch.randn(2, 8)
    marks.vectors.data.copy_(v)
    emb = marks(marks.with_bins(torch.tensor([[-1, 0, 1]]), None))
    assert torch.equal(emb[0], torch.stack([torch.zeros(8), v[0], v[1]]))


def test_page_marks_reach_the_critic_at_their_own_positions(rollout_setup):
    """A mark on response token j changes the values from position j + 1 on (V_t is read from the state that
    predicts token t, which has seen tokens < t) and nothing before; prompt marks change every value; the policy's
    forward and a critic without marks are untouched. Fails if the marks are shifted, misplaced or not passed on."""
    model, path, batch, pages, rollout = rollout_setup
    proc = Processor.from_pretrained(path)
    critic = Qwen2VL.from_pretrained(path)
    critic.value_head = ValueHead(critic.config.text.hidden_size)
    torch.nn.init.normal_(critic.value_head.linear.weight, std=0.1)
    critic.page_marks = PageMarks(critic.config.text.hidden_size, proc.token_texts())
    exp = make_experience(model, batch, pages, rollout, torch.zeros(4), 2, PPOConfig(), 0.0, critic, reference=model,
                          relevant=[{1}, {2}])
    rows = torch.arange(4)
    values = lambda: response_forward(critic, exp, rows, logprobs=False, values=True)[2]  # noqa: E731
    with torch.no_grad():
        plain = values()  # the marks start at zero: the critic starts as the model it was copied from
        marks, critic.page_marks = critic.page_marks, None
        assert torch.equal(values(), plain)
        critic.page_marks = marks
        assert (exp.prompt_marks[..., 0] >= 0).sum() == 5  # the "Image k:" slots of prompts with 3 and 2 pages
        assert (exp.prompt_marks[..., 1] == -1).all()  # built without greedy bins: not told
        torch.nn.init.normal_(critic.page_marks.vectors, std=1.0)
        exp.marks, exp.prompt_marks = torch.full_like(exp.marks, -1), torch.full_like(exp.prompt_marks, -1)
        assert torch.equal(values(), plain)  # nothing marked: the vectors are not read
        j = 3  # mark response token j of every row (as if it named a page)
        exp.marks[:, j, 0] = torch.tensor([0, 1, 0, 1])
        changed = (values() - plain).abs() > 1e-6
        assert not changed[:, :j + 1].any() and changed[:, j + 1:][exp.mask[:, j + 1:]].all()
        exp.marks.fill_(-1)
        exp.prompt_marks[:, -5, 0] = 1
        assert ((values() - plain).abs() > 1e-6)[exp.mask].all()
        critic.set_gradient_checkpointing(True)  # the other forward path, one sequence per row
        critic.train()
        checkpointed = values()
        shared = response_forward(critic.eval(), exp, rows, logprobs=False, values=True)[2]
        assert torch.allclose(checkpointed * exp.mask, shared * exp.mask, atol=1e-5)
        logp = response_forward(model, exp, rows)[0]
        assert torch.equal(logp, exp.old_logp)  # the policy never sees them


def test_the_greedy_reward_reaches_every_value_of_its_prompt_and_never_the_policy(rollout_setup):
    """--critic-greedy: each prompt's greedy reward, binned, changes its critic's values at every response position,
    token 0 included (it is known before the response starts), leaves the other prompt's rows alone, and never
    reaches the policy. Fails if the bin is dropped, given to the wrong rows or read only from some position on."""
    model, path, batch, pages, rollout = rollout_setup
    proc = Processor.from_pretrained(path)
    critic = Qwen2VL.from_pretrained(path)
    critic.value_head = ValueHead(critic.config.text.hidden_size)
    torch.nn.init.normal_(critic.value_head.linear.weight, std=0.1)
    critic.page_marks = PageMarks(critic.config.text.hidden_size, proc.token_texts(), greedy_buckets=20)
    scores = torch.tensor([0.0, 0.05, 0.1, 1.99, 2.0, 5.0, float("nan"), float("inf")])
    assert critic.page_marks.bins(scores, 2.0).tolist() == [0, 0, 1, 19, 19, 19, -1, -1]  # -1: not told
    with pytest.raises(ValueError, match="greedy"):
        make_experience(model, batch, pages, rollout, torch.zeros(4), 2, PPOConfig(), 0.0, critic, reference=model,
                        relevant=[{1}, {2}])
    exp = make_experience(model, batch, pages, rollout, torch.zeros(4), 2, PPOConfig(), 0.0, critic, reference=model,
                          relevant=[{1}, {2}], greedy=torch.tensor([0.3, 1.5]))
    assert exp.prompt_marks[..., 1].tolist() == [[3] * exp.prompt_ids.shape[1], [15] * exp.prompt_ids.shape[1]]
    assert (exp.marks[..., 1] == torch.tensor([3, 3, 15, 15])[:, None]).all()  # rows 0, 1 answer prompt 0
    rows = torch.arange(4)
    values = lambda: response_forward(critic, exp, rows, logprobs=False, values=True)[2]  # noqa: E731
    with torch.no_grad():
        torch.nn.init.normal_(critic.page_marks.greedy, std=1.0)
        plain = values()
        exp.prompt_marks[1, :, 1] = 7  # prompt 1 (rows 2, 3) told another reward
        exp.marks[2:, :, 1] = 7
        changed = (values() - plain).abs() > 1e-6
        assert changed[2:][exp.mask[2:]].all() and not changed[:2].any()
        assert torch.equal(response_forward(model, exp, rows)[0], exp.old_logp)  # the policy never sees it


def answer_rollouts(proc, batch, n: int, seed: int, decided_last: bool = False):
    """Responses that name the best image, reason a little, then answer; the return is 1 iff the answer lists image 1
    first, and each response ends at its own position. `decided_last`: the image is named in the response's last
    token before the stop token instead, which only the state that predicts the stop token has read."""
    g = torch.Generator().manual_seed(seed)
    rows, scores = [], []
    for _ in range(batch["input_ids"].shape[0] * n):
        first = int(torch.randint(1, 4, (1,), generator=g))
        rest = [i for i in (1, 2, 3) if i != first]
        filler = " ".join(["red", "page", "shape", "blue"][int(i)] for i in torch.randint(0, 4, (int(torch.randint(
            0, 6, (1,), generator=g)),), generator=g))
        if decided_last:
            ids = proc.encode(f"<think>{filler}</think><answer>[") + proc.encode(str(first))
        else:
            ids = proc.encode(f"<think>Image {first} is best. {filler}</think><answer>[{first}, {rest[0]}, "
                              f"{rest[1]}]</answer>")
        rows.append(ids + [proc.im_end_id])
        scores.append(float(first == 1))
    T = max(map(len, rows))
    tokens = torch.full((len(rows), T), proc.pad_id)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r)
    mask = torch.arange(T)[None] < torch.tensor([len(r) for r in rows])[:, None]
    return types.SimpleNamespace(tokens=tokens, mask=mask), torch.tensor(scores)


def critic_explained_variance_last(path, critic_kind: str, passes: int = 12, decided_last: bool = False) -> float:
    """Train a critic on returns the written answer decides (value-only updates, as value pretraining does) and
    return its explained variance at the last token of held-out responses."""
    torch.manual_seed(0)
    policy, proc = Qwen2VL.from_pretrained(path), Processor.from_pretrained(path)
    critic = Qwen2VL.from_pretrained(path) if critic_kind == "separate" else None
    (critic or policy).value_head = ValueHead(policy.config.text.hidden_size)
    trained = critic if critic is not None else policy.value_head
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    cfg = PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=8)
    batch = proc.rerank_inputs([f"query {i}" for i in range(4)], [page_images(3, seed=i) for i in range(4)])
    pages = encode_pages(policy, batch)
    data = [answer_rollouts(proc, batch, 4, seed, decided_last) for seed in range(6)]
    for p in range(passes):
        for rollout, scores in data[:-1]:
            exp = make_experience(policy, batch, pages, rollout, scores, 4, cfg, 0.0, critic, reference=policy)
            ppo_update(policy, exp, optimizer, params, cfg, 0.0, critic, value_only=True,
                       generator=torch.Generator().manual_seed(p))
    rollout, scores = data[-1]
    exp = make_experience(policy, batch, pages, rollout, scores, 4, cfg, 0.0, critic, reference=policy)
    return explained_variance(exp.old_values, exp.returns, last_token(exp.mask.float()).float())


def test_a_critic_learns_a_return_the_written_answer_decides(tiny_model_dirs):
    """The wiring of a critic that reads: values at the right token, masked to the real tokens, gradients reaching
    its trunk. A linear head on the policy's detached states (the shared critic) cannot read the answer here."""
    path = tiny_model_dirs["qwen2_5_vl"]
    assert critic_explained_variance_last(path, "separate") >= 0.9
    assert critic_explained_variance_last(path, "shared") < 0.5


def test_a_critic_reads_the_last_token_before_the_stop(tiny_model_dirs):
    """V at the stop token is read from the state that has seen the token before it: a value taken one position
    early, or a reward placed on the wrong token, cannot explain this return."""
    assert critic_explained_variance_last(tiny_model_dirs["qwen2_5_vl"], "separate", decided_last=True) >= 0.9
