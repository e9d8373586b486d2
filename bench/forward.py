"""One forward pass of a rerank batch (4 prompts x 5 pages of ~300x220 px), mmr5 vs HF transformers.

Prints HF time / mmr5 time (target >= 1.0 on CPU fp32). Usage: python bench/forward.py [--sizes tiny 100m]
"""
import argparse

import torch
from common import hf_kwargs, models, rerank_batch, setup_threads, timeit


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", nargs="+", default=["tiny", "100m"], help="model sizes from bench/common.py")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions (median reported)")
    args = p.parse_args()
    setup_threads()
    print(f"{'size':<6} {'params':>8} {'tokens':>7} {'HF s':>8} {'mmr5 s':>8} {'HF/mmr5':>8} {'max|diff|':>10}")
    for size in args.sizes:
        ref, ours = models(size)
        batch = rerank_batch()
        with torch.inference_mode():
            expected = ref(**hf_kwargs(batch)).logits
            got = ours(**batch).logits
            t_ref = timeit(lambda: ref(**hf_kwargs(batch)), args.repeat)
            t_ours = timeit(lambda: ours(**batch), args.repeat)
        valid = batch["attention_mask"].bool()
        diff = (expected[valid] - got[valid]).abs().max().item()
        print(f"{size:<6} {ours.num_parameters() / 1e6:>7.1f}M {int(valid.sum()):>7} {t_ref:>8.3f} {t_ours:>8.3f} "
              f"{t_ref / t_ours:>8.2f} {diff:>10.2e}")


if __name__ == "__main__":
    main()
