"""One PPO step on a fixed batch: where the time goes, peak memory, tokens/s, and what LoRA's reference saves.

A step = rollout (4 prompts x 4 samples, 5 pages each, 48 new tokens) + experience (old and reference log-probs,
values, GAE) + update (2 epochs of clipped policy + value losses). The policy trains LoRA adapters; its reference
is either the same model with adapters off (mmr5's way: no second copy) or a separate frozen copy. Each variant
runs in its own process; peak memory counts from just before the reference is made. The default size is 100m: on
the tiny config the r64 adapters outweigh the 2.4 MB copy they replace, so the comparison says nothing there.
Usage: python bench/ppo_step.py [--size 100m|tiny] [--device cuda]
"""
import argparse
import copy
import time
from types import SimpleNamespace

import torch
from common import SPECIAL, in_own_process, models, rerank_batch, rss_kib, setup_threads

PROMPTS, SAMPLES, NEW = 4, 4, 48


def measure(size: str, device: str, separate_reference: bool, queue):
    from mmr5.lora import add_lora
    from mmr5.critic import ValueHead
    from mmr5.ppo import PPOConfig, encode_pages, make_experience, ppo_update
    from mmr5.sampler import generate

    setup_threads()
    _, policy = models(size)
    policy = policy.to(device)
    policy.visual.requires_grad_(False)
    proc = SimpleNamespace(pad_id=0, im_end_id=-1, endoftext_id=-1, decode=lambda ids: "",
                           image_pad_id=SPECIAL["image_token_id"], vision_start_id=SPECIAL["vision_start_token_id"],
                           vision_end_id=SPECIAL["vision_end_token_id"])
    batch = rerank_batch(batch=PROMPTS, grid=(1, 8, 8), text_len=60)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = rss_kib("VmRSS") * 1024
    reference = copy.deepcopy(policy).requires_grad_(False) if separate_reference else None
    add_lora(policy, rank=64, alpha=128)
    policy.value_head = ValueHead(policy.config.text.hidden_size).to(device)  # the shared-trunk critic
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    cfg = PPOConfig(epochs=2, minibatch_size=8, micro_batch_size=4)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    t = {}
    sync()
    t0 = time.perf_counter()
    pages = encode_pages(policy, batch)
    rollout = generate(policy, proc, batch, NEW, temperature=1.0, n=SAMPLES, stop_ids=[],
                       generator=torch.Generator(device).manual_seed(0), image_features=torch.cat(pages[0]))
    sync()
    t["rollout"] = time.perf_counter() - t0
    scores = torch.rand(PROMPTS * SAMPLES, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    exp = make_experience(policy, batch, pages, rollout, scores, SAMPLES, cfg, 0.05, None, reference)
    sync()
    t["experience (old + ref log-probs, values, GAE)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    policy.train()
    ppo_update(policy, exp, optimizer, params, cfg, 0.05)
    sync()
    t["update (2 epochs)"] = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else rss_kib("VmHWM") * 1024) - base
    tokens = int(rollout.mask.sum())
    queue.put((t, peak, tokens, policy.num_parameters()))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="100m", help="model size from bench/common.py")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    times, peak_lora, tokens, n_params = in_own_process(measure, args.size, args.device, False)
    _, peak_copy, _, _ = in_own_process(measure, args.size, args.device, True)
    total = sum(times.values())
    print(f"PPO step, {args.size} ({n_params / 1e6:.1f}M parameters), {args.device}: {PROMPTS} prompts x {SAMPLES} "
          f"samples x {NEW} tokens, LoRA r64 policy + value head on the shared trunk")
    print(f"{'phase':<48} {'seconds':>8} {'share':>6}")
    for name, s in times.items():
        print(f"{name:<48} {s:>8.2f} {100 * s / total:>5.1f}%")
    print(f"{'total':<48} {total:>8.2f}   rollout {tokens / times['rollout']:.0f} tokens/s, "
          f"step {tokens / total:.0f} tokens/s")
    print(f"peak memory above the loaded policy: reference = adapters off {peak_lora / 2**20:.0f} MB, "
          f"separate reference copy {peak_copy / 2**20:.0f} MB, ratio {peak_lora / peak_copy:.2f}")


if __name__ == "__main__":
    main()
