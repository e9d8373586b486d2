"""Supervised fine-tuning of a Qwen2-VL / Qwen2.5-VL reranker on MM-R5-style reasoning chains.

With no arguments: builds the built-in demo under runs/demo/ (synthetic pages, a tiny random Qwen2.5-VL, a
tokenizer), trains it on 2 CPU cores for a few minutes and reports held-out Recall@1 before -> after.
With --model/--train/--eval/--out: the same loop on your checkpoint and data (see README: data format, recipes).
A run in --out resumes from its last checkpoint; Ctrl-C saves one before exiting.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mmr5.checkpoint import (StopFlag, append_metrics, latest_checkpoint, load_checkpoint, load_optimizer,
                             rewind_metrics, save_checkpoint, set_rng_state)
from mmr5.data import DataError, read_samples
from mmr5.lora import add_lora, load_lora_state_dict, lora_state_dict, merge_lora
from mmr5.model import Qwen2VL
from mmr5.plots import plot_curves, read_metrics
from mmr5.processor import Processor
from mmr5.reranker import Reranker
from mmr5.sft import learning_rate, sample_order, sft_batch, sft_loss
from mmr5.synthetic import build_demo

# The built-in default: what `python train_sft.py` runs (sized to learn in minutes on 2 CPU cores).
DEMO = dict(out="runs/demo/sft", steps=600, batch_size=16, lr=2e-3, warmup_steps=30, eval_every=150,
            save_every=100, eval_max_new_tokens=96)
# Flags whose change makes a checkpoint's continuation a different run.
RUN_IDENTITY = ("model", "train", "batch_size", "lora_rank", "lora_alpha", "lora_targets", "seed", "freeze_vision")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("inputs and outputs (all four unset: the built-in demo)")
    io.add_argument("--model", help="local HF-layout Qwen2-VL / Qwen2.5-VL checkpoint directory")
    io.add_argument("--train", help="training JSONL (mmr5 format, every sample with a `response`)")
    io.add_argument("--eval", help="held-out JSONL for Recall@1 before, during and after training")
    io.add_argument("--out", help="output folder: checkpoints/, metrics.jsonl, curve.png, model/ (the final model)")
    t = p.add_argument_group("optimisation")
    t.add_argument("--steps", type=int, help="optimizer steps (default: --epochs over the training set)")
    t.add_argument("--epochs", type=float, default=1.0, help="passes over the training set when --steps is unset")
    t.add_argument("--batch-size", type=int, default=8, help="samples per optimizer step")
    t.add_argument("--micro-batch-size", type=int, default=0, help="samples per forward (gradient accumulation); 0 = batch size")
    t.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (the release: 1e-4 with LoRA)")
    t.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate as a fraction of --lr (cosine)")
    t.add_argument("--warmup-steps", type=int, default=10, help="linear warmup steps")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    t.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    t.add_argument("--seed", type=int, default=0, help="seed for data order and initialisation")
    m = p.add_argument_group("model")
    m.add_argument("--freeze-vision", action="store_true", help="keep the vision tower fixed (the release does)")
    m.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0 = full fine-tuning; the release: 8)")
    m.add_argument("--lora-alpha", type=float, default=32, help="LoRA alpha (the release: 32)")
    m.add_argument("--lora-targets", default="all-linear", help="'all-linear' or suffixes like 'q_proj,v_proj'")
    m.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    m.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (long image prompts)")
    m.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    m.add_argument("--bf16", choices=["auto", "on", "off"], default="auto", help="bf16 autocast (auto: on for CUDA)")
    m.add_argument("--min-pixels", type=int, help="override the checkpoint's preprocessor min_pixels")
    m.add_argument("--max-pixels", type=int, help="override the checkpoint's preprocessor max_pixels")
    r = p.add_argument_group("evaluation, checkpoints, logging")
    r.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0 = before and after only)")
    r.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N eval samples (0 = all)")
    r.add_argument("--eval-max-new-tokens", type=int, default=1024, help="generation budget per eval answer")
    r.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (and at the end, and on Ctrl-C)")
    r.add_argument("--log-every", type=int, default=10, help="write metrics.jsonl / curve.png every N steps")
    r.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    args = p.parse_args(argv)
    demo = not any((args.model, args.train, args.eval, args.out))
    if demo:
        for k, v in DEMO.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    elif not (args.model and args.train and args.out):
        p.error("--model, --train and --out are required unless all of --model/--train/--eval/--out are unset (demo)")
    for name in ("batch_size", "log_every", "save_every"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.lr <= 0 or args.micro_batch_size < 0 or (args.steps is not None and args.steps <= 0) or args.epochs <= 0:
        p.error("--lr, --steps and --epochs must be positive, --micro-batch-size >= 0")
    if args.min_pixels and args.max_pixels and args.max_pixels < args.min_pixels:
        p.error(f"--max-pixels ({args.max_pixels}) is smaller than --min-pixels ({args.min_pixels})")
    return args, demo


def recall_at_1(reranker: Reranker, samples, max_new_tokens: int) -> float:
    records = reranker.evaluate(samples, max_new_tokens=max_new_tokens)
    return sum(r["recall@1"] for r in records) / max(1, len(records))


def main(argv=None):
    args, demo = parse_args(argv)
    if demo:
        print("built-in demo: synthetic pages + a tiny random Qwen2.5-VL (see README); building it under runs/demo/ ...")
        paths = build_demo()
        args.model, args.train, args.eval = paths["base"], paths["train"], paths["eval"]
    out = Path(args.out)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and device.startswith("cuda"))
    torch.manual_seed(args.seed)

    try:
        train = read_samples(args.train, require_response=True)
        evals = read_samples(args.eval) if args.eval else []
    except (DataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if args.eval_limit:
        evals = evals[: args.eval_limit]
    total = args.steps or max(1, round(args.epochs * len(train) / args.batch_size))
    micro = args.micro_batch_size or args.batch_size

    try:  # a frozen base can sit in bf16; trained weights stay float32 (autocast computes in bf16)
        dtype = torch.bfloat16 if bf16 and args.lora_rank > 0 else torch.float32
        model = Qwen2VL.from_pretrained(args.model, dtype=dtype, device=device)
        processor = Processor.from_pretrained(args.model, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.lora_rank > 0:
        add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_dropout)
    if args.freeze_vision:
        model.visual.requires_grad_(False)
    model.set_gradient_checkpointing(args.grad_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))

    def trained() -> dict:
        """The tensors a checkpoint must hold: the adapters, or the whole model (a tied lm_head once)."""
        if args.lora_rank > 0:
            return lora_state_dict(model)
        tied = model.config.tie_word_embeddings
        return {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}

    step, state = 0, {"eval_before": None}
    try:
        ckpt = None if args.no_resume else latest_checkpoint(out)
        if ckpt is not None:
            weights, opt_tensors, rng, state = load_checkpoint(ckpt)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if ckpt is not None:
        changed = [k for k in RUN_IDENTITY if state["args"].get(k) != vars(args).get(k)]
        if changed:
            sys.exit(f"error: {out} holds a run with different {', '.join('--' + k.replace('_', '-') for k in changed)};"
                     " use another --out or --no-resume")
        if args.lora_rank > 0:
            load_lora_state_dict(model, weights)
        else:
            model.load_state_dict(weights, strict=False)  # a tied lm_head is saved once, under embed_tokens
        load_optimizer(optimizer, opt_tensors, state["optimizer"])
        set_rng_state(rng, state["rng"])
        step = state["step"]
        if step >= total and (out / "summary.json").exists():
            summary = json.loads((out / "summary.json").read_text())
            print(f"{out} already holds a finished run ({summary}); --no-resume starts it over")
            return
        rewind_metrics(out, step)
        print(f"resuming {out} from step {step}/{total}")
    elif (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # a fresh run in an old folder: its curve starts over
    out.mkdir(parents=True, exist_ok=True)
    n_trained = sum(p.numel() for p in params)
    print(f"model {args.model}: {model.num_parameters() / 1e6:.2f}M parameters, {n_trained / 1e6:.2f}M trained "
          f"({'LoRA r%d' % args.lora_rank if args.lora_rank else 'full'}), {device}{' bf16' if bf16 else ''}; "
          f"{len(train)} train / {len(evals)} eval samples; {total} steps of {args.batch_size}")

    reranker = Reranker(model, processor, batch_size=max(micro, 8))
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)

    def evaluate():
        model.eval()
        with autocast:
            r1 = recall_at_1(reranker, evals, args.eval_max_new_tokens)
        model.train()
        return r1

    if evals and state.get("eval_before") is None:
        print(f"evaluating the starting model on {len(evals)} held-out samples ...")
        state["eval_before"] = evaluate()
        append_metrics(out, {"step": 0, "eval_recall@1": state["eval_before"]})
        print(f"held-out Recall@1 before training: {state['eval_before']:.3f}")

    def save(step):
        save_checkpoint(out, step, trained(), optimizer, {"args": vars(args), "eval_before": state["eval_before"]})

    stop = StopFlag()
    model.train()
    bar = tqdm(total=total, initial=step, desc="sft", unit="step", dynamic_ncols=True)
    log, t_last, tokens_since = [], time.time(), 0
    while step < total and not stop.requested:
        lr = learning_rate(step, total, args.lr, args.warmup_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = sample_order(len(train), args.batch_size, step, args.seed)
        batches = [sft_batch(processor, [train[i] for i in indices[s:s + micro]]) for s in range(0, len(indices), micro)]
        n_tokens = sum(int(b["labels_mask"][:, 1:].sum()) for b in batches)
        loss_sum = 0.0
        for batch in batches:
            with autocast:
                loss, _ = sft_loss(model, batch)
            (loss / n_tokens).backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf")).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_since += sum(int(b["attention_mask"].sum()) for b in batches)
        log.append(loss_sum / n_tokens)
        bar.update(1)
        bar.set_postfix(loss=f"{log[-1]:.3f}", lr=f"{lr:.2e}")
        record = None
        if step % args.log_every == 0 or step == total:
            elapsed = time.time() - t_last
            record = {"step": step, "loss": sum(log) / len(log), "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens_since / elapsed}
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            log, t_last, tokens_since = [], time.time(), 0
        if evals and args.eval_every and step % args.eval_every == 0 and step < total:
            record = record or {"step": step}
            record["eval_recall@1"] = evaluate()
            tqdm.write(f"step {step}: held-out Recall@1 {record['eval_recall@1']:.3f}")
        if record:
            append_metrics(out, record)
            plot_curves(read_metrics(out / "metrics.jsonl"), ["loss", "eval_recall@1", "lr"], out / "curve.png",
                        title=f"train_sft.py  {out}")
        if step % args.save_every == 0 or step == total or stop.requested:
            save(step)
    bar.close()
    if step < total:
        print(f"stopped at step {step}/{total}; checkpoint saved in {out / 'checkpoints'}; run again to resume")
        return

    after = None
    if evals:
        after = evaluate()
        append_metrics(out, {"step": step, "eval_recall@1": after})
        plot_curves(read_metrics(out / "metrics.jsonl"), ["loss", "eval_recall@1", "lr"], out / "curve.png",
                    title=f"train_sft.py  {out}")
    if args.lora_rank > 0:
        merge_lora(model)
    model.save_pretrained(out / "model", side_files_from=args.model)
    summary = {"steps": step, "eval_recall@1_before": state["eval_before"], "eval_recall@1_after": after,
               "model": str(out / "model")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"final model (HF layout, loads in transformers / vLLM / evaluate.py / train_ppo.py): {out / 'model'}")
    if after is not None:
        print(f"held-out Recall@1: {state['eval_before']:.3f} -> {after:.3f}  (curve: {out / 'curve.png'})")


if __name__ == "__main__":
    main()
