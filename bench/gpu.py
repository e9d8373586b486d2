"""The CUDA / bf16 path measured on a GPU: decode tokens/s against the memory-bandwidth bound, one SFT step.

A random model with the exact Qwen2.5-VL-3B-Instruct shapes (bf16, ~3.75B parameters) on one GPU:
- decode tokens/s at batch 1 and 16 (prompt of 5 pages at 256 tokens each, 128 new tokens, sampling), eager and
  with `generate(compile=True)`, against the bound "weights bytes / measured device-to-device copy bandwidth"
  (each decode step must read every weight once);
- one SFT step (LoRA r8 on all LM linears, gradient checkpointing, 4 samples x 5 pages): time and peak memory.
Usage: python bench/gpu.py [--batches 1 16] [--new-tokens 128]. Needs a CUDA GPU.
"""
import argparse
import datetime
import time
from types import SimpleNamespace

import torch
from real_shape import qwen25_vl_3b_config

from mmr5.lora import add_lora
from mmr5.model import Qwen2VL
from mmr5.sampler import generate
from mmr5.sft import sft_loss

PAGE_GRID = (1, 32, 32)  # 448x448 px: 256 merged tokens per page


def copy_bandwidth(nbytes: int = 2 * 2**30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), best of 5."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def prompt_batch(cfg, batch: int, pages: int = 5, text: int = 200):
    ids, grids = [], []
    for _ in range(batch):
        row = torch.randint(0, 1000, (text,)).tolist()
        for _ in range(pages):
            row += [cfg.vision_start_token_id] + [cfg.image_token_id] * (PAGE_GRID[1] * PAGE_GRID[2] // 4)
            row += [cfg.vision_end_token_id] + torch.randint(0, 1000, (4,)).tolist()
            grids.append(list(PAGE_GRID))
        ids.append(row)
    input_ids = torch.tensor(ids)
    grid = torch.tensor(grids)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), image_grid_thw=grid,
                pixel_values=torch.randn(int(grid.prod(-1).sum()), 1176))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16], help="decode batch sizes")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU")
    cfg = qwen25_vl_3b_config()
    with torch.device("cuda"):
        model = Qwen2VL.random(cfg, seed=0).to(torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.model.parameters()) + \
        model.lm_head.weight.numel() * 2 * (not cfg.tie_word_embeddings)
    bandwidth = copy_bandwidth()
    bound = bandwidth / weight_bytes  # decode steps per second if only the weights had to be read
    proc = SimpleNamespace(pad_id=0, im_end_id=-1, endoftext_id=-1, decode=lambda ids: "",
                           image_pad_id=cfg.image_token_id, vision_start_id=cfg.vision_start_token_id,
                           vision_end_id=cfg.vision_end_token_id)
    print(f"{torch.cuda.get_device_name()}  {datetime.date.today()}  torch {torch.__version__}")
    print(f"Qwen2.5-VL-3B shapes, bf16: LM + head weights {weight_bytes / 2**30:.2f} GiB, copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s -> bound {bound:.0f} decode steps/s")
    for compile in (False, True):
        for batch in args.batches:
            b = prompt_batch(cfg, batch)
            generate(model, proc, b, 8, stop_ids=[], compile=compile)  # warm-up (and compilation)
            torch.cuda.synchronize()
            t_prefill = time.perf_counter()
            generate(model, proc, b, 1, stop_ids=[], compile=compile)
            torch.cuda.synchronize()
            t_prefill = time.perf_counter() - t_prefill
            t0 = time.perf_counter()
            generate(model, proc, b, args.new_tokens, stop_ids=[], compile=compile)
            torch.cuda.synchronize()
            steps_per_s = (args.new_tokens - 1) / (time.perf_counter() - t0 - t_prefill)
            print(f"decode batch {batch:>3} {'compiled' if compile else 'eager   '}: {steps_per_s * batch:8.0f} tokens/s, "
                  f"{steps_per_s:6.1f} steps/s = {100 * steps_per_s / bound:5.1f}% of the bandwidth bound "
                  f"(prefill {t_prefill:.2f} s)")
    add_lora(model, rank=8, alpha=32)
    model.visual.requires_grad_(False)
    model.set_gradient_checkpointing(True)
    model.train()
    b = prompt_batch(cfg, 4)
    b["labels_mask"] = torch.zeros_like(b["input_ids"], dtype=torch.bool)
    b["labels_mask"][:, -64:] = True
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for i in range(2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, n = sft_loss(model, b)
            (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i == 1:
            print(f"SFT step (LoRA r8, grad checkpointing, 4 x 5 pages, {b['input_ids'].shape[1]} tokens/row): "
                  f"{time.perf_counter() - t0:.2f} s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
