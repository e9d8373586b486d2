"""The built-in demo task: synthetic pages, rerank samples, a tokenizer and a tiny random Qwen2.5-VL, on disk.

Pipeline: [data] -> processor -> model -> sampler -> rewards -> ppo; synthetic.py makes the built-in demo's data,
tokenizer and model. Real checkpoints and MMDocIR cannot be had
everywhere, so `build_demo` makes a task a small model learns in minutes on a CPU, in exactly the files the real
pipeline reads: PNG pages, JSONL samples (the `mmr5.data` format, with MM-R5-style SFT targets), and a model
directory (config.json + safetensors + tokenizer.json + preprocessor/chat files) that `Qwen2VL.from_pretrained`
and `Processor.from_pretrained` load like a released checkpoint.

Each page shows one coloured shape; a query asks for one colour + shape ("Which page shows a red triangle?") and
1-2 of the 5 candidates match. The SFT target restates the question, checks each image's colour and shape against
it, lists the matches, and ranks (relevant images first, ascending, then the rest ascending, as MM-R5's released SFT
targets):

    <think>The question asks for a red triangle. Image 1: blue no, circle no, so no. Image 2: red yes, triangle yes,
    so yes. ... Relevant: 2.</think><answer>[2, 1, 3, 4, 5]</answer>

The wording is shaped for what a ~1M-parameter model can learn (see `make_response`).
"""
import json
import math
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw
from tokenizers import Tokenizer

from mmr5.config import Config, TextConfig
from mmr5.model import Qwen2VL
from mmr5.vision import VisionConfig
from mmr5.processor import QUESTION_TEMPLATE, SYSTEM_PROMPT, Processor
from mmr5.tokenizer_build import save_tokenizer_files, train_tokenizer

COLOURS = {"red": (215, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 215), "yellow": (225, 190, 20),
           "purple": (140, 50, 180)}
SHAPES = ("circle", "square", "triangle", "cross")
WIDTH = HEIGHT = 56  # px: 4x4 patches of 14 px, merged 2x2 into 4 LM tokens per page
CANDIDATES = 5
QUERY_TEMPLATES = ("Which page shows a {}?", "Find the page with a {}.", "Which image contains a {}?")
SIZES = dict(train=6000, eval=200)  # samples per split; every candidate is its own fresh render
# The RL stage's prompts: one candidate more than SFT saw, all negatives near misses, 1-3 relevant pages. The full SFT
# model scores rerank ~0.53 on them (5 candidates, hard: 0.95, no room; 7: its format breaks): bench/README.md.
RL_CANDIDATES = 6
RL_SIZES = dict(train=1500, eval=150)
VOCAB = 768
# RoPE base 1e4 (not the released 1e6): with a 32-wide head, 1e6 leaves almost no rotary frequencies that tell
# neighbouring tokens apart, and the per-image checks below compare neighbours.
ROPE_THETA = 1e4
# Init std ~ 1/sqrt(LM width). HF's 0.02 (made for widths ~1000) leaves a 128-wide model's attention uniform for
# hundreds of steps before it can single out one image; at 0.08 it reads the pages within ~100 steps.
INIT_STD = 0.08


def render_page(colour: str, shape: str, rng: random.Random) -> Image.Image:
    """A white page with one shape, 38-44 px wide, near the centre (jittered by up to 2 px).

    Kept near the centre because a ~1M-parameter vision tower learns shapes from 14 px patches much faster when the
    outline crosses the same patches every time (anywhere on the page: shape accuracy 0.64 after 320 steps). The
    shapes fill clearly different shares of their box (triangle 0.5, cross 0.64, circle 0.79, square 1; the cross's
    arms are 0.4 of its width) and the colours are far apart: both attributes are plain in the pixels.
    """
    page = Image.new("RGB", (WIDTH, HEIGHT), (250, 250, 250))
    draw = ImageDraw.Draw(page)
    s = rng.randint(38, 44)
    x0, y0 = (WIDTH - s) // 2 + rng.randint(-2, 2), (HEIGHT - s) // 2 + rng.randint(-2, 2)
    box, fill = [x0, y0, x0 + s - 1, y0 + s - 1], COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + (s - 1) / 2, y0), (x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1)], fill=fill)
    elif shape == "cross":
        a, b = round(0.3 * s), round(0.7 * s) - 1
        draw.rectangle([x0 + a, y0, x0 + b, y0 + s - 1], fill=fill)
        draw.rectangle([x0, y0 + a, x0 + s - 1, y0 + b], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return page


def make_response(target: tuple[str, str], pages: list[tuple[str, str]]) -> str:
    """The SFT target: restate the question, check each image's colour and shape against it, list the matches,
    then rank the relevant images first (ascending) and the rest ascending -- the order of MM-R5's targets.

    Why this wording: a tiny model learns relevance only as *local* comparisons. "blue no" compares the word just
    written with the restated colour; "so no" combines the two checks right before it; "Relevant: 2" copies the ids
    whose check said yes. Captions followed by a single verdict stayed at chance (bench/README.md).
    """
    positives = [i for i, page in enumerate(pages, 1) if page == target]
    if not positives:
        raise ValueError("a demo sample needs at least one relevant page")

    def yes(match: bool) -> str:
        return "yes" if match else "no"

    checks = " ".join(f"Image {i}: {c} {yes(c == target[0])}, {s} {yes(s == target[1])}, so {yes((c, s) == target)}."
                      for i, (c, s) in enumerate(pages, 1))
    order = positives + [i for i in range(1, len(pages) + 1) if i not in positives]
    return (f"<think>The question asks for a {' '.join(target)}. {checks} Relevant: {', '.join(map(str, positives))}."
            f"</think><answer>[{', '.join(map(str, order))}]</answer>")


def make_sample(rng: random.Random, pages_dir: Path, split: str, index: int, candidates: int = CANDIDATES,
                hard: bool = False) -> dict:
    """One JSONL record: a query for a random (colour, shape), 1-2 pages showing it and other pages, shuffled; each
    page is rendered fresh and saved under `pages_dir` (paths in the record are relative to its parent).

    One question in five has two relevant pages. MMDocIR's Recall@1 gives those at most 0.5, so a perfect model
    scores 0.9 and chance 0.2.

    Negatives may share the colour or the shape with the target, so both must be checked. `hard` (the RL stage's
    prompts, harder than SFT's as in the paper): 1-3 relevant pages and every negative a near miss that shares one
    attribute with the target. domain = the shape asked for (per-domain recall). File names are numbered: nothing
    but the pixels tells what a page shows.
    """
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    target = rng.choice(combos)
    if hard:
        n_pos = rng.choice((1, 2, 3))
        others = [c for c in combos if c != target and (c[0] == target[0] or c[1] == target[1])]
    else:
        n_pos = 1 if rng.random() < 0.8 else 2
        others = [c for c in combos if c != target]
    pages = [target] * n_pos + [rng.choice(others) for _ in range(candidates - n_pos)]
    rng.shuffle(pages)
    images = []
    for i, (colour, shape) in enumerate(pages):
        name = f"{split}_{index:05d}_{i}.png"
        render_page(colour, shape, rng).save(pages_dir / name)
        images.append(f"{pages_dir.name}/{name}")
    query = rng.choice(QUERY_TEMPLATES).format(" ".join(target))
    return {"query": query, "images": images, "positives": [i for i, page in enumerate(pages, 1) if page == target],
            "domain": target[1], "response": make_response(target, pages)}


def demo_model_config(tokenizer: Tokenizer) -> Config:
    """A ~1.2M-parameter Qwen2.5-VL for `tokenizer`: the released architecture (window + full-attention vision
    blocks, GQA, M-RoPE) at widths a CPU trains in minutes. One 112 px window covers a whole page.
    Special ids are looked up by content, as the processor does; the vocabulary is padded to a multiple of 8."""
    def token(name):
        return tokenizer.token_to_id(f"<|{name}|>")

    text = TextConfig(vocab_size=8 * math.ceil(tokenizer.get_vocab_size() / 8), hidden_size=128,
                      intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      mrope_section=[4, 6, 6], rope_theta=ROPE_THETA, max_position_embeddings=4096,
                      bos_token_id=token("endoftext"), eos_token_id=token("im_end"))
    vision = VisionConfig(depth=2, hidden_size=64, out_hidden_size=128, num_heads=2, intermediate_size=128,
                          window_size=112, fullatt_block_indexes=[1])
    return Config(model_type="qwen2_5_vl", text=text, vision=vision, image_token_id=token("image_pad"),
                  video_token_id=token("video_pad"), vision_start_token_id=token("vision_start"),
                  vision_end_token_id=token("vision_end"), tie_word_embeddings=False, torch_dtype="float32")


def tokenizer_corpus(samples: list[dict]) -> list[str]:
    """Everything the demo ever tokenizes, as plain text (special tokens are added after training)."""
    prompts = [SYSTEM_PROMPT, "system", "user", "assistant", "You are a helpful assistant."]
    prompts += [f"\nImage {i}: " for i in range(1, CANDIDATES + 1)]
    texts = [QUESTION_TEMPLATE.format(Question=s["query"], image_num=CANDIDATES, image_num_end=CANDIDATES)
             for s in samples]
    return prompts * len(samples) + texts + [s["response"] for s in samples]


def write_splits(rng: random.Random, pages_dir: Path, paths: dict, sizes: dict, candidates: int, hard: bool) -> dict:
    """Render and write the train and eval JSONL files (pages under `pages_dir`); -> the samples by split."""
    samples = {}
    for split in ("train", "eval"):
        samples[split] = [make_sample(rng, pages_dir, split, i, candidates, hard) for i in range(sizes[split])]
        with open(paths[split], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s) + "\n" for s in samples[split])
    return samples


def build_demo(root="runs/demo", seed: int = 0, force: bool = False, sizes: dict | None = None) -> dict:
    """Build (once) the demo under `root` and return its paths: `base` (model dir), `train`, `eval` (JSONL).

    A DONE file written last marks a complete build: with it the build is skipped (unless `force`), without it
    (an interrupted run) everything is redone. Deterministic given `seed`; `sizes` overrides SIZES (tests use
    small ones). Eval pages are separate renders from training pages.
    """
    root = Path(root)
    sizes = {**SIZES, **(sizes or {})}
    paths = {"base": root / "base", "train": root / "data" / "train.jsonl", "eval": root / "data" / "eval.jsonl"}
    done = root / "DONE"
    if done.exists() and not force:
        return {k: str(v) for k, v in paths.items()}
    shutil.rmtree(root, ignore_errors=True)
    pages_dir = root / "data" / "pages"
    pages_dir.mkdir(parents=True)
    samples = write_splits(random.Random(seed), pages_dir, paths, sizes, CANDIDATES, hard=False)

    tokenizer = train_tokenizer(tokenizer_corpus(samples["train"]), VOCAB)
    side = root / "tokenizer"
    save_tokenizer_files(tokenizer, str(side), min_pixels=WIDTH * HEIGHT, max_pixels=WIDTH * HEIGHT)
    model = Qwen2VL.random(demo_model_config(tokenizer), std=INIT_STD, seed=seed)
    model.save_pretrained(paths["base"], side_files_from=side)
    Processor.from_pretrained(paths["base"])  # fails now, not in the trainer, if the files do not fit together
    manifest = {"seed": seed, "sizes": sizes, **{k: str(v.relative_to(root)) for k, v in paths.items()}}
    done.write_text(json.dumps(manifest, indent=2) + "\n")
    return {k: str(v) for k, v in paths.items()}


def build_rl_demo(root="runs/demo", seed: int = 0, force: bool = False, sizes: dict | None = None) -> dict:
    """Build (once) the RL stage's prompts under `root`/rl and return their paths (`train`, `eval`).

    The paper's RL data is harder than its SFT data, and the full SFT model is at the ceiling of its own task: here
    each prompt has RL_CANDIDATES pages, every negative a near miss. Separate from `build_demo` (its own DONE file and
    seed stream) so that an SFT demo built before it stays valid and byte-identical.
    """
    root = Path(root) / "rl"
    sizes = {**RL_SIZES, **(sizes or {})}
    paths = {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}
    done = root / "DONE"
    if not done.exists() or force:
        shutil.rmtree(root, ignore_errors=True)
        (root / "pages").mkdir(parents=True)
        write_splits(random.Random(f"rl-{seed}"), root / "pages", paths, sizes, RL_CANDIDATES, hard=True)
        done.write_text(json.dumps({"seed": seed, "sizes": sizes, "candidates": RL_CANDIDATES}, indent=2) + "\n")
    return {k: str(v) for k, v in paths.items()}
