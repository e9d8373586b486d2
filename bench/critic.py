"""Can a critic predict the returns of a policy's rollouts? Value pretraining on frozen rollouts, held-out EV.

Samples rollouts from one policy (temperature 1, n per prompt), scores them with the fused reward, and fits a value
function to the Monte-Carlo returns (GAE with lam = 1; no KL term: the policy is its own reference here):
  head     the linear value head on the policy's (frozen) last hidden states, as `--critic shared` trains it
  separate a whole copy of the model with its own head, as `--critic separate` trains it
then prints, after every pass over the training rollouts, the explained variance on held-out rollouts (over all
response tokens, and at the first one, where only the prompt is known) and the score variance within prompt groups.
A critic with EV <= 0 gives GAE nothing a constant would not. Default: the built-in demo's SFT model.
`--online N` instead feeds a separate critic N fresh rollouts once each, as train_ppo.py's value pretraining does
(EV on each before it trains on it, then `--epochs` passes with the value clip): the learning curve against a policy
that does not move. `--critic-vision` lets that critic train a vision tower of its own (it encodes the pages itself).
`--reader-steps N` first fine-tunes that critic on the chains of `--train` (N steps of 16 samples, vision frozen), so
it reads the pages better than the policy. With `--online`, the critic also writes its own response to every
prompt (greedy), and the last token's return is fitted (on the first half of the rollouts) to the score each response
would get if the pages the critic wrote are relevant ("Relevant: ..." in the demo's chains) were the truth: what its
written reading predicts, next to what its value head learned.
Usage: python bench/critic.py [--model DIR --train JSONL] [--critics head separate] [--rollouts 6]
       python bench/critic.py --model runs/demo/sft/model --train runs/demo/rl/train.jsonl --online 40
       ... --online 40 --reader-steps 150 --eval runs/demo/rl/eval.jsonl
"""
import argparse
import copy
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from common import setup_threads

from mmr5.data import read_samples
from mmr5.model import Qwen2VL
from mmr5.critic import ValueHead
from mmr5.ppo import (PPOConfig, chunks, encode_pages, explained_variance, last_token, make_experience, masked_mean,
                      response_forward, value_loss)
from mmr5.processor import Processor
from mmr5.rewards import fused_reward
from mmr5.sampler import generate
from mmr5.sft import sft_batch, sft_loss


def rollouts(policy, processor, train, count, prompts, n, max_new_tokens, rng, seed):
    """`count` rollouts of `prompts` x `n` responses, each turned into an Experience with lam = 1 returns."""
    cfg = PPOConfig(advantage="gae", lam=1.0, micro_batch_size=16)
    out = []
    for i in range(count):
        samples = rng.sample(train, prompts)
        batch = processor.rerank_inputs([s.query for s in samples], [s.images for s in samples])
        with torch.no_grad():
            pages = encode_pages(policy, batch)
            rollout = generate(policy, processor, batch, max_new_tokens, temperature=1.0, n=n,
                               generator=torch.Generator().manual_seed(seed + i), image_features=torch.cat(pages[0]))
            scores = torch.tensor([fused_reward(t, samples[r // n].positives, len(samples[r // n].images))["reward"]
                                   for r, t in enumerate(rollout.texts)])
            out.append(make_experience(policy, batch, pages, rollout, scores, n, cfg, 0.0))
            out[-1].batch = batch  # for a critic that encodes the pages itself
            out[-1].texts = rollout.texts
    return out


def evaluate(model, exps) -> tuple[float, float, float]:
    """Held-out explained variance over all response tokens, at the first and at the last response token."""
    values, returns, masks = [], [], []
    with torch.no_grad():
        for e in exps:
            for rows in torch.arange(len(e.scores)).split(16):
                values.append(response_forward(model, e, rows, logprobs=False, values=True)[2])
                returns.append(e.returns[rows])
                masks.append(e.mask[rows].float())
    T = max(v.shape[1] for v in values)
    v, r, m = (torch.cat([torch.nn.functional.pad(x, (0, T - x.shape[1])) for x in xs])
               for xs in (values, returns, masks))
    first = torch.zeros_like(m)
    first[:, 0] = m[:, 0]
    return explained_variance(v, r, m), explained_variance(v, r, first), explained_variance(v, r, last_token(m))


def fit(name, model, params, lr, passes, train_exps, test_exps, minibatch=48, micro=16):
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.value_head.start_at(torch.cat([e.returns[e.mask.bool()] for e in train_exps]).mean().item())  # as PPO
    t0 = time.time()
    for p in range(passes):
        model.train()
        for e in train_exps:
            for rows in torch.randperm(len(e.scores)).split(minibatch):
                tokens = e.mask[rows].sum()
                for sub in rows.split(micro):
                    v = response_forward(model, e, sub, logprobs=False, values=True)[2]
                    m = e.mask[sub].float()
                    (0.5 * masked_mean((v - e.returns[sub]) ** 2, m) * m.sum() / tokens).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        model.eval()
        ev_all, ev_first, ev_last = evaluate(model, test_exps)
        print(f"{name:<9} lr {lr:g}  pass {p + 1}  ({time.time() - t0:4.0f} s)  held-out EV: all tokens "
              f"{ev_all:+.3f}, first token {ev_first:+.3f}, last token {ev_last:+.3f}", flush=True)


def written_relevant(text: str) -> set[int]:
    """The pages a response calls relevant in the demo's chains ("... Relevant: 3, 6.</think>")."""
    m = re.search(r"Relevant: ([\d, ]+)", text)
    return {int(k) for k in re.findall(r"\d+", m.group(1))} if m else set()


def show_ev(ev: float | None) -> str:
    return "n/a (equal returns)" if ev is None else f"{ev:+.3f}"


def learn_to_read(model, processor, train, steps, lr=5e-4, batch=16, micro=8):
    """Supervised fine-tuning of the critic on the chains of `train` (the pages it must judge are the policy's)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng, t0 = random.Random(1), time.time()
    model.train()
    for _ in range(steps):
        parts = [sft_batch(processor, s) for s in chunks(rng.sample(train, batch), micro)]
        tokens = sum(int(b["labels_mask"][:, 1:].sum()) for b in parts)
        for b in parts:
            (sft_loss(model, b)[0] / tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(f"critic fine-tuned on {steps} x {batch} chains in {time.time() - t0:.0f} s")
    model.eval()


def page_reading(model, processor, samples, max_new_tokens) -> float:
    """Fraction of pages whose relevance the model's own greedy response gets right."""
    right = 0
    for part in chunks(samples, 25):
        batch = processor.rerank_inputs([s.query for s in part], [s.images for s in part])
        with torch.no_grad():
            texts = generate(model, processor, batch, max_new_tokens, temperature=0.0).texts
        right += sum((k in written_relevant(t)) == (k in s.positives)
                     for t, s in zip(texts, part) for k in range(1, len(s.images) + 1))
    return right / sum(len(s.images) for s in samples)


def written_reading_fit(model, processor, exps, max_new_tokens) -> float:
    """EV at the last token, on the second half of `exps`, of a linear fit (on the first half) of the return to the
    score each response would get if the pages the critic writes are relevant were the truth."""
    xs, ys = [], []
    for e in exps:
        batch = dict(e.batch, pixel_values=None)
        with torch.no_grad():
            read = [written_relevant(t) for t in generate(model, processor, batch, max_new_tokens, temperature=0.0,
                                                          image_features=torch.cat(e.features)).texts]
        last = last_token(e.mask.float()).bool()
        for r, text in enumerate(e.texts):
            p = int(e.group[r])
            xs.append(fused_reward(text, sorted(read[p]) or [0], len(e.grids[p]))["reward"])
            ys.append(float(e.returns[r][last[r]]))
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    h = len(exps) // 2 * len(exps[0].scores)
    a = torch.stack([torch.ones_like(x), x], 1)
    w = torch.linalg.lstsq(a[:h], y[:h, None]).solution[:, 0]
    return float(1 - (y[h:] - a[h:] @ w).var() / y[h:].var())


def online(model, lr, exps, epochs, clip, vision, minibatch=24, micro=16):
    """Each rollout once: EV before training on it, then `epochs` passes of clipped value loss (train_ppo's
    value pretraining without the policy moving). -> [(EV all tokens, EV last token)] per rollout."""
    model.value_head.start_at(exps[0].returns[exps[0].mask.bool()].mean().item())  # as train_ppo's first step
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    evs, t0 = [], time.time()
    for k, e in enumerate(exps):
        model.eval()
        with torch.no_grad():
            if vision:
                e.features = encode_pages(model, e.batch)[0]
            old = torch.cat([response_forward(model, e, rows, logprobs=False, values=True)[2]
                             for rows in torch.arange(len(e.scores)).split(micro)])
        m = e.mask.float()
        evs.append((explained_variance(old, e.returns, m), explained_variance(old, e.returns, last_token(m).float())))
        model.train()
        for _ in range(epochs):
            for rows in torch.randperm(len(e.scores)).split(minibatch):
                tokens = e.mask[rows].sum()
                for sub in rows.split(micro):
                    if vision:  # the critic's own tower, with gradients (encode_pages is no_grad)
                        e.features = encode_pages.__wrapped__(model, e.batch)[0]
                    v = response_forward(model, e, sub, logprobs=False, values=True)[2]
                    ms = e.mask[sub].float()
                    (value_loss(v, old[sub], e.returns[sub], ms, clip) * ms.sum() / tokens).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        print(f"online lr {lr:g}{' +vision' if vision else ''}  rollout {k + 1}  ({time.time() - t0:4.0f} s)  EV "
              f"before training on it: all tokens {show_ev(evs[-1][0])}, last token {show_ev(evs[-1][1])}", flush=True)
    return evs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/demo/sft/model", help="the policy (default: the demo's SFT model)")
    p.add_argument("--train", default="runs/demo/data/train.jsonl", help="prompts to roll out (JSONL)")
    p.add_argument("--critics", nargs="+", default=["head", "separate"], choices=["head", "separate"])
    p.add_argument("--head-lrs", nargs="+", type=float, default=[1e-3, 1e-2], help="learning rates of the head")
    p.add_argument("--separate-lr", type=float, default=3e-4, help="learning rate of the separate critic")
    p.add_argument("--rollouts", type=int, default=6, help="training rollouts (2 more are held out)")
    p.add_argument("--prompts", type=int, default=24, help="prompts per rollout")
    p.add_argument("--samples", type=int, default=4, help="responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--passes", type=int, default=4, help="passes over the training rollouts")
    p.add_argument("--online", type=int, default=0, help="if > 0: this many fresh rollouts, each seen once by a "
                   "separate critic at --separate-lr (EV before training on each), instead of the passes above")
    p.add_argument("--epochs", type=int, default=2, help="--online: passes over each rollout (train_ppo's --epochs)")
    p.add_argument("--value-clip", type=float, default=0.2, help="--online: train_ppo's --value-clip")
    p.add_argument("--critic-vision", action="store_true", help="--online: the critic trains its own vision tower")
    p.add_argument("--reader-steps", type=int, default=0, help="--online: first fine-tune the critic on --train's "
                   "chains for this many steps of 16 samples")
    p.add_argument("--eval", help="--online: held-out JSONL on which to report the policy's and the critic's page "
                   "reading (their own greedy responses)")
    args = p.parse_args()
    if not Path(args.model, "config.json").exists():
        sys.exit(f"error: no model at {args.model} (run `python train_sft.py` for the demo's, or pass --model)")
    setup_threads()  # THREADS, default 2, as every benchmark
    torch.manual_seed(0)
    policy = Qwen2VL.from_pretrained(args.model).eval()
    policy.value_head = ValueHead(policy.config.text.hidden_size)
    processor = Processor.from_pretrained(args.model)
    train = read_samples(args.train)
    rng = random.Random(0)
    t0 = time.time()
    if args.online:
        exps = rollouts(policy, processor, train, args.online, args.prompts, args.samples, args.max_new_tokens, rng,
                        100)
        print(f"{args.online} rollouts in {time.time() - t0:.0f} s")
        model = copy.deepcopy(policy)
        model.value_head = ValueHead(policy.config.text.hidden_size)
        model.visual.requires_grad_(False)
        if args.reader_steps:
            if any(s.response is None for s in train):
                sys.exit(f"error: --reader-steps needs chains: {args.train} has samples without a `response`")
            learn_to_read(model, processor, train, args.reader_steps)
        if args.eval:
            held = read_samples(args.eval)
            print(f"page reading on {args.eval} (greedy, own response): policy "
                  f"{page_reading(policy, processor, held, args.max_new_tokens):.3f}, critic "
                  f"{page_reading(model, processor, held, args.max_new_tokens):.3f}")
        print(f"what the critic's written reading predicts (EV at the last token, fit on the first half of the "
              f"rollouts): {written_reading_fit(model, processor, exps, args.max_new_tokens):+.3f}", flush=True)
        model.visual.requires_grad_(args.critic_vision)
        evs = online(model, args.separate_lr, exps, args.epochs, args.value_clip, args.critic_vision)
        last = evs[-20:]
        all_tokens, last_tokens = ([ev[i] for ev in last if ev[i] is not None] for i in (0, 1))
        median = lambda v: statistics.median(v) if v else None  # noqa: E731
        print(f"median over the last {len(last)} rollouts: EV all tokens {show_ev(median(all_tokens))}, last token "
              f"{show_ev(median(last_tokens))}")
        return
    train_exps = rollouts(policy, processor, train, args.rollouts, args.prompts, args.samples, args.max_new_tokens,
                          rng, 100)
    test_exps = rollouts(policy, processor, train, 2, args.prompts, args.samples, args.max_new_tokens, rng, 900)
    scores = torch.cat([e.scores for e in train_exps + test_exps]).view(-1, args.samples)
    within = scores.var(1, unbiased=False).mean() / scores.var(unbiased=False)
    print(f"{len(scores) * args.samples} responses in {time.time() - t0:.0f} s: mean score {scores.mean():.3f}, "
          f"{100 * within:.0f}% of its variance within prompt groups")
    for critic in args.critics:
        if critic == "head":
            for lr in args.head_lrs:
                policy.value_head = ValueHead(policy.config.text.hidden_size)
                fit("head", policy, list(policy.value_head.parameters()), lr, args.passes, train_exps, test_exps)
        else:
            model = copy.deepcopy(policy)
            model.value_head = ValueHead(policy.config.text.hidden_size)
            fit("separate", model, list(model.parameters()), args.separate_lr, args.passes, train_exps, test_exps)


if __name__ == "__main__":
    main()
