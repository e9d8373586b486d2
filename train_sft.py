"""Supervised fine-tuning of a Qwen2-VL / Qwen2.5-VL reranker on MM-R5-style reasoning chains.

With no arguments: builds the built-in demo under runs/demo/ (synthetic pages, a tiny random Qwen2.5-VL, a
tokenizer), trains it on 2 CPU cores for a few minutes and reports held-out Recall@1 before -> after.
With --model/--train/--eval/--out: the same loop on your checkpoint and data (see README: data format, recipes).
A run in --out resumes from its last checkpoint; Ctrl-C saves one before exiting.
"""
import argparse
import contextlib
import math
import time

import torch
from tqdm import tqdm

from mmr5 import distributed
from mmr5.data import sample_order
from mmr5.run import Run, add_run_flags, parse_run_args
from mmr5.sft import learning_rate, sft_batch, sft_loss
from mmr5.synthetic import build_demo

# The built-in default: what `python train_sft.py` runs (sized to learn in minutes on 2 CPU cores).
DEMO = dict(out="runs/demo/sft", steps=300, batch_size=16, lr=2e-3, warmup_steps=30, eval_every=100,
            save_every=100, eval_max_new_tokens=128)
# Flags whose change makes a checkpoint's continuation a different run.
RUN_IDENTITY = ("model", "train", "batch_size", "lora_rank", "lora_alpha", "lora_targets", "seed", "freeze_vision")
CURVES = ["loss", "eval_recall@1", "lr"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_flags(p, model_help="local HF-layout Qwen2-VL / Qwen2.5-VL checkpoint directory",
                  train_help="training JSONL (mmr5 format, every sample with a `response`)",
                  lora_release="the release: 8", lora_alpha=32, save_every=200)
    t = p.add_argument_group("optimisation")
    t.add_argument("--steps", type=int, help="optimizer steps (default: --epochs over the training set)")
    t.add_argument("--epochs", type=float, default=1.0, help="passes over the training set when --steps is unset")
    t.add_argument("--batch-size", type=int, default=8, help="samples per optimizer step")
    t.add_argument("--micro-batch-size", type=int, default=0, help="samples per forward (gradient accumulation); "
                   "0 = batch size")
    t.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (the release: 1e-4 with LoRA)")
    t.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate as a fraction of --lr (cosine)")
    t.add_argument("--warmup-steps", type=int, default=10, help="linear warmup steps")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    t.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    t.add_argument("--freeze-vision", action="store_true", help="keep the vision tower fixed (the release does)")
    t.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    t.add_argument("--log-every", type=int, default=10, help="write metrics.jsonl / curve.png every N steps")
    args, demo = parse_run_args(p, argv, DEMO)
    for name in ("batch_size", "log_every"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.lr <= 0 or args.micro_batch_size < 0 or (args.steps is not None and args.steps <= 0) or args.epochs <= 0:
        p.error("--lr, --steps and --epochs must be positive, --micro-batch-size >= 0")
    return args, demo


def train_step(run: Run, model, forward, processor, optimizer, params, train: list, step: int) -> tuple:
    """One optimizer step on the step's batch (token-mean cross-entropy over the whole global batch; the NaN/inf
    guard skips a bad step). -> (loss, grad norm, tokens seen, lr)."""
    args, d = run.args, run.d
    micro = args.micro_batch_size or args.batch_size
    lr = learning_rate(step, run.total, args.lr, args.warmup_steps, args.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    mine = distributed.shard(sample_order(len(train), args.batch_size, step, args.seed), d)
    batches = [sft_batch(processor, [train[i] for i in mine[s:s + micro]]) for s in range(0, len(mine), micro)]
    # Every rank divides by the same global token count; DDP/FSDP then average gradients over ranks, so the loss is
    # scaled by the world size to make that average a sum.
    n_tokens = distributed.all_sum(sum(int(b["labels_mask"][:, 1:].sum()) for b in batches), d)
    loss_sum = 0.0
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1 or d.world == 1 or args.fsdp
        with run.autocast, (contextlib.nullcontext() if sync else forward.no_sync()):
            loss, _ = sft_loss(model, batch, forward)
            (loss * d.world / n_tokens).backward()
        loss_sum += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf")).item()
    step_loss = distributed.all_sum(loss_sum, d) / n_tokens
    if math.isfinite(step_loss) and math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, distributed.all_sum(sum(int(b["attention_mask"].sum()) for b in batches), d), lr


def main(argv=None):
    args, demo = parse_args(argv)
    run = Run(args, "train_sft.py", RUN_IDENTITY, CURVES)
    if demo:
        run.say("built-in demo: synthetic pages + a tiny random Qwen2.5-VL (see README); building it under runs/demo/ ...")
        if run.main:
            build_demo()
        distributed.barrier(run.d)
        paths = build_demo()
        args.model, args.train, args.eval = paths["base"], paths["train"], paths["eval"]
    train = run.load_data(require_response=True)
    total = args.steps or max(1, round(args.epochs * len(train) / args.batch_size))
    model = run.load_model(args.freeze_vision, args.lora_dropout)
    processor = run.load_processor(model)
    model.set_gradient_checkpointing(args.grad_checkpointing)
    forward = distributed.wrap(model, run.d, args.fsdp)  # DDP or FSDP2 under torchrun; the model itself alone
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    run.eval_batch_size = max(args.micro_batch_size or args.batch_size, 8)
    kind = f"LoRA r{args.lora_rank}" if args.lora_rank else "full"
    if not run.start({"model": model}, optimizer, total,
                     f"model {args.model}: {model.num_parameters() / 1e6:.2f}M parameters, "
                     f"{sum(p.numel() for p in params) / 1e6:.2f}M trained ({kind}); {len(train)} train / "
                     f"{len(run.evals)} eval samples; {total} steps of {args.batch_size}"):
        return
    model.train()
    bar = tqdm(total=total, initial=run.step, desc="sft", unit="step", dynamic_ncols=True, disable=not run.main)
    losses, tokens, clock = [], 0, time.time()
    while run.step < total:
        loss, grad_norm, n, lr = train_step(run, model, forward, processor, optimizer, params, train, run.step)
        run.step += 1
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if not finite:
            tqdm.write(f"step {run.step}: non-finite loss or gradient ({loss}, {grad_norm}); update skipped")
            run.log({"step": run.step, "skipped": 1})
        losses, tokens = losses + [loss] * math.isfinite(loss), tokens + n
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        record = None
        if run.step % args.log_every == 0 or run.step == total:
            record = {"step": run.step, "loss": sum(losses) / max(1, len(losses)), "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens / (time.time() - clock)}
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            losses, tokens, clock = [], 0, time.time()
        if not run.end_step(record, finite):
            break
    bar.close()
    run.finish(summary=lambda before, after: {"eval_recall@1_before": before and before["eval_recall@1"],
                                              "eval_recall@1_after": after and after["eval_recall@1"]})


if __name__ == "__main__":
    main()
