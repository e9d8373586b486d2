"""Shared setup for the benchmarks: the same random model in HF transformers (the reference) and in mmr5.

Benchmarks print ratios against the reference measured in the same process, never absolute targets alone.
"""
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from queue import Empty

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mmr5.model import Qwen2VL  # noqa: E402

SPECIAL = dict(image_token_id=310, video_token_id=311, vision_start_token_id=312, vision_end_token_id=313)
SIZES = {
    # ~0.5 M parameters
    "tiny": dict(vocab_size=1024, text=dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2),
                 vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2)),
    # ~100 M parameters
    "100m": dict(vocab_size=32000, text=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                              num_attention_heads=8, num_key_value_heads=2),
                 vision=dict(depth=12, hidden_size=512, intermediate_size=1536, num_heads=8)),
}


def hf_config(size: str, special=SPECIAL):
    from transformers import Qwen2_5_VLConfig

    s = SIZES[size]
    hd = s["text"]["hidden_size"] // s["text"]["num_attention_heads"]
    mrope = [hd // 8, hd // 16 * 3, hd // 16 * 3]
    mrope[0] += hd // 2 - sum(mrope)
    text = dict(vocab_size=s["vocab_size"], rope_scaling={"type": "mrope", "mrope_section": mrope},
                max_position_embeddings=32768, bos_token_id=None, eos_token_id=None, **s["text"])
    vision = dict(out_hidden_size=s["text"]["hidden_size"], window_size=112, fullatt_block_indexes=[s["vision"]["depth"] - 1],
                  **s["vision"])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)


def models(size: str, dtype=torch.float32):
    """(hf_model, mmr5_model) with identical random weights."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    ref = AutoModelForImageTextToText.from_config(hf_config(size)).to(dtype).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = Qwen2VL.from_pretrained(d, dtype=dtype)
    return ref, ours


def rerank_batch(batch: int = 4, images: int = 5, grid=(1, 16, 22), text_len: int = 120, vocab: int = 300, seed: int = 0):
    """Left-padded rerank-shaped prompts: text, then `images` pages of ~300x220 px (16x22 patches) with captions."""
    g = torch.Generator().manual_seed(seed)
    rows, grids = [], []
    for b in range(batch):
        ids = torch.randint(0, vocab, (text_len - 3 * b,), generator=g).tolist()
        for _ in range(images):
            ids += torch.randint(0, vocab, (5,), generator=g).tolist()
            ids += [SPECIAL["vision_start_token_id"]] + [SPECIAL["image_token_id"]] * (grid[0] * grid[1] * grid[2] // 4)
            ids += [SPECIAL["vision_end_token_id"]]
            grids.append(list(grid))
        rows.append(ids + torch.randint(0, vocab, (8,), generator=g).tolist())
    L = max(map(len, rows))
    input_ids = torch.zeros(batch, L, dtype=torch.long)
    attention_mask = torch.zeros(batch, L, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, L - len(r):] = torch.tensor(r)
        attention_mask[i, L - len(r):] = 1
    grid_t = torch.tensor(grids)
    pixel_values = torch.randn(int(grid_t.prod(-1).sum()), 1176, generator=g)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_grid_thw=grid_t)


def hf_kwargs(batch):
    return dict(batch, mm_token_type_ids=(batch["input_ids"] == SPECIAL["image_token_id"]).int())


def timeit(fn, repeat: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds."""
    return timeit_interleaved({"fn": fn}, repeat, warmup)["fn"]


def timeit_interleaved(fns: dict, repeat: int = 3, warmup: int = 1) -> dict:
    """Median wall time of each `fns[name]()` in seconds, the functions taking turns in every repetition: this
    machine's speed drifts by tens of percent over a minute, and turns spread the drift over every side alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def setup_threads():
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))


def rss_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status: VmRSS (now) or VmHWM (peak), in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def in_own_process(target, *args):
    """Run target(*args, queue) in a fresh (spawned) process and return what it puts on the queue, so that each
    measurement's peak memory is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, queue))
    p.start()
    while True:  # poll, so a child killed by the OOM killer is reported instead of waited for forever
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not p.is_alive():
                return {"failed": f"the measuring process died (exit code {p.exitcode}; -9: killed, e.g. out of memory)"}
    p.join()
    return result
