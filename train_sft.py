"""Supervised fine-tuning of a Qwen2-VL / Qwen2.5-VL reranker on MM-R5-style reasoning chains.

With no arguments: builds the built-in demo under runs/demo/ (synthetic pages, a tiny random Qwen2.5-VL, a
tokenizer), trains it on 2 CPU cores for a few minutes and reports held-out Recall@1 before -> after.
With --model/--train/--eval/--out: the same loop on your checkpoint and data (see README: data format, recipes).
A run in --out resumes from its last checkpoint; Ctrl-C saves one before exiting.
"""
import argparse
import contextlib
import json
import math
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
from mmr5.processor import Processor
from mmr5.reranker import Reranker, check_before_loading, check_pair
from mmr5.sft import learning_rate, sample_order, sft_batch, sft_loss
from mmr5.synthetic import build_demo

# The built-in default: what `python train_sft.py` runs (sized to learn in minutes on 2 CPU cores).
DEMO = dict(out="runs/demo/sft", steps=300, batch_size=16, lr=2e-3, warmup_steps=30, eval_every=100,
            save_every=100, eval_max_new_tokens=128)
# Flags whose change makes a checkpoint's continuation a different run.
RUN_IDENTITY = ("model", "train", "batch_size", "lora_rank", "lora_alpha", "lora_targets", "seed", "freeze_vision")
CURVES = ["loss", "eval_recall@1", "lr"]


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
    m.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    m.add_argument("--fsdp", action="store_true", help="under torchrun, shard the model with FSDP2 (default: DDP)")
    m.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast (auto: on for CUDA GPUs that have bf16, Ampere and later)")
    m.add_argument("--save-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="dtype of the final model's weights (auto: the base checkpoint's, e.g. bfloat16 for the "
                        "released Qwen models and MM-R5; float32 keeps updates smaller than a bfloat16 step)")
    m.add_argument("--min-pixels", type=int, help="override the checkpoint's preprocessor min_pixels")
    m.add_argument("--max-pixels", type=int, help="override the checkpoint's preprocessor max_pixels")
    r = p.add_argument_group("evaluation, checkpoints, logging")
    r.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0 = before and after only)")
    r.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N eval samples (0 = all)")
    r.add_argument("--eval-max-new-tokens", type=int, default=1024, help="generation budget per eval answer")
    r.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (and at the end, and on Ctrl-C)")
    r.add_argument("--log-every", type=int, default=10, help="write metrics.jsonl / curve.png every N steps")
    r.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    r.add_argument("--max-bad-steps", type=int, default=3, help="stop after this many non-finite steps in a row")
    args = p.parse_args(argv)
    demo = not any((args.model, args.train, args.eval, args.out))
    if demo:
        for k, v in DEMO.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    elif not (args.model and args.train and args.out):
        p.error("--model, --train and --out are required unless all of --model/--train/--eval/--out are unset (demo)")
    for name in ("batch_size", "log_every", "save_every", "max_bad_steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.lr <= 0 or args.micro_batch_size < 0 or (args.steps is not None and args.steps <= 0) or args.epochs <= 0:
        p.error("--lr, --steps and --epochs must be positive, --micro-batch-size >= 0")
    if args.min_pixels and args.max_pixels and args.max_pixels < args.min_pixels:
        p.error(f"--max-pixels ({args.max_pixels}) is smaller than --min-pixels ({args.min_pixels})")
    return args, demo


def main(argv=None):
    args, demo = parse_args(argv)
    d = distributed.setup(args.device)
    say = print if d.main else (lambda *a, **k: None)
    if demo:
        say("built-in demo: synthetic pages + a tiny random Qwen2.5-VL (see README); building it under runs/demo/ ...")
        if d.main:
            build_demo()
        distributed.barrier(d)
        paths = build_demo()
        args.model, args.train, args.eval = paths["base"], paths["train"], paths["eval"]
    out = Path(args.out)
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and d.device.startswith("cuda") and torch.cuda.is_bf16_supported())
    torch.manual_seed(args.seed)

    try:
        check_output_folder(out)
        train = read_samples(args.train, require_response=True)
        evals = read_samples(args.eval) if args.eval else []
    except (DataError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.eval_limit:
        evals = evals[: args.eval_limit]
    total = args.steps or max(1, round(args.epochs * len(train) / args.batch_size))
    micro = args.micro_batch_size or args.batch_size

    try:  # a frozen base can sit in bf16; trained weights stay float32 (autocast computes in bf16)
        dtype = torch.bfloat16 if bf16 and args.lora_rank > 0 else torch.float32
        check_before_loading(args.model, train + evals, args.min_pixels, args.max_pixels, responses=True)
        model = Qwen2VL.from_pretrained(args.model, dtype=dtype, device=d.device)
        processor = Processor.from_pretrained(args.model, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
        check_pair(model, processor)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.lora_rank > 0:
        add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_dropout)
    if args.freeze_vision:
        model.visual.requires_grad_(False)
    model.set_gradient_checkpointing(args.grad_checkpointing)
    forward = distributed.wrap(model, d, args.fsdp)  # DDP or FSDP2 under torchrun; the model itself alone
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))

    def trained() -> dict:
        """The tensors a checkpoint holds: the adapters, or the whole model (a tied lm_head once). Collective."""
        full = distributed.full_state_dict(model, d)
        if args.lora_rank > 0:
            return {k: v for k, v in full.items() if ".lora_" in k}
        return {k: v for k, v in full.items() if not (model.config.tie_word_embeddings and k == "lm_head.weight")}

    step, state = 0, {"eval_before": None}
    resumed = resume_checkpoint(out, args, RUN_IDENTITY)
    if resumed is not None:
        weights, opt_tensors, rng, state = resumed
        distributed.load_full_state_dict(model, weights)
        load_optimizer(model, optimizer, opt_tensors, state["optimizer"])
        set_rng_state(rng, state["rng"])
        step = state["step"]
        if step >= total and (out / "summary.json").exists():
            say(f"{out} already holds a finished run ({json.loads((out / 'summary.json').read_text())}); "
                "--no-resume starts it over")
            return distributed.cleanup(d)
        if d.main:
            rewind_metrics(out, step)
        say(f"resuming {out} from step {step}/{total}")
    elif d.main and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # a fresh run in an old folder: its curve starts over
    out.mkdir(parents=True, exist_ok=True)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ranks = f", {d.world} ranks ({'FSDP2' if args.fsdp else 'DDP'})" if d.world > 1 else ""
    say(f"model {args.model}: {model.num_parameters() / 1e6:.2f}M parameters, {n_trained / 1e6:.2f}M trained "
        f"({'LoRA r%d' % args.lora_rank if args.lora_rank else 'full'}), {d.device}{' bf16' if bf16 else ''}{ranks}; "
        f"{len(train)} train / {len(evals)} eval samples; {total} steps of {args.batch_size}")

    reranker = Reranker(model, processor, batch_size=max(micro, 8))
    autocast = torch.autocast(d.device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)

    def evaluate() -> float:
        """Held-out Recall@1 (greedy). DDP ranks split the samples; FSDP ranks all run all of them, because
        their forwards are collectives and must stay in step."""
        model.eval()
        mine = evals if args.fsdp else distributed.shard(evals, d)
        keep_going = (lambda local: distributed.all_sum(float(local), d) > 0) if args.fsdp and d.world > 1 else None
        with autocast:
            records = reranker.evaluate(mine, max_new_tokens=args.eval_max_new_tokens, keep_going=keep_going)
        model.train()
        hits = [r["recall@1"] for r in records]
        if args.fsdp:
            return sum(hits) / max(1, len(hits))
        return distributed.all_sum(sum(hits), d) / max(1, len(evals))

    if evals and state.get("eval_before") is None:
        say(f"evaluating the starting model on {len(evals)} held-out samples ...")
        state["eval_before"] = evaluate()
        if d.main:
            append_metrics(out, {"step": 0, "eval_recall@1": state["eval_before"]})
        say(f"held-out Recall@1 before training: {state['eval_before']:.3f}")

    def save(step):
        weights, opt_state = trained(), optimizer_tensors(model, optimizer)  # collectives: every rank
        if d.main:
            write_checkpoint(out, step, weights, opt_state, {"args": vars(args), "eval_before": state["eval_before"]})
        distributed.barrier(d)

    stop = StopFlag()
    model.train()
    bar = tqdm(total=total, initial=step, desc="sft", unit="step", dynamic_ncols=True, disable=not d.main)
    log, t_last, tokens_since, bad_steps = [], time.time(), 0, 0
    while step < total:
        lr = learning_rate(step, total, args.lr, args.warmup_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mine = distributed.shard(sample_order(len(train), args.batch_size, step, args.seed), d)
        batches = [sft_batch(processor, [train[i] for i in mine[s:s + micro]]) for s in range(0, len(mine), micro)]
        # Token-mean over the whole global batch: every rank divides by the same total; DDP/FSDP then average
        # gradients over ranks, so the loss is scaled by the world size to make that average a sum.
        n_tokens = distributed.all_sum(sum(int(b["labels_mask"][:, 1:].sum()) for b in batches), d)
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1 or d.world == 1 or args.fsdp
            with autocast, (contextlib.nullcontext() if sync else forward.no_sync()):
                loss, _ = sft_loss(model, batch, forward)
                (loss * d.world / n_tokens).backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf")).item()
        step_loss = distributed.all_sum(loss_sum, d) / n_tokens
        if math.isfinite(step_loss) and math.isfinite(grad_norm):  # the NaN/inf guard: a bad step changes nothing
            optimizer.step()
            bad_steps = 0
        else:
            bad_steps += 1
            tqdm.write(f"step {step + 1}: non-finite loss or gradient ({step_loss}, {grad_norm}); update skipped")
            if d.main:
                append_metrics(out, {"step": step + 1, "skipped": 1})
            if bad_steps >= args.max_bad_steps:
                sys.exit(f"error: {bad_steps} non-finite steps in a row; stopping (last good checkpoint in "
                         f"{out / 'checkpoints'}). Lower --lr?")
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_since += distributed.all_sum(sum(int(b["attention_mask"].sum()) for b in batches), d)
        log += [step_loss] if math.isfinite(step_loss) else []
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}")
        record = None
        if step % args.log_every == 0 or step == total:
            elapsed = time.time() - t_last
            record = {"step": step, "loss": sum(log) / max(1, len(log)), "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens_since / elapsed}
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            log, t_last, tokens_since = [], time.time(), 0
        if evals and args.eval_every and step % args.eval_every == 0 and step < total:
            record = record or {"step": step}
            record["eval_recall@1"] = evaluate()
            if d.main:
                tqdm.write(f"step {step}: held-out Recall@1 {record['eval_recall@1']:.3f}")
        if record and d.main:
            append_metrics(out, record)
            plot_curves(read_metrics(out / "metrics.jsonl"), CURVES, out / "curve.png", title=f"train_sft.py  {out}")
        stopping = distributed.all_sum(float(stop.requested), d) > 0  # every rank stops at the same step
        if step % args.save_every == 0 or step == total or stopping:
            save(step)
        if stopping:
            break
    bar.close()
    if step < total:
        say(f"stopped at step {step}/{total}; checkpoint saved in {out / 'checkpoints'}; run again to resume")
        return distributed.cleanup(d)

    after = evaluate() if evals else None
    weights = trained()  # frozen tensors come from the base checkpoint as they are (not bf16-rounded copies)
    if d.main:
        if after is not None:
            append_metrics(out, {"step": step, "eval_recall@1": after})
            plot_curves(read_metrics(out / "metrics.jsonl"), CURVES, out / "curve.png", title=f"train_sft.py  {out}")
        save_final_model(args, weights, out / "model")
        summary = {"steps": step, "eval_recall@1_before": state["eval_before"], "eval_recall@1_after": after,
                   "model": str(out / "model")}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"final model (HF layout, loads in transformers / vLLM / evaluate.py / train_ppo.py): {out / 'model'}")
        if after is not None:
            print(f"held-out Recall@1: {state['eval_before']:.3f} -> {after:.3f}  (curve: {out / 'curve.png'})")
    distributed.barrier(d)
    distributed.cleanup(d)


def save_final_model(args, weights: dict, path: Path):
    """A plain HF-layout checkpoint: the trained tensors put into a fresh copy of the base model, LoRA merged. Under
    LoRA the frozen base sat in bf16 for memory only (autocast rounds every matmul's weights to bf16 anyway), so the
    merged model is the base's own weights + the learned update."""
    model = Qwen2VL.from_pretrained(args.model)
    if args.lora_rank > 0:
        add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_dropout)
    distributed.load_full_state_dict(model, weights)
    merge_lora(model)
    dtype = model.config.stored_dtype if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
    model.to(dtype).save_pretrained(path, side_files_from=args.model)


if __name__ == "__main__":
    main()
