"""PPO (with a critic) or GRPO fine-tuning of an MM-R5 reranker on the fused reward: rerank + format (+ think).

With no arguments: continues the built-in demo from its SFT model (runs/demo/sft/model; trains it first if missing)
and reports held-out rewards before -> after. With --model/--train/--eval/--out: your SFT output and data.
Each step: sample `--samples` responses per prompt, score them (mmr5.rewards), then mmr5.ppo's make_experience
(old / reference log-probs, values, GAE) and ppo_update (clipped policy + value losses). A run in --out resumes from
its last checkpoint; Ctrl-C saves one before exiting.
"""
import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mmr5 import distributed
from mmr5.checkpoint import (StopFlag, append_metrics, check_output_folder, load_optimizer, resume_checkpoint,
                             optimizer_tensors, rewind_metrics, set_rng_state, write_checkpoint)
from mmr5.data import DataError, read_samples
from mmr5.lora import add_lora, merge_lora
from mmr5.model import Qwen2VL
from mmr5.plots import plot_curves, read_metrics
from mmr5.ppo import AdaptiveKL, PPOConfig, ValueHead, encode_pages, explained_variance, make_experience, ppo_update
from mmr5.processor import Processor
from mmr5.reranker import Reranker, check_before_loading, check_pair
from mmr5.rewards import fused_reward
from mmr5.sampler import generate
from mmr5.sft import sample_order

# Many prompts per step is what makes held-out reward rise (measured: 24 prompts x 4 samples, GRPO, 30 steps from a
# 150-step SFT model: held-out rerank 0.59 -> 0.70 in ~9 min on 2 cores; with 8 prompts per step the same lr memorises
# and held-out falls). PPO's critic settings for the demo, measured from that model (tests/test_e2e.py, bench/critic.py):
# no value head we trained predicts this task's returns (held-out explained variance <= 0), so lam = 1 (every token
# gets the whole final reward minus its value, as Open-Reasoner-Zero and VC-PPO use for long reasoning; at 0.95 the
# checks that decide the ranking get < 0.36 of it) with k3 in the loss, and a value head learning at 1e-5, which
# stays near its zero init: a learning one (1e-3) only added noise (held-out rerank 0.687 vs 0.748 at step 45, same
# random stream). 24-row minibatches (8 optimizer steps per rollout, not 4) over 60 steps: with 4 the clip fraction
# stayed ~0.002 and a 45-step run gained anywhere from 0.03 to 0.16 by seed and CPU; now +0.13 .. +0.16 over 4 seeds.
DEMO = dict(out="runs/demo/ppo", steps=60, prompts_per_step=24, samples=4, lr=1e-4, max_new_tokens=128,
            eval_every=20, eval_max_new_tokens=128, save_every=5, minibatch_size=24, micro_batch_size=16,
            lam=1.0, kl_in="loss", critic_lr=1e-5)
DEMO_SFT = "runs/demo/sft"
RUN_IDENTITY = ("model", "train", "prompts_per_step", "samples", "lora_rank", "lora_alpha", "lora_targets", "critic",
                "advantage", "seed")
CURVES = ["reward", "rerank", "format", "kl", "value_loss", "explained_variance", "eval_rerank", "eval_recall@1"]


def parse_args(argv=None):
    demo_flags = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO.items())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog=f"The built-in demo replaces these defaults (flags you give win): {demo_flags}")
    io = p.add_argument_group("inputs and outputs (all four unset: the built-in demo)")
    io.add_argument("--model", help="local HF-layout checkpoint to start from (an SFT output)")
    io.add_argument("--train", help="training JSONL (mmr5 format; no `response` needed)")
    io.add_argument("--eval", help="held-out JSONL: rewards and Recall@1 before, during and after")
    io.add_argument("--out", help="output folder: checkpoints/, metrics.jsonl, curve.png, model/ (the final policy)")
    r = p.add_argument_group("rollouts and rewards")
    r.add_argument("--steps", type=int, default=100, help="PPO steps (rollout + update)")
    r.add_argument("--prompts-per-step", type=int, default=8, help="queries per rollout")
    r.add_argument("--samples", type=int, default=4, help="responses per query (the release: 4)")
    r.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (the release: 1.0)")
    r.add_argument("--max-new-tokens", type=int, default=1024, help="response budget (the release: 2048)")
    r.add_argument("--w-rerank", type=float, default=1.0, help="weight of the rerank reward")
    r.add_argument("--w-format", type=float, default=1.0, help="weight of the format reward")
    r.add_argument("--w-think", type=float, default=0.0, help="weight of the think reward (our extension)")
    a = p.add_argument_group("algorithm")
    a.add_argument("--advantage", choices=["gae", "grpo"], default="gae", help="PPO with a critic, or the release's GRPO")
    a.add_argument("--critic", choices=["shared", "separate"], default="shared",
                   help="value head on the policy's trunk, or on a separate copy of the model")
    a.add_argument("--kl-coef", type=float, default=0.05, help="beta: weight of KL(policy || reference)")
    a.add_argument("--kl-in", choices=["reward", "loss"], help="k1 per token in the reward, or k3 in the loss "
                   "(default: reward for gae, loss for grpo)")
    a.add_argument("--target-kl", type=float, help="adapt beta toward this KL per sequence (default: fixed beta)")
    a.add_argument("--kl-horizon", type=int, default=10000, help="horizon of the adaptive KL controller")
    a.add_argument("--gamma", type=float, default=1.0, help="GAE discount")
    a.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    a.add_argument("--clip", type=float, default=0.2, help="policy ratio clip")
    a.add_argument("--value-clip", type=float, default=0.2, help="value prediction clip")
    a.add_argument("--vf-coef", type=float, default=0.5, help="value loss weight")
    a.add_argument("--entropy-coef", type=float, default=0.0, help="entropy bonus weight")
    a.add_argument("--epochs", type=int, default=2, help="passes over each rollout (the release: 2)")
    a.add_argument("--minibatch-size", type=int, default=8, help="rollout rows per optimizer step")
    a.add_argument("--micro-batch-size", type=int, default=4, help="rows per forward (gradient accumulation)")
    a.add_argument("--critic-warmup", type=int, default=0, help="first N steps train only the critic")
    a.add_argument("--reward-clip", type=float, default=10.0, help="clip sequence scores to +-this")
    a.add_argument("--max-bad-steps", type=int, default=3, help="stop after this many non-finite updates in a row")
    t = p.add_argument_group("optimisation and model")
    t.add_argument("--lr", type=float, default=1e-5, help="learning rate (the release: 1e-5 with LoRA r64)")
    t.add_argument("--critic-lr", type=float, help="learning rate of the value head (and of a separate critic "
                   "model); default 10x --lr: the zero-initialised head must reach the rewards' scale within a few "
                   "steps, or GAE's advantages are mostly the critic's error")
    t.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    t.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0 = full fine-tuning with a frozen copy as "
                   "reference; the release: 64); with LoRA the reference is the model with adapters off")
    t.add_argument("--lora-alpha", type=float, default=128, help="LoRA alpha (the release: 128)")
    t.add_argument("--lora-targets", default="all-linear", help="'all-linear' or suffixes like 'q_proj,v_proj'")
    t.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (less "
                   "memory; the training forwards then repeat each prompt per response instead of sharing its cache)")
    t.add_argument("--device", help="cpu, cuda, ... (default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    t.add_argument("--fsdp", action="store_true", help="under torchrun, shard the models with FSDP2 (default: DDP)")
    t.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast (auto: on for CUDA GPUs that have bf16, Ampere and later)")
    t.add_argument("--save-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="dtype of the final model's weights (auto: the base checkpoint's, e.g. bfloat16 for the "
                        "released Qwen models and MM-R5; float32 keeps updates smaller than a bfloat16 step)")
    t.add_argument("--min-pixels", type=int, help="override the checkpoint's preprocessor min_pixels")
    t.add_argument("--max-pixels", type=int, help="override the checkpoint's preprocessor max_pixels")
    t.add_argument("--seed", type=int, default=0, help="seed for data order and sampling")
    e = p.add_argument_group("evaluation, checkpoints, logging")
    e.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0 = before and after only)")
    e.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N eval samples (0 = all)")
    e.add_argument("--eval-max-new-tokens", type=int, default=1024, help="generation budget per eval answer")
    e.add_argument("--save-every", type=int, default=20, help="checkpoint every N steps (and at the end, and on Ctrl-C)")
    e.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    args = p.parse_args(argv)
    demo = not any((args.model, args.train, args.eval, args.out))
    if demo:
        for k, v in DEMO.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    elif not (args.model and args.train and args.out):
        p.error("--model, --train and --out are required unless all of --model/--train/--eval/--out are unset (demo)")
    for name in ("steps", "prompts_per_step", "samples", "max_new_tokens", "epochs", "minibatch_size",
                 "micro_batch_size", "save_every", "max_bad_steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    args.critic_lr = args.critic_lr if args.critic_lr is not None else 10 * args.lr
    if args.lr <= 0 or args.critic_lr <= 0 or args.temperature < 0 or args.kl_coef < 0 or args.clip <= 0:
        p.error("--lr, --critic-lr and --clip must be positive, --temperature and --kl-coef non-negative")
    if args.advantage == "grpo" and args.samples < 2:
        p.error("--advantage grpo compares samples of one prompt: --samples must be >= 2")
    if args.min_pixels and args.max_pixels and args.max_pixels < args.min_pixels:
        p.error(f"--max-pixels ({args.max_pixels}) is smaller than --min-pixels ({args.min_pixels})")
    args.kl_in = args.kl_in or ("reward" if args.advantage == "gae" else "loss")
    return args, demo


def demo_inputs(args):
    """The built-in demo continues from the built-in SFT model, training it first (`python train_sft.py`, as the
    README runs it) when it is missing."""
    if not (Path(DEMO_SFT) / "model" / "config.json").exists():
        print(f"no built-in SFT model in {DEMO_SFT}/model yet: running train_sft.py's built-in default first")
        done = subprocess.run([sys.executable, str(Path(__file__).with_name("train_sft.py"))])
        if done.returncode:
            sys.exit(f"error: the built-in SFT run failed (exit code {done.returncode}); see its output above")
    from mmr5.synthetic import build_demo

    paths = build_demo()
    args.model, args.train, args.eval = str(Path(DEMO_SFT) / "model"), paths["train"], paths["eval"]


def main(argv=None):
    args, demo = parse_args(argv)
    d = distributed.setup(args.device)
    say = print if d.main else (lambda *a, **k: None)
    if demo:
        if d.main:
            demo_inputs(args)
        distributed.barrier(d)
        demo_inputs(args)
    if args.prompts_per_step % d.world:
        sys.exit(f"error: --prompts-per-step ({args.prompts_per_step}) must be a multiple of the {d.world} ranks")
    out = Path(args.out)
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and d.device.startswith("cuda") and torch.cuda.is_bf16_supported())
    torch.manual_seed(args.seed)
    try:
        check_output_folder(out)
        train = read_samples(args.train)
        evals = read_samples(args.eval) if args.eval else []
    except (DataError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    train = [s for s in train if s.positives]  # no relevant page among the candidates: no rerank signal
    evals = evals[: args.eval_limit] if args.eval_limit else evals
    if not train:
        sys.exit(f"error: {args.train} has no sample with a positive among its candidates")

    def load() -> Qwen2VL:
        model = Qwen2VL.from_pretrained(args.model, dtype=dtype, device=d.device)
        model.visual.requires_grad_(False)  # frozen (as the release): rollout pages are encoded once and reused
        if args.lora_rank > 0:
            add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets)
        return model

    try:
        dtype = torch.bfloat16 if bf16 and args.lora_rank > 0 else torch.float32
        check_before_loading(args.model, train + evals, args.min_pixels, args.max_pixels)
        policy = load()
        processor = Processor.from_pretrained(args.model, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
        check_pair(policy, processor)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    # The reference: with LoRA the policy itself with adapters off; else a frozen copy of the starting weights.
    reference = None if args.lora_rank > 0 else copy.deepcopy(policy).requires_grad_(False).eval()
    critic = load() if args.advantage == "gae" and args.critic == "separate" else None
    if args.advantage == "gae":
        (critic or policy).value_head = ValueHead(policy.config.text.hidden_size).to(d.device)
    models = {"policy": policy, "critic": critic}
    forwards = {}
    for name, m in models.items():
        if m is not None:
            m.set_gradient_checkpointing(args.grad_checkpointing)
            forwards[name] = distributed.wrap(m, d, args.fsdp)
    critic_params = {id(p) for p in (critic or policy).value_head.parameters()} if args.advantage == "gae" else set()
    if critic is not None:
        critic_params |= {id(p) for p in critic.parameters()}
    params = [p for m in models.values() if m is not None for p in m.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in critic_params], "lr": args.lr},
              {"params": [p for p in params if id(p) in critic_params], "lr": args.critic_lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95), weight_decay=0.0)
    cfg = PPOConfig(advantage=args.advantage, gamma=args.gamma, lam=args.lam, clip=args.clip,
                    value_clip=args.value_clip, vf_coef=args.vf_coef, entropy_coef=args.entropy_coef,
                    kl_coef=args.kl_coef, kl_in=args.kl_in, target_kl=args.target_kl, kl_horizon=args.kl_horizon,
                    epochs=args.epochs, minibatch_size=max(1, args.minibatch_size // d.world),
                    micro_batch_size=args.micro_batch_size, reward_clip=args.reward_clip, grad_clip=args.grad_clip)
    kl_ctl = AdaptiveKL(args.kl_coef, args.target_kl, args.kl_horizon)
    reduce = lambda x: distributed.all_sum(x, d)  # noqa: E731

    def trained_tensors(m) -> dict:
        """One model's trained tensors (adapters + value head under LoRA), unsharded. Collective."""
        full = distributed.full_state_dict(m, d)
        return {k: full[k] for k, p in m.named_parameters() if p.requires_grad and k in full}

    def trained() -> dict:
        """Every trained tensor, prefixed by its model. Collective."""
        return {f"{name}.{k}": v for name, m in models.items() if m is not None for k, v in trained_tensors(m).items()}

    def optimizer_state():
        """The optimizer's state by parameter name, over both models (policy./critic. prefixes). Collective."""
        container = torch.nn.ModuleDict({k: m for k, m in models.items() if m is not None})
        return optimizer_tensors(container, optimizer)

    step, state = 0, {"eval_before": None, "bad_steps": 0}
    resumed = resume_checkpoint(out, args, RUN_IDENTITY)
    if resumed is not None:
        weights, opt_tensors, rng, state = resumed
        for name, m in models.items():
            if m is not None:
                distributed.load_full_state_dict(m, {k[len(name) + 1:]: v for k, v in weights.items()
                                                     if k.startswith(name + ".")})
        load_optimizer(torch.nn.ModuleDict({k: m for k, m in models.items() if m is not None}), optimizer,
                       opt_tensors, state["optimizer"])
        set_rng_state(rng, state["rng"])
        kl_ctl.value = state["kl_coef"]
        step = state["step"]
        if step >= args.steps and (out / "summary.json").exists():
            say(f"{out} already holds a finished run; --no-resume starts it over")
            return distributed.cleanup(d)
        if d.main:
            rewind_metrics(out, step)
        say(f"resuming {out} from step {step}/{args.steps}")
    elif d.main and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    out.mkdir(parents=True, exist_ok=True)
    n_trained = sum(p.numel() for p in params)
    ranks = f", {d.world} ranks ({'FSDP2' if args.fsdp else 'DDP'})" if d.world > 1 else ""
    say(f"policy {args.model}: {policy.num_parameters() / 1e6:.2f}M parameters, {n_trained / 1e6:.2f}M trained "
        f"({'LoRA r%d' % args.lora_rank if args.lora_rank else 'full'}); {args.advantage}"
        f"{' + ' + args.critic + ' critic' if args.advantage == 'gae' else ''}; {len(train)} train / {len(evals)} "
        f"eval; {args.steps} steps x {args.prompts_per_step} prompts x {args.samples} samples; {d.device}"
        f"{' bf16' if bf16 else ''}{ranks}")

    autocast = torch.autocast(d.device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)
    reranker = Reranker(policy, processor, batch_size=16)
    # FSDP forwards are collectives: every rank must decode as long as the longest one.
    keep_going = (lambda local: distributed.all_sum(float(local), d) > 0) if args.fsdp and d.world > 1 else None

    def evaluate() -> dict:
        """Greedy held-out rewards and Recall@1 (DDP ranks split the samples; FSDP ranks all run all of them)."""
        policy.eval()
        mine = evals if args.fsdp else distributed.shard(evals, d)
        with autocast:
            records = reranker.evaluate(mine, max_new_tokens=args.eval_max_new_tokens, keep_going=keep_going)
        keys = {"eval_rerank": "reward_rerank", "eval_format": "reward_format", "eval_recall@1": "recall@1",
                "eval_parsed": "parsed"}
        if args.fsdp:
            return {k: sum(r[v] for r in records) / len(records) for k, v in keys.items()}
        return {k: distributed.all_sum(sum(r[v] for r in records), d) / len(evals) for k, v in keys.items()}

    if evals and state.get("eval_before") is None:
        say(f"evaluating the starting policy on {len(evals)} held-out samples ...")
        state["eval_before"] = evaluate()
        if d.main:
            append_metrics(out, {"step": 0, **state["eval_before"]})
        say("before: " + ", ".join(f"{k} {v:.3f}" for k, v in state["eval_before"].items()))

    def save(step):
        weights, opt_state = trained(), optimizer_state()
        if d.main:
            write_checkpoint(out, step, weights, opt_state, {"args": vars(args), "eval_before": state["eval_before"],
                                                            "kl_coef": kl_ctl.value, "bad_steps": state["bad_steps"]})
        distributed.barrier(d)

    stop = StopFlag()
    bar = tqdm(total=args.steps, initial=step, desc="ppo", unit="step", dynamic_ncols=True, disable=not d.main)
    while step < args.steps:
        t0 = time.time()
        # 1. Rollout: n samples per prompt from the current policy (pages encoded once, shared by every forward).
        order = sample_order(len(train), args.prompts_per_step, step, args.seed)
        samples = [train[i] for i in distributed.shard(order, d)]
        batch = processor.rerank_inputs([s.query for s in samples], [s.images for s in samples])
        policy.eval()
        gen = torch.Generator(d.device).manual_seed(args.seed * 1_000_003 + step * 1009 + d.rank)
        with autocast:
            pages = encode_pages(policy, batch)
            batch["image_features"] = torch.cat(pages[0])
            rollout = generate(policy, processor, batch, args.max_new_tokens, temperature=args.temperature,
                               n=args.samples, generator=gen, keep_going=keep_going)
        t_rollout = time.time() - t0
        # 2. Rewards: the fused reward of each response (row i answers prompt i // samples).
        parts = [fused_reward(text, samples[i // args.samples].positives, len(samples[i // args.samples].images),
                              args.w_rerank, args.w_format, args.w_think) for i, text in enumerate(rollout.texts)]
        scores = torch.tensor([p["reward"] for p in parts])
        # 3. Old and reference log-probs, values, advantages; 4. the clipped updates.
        with autocast:
            exp = make_experience(policy, batch, pages, rollout, scores, args.samples, cfg, kl_ctl.value, critic,
                                  reference, reduce)
            for m in (policy, critic):
                if m is not None:
                    m.train()
            stats = ppo_update(policy, exp, optimizer, params, cfg, kl_ctl.value, critic,
                               value_only=step < args.critic_warmup,
                               generator=torch.Generator().manual_seed(args.seed * 7919 + step * 1009 + d.rank),
                               forwards=forwards, reduce=reduce, world=d.world)
        m = exp.mask.float()
        rows = distributed.all_sum(len(scores), d)
        mean = lambda x: distributed.all_sum(float(x), d) / rows  # noqa: E731  (mean over the global rollout)
        kl = mean(((exp.old_logp - exp.ref_logp) * m).sum())  # KL(policy || reference) per sequence
        kl_ctl.update(kl, int(rows))
        n_minibatches = args.epochs * -(-len(scores) // cfg.minibatch_size)
        state["bad_steps"] = state["bad_steps"] + 1 if stats["skipped"] == n_minibatches else 0
        step += 1
        record = {"step": step, "reward": mean(scores.sum()),
                  **{k: mean(sum(p[k] for p in parts)) for k in ("rerank", "format", "think")},
                  "kl": kl, "kl_coef": kl_ctl.value, **stats,
                  "explained_variance": explained_variance(exp.old_values, exp.returns, m)
                  if args.advantage == "gae" else None,
                  "response_length": mean(rollout.lengths.sum()),
                  "parse_failure": mean(sum("<answer>[" not in t for t in rollout.texts)),
                  "tokens_per_s": distributed.all_sum(int(rollout.mask.sum()), d) / max(t_rollout, 1e-9),
                  "step_s": time.time() - t0}
        if evals and args.eval_every and step % args.eval_every == 0 and step < args.steps:
            record.update(evaluate())
            say(f"step {step}: held-out rerank reward {record['eval_rerank']:.3f}, format "
                f"{record['eval_format']:.3f}, Recall@1 {record['eval_recall@1']:.3f}")
        if stats["skipped"]:
            say(f"step {step}: {stats['skipped']} update(s) skipped: non-finite loss or gradient")
        if d.main:
            append_metrics(out, record)
            plot_curves(read_metrics(out / "metrics.jsonl"), CURVES, out / "curve.png", title=f"train_ppo.py  {out}")
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{kl:.3f}", len=f"{record['response_length']:.0f}")
        if state["bad_steps"] >= args.max_bad_steps:
            bar.close()
            sys.exit(f"error: {state['bad_steps']} steps in a row had only non-finite updates; stopping "
                     f"(last good checkpoint in {out / 'checkpoints'}). Lower --lr or raise --kl-coef?")
        stopping = distributed.all_sum(float(stop.requested), d) > 0  # every rank stops at the same step
        if step % args.save_every == 0 or step == args.steps or stopping:
            save(step)
        if stopping:
            break
    bar.close()
    if step < args.steps:
        say(f"stopped at step {step}/{args.steps}; checkpoint saved in {out / 'checkpoints'}; run again to resume")
        return distributed.cleanup(d)

    after = evaluate() if evals else None
    weights = trained_tensors(policy)  # not a separate critic's: the final model is the policy alone
    if d.main:
        if after is not None:
            append_metrics(out, {"step": step, **after})
            plot_curves(read_metrics(out / "metrics.jsonl"), CURVES, out / "curve.png", title=f"train_ppo.py  {out}")
        save_final_policy(args, weights, out / "model")
        summary = {"steps": step, "eval_before": state["eval_before"], "eval_after": after, "model": str(out / "model")}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"final policy (HF layout): {out / 'model'}")
        if after is not None:
            for k in after:
                print(f"held-out {k}: {state['eval_before'][k]:.3f} -> {after[k]:.3f}")
    distributed.barrier(d)
    distributed.cleanup(d)


def save_final_policy(args, weights: dict, path: Path):
    """A plain HF-layout checkpoint of the policy: trained tensors in a fresh base model, LoRA merged, no value head.
    Frozen tensors are the base's own (under LoRA they sat in bf16 for memory only), not bf16-rounded copies."""
    model = Qwen2VL.from_pretrained(args.model)
    if args.lora_rank > 0:
        add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets)
    distributed.load_full_state_dict(model, {k: v for k, v in weights.items() if not k.startswith("value_head.")})
    merge_lora(model)
    dtype = model.config.stored_dtype if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
    model.to(dtype).save_pretrained(path, side_files_from=args.model)


if __name__ == "__main__":
    main()
