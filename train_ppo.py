"""PPO (with a critic), GRPO or REINFORCE++ fine-tuning of an MM-R5 reranker on the fused reward: rerank + format
(+ think).

With no arguments: continues the built-in demo from its SFT model (runs/demo/sft/model; trains it first if missing)
and reports held-out rewards before -> after. With --model/--train/--eval/--out: your SFT output and data.
Each step, top to bottom: rollout (`--samples` responses per prompt), score (mmr5.rewards), experience (old and
reference log-probs, values, advantages: mmr5.ppo.make_experience), update (clipped policy and value losses:
mmr5.ppo.ppo_update), log. A run in --out resumes from its last checkpoint; Ctrl-C saves one before exiting.
"""
import argparse
import copy
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mmr5 import distributed
from mmr5.data import sample_order
from mmr5.critic import PageMarks, ValueHead
from mmr5.ppo import (AdaptiveKL, PPOConfig, buffer_from_tensors, buffer_tensors, encode_pages, explained_variance,
                      last_token, make_experience, outcome, ppo_update, replay_critic)
from mmr5.rewards import fused_reward
from mmr5.run import Run, add_config_flags, add_run_flags, config_from_args, parse_run_args
from mmr5.runlog import read_metrics
from mmr5.sampler import generate

# The built-in demo (why these settings: bench/README.md, "The PPO demo's settings").
DEMO = dict(out="runs/demo/ppo", steps=50, prompts_per_step=24, samples=4, lr=1e-4, max_new_tokens=128,
            eval_every=25, eval_max_new_tokens=128, save_every=5, minibatch_size=24, micro_batch_size=16,
            lam=1.0)
DEMO_SFT = "runs/demo/sft"
GREEDY_BINS = 20  # --critic-greedy: the greedy reward in 20 bins of [0, max reward] (0.1 wide on the demo)
RUN_IDENTITY = ("model", "train", "prompts_per_step", "samples", "lora_rank", "lora_alpha", "lora_targets", "critic",
                "critic_labels", "critic_greedy", "advantage", "seed")
CURVES = ["reward", "rerank", "format", "kl", "value_loss", "explained_variance", "explained_variance_last",
          "eval_rerank", "eval_recall@1"]


def parse_args(argv=None):
    demo_flags = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO.items())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog=f"The built-in demo replaces these defaults (flags you give win): {demo_flags}")
    add_run_flags(p, model_help="local HF-layout checkpoint to start from (an SFT output)",
                  train_help="training JSONL (mmr5 format; no `response` needed)",
                  lora_release="the release: 64; with LoRA the reference is the model with adapters off, else a "
                  "frozen copy", lora_alpha=128, save_every=20)
    add_config_flags(p.add_argument_group("PPO / GRPO (mmr5.ppo.PPOConfig)"), PPOConfig)
    args, demo = parse_run_args(p, argv, DEMO)
    return args, config_from_args(p, args, PPOConfig), demo


def demo_inputs(args):
    """The built-in demo continues from the built-in SFT model, training it first (`python train_sft.py`, as the
    README runs it) when it is missing."""
    if not (Path(DEMO_SFT) / "model" / "config.json").exists():
        print(f"no built-in SFT model in {DEMO_SFT}/model yet: running train_sft.py's built-in default first")
        done = subprocess.run([sys.executable, str(Path(__file__).with_name("train_sft.py"))])
        if done.returncode:
            sys.exit(f"error: the built-in SFT run failed (exit code {done.returncode}); see its output above")
    from mmr5.synthetic import build_rl_demo

    paths = build_rl_demo()  # harder prompts than SFT's: its model is at the ceiling of its own task
    args.model, args.train, args.eval = str(Path(DEMO_SFT) / "model"), paths["train"], paths["eval"]


def build_models(run: Run, cfg: PPOConfig):
    """Policy (vision frozen, as the release: pages are encoded once per rollout), reference (None under LoRA: the
    policy with adapters off), optional separate critic, the value head, and one AdamW with the critic's own lr."""
    policy = run.load_model(freeze_vision=True)
    run.load_processor(policy)
    reference = None if run.args.lora_rank > 0 else copy.deepcopy(policy).requires_grad_(False).eval()
    critic = run.load_model(freeze_vision=True) if cfg.advantage == "gae" and cfg.critic == "separate" else None
    if cfg.advantage == "gae":
        (critic or policy).value_head = ValueHead(policy.config.text.hidden_size).to(run.d.device)
    if cfg.critic_labels or cfg.critic_greedy:
        critic.page_marks = PageMarks(policy.config.text.hidden_size, run.processor.token_texts(),
                                      GREEDY_BINS if cfg.critic_greedy else 0).to(run.d.device)
    models = {"policy": policy, **({"critic": critic} if critic is not None else {})}
    forwards = {}
    for name, m in models.items():
        m.set_gradient_checkpointing(run.args.grad_checkpointing)
        forwards[name] = distributed.wrap(m, run.d, run.args.fsdp)
    critic_params = {id(p) for p in (critic or policy).value_head.parameters()} if cfg.advantage == "gae" else set()
    critic_params |= {id(p) for p in critic.parameters()} if critic is not None else set()
    params = [p for m in models.values() for p in m.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in critic_params], "lr": cfg.lr},
              {"params": [p for p in params if id(p) in critic_params], "lr": cfg.critic_lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95), weight_decay=0.0)
    return models, reference, forwards, params, optimizer


def rollout(run: Run, cfg: PPOConfig, policy, samples: list, step: int, keep_going):
    """`cfg.samples` responses per prompt from the current policy; its pages encoded once and shared by every forward
    over this rollout. With --critic-greedy also its greedy response to each prompt, scored for the critic. -> (prompt
    batch, pages, rollout, each prompt's greedy reward or None)."""
    batch = run.processor.rerank_inputs([s.query for s in samples], [s.images for s in samples])
    policy.eval()
    gen = torch.Generator(run.d.device).manual_seed(run.args.seed * 1_000_003 + step * 1009 + run.d.rank)
    greedy = None
    with run.autocast:
        pages = encode_pages(policy, batch)
        features = torch.cat(pages[0])
        out = generate(policy, run.processor, batch, cfg.max_new_tokens, temperature=cfg.temperature, n=cfg.samples,
                       generator=gen, keep_going=keep_going, image_features=features)
        if cfg.critic_greedy:
            best = generate(policy, run.processor, batch, cfg.max_new_tokens, temperature=0.0,
                            keep_going=keep_going, image_features=features)
            greedy = score(best.texts, samples, cfg, n=1)[0]
    return batch, pages, out, greedy


def score(texts: list[str], samples: list, cfg: PPOConfig, n: int | None = None) -> tuple[torch.Tensor, list[dict]]:
    """The fused reward of each response (row i answers prompt i // n; n: `cfg.samples`) and its parts."""
    n = n or cfg.samples
    parts = [fused_reward(text, samples[i // n].positives, len(samples[i // n].images),
                          cfg.w_rerank, cfg.w_format, cfg.w_think) for i, text in enumerate(texts)]
    return torch.tensor([p["reward"] for p in parts]), parts


def step_record(run: Run, cfg: PPOConfig, scores, parts, exp, out, stats, kl_ctl, seconds: tuple) -> dict:
    """The step's metrics, averaged over the global rollout: rewards, KL to the reference, the update's losses,
    the critic's explained variance on this fresh rollout before it trained on it (over all response tokens, and at
    each response's last token, where the return is already decided), response length and speed."""
    rows = distributed.all_sum(len(scores), run.d)
    mean = lambda x: distributed.all_sum(float(x), run.d) / rows  # noqa: E731
    m = exp.mask.float()
    kl = mean(((exp.old_logp - exp.ref_logp) * m).sum())  # KL(policy || reference) per sequence
    kl_ctl.update(kl, int(rows))
    return {"step": run.step, "reward": mean(scores.sum()),
            **{k: mean(sum(p[k] for p in parts)) for k in ("rerank", "format", "think")},
            "kl": kl, "kl_coef": kl_ctl.value, **stats,
            **({"explained_variance": explained_variance(exp.old_values, exp.returns, m),
                "explained_variance_last": explained_variance(exp.old_values, exp.returns, last_token(m).float())}
               if cfg.advantage == "gae" else {}),
            "response_length": mean(out.lengths.sum()),
            "parse_failure": mean(sum("<answer>[" not in t for t in out.texts)),
            "tokens_per_s": distributed.all_sum(int(out.mask.sum()), run.d) / max(seconds[0], 1e-9),
            "step_s": seconds[1]}


def banner(run: Run, cfg: PPOConfig, policy, params: list, n_train: int) -> str:
    kind = f"LoRA r{run.args.lora_rank}" if run.args.lora_rank else "full"
    critic_kind = ""
    if cfg.advantage == "gae":
        told = [what for what, on in (("the labels", cfg.critic_labels),
                                      ("the greedy answer's reward", cfg.critic_greedy)) if on]
        told = f", told {' and '.join(told)}" if told else ""
        replaying = f", replaying the last {cfg.critic_replay} rollouts" if cfg.critic_replay else ""
        critic_kind = f" + {cfg.critic} critic{told}{replaying}"
    return (f"policy {run.args.model}: {policy.num_parameters() / 1e6:.2f}M parameters, "
            f"{sum(p.numel() for p in params) / 1e6:.2f}M trained ({kind}); {cfg.advantage}{critic_kind}; {n_train} "
            f"train / {len(run.evals)} eval; {cfg.steps} steps x {cfg.prompts_per_step} prompts x {cfg.samples} samples")


def start_critic(cfg: PPOConfig, head: ValueHead, scores, reduce):
    """V starts at the first rollout's mean outcome (`ValueHead.start_at`), over every rank's rows."""
    first = outcome(scores, cfg.samples, cfg)
    first = first[first.isfinite()]  # a non-finite score is skipped by the update; it must not set V
    head.start_at(reduce(float(first.sum())) / max(1.0, reduce(float(first.numel()))))


def warmup_progress(run: Run, cfg: PPOConfig, ev: float | None):
    """Value pretraining ends once the critic's explained variance on fresh rollouts stops setting new bests (VAPO:
    trained longer it overfits)."""
    best, since = run.state.get("warmup_best"), run.state.get("warmup_since_best", 0)
    if ev is not None and (best is None or ev > best + 0.01):
        best, since = ev, 0
    else:
        since += 1
    run.state.update(warmup_best=best, warmup_since_best=since)
    if since >= cfg.critic_warmup_patience or run.step >= cfg.critic_warmup:
        run.state["warmup_over"] = True
        run.say(f"value pretraining over after {run.step} steps (best explained variance {best})")


def critic_summary(out_dir: Path, last: int = 20) -> dict:
    """The critic's median explained variance over the run's last `last` logged steps, over all response tokens and
    at the last token: one figure each for whether it learned (1 predicts every return, 0 no better than a constant)."""
    records = read_metrics(Path(out_dir) / "metrics.jsonl")
    medians = {}
    for key in ("explained_variance", "explained_variance_last"):
        values = [r[key] for r in records if r.get(key) is not None][-last:]
        medians[key] = statistics.median(values) if values else None
    return medians


def finish(run: Run, cfg: PPOConfig):
    """Evaluate and save the final policy (not a separate critic); with a critic, its medians go into summary.json
    and are printed last."""
    critic = {}  # filled only when the finished run writes summary.json

    def summary(before, after):
        critic.update(critic_summary(run.out))
        return {"eval_before": before, "eval_after": after, "critic_last_20_steps": critic}
    run.finish("policy", summary if cfg.advantage == "gae" else None)
    if critic:
        show = {k: "n/a" if v is None else f"{v:.3f}" for k, v in critic.items()}
        print(f"critic: median explained variance over the last 20 steps {show['explained_variance']} over all "
              f"response tokens, {show['explained_variance_last']} at the last token (1: it predicts every return; "
              f"0: no better than a constant)")


def training_prompts(run: Run, cfg: PPOConfig, demo: bool) -> list:
    """The RL prompts with a relevant page among their candidates (the demo's built first), checked for the ranks."""
    if demo:
        if run.main:
            demo_inputs(run.args)
        distributed.barrier(run.d)
        demo_inputs(run.args)
    if cfg.prompts_per_step % run.d.world:
        sys.exit(f"error: --prompts-per-step ({cfg.prompts_per_step}) must be a multiple of the {run.d.world} ranks")
    train = [s for s in run.load_data() if s.positives]  # no relevant page among the candidates: no rerank signal
    if not train:
        sys.exit(f"error: {run.args.train} has no sample with a positive among its candidates")
    return train


def main(argv=None):
    args, cfg, demo = parse_args(argv)
    run = Run(args, "train_ppo.py", RUN_IDENTITY, CURVES)
    train = training_prompts(run, cfg, demo)
    models, reference, forwards, params, optimizer = build_models(run, cfg)
    policy, critic = models["policy"], models.get("critic")
    cfg.minibatch_size = max(1, cfg.minibatch_size // run.d.world)  # each rank's share of an optimizer step
    kl_ctl = AdaptiveKL(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    if not run.start(models, optimizer, cfg.steps, banner(run, cfg, policy, params, len(train))):
        return
    kl_ctl.value = run.state.get("kl_coef", kl_ctl.value)
    reduce = lambda x: distributed.all_sum(x, run.d)  # noqa: E731
    # FSDP forwards are collectives: every rank must decode as long as the longest one.
    keep_going = (lambda local: reduce(float(local)) > 0) if args.fsdp and run.d.world > 1 else None
    # the last --critic-replay rollouts' experience, for the critic's extra passes; in checkpoints, per rank
    replaying = cfg.advantage == "gae" and cfg.critic_replay > 0
    replay = buffer_from_tensors(run.rank_state or {}, run.d.device)
    bar = tqdm(total=cfg.steps, initial=run.step, desc="ppo", unit="step", dynamic_ncols=True, disable=not run.main)
    while run.step < cfg.steps:
        t0 = time.time()
        samples = [train[i] for i in distributed.shard(sample_order(len(train), cfg.prompts_per_step, run.step,
                                                                    args.seed), run.d)]
        batch, pages, out, greedy = rollout(run, cfg, policy, samples, run.step, keep_going)
        warming = cfg.advantage == "gae" and run.step < cfg.critic_warmup and not run.state.get("warmup_over")
        t_rollout = time.time() - t0
        scores, parts = score(out.texts, samples, cfg)
        if cfg.advantage == "gae" and run.step == 0:
            start_critic(cfg, (critic or policy).value_head, scores, reduce)
        with run.autocast:
            exp = make_experience(policy, batch, pages, out, scores, cfg.samples, cfg, kl_ctl.value, critic,
                                  reference, reduce, relevant=[set(s.positives) for s in samples], greedy=greedy)
            for m in models.values():
                m.train()
            generator = torch.Generator().manual_seed(args.seed * 7919 + run.step * 1009 + run.d.rank)
            if cfg.anneal_lr:  # group 0 is the policy's (build_models)
                optimizer.param_groups[0]["lr"] = cfg.lr * (1 - run.step / cfg.steps)
            stats = ppo_update(policy, exp, optimizer, params, cfg, kl_ctl.value, critic, value_only=warming,
                               generator=generator, forwards=forwards, reduce=reduce, world=run.d.world)
            if replaying:
                stats.update(replay_critic(policy, replay, optimizer, params, cfg, critic, generator, forwards,
                                           reduce, run.d.world))
                replay = (replay + [exp])[-cfg.critic_replay:]
        run.step += 1
        record = step_record(run, cfg, scores, parts, exp, out, stats, kl_ctl, (t_rollout, time.time() - t0))
        if warming:
            record["critic_warmup"] = 1
            warmup_progress(run, cfg, record["explained_variance"])
        if stats["skipped"]:
            run.say(f"step {run.step}: {stats['skipped']} update(s) skipped: non-finite loss or gradient")
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}", len=f"{record['response_length']:.0f}")
        if not run.end_step(record, stats["skipped"] < stats["minibatches"], {"kl_coef": kl_ctl.value},
                            (lambda: buffer_tensors(replay)) if replaying else None):
            break
    bar.close()
    finish(run, cfg)


if __name__ == "__main__":
    main()
