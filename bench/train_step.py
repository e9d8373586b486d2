"""One SFT step (forward + backward) on the same batch, mmr5 vs HF transformers: time and peak memory ratios.

Batch: 4 samples x 5 pages of ~300x220 px, loss on the last 64 tokens (the response). HF is run as a user would:
labels with -100 outside the response. Each measurement runs in its own process so peak memory is its own.
Targets: HF time / mmr5 time >= 1.0; mmr5 peak <= HF peak. Usage: python bench/train_step.py [--sizes tiny 100m]
"""
import argparse
import time

import torch
from common import hf_kwargs, in_own_process, models, rerank_batch, rss_kib, setup_threads, timeit

RESPONSE = 64


def measure(size: str, which: str, device: str, queue):
    """Time and extra peak memory of one forward + backward (after a warm-up step)."""
    setup_threads()
    ref, ours = models(size)
    model = (ref if which == "hf" else ours).to(device).train()
    del ref, ours
    batch = {k: v.to(device) for k, v in rerank_batch().items()}
    labels_mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    labels_mask[:, -RESPONSE:] = True

    def step():
        if which == "hf":
            labels = batch["input_ids"].masked_fill(~labels_mask, -100)
            loss = model(**hf_kwargs(batch), labels=labels).loss
        else:
            from mmr5.sft import sft_loss

            loss_sum, n = sft_loss(model, {**batch, "labels_mask": labels_mask})
            loss = loss_sum / n
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter: the peak below is this step's alone
        base = rss_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else rss_kib("VmHWM") * 1024) - base
    seconds = min(first, timeit(step, repeat=2, warmup=0))
    queue.put((seconds, peak))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "100m"], help="model sizes from bench/common.py")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    print(f"{'size':<6} {'HF s':>8} {'mmr5 s':>8} {'HF/mmr5':>8} {'HF peak MB':>11} {'mmr5 peak MB':>13} {'mmr5/HF':>8}")
    for size in args.sizes:
        t_hf, m_hf = in_own_process(measure, size, "hf", args.device)
        t_ours, m_ours = in_own_process(measure, size, "mmr5", args.device)
        print(f"{size:<6} {t_hf:>8.3f} {t_ours:>8.3f} {t_hf / t_ours:>8.2f} {m_hf / 2**20:>11.1f} "
              f"{m_ours / 2**20:>13.1f} {m_ours / m_hf:>8.2f}")


if __name__ == "__main__":
    main()
