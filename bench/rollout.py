"""Rollout throughput: new tokens/s of mmr5.sampler.generate vs HF generate, same random model, same prompts.

(a) 4 prompts x 1 sample; (b) 4 prompts x 4 samples (HF is given each prompt 4 times, as its generate
recomputes the prompt per sample). 5 pages of ~300x220 px per prompt, 64 new tokens forced (no stop), sampling at
temperature 1. Targets on CPU fp32, 2 threads: tiny >= 2x (a) and >= 3x (b); ~100M >= 1.3x on both.
`--compile` adds mmr5 with `generate(compile=True)` (static-shape decode under torch.compile; its one-off
compilation is timed apart, in a warm-up run, and printed); HF runs its default eager generate in both.
HF and mmr5 take turns in every repetition (medians reported).
Usage: python bench/rollout.py [--sizes tiny 100m] [--compile] [--device cuda --dtype bfloat16]
"""
import argparse
from types import SimpleNamespace

import torch
from common import SPECIAL, models, rerank_batch, setup_threads, timeit, timeit_interleaved

from mmr5.sampler import generate

NEW = 64


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "100m"], help="model sizes from bench/common.py")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--repeat", type=int, default=1, help="timed repetitions (median reported)")
    p.add_argument("--compile", action="store_true", help="also time mmr5 with generate(compile=True)")
    args = p.parse_args()
    setup_threads()
    dtype = getattr(torch, args.dtype)
    # generate() needs only these from a processor: special token ids and a decoder.
    proc = SimpleNamespace(pad_id=0, im_end_id=-1, endoftext_id=-1, decode=lambda ids: "",
                           image_pad_id=SPECIAL["image_token_id"], vision_start_id=SPECIAL["vision_start_token_id"],
                           vision_end_id=SPECIAL["vision_end_token_id"])
    print(f"device {args.device}, dtype {args.dtype}, threads {torch.get_num_threads()}, {NEW} new tokens")
    extra = f" {'compiled tok/s':>15} {'compiled/HF':>12} {'compile s':>10}" if args.compile else ""
    print(f"{'size':<6} {'case':<12} {'HF tok/s':>9} {'mmr5 tok/s':>11} {'mmr5/HF':>8}{extra}")
    for size in args.sizes:
        ref, ours = models(size, dtype)
        ref, ours = ref.to(args.device), ours.to(args.device)
        for n in (1, 4):
            batch = rerank_batch()
            repeated = {k: v.repeat_interleave(n, 0) if k in ("input_ids", "attention_mask") else v for k, v in batch.items()}
            repeated["pixel_values"] = batch["pixel_values"].view(4, -1, 1176).repeat_interleave(n, 0).flatten(0, 1)
            repeated["image_grid_thw"] = batch["image_grid_thw"].view(4, -1, 3).repeat_interleave(n, 0).flatten(0, 1)
            hf_in = {k: v.to(args.device) for k, v in repeated.items()}
            hf_in["mm_token_type_ids"] = (hf_in["input_ids"] == SPECIAL["image_token_id"]).int()

            def run_hf():
                with torch.inference_mode():
                    out = ref.generate(**hf_in, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=True, top_k=0,
                                       top_p=1.0, temperature=1.0, pad_token_id=0, eos_token_id=None)
                assert out.shape[1] == hf_in["input_ids"].shape[1] + NEW

            def run_ours(compile=False):
                r = generate(ours, proc, batch, max_new_tokens=NEW, temperature=1.0, n=n, stop_ids=[], compile=compile)
                assert int(r.mask.sum()) == 4 * n * NEW

            fns = {"hf": run_hf, "ours": run_ours}
            if args.compile:
                t_compile = timeit(lambda: run_ours(True), 1, 0)  # the first call builds the graph
                fns["compiled"] = lambda: run_ours(True)
            t = timeit_interleaved(fns, args.repeat, warmup=1 if size == "tiny" else 0)
            tok_s = {name: 4 * n * NEW / seconds for name, seconds in t.items()}
            row = f"{size:<6} {f'4 x {n} sample':<12} {tok_s['hf']:>9.1f} {tok_s['ours']:>11.1f} {t['hf'] / t['ours']:>8.2f}"
            if args.compile:
                row += f" {tok_s['compiled']:>15.1f} {t['hf'] / t['compiled']:>12.2f} {t_compile - t['compiled']:>10.1f}"
            print(row, flush=True)


if __name__ == "__main__":
    main()
