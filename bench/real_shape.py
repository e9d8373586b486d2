"""Real scale on a CPU machine: a random checkpoint with the exact Qwen2.5-VL-3B-Instruct config and key layout.

Writes (once) the released flat config.json and sharded bf16 safetensors under --dir, then measures, each in its
own process so every peak is its own, mmr5 against HF transformers:
  load      time and peak RSS (mmr5 must stay under ~1.2x the loaded weights: no double copy)
  forward   one forward over a 5-page rerank prompt at max_pixels = 256*28*28 (256 tokens per page)
  sft       one LoRA (r8, all LM linears) + gradient-checkpointing SFT step: time and peak RSS
  ppo       (mmr5) one PPO update: LoRA r64 policy, reference = adapters off, value head on the shared trunk
Compute runs in float32: this CPU has no fast bf16 matmul. Usage: python bench/real_shape.py [--parts load ...]
Slow (tens of minutes on 2 cores): a benchmark, not a test.
"""
import argparse
import json
import time
from pathlib import Path

import torch
from common import in_own_process

from mmr5.config import Config, TextConfig
from mmr5.model import Qwen2VL
from mmr5.vision import VisionConfig
from mmr5.weights import INDEX

PAGE_GRID = (1, 32, 32)  # 448 x 448 px = 256*28*28: 1024 patches, 256 tokens per page


def qwen25_vl_3b_config() -> Config:
    """Qwen/Qwen2.5-VL-3B-Instruct's published config (hidden 2048, 36 layers, 16 heads, 2 KV heads, tied)."""
    text = TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                      num_attention_heads=16, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                      mrope_section=[16, 24, 24], max_position_embeddings=128000)
    vision = VisionConfig(depth=32, hidden_size=1280, out_hidden_size=2048, num_heads=16, intermediate_size=3420,
                          hidden_act="silu", window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                          tokens_per_second=2)
    return Config(model_type="qwen2_5_vl", text=text, vision=vision, tie_word_embeddings=True, torch_dtype="bfloat16")


def write_checkpoint(path: Path, shard_bytes: int = 4 * 10**9):
    """Random bf16 weights, shard by shard (never the whole model in memory), released key names; ~4 GB shards
    as released (two for the 3B)."""
    if (path / INDEX).exists():
        return
    from safetensors.torch import save_file

    cfg = qwen25_vl_3b_config()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen2VL(cfg).state_dict().items() if k != "lm_head.weight"}
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for k, shape in shapes.items():
        t = torch.ones(shape) if k.endswith("norm.weight") or "norm1" in k or "norm2" in k or "ln_q" in k else \
            torch.randn(shape, generator=gen) * 0.02
        current[k] = t.to(torch.bfloat16)
        size += current[k].numel() * 2
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, path / name, metadata={"format": "pt"})
    weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
    total = sum(v.numel() * 2 for shard in shards for v in shard.values())
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))


def rss_gib(field: str = "VmHWM") -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 2**20


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rerank_batch(cfg: Config, rows: int = 1, pages: int = 5, text: int = 300):
    g = torch.Generator().manual_seed(0)
    ids, grids = [], []
    for _ in range(rows):
        row = torch.randint(0, 150000, (text,), generator=g).tolist()
        for _ in range(pages):
            row += [cfg.vision_start_token_id] + [cfg.image_token_id] * (PAGE_GRID[1] * PAGE_GRID[2] // 4)
            row += [cfg.vision_end_token_id] + torch.randint(0, 150000, (4,), generator=g).tolist()
            grids.append(list(PAGE_GRID))
        ids.append(row)
    input_ids = torch.tensor(ids)
    grid = torch.tensor(grids)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), image_grid_thw=grid,
                pixel_values=torch.randn(int(grid.prod(-1).sum()), 1176, generator=g))


def load(which: str, path: Path):
    if which == "mmr5":
        return Qwen2VL.from_pretrained(path, dtype=torch.float32)
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def lora_everywhere(model, rank: int, alpha: float):
    """Our LoRALinear on every linear layer of the language model, for either implementation."""
    from mmr5.lora import LoRALinear

    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    model.requires_grad_(False)
    for name, m in list(lm.named_modules()):
        if isinstance(m, torch.nn.Linear):
            parent, _, attr = name.rpartition(".")
            setattr(lm.get_submodule(parent), attr, LoRALinear(m, rank, alpha))


def part(name: str, which: str, path: str, queue):
    torch.set_num_threads(2)
    if which == "mmr5":  # as train_sft.py / train_ppo.py do on a CPU (mmr5.distributed.setup)
        from mmr5.distributed import map_large_allocations

        map_large_allocations()
    path = Path(path)
    out = {}
    if name == "load":
        reset_peak()
        t0 = time.perf_counter()
        model = load(which, path)
        out = {"seconds": time.perf_counter() - t0, "peak_gib": rss_gib(),
               "weights_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30}
    else:
        model = load(which, path)
        cfg = qwen25_vl_3b_config()
        batch = rerank_batch(cfg)
        kwargs = dict(batch) if which == "mmr5" else \
            dict(batch, mm_token_type_ids=(batch["input_ids"] == cfg.image_token_id).int())
        base = rss_gib("VmRSS")
        reset_peak()
        t0 = time.perf_counter()
        if name == "forward":
            with torch.no_grad():
                logits = model(**kwargs).logits
            out["logit_checksum"] = logits[0, -1, :1000].double().sum().item()
        elif name == "sft":
            lora_everywhere(model, 8, 32)
            if which == "mmr5":
                model.set_gradient_checkpointing(True)
                from mmr5.sft import sft_loss

                mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
                mask[:, -64:] = True
                loss, n = sft_loss(model.train(), {**batch, "labels_mask": mask})
                (loss / n).backward()
            else:
                model.gradient_checkpointing_enable()
                model.train()
                labels = batch["input_ids"].clone()
                labels[:, :-64] = -100
                model(**kwargs, labels=labels).loss.backward()
        elif name == "ppo":
            out.update(ppo_update(model, cfg, base))
        out.update(seconds=time.perf_counter() - t0, peak_gib=rss_gib(), above_weights_gib=rss_gib() - base)
    queue.put(out)


def ppo_update(model, cfg, base) -> dict:
    """One PPO step on 2 samples of a 5-page prompt: rollout, experience, update, with a memory breakdown."""
    from types import SimpleNamespace

    from mmr5.lora import add_lora
    from mmr5.critic import ValueHead
    from mmr5.ppo import PPOConfig, encode_pages, make_experience, ppo_update
    from mmr5.sampler import generate

    model.visual.requires_grad_(False)
    add_lora(model, rank=64, alpha=128)
    model.value_head = ValueHead(cfg.text.hidden_size)
    model.set_gradient_checkpointing(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    adapters_gib = sum(p.numel() * 4 for p in params) / 2**30
    batch = rerank_batch(cfg)
    proc = SimpleNamespace(pad_id=0, im_end_id=-1, endoftext_id=-1, decode=lambda ids: "",
                           image_pad_id=cfg.image_token_id, vision_start_id=cfg.vision_start_token_id,
                           vision_end_id=cfg.vision_end_token_id)
    t = {}
    t0 = time.perf_counter()
    pages = encode_pages(model, batch)
    rollout = generate(model.eval(), proc, batch, 16, n=2, stop_ids=[], generator=torch.Generator().manual_seed(0),
                       image_features=torch.cat(pages[0]))
    t["rollout_s"] = time.perf_counter() - t0
    rollout_peak = rss_gib() - base
    cfg_ppo = PPOConfig(epochs=1, minibatch_size=2, micro_batch_size=1)
    t0 = time.perf_counter()
    exp = make_experience(model, batch, pages, rollout, torch.tensor([1.0, 0.0]), 2, cfg_ppo, 0.05)
    t["experience_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ppo_update(model.train(), exp, optimizer, params, cfg_ppo, 0.05)
    t["update_s"] = time.perf_counter() - t0
    kv_gib = 2 * cfg.text.num_hidden_layers * 2 * cfg.text.num_key_value_heads * 128 * \
        (batch["input_ids"].shape[1] + 16) * 4 / 2**30
    optimizer_gib = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                        if torch.is_tensor(v)) / 2**30
    return {**t, "adapters_gib": adapters_gib, "optimizer_gib": optimizer_gib, "kv_cache_gib": kv_gib,
            "rollout_peak_above_weights_gib": rollout_peak}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="runs/bench/qwen2.5-vl-3b-random", help="where the random checkpoint goes")
    p.add_argument("--parts", nargs="+", default=["load", "forward", "sft", "ppo"], help="what to measure")
    p.add_argument("--impl", nargs="+", default=["mmr5", "hf"], choices=["mmr5", "hf"],
                   help="whose code to measure (ppo: mmr5 only)")
    args = p.parse_args()
    path = Path(args.dir)
    write_checkpoint(path)
    on_disk = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30
    print(f"random Qwen2.5-VL-3B-Instruct-shaped checkpoint: {path} ({on_disk:.2f} GiB bf16 on disk); compute fp32")
    results = {}
    for name in args.parts:
        for which in [w for w in args.impl if name != "ppo" or w == "mmr5"]:
            results[name, which] = r = in_own_process(part, name, which, str(path))
            print(f"{name:<8} {which:<5} " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in r.items()), flush=True)
    if "peak_gib" in results.get(("load", "mmr5"), {}):
        r = results["load", "mmr5"]
        print(f"mmr5 load peak / loaded weights: {r['peak_gib'] / r['weights_gib']:.2f}")


if __name__ == "__main__":
    main()
