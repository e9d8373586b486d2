"""The PPO pieces against their definitions, and one make_experience + ppo_update on a tiny model."""
import math

import pytest
import torch
from conftest import page_images

from mmr5.lora import add_lora
from mmr5.model import Qwen2VL
from mmr5.ppo import (AdaptiveKL, PPOConfig, ValueHead, encode_pages, explained_variance, gae, group_advantages,
                      kl_estimate, make_experience, masked_whiten, policy_loss, ppo_update, response_forward,
                      value_loss)
from mmr5.processor import Processor
from mmr5.sampler import generate


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


def test_rewards_sit_on_the_last_token_and_kl_enters(rollout_setup):
    model, path, batch, pages, rollout = rollout_setup
    scores = torch.tensor([1.0, 0.0, 0.5, 0.2])
    cfg = PPOConfig(gamma=1.0, lam=1.0)
    model.value_head = ValueHead(64)
    exp = make_experience(model, batch, pages, rollout, scores, 2, cfg, 0.0, reference=model)
    m = exp.mask.float()
    # V = 0, gamma = lam = 1, no KL: every token's return is the sequence's score
    assert torch.allclose(exp.returns, scores[:, None] * m)
    model = Qwen2VL.from_pretrained(path)  # a fresh copy: the adapters below must not leak into other tests
    add_lora(model, rank=4, alpha=8)  # perturb the adapters: the policy now differs from the base reference
    model.value_head = ValueHead(64)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    exp = make_experience(model, batch, pages, rollout, scores, 2, cfg, 0.5)
    k1 = (exp.old_logp - exp.ref_logp) * m
    assert k1.abs().sum() > 0
    expected = (scores[:, None] - 0.5 * (k1.flip(1).cumsum(1).flip(1))) * m  # reward-to-go of -beta*k1 + score
    assert torch.allclose(exp.returns, expected, atol=1e-4)


def test_ppo_update_moves_toward_advantage_and_guards_nan(rollout_setup):
    _, path, batch, pages, rollout = rollout_setup
    model = Qwen2VL.from_pretrained(path)
    add_lora(model, rank=4, alpha=8)
    model.value_head = ValueHead(64)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0])
    for advantage in ("gae", "grpo"):
        cfg = PPOConfig(advantage=advantage, epochs=3, minibatch_size=2, micro_batch_size=1,
                        kl_in="loss" if advantage == "grpo" else "reward")
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
            logp, entropy, values = response_forward(model, exp, rows, values=True)
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
