"""mmr5 against TRL on the same work: train_ppo.py --advantage grpo's step vs TRL's GRPOTrainer, and
train_sft.py's step vs TRL's SFTTrainer.

The same model (the demo's SFT model by default), the same rerank prompts and pages, the same fused reward, the same
objective (group advantages, clip 0.2, beta 0.04 k3 KL, sequence aggregation, full fine-tuning with a frozen
reference copy, vision tower frozen), `--prompts` x `--samples` rows per rollout, `--epochs` passes over it in
`--minibatch`-row optimizer steps. One rollout and its updates = one step. Each side runs in its own fresh process
per repetition (peak RSS is its own), the sides taking turns (this machine's speed drifts); the first step of each
process is a warm-up and is not counted. SFT: `--sft-batch` samples of the demo's SFT data per optimizer step
(its batch), lr 2e-3 constant, full fine-tuning, vision trained, the loss on response tokens only.

TRL, transformers, accelerate and datasets are bench-only (requirements-bench.txt); no CPU torchvision wheel is
reachable here, so TRL's Qwen2.5-VL processor is assembled from its parts (the PIL image processor, the tokenizer,
the checkpoint's chat template) as from_pretrained would, without a video processor.
Named vs_trl.py, not trl.py: Python puts a script's folder first on sys.path, so a bench/trl.py would shadow the
`trl` package it imports. tests/test_vs_trl.py runs both sides on a tiny model.
Usage: python bench/vs_trl.py [--model runs/demo/sft/model --train runs/demo/data/train.jsonl] [--repeat 2]
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import in_own_process, rss_kib, setup_threads

PHASES = ("rollout", "reward", "log-probs (old + reference)", "update")
SFT_PHASES = ("forward + backward", "data, optimizer")


def load_samples(path, count):
    from mmr5.data import read_samples

    return [s for s in read_samples(path) if s.positives][:count]


def mmr5_steps(args, queue):
    """train_ppo.py's GRPO step (its library calls, in its order), timed by phase."""
    import copy

    from mmr5.model import Qwen2VL
    from mmr5.ppo import PPOConfig, encode_pages, make_experience, ppo_update
    from mmr5.processor import Processor
    from mmr5.rewards import fused_reward
    from mmr5.sampler import generate

    setup_threads()
    torch.manual_seed(0)
    samples = load_samples(args.train, args.prompts * (args.steps + 1))
    policy = Qwen2VL.from_pretrained(args.model)
    policy.visual.requires_grad_(False)
    processor = Processor.from_pretrained(args.model)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    cfg = PPOConfig(advantage="grpo", kl_in="loss", kl_coef=args.beta, clip=0.2, epochs=args.epochs,
                    minibatch_size=args.minibatch, micro_batch_size=args.minibatch)
    phases, tokens, start = dict.fromkeys(PHASES, 0.0), 0, None
    for step in range(args.steps + 1):
        if step == 1:  # step 0 is the warm-up
            phases, tokens, start = dict.fromkeys(PHASES, 0.0), 0, time.perf_counter()
        part = samples[step * args.prompts:(step + 1) * args.prompts]
        t0 = time.perf_counter()
        batch = processor.rerank_inputs([s.query for s in part], [s.images for s in part])
        policy.eval()
        pages = encode_pages(policy, batch)  # once per rollout, shared by every forward over it (as train_ppo.py)
        rollout = generate(policy, processor, batch, args.max_new_tokens, n=args.samples,
                           generator=torch.Generator().manual_seed(step), image_features=torch.cat(pages[0]))
        t1 = time.perf_counter()
        scores = torch.tensor([fused_reward(text, part[i // args.samples].positives,
                                            len(part[i // args.samples].images))["reward"]
                               for i, text in enumerate(rollout.texts)])
        t2 = time.perf_counter()
        exp = make_experience(policy, batch, pages, rollout, scores, args.samples, cfg, args.beta,
                              reference=reference)
        t3 = time.perf_counter()
        policy.train()
        ppo_update(policy, exp, optimizer, params, cfg, args.beta, generator=torch.Generator().manual_seed(step))
        t4 = time.perf_counter()
        for name, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[name] += dt
        tokens += int(rollout.mask.sum())
    queue.put(dict(step_s=(time.perf_counter() - start) / args.steps, phases=phases, tokens=tokens,
                   peak_rss_gib=rss_kib("VmHWM") / 2**20))


def trl_processor(model_dir):
    """Qwen2.5-VL's processor from its parts, as from_pretrained would build it (without the video processor, whose
    class needs torchvision)."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImagesOnlyProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, argument):
            if name != "video_processor":
                return super().check_argument_for_proper_class(name, argument)

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "preprocessor_config.json").read_text())
    image_processor = Qwen2VLImageProcessorPil(**{k: v for k, v in config.items()
                                                  if k not in ("image_processor_type", "processor_class")})
    template = json.loads((model_dir / "chat_template.json").read_text())["chat_template"]
    return ImagesOnlyProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(model_dir),
                               video_processor=None, chat_template=template)


def trl_steps(args, queue):
    """TRL's GRPOTrainer on the same work, its phases timed by wrapping its own methods."""
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from mmr5.processor import Processor, load_rgb
    from mmr5.rewards import fused_reward

    setup_threads()
    samples = load_samples(args.train, args.prompts * (args.steps + 1))
    ours = Processor.from_pretrained(args.model)
    dataset = Dataset.from_list([{"prompt": ours.rerank_messages(s.query, len(s.images)),
                                  "images": [load_rgb(p) for p in s.images], "positives": s.positives,
                                  "n": len(s.images)} for s in samples])

    def reward(prompts, completions, positives, n, **_):
        return [fused_reward(c[0]["content"], p, k)["reward"] for c, p, k in zip(completions, positives, n)]

    rows = args.prompts * args.samples
    state = dict(phases=dict.fromkeys(PHASES, 0.0), tokens=0, start=None)
    updates_per_step = rows // args.minibatch * args.epochs

    class Timed(GRPOTrainer):
        def _generate(self, *a, **k):
            t0 = time.perf_counter()
            out = super()._generate(*a, **k)
            state["phases"]["rollout"] += time.perf_counter() - t0
            return out

        def _calculate_rewards(self, *a, **k):
            t0 = time.perf_counter()
            out = super()._calculate_rewards(*a, **k)
            state["phases"]["reward"] += time.perf_counter() - t0
            return out

        def _get_per_token_logps_and_entropies(self, *a, **k):
            if torch.is_grad_enabled():  # the update's forward
                return super()._get_per_token_logps_and_entropies(*a, **k)
            t0 = time.perf_counter()
            out = super()._get_per_token_logps_and_entropies(*a, **k)
            state["phases"]["log-probs (old + reference)"] += time.perf_counter() - t0
            return out

        def _generate_and_score_completions(self, *a, **k):
            out = super()._generate_and_score_completions(*a, **k)
            state["tokens"] += int(out["completion_mask"].sum())
            return out

    class AfterWarmup(TrainerCallback):
        def on_step_end(self, _args, trainer_state, control, **kwargs):
            if trainer_state.global_step == updates_per_step:  # the warm-up step's updates are done
                state.update(phases=dict.fromkeys(PHASES, 0.0), tokens=0, start=time.perf_counter())

    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    model.model.visual.requires_grad_(False)
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, per_device_train_batch_size=args.minibatch, gradient_accumulation_steps=1,
            steps_per_generation=rows // args.minibatch, num_generations=args.samples, num_iterations=args.epochs,
            max_completion_length=args.max_new_tokens, temperature=1.0, beta=args.beta, epsilon=0.2,
            loss_type="grpo", use_bias_correction_kl=False, learning_rate=args.lr, adam_beta2=0.95,
            weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=1.0,
            max_steps=updates_per_step * (args.steps + 1), use_cpu=True, bf16=False, report_to="none",
            save_strategy="no", logging_steps=10**6, seed=0, dataloader_num_workers=0,
            gradient_checkpointing=args.trl_grad_checkpointing == "on")
        trainer = Timed(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                        processing_class=trl_processor(args.model), callbacks=[AfterWarmup()])
        trainer.train()
    total = time.perf_counter() - state["start"]
    phases = state["phases"]
    phases["update"] = total - sum(phases.values())
    queue.put(dict(step_s=total / args.steps, phases=phases, tokens=state["tokens"],
                   peak_rss_gib=rss_kib("VmHWM") / 2**20))


def mmr5_sft_steps(args, queue):
    """train_sft.py's step (one micro-batch: the whole batch), timed."""
    from mmr5.model import Qwen2VL
    from mmr5.processor import Processor
    from mmr5.sft import sft_batch, sft_loss

    setup_threads()
    torch.manual_seed(0)
    samples = load_samples(args.train, args.sft_batch * (args.steps + 1))
    model = Qwen2VL.from_pretrained(args.model).train()
    processor = Processor.from_pretrained(args.model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.sft_lr, weight_decay=0.0, betas=(0.9, 0.95))
    phases, tokens, start = dict.fromkeys(SFT_PHASES, 0.0), 0, None
    for step in range(args.steps + 1):
        if step == 1:
            phases, tokens, start = dict.fromkeys(SFT_PHASES, 0.0), 0, time.perf_counter()
        t0 = time.perf_counter()
        batch = sft_batch(processor, samples[step * args.sft_batch:(step + 1) * args.sft_batch])
        t1 = time.perf_counter()
        loss, n_tokens = sft_loss(model, batch)
        (loss / n_tokens).backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        phases["forward + backward"] += t2 - t1
        phases["data, optimizer"] += time.perf_counter() - t2 + t1 - t0
        tokens += int(batch["attention_mask"].sum())
    queue.put(dict(step_s=(time.perf_counter() - start) / args.steps, phases=phases, tokens=tokens,
                   peak_rss_gib=rss_kib("VmHWM") / 2**20))


def trl_sft_steps(args, queue):
    """TRL's SFTTrainer on the same samples (prompt-completion form: the loss on the completion only)."""
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from mmr5.processor import Processor, load_rgb

    setup_threads()
    samples = load_samples(args.train, args.sft_batch * (args.steps + 1))
    ours = Processor.from_pretrained(args.model)
    dataset = Dataset.from_list([{"prompt": ours.rerank_messages(s.query, len(s.images)),
                                  "completion": [{"role": "assistant", "content": s.response}],
                                  "images": [load_rgb(p) for p in s.images]} for s in samples])
    state = dict(phases=dict.fromkeys(SFT_PHASES, 0.0), tokens=0, start=None)

    class Timed(SFTTrainer):
        def training_step(self, model, inputs, *a, **k):
            t0 = time.perf_counter()
            out = super().training_step(model, inputs, *a, **k)
            state["phases"]["forward + backward"] += time.perf_counter() - t0
            state["tokens"] += int(inputs["attention_mask"].sum())
            return out

    class AfterWarmup(TrainerCallback):
        def on_step_end(self, _args, trainer_state, control, **kwargs):
            if trainer_state.global_step == 1:
                state.update(phases=dict.fromkeys(SFT_PHASES, 0.0), tokens=0, start=time.perf_counter())

    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, per_device_train_batch_size=args.sft_batch, gradient_accumulation_steps=1,
                           learning_rate=args.sft_lr, adam_beta2=0.95, weight_decay=0.0, lr_scheduler_type="constant",
                           max_grad_norm=1.0, max_steps=args.steps + 1, use_cpu=True, bf16=False, report_to="none",
                           save_strategy="no", logging_steps=10**6, seed=0, dataloader_num_workers=0,
                           max_length=None, gradient_checkpointing=args.trl_grad_checkpointing == "on")
        trainer = Timed(model=model, args=config, train_dataset=dataset, processing_class=trl_processor(args.model),
                        callbacks=[AfterWarmup()])
        trainer.train()
    total = time.perf_counter() - state["start"]
    state["phases"]["data, optimizer"] = total - state["phases"]["forward + backward"]
    queue.put(dict(step_s=total / args.steps, phases=state["phases"], tokens=state["tokens"],
                   peak_rss_gib=rss_kib("VmHWM") / 2**20))


def report(title, results, phases, steps, goal_speed, goal_memory=None):
    print(title)
    summary = {}
    for side, runs in results.items():
        failed = [r["failed"] for r in runs if "failed" in r]
        if failed:
            print(f"  {side}: {failed[0]}")
            continue
        step_s = statistics.median(r["step_s"] for r in runs)
        shares = {k: sum(r["phases"][k] for r in runs) / sum(sum(r["phases"].values()) for r in runs) for k in phases}
        tokens_s = statistics.median(r["tokens"] / (r["step_s"] * steps) for r in runs)
        peak = max(r["peak_rss_gib"] for r in runs)
        summary[side] = (step_s, peak)
        each = ", ".join(f"{r['step_s']:.2f}" for r in runs)
        print(f"  {side:5s} {step_s:7.2f} s/step  {tokens_s:8.1f} tokens/s  peak RSS {peak:.2f} GiB  "
              + " / ".join(f"{k} {v:.0%}" for k, v in shares.items()) + f"  (each process: {each} s/step)")
    if len(summary) == 2:
        memory = f" (goal <= {goal_memory})" if goal_memory else ""
        print(f"  TRL/mmr5 step time {summary['TRL'][0] / summary['mmr5'][0]:.2f}x (goal >= {goal_speed}), "
              f"mmr5/TRL peak RSS {summary['mmr5'][1] / summary['TRL'][1]:.2f}{memory}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/demo/sft/model", help="HF-layout Qwen2.5-VL directory (python train_sft.py "
                   "builds the default)")
    p.add_argument("--train", default="runs/demo/data/train.jsonl", help="mmr5 JSONL with positives")
    p.add_argument("--prompts", type=int, default=24, help="prompts per rollout")
    p.add_argument("--samples", type=int, default=4, help="responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--minibatch", type=int, default=24, help="rows per optimizer step")
    p.add_argument("--epochs", type=int, default=2, help="passes over each rollout")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--sft-batch", type=int, default=16, help="SFT samples per optimizer step (the demo's)")
    p.add_argument("--sft-lr", type=float, default=2e-3, help="SFT learning rate (the demo's peak)")
    p.add_argument("--only", choices=["grpo", "sft"], help="run one comparison (default: both)")
    p.add_argument("--trl-grad-checkpointing", choices=["on", "off"], default="off", help="TRL's default is on "
                   "(it recomputes the forward in backward); off is the same work as mmr5's step")
    p.add_argument("--steps", type=int, default=2, help="timed steps per process (after one warm-up step)")
    p.add_argument("--repeat", type=int, default=2, help="processes per side, taking turns")
    args = p.parse_args()
    if (args.prompts * args.samples) % args.minibatch or args.minibatch % args.samples:
        p.error("--minibatch must hold whole groups and divide --prompts x --samples")
    if args.only != "sft":
        results = {"mmr5": [], "TRL": []}
        for _ in range(args.repeat):
            results["mmr5"].append(in_own_process(mmr5_steps, args))
            results["TRL"].append(in_own_process(trl_steps, args))
        report(f"GRPO, {args.prompts} prompts x {args.samples} samples, {args.max_new_tokens} new tokens, "
               f"{args.epochs} passes in {args.minibatch}-row minibatches; {args.steps} steps x {args.repeat} "
               f"processes per side (response tokens/s)", results, PHASES, args.steps, 3, 0.8)
    if args.only != "grpo":
        results = {"mmr5": [], "TRL": []}
        for _ in range(args.repeat):
            results["mmr5"].append(in_own_process(mmr5_sft_steps, args))
            results["TRL"].append(in_own_process(trl_sft_steps, args))
        report(f"SFT, {args.sft_batch} samples per step; {args.steps} steps x {args.repeat} processes per side "
               f"(prompt + response tokens/s)", results, SFT_PHASES, args.steps, 1.5)


if __name__ == "__main__":
    main()
