"""The built-in demo task: synthetic pages, rerank samples, a tokenizer and a tiny random Qwen2.5-VL, on disk.

Pipeline: [data] -> processor -> model -> sampler -> rewards -> ppo. Real checkpoints and MMDocIR cannot be had
everywhere, so `build_demo` makes a task a small model learns in minutes on a CPU, in exactly the files the real
pipeline reads: PNG pages, JSONL samples (the `mmr5.data` format, with MM-R5-style SFT targets), and a model
directory (config.json + safetensors + tokenizer.json + preprocessor/chat files) that `Qwen2VL.from_pretrained`
and `Processor.from_pretrained` load like a released checkpoint.

Each page shows one coloured shape; a query asks for one colour + shape ("Which page shows a red triangle?") and
1-2 of the 5 candidates match. The SFT target restates the question, judges each image, then answers:

    <think>The question asks for a red triangle. Image 1: a blue circle; no. Image 2: a red triangle; yes. ...
    So the relevant image is 2.</think><answer>[2, 1, 3, 4, 5]</answer>

Restating first matters: a tiny model then only has to compare each image with a phrase a few tokens back.
"""
import json
import math
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw
from tokenizers import Tokenizer

from mmr5.model import Config, Qwen2VL, TextConfig, VisionConfig
from mmr5.processor import QUESTION_TEMPLATE, SYSTEM_PROMPT, Processor
from mmr5.tokenizer_build import save_tokenizer_files, train_tokenizer

COLOURS = {"red": (215, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 215), "yellow": (225, 190, 20),
           "purple": (140, 50, 180)}
SHAPES = ("circle", "square", "triangle", "cross")
PAGE = 56  # px: 4x4 patches of 14 px, merged 2x2 into 4 LM tokens per page; also the processor's min/max pixels
CANDIDATES = 5
QUERY_TEMPLATES = ("Which page shows a {}?", "Find the page with a {}.", "Which image contains a {}?")
SIZES = dict(train=3000, eval=200)  # samples per split
VARIANTS = dict(train=40, eval=10)  # rendered pages per (colour, shape) per split; eval pages are fresh renders
VOCAB = 768


def render_page(colour: str, shape: str, rng: random.Random, size: int = PAGE) -> Image.Image:
    """A tinted page with two grey "title" lines and one big shape, jittered in size and position.

    The shape stays at least 24 px wide so its outline spans several patches; the cross's arms are 0.4 of its
    width, so the shapes fill clearly different shares of their box (triangle 0.5, cross 0.64, circle 0.79,
    square 1), and the colours are far apart, so both attributes are plain in the pixels.
    """
    tint = tuple(rng.randint(232, 255) for _ in range(3))
    page = Image.new("RGB", (size, size), tint)
    draw = ImageDraw.Draw(page)
    grey = rng.randint(90, 150)
    for y, length in ((3, rng.randint(18, 40)), (7, rng.randint(10, 30))):
        draw.rectangle([3, y, 3 + length, y + 1], fill=(grey, grey, grey))
    s = rng.randint(24, min(36, size - 14))
    x0, y0 = rng.randint(2, size - 2 - s), rng.randint(12, size - 2 - s)
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
    """The SFT target: restate the question, one verdict per image, then relevant images first (ascending), the
    rest ascending -- the order MM-R5's released SFT data uses."""
    positives = [i for i, page in enumerate(pages, 1) if page == target]
    if not positives:
        raise ValueError("a demo sample needs at least one relevant page")
    verdicts = " ".join(f"Image {i}: a {c} {s}; {'yes' if (c, s) == target else 'no'}."
                        for i, (c, s) in enumerate(pages, 1))
    summary = (f"So the relevant image is {positives[0]}." if len(positives) == 1 else
               f"So the relevant images are {', '.join(map(str, positives[:-1]))} and {positives[-1]}.")
    order = positives + [i for i in range(1, len(pages) + 1) if i not in positives]
    return (f"<think>The question asks for a {' '.join(target)}. {verdicts} {summary}</think>"
            f"<answer>[{', '.join(map(str, order))}]</answer>")


def make_sample(rng: random.Random, pool: dict[tuple[str, str], list[str]]) -> dict:
    """One JSONL record: a query for a random (colour, shape), 1-2 pages showing it and other pages, shuffled.

    `pool` maps each (colour, shape) to page paths (relative to the JSONL folder); negatives may share the colour
    or the shape with the target, so both must be checked. domain = the shape asked for (per-domain recall).
    """
    combos = sorted(pool)
    target = rng.choice(combos)
    n_pos = 1 if rng.random() < 0.6 else 2
    others = [rng.choice([c for c in combos if c != target]) for _ in range(CANDIDATES - n_pos)]
    picked = [target] * n_pos + others
    images, used = [], set()
    for combo in picked:  # distinct files, even when two candidates show the same combination
        path = rng.choice([p for p in pool[combo] if p not in used])
        used.add(path)
        images.append((combo, path))
    rng.shuffle(images)
    pages = [combo for combo, _ in images]
    query = rng.choice(QUERY_TEMPLATES).format(" ".join(target))
    return {"query": query, "images": [path for _, path in images],
            "positives": [i for i, page in enumerate(pages, 1) if page == target], "domain": target[1],
            "response": make_response(target, pages)}


def demo_model_config(tokenizer: Tokenizer) -> Config:
    """A ~1M-parameter Qwen2.5-VL for `tokenizer`: the released architecture (window + full-attention vision
    blocks, GQA, M-RoPE) at widths a CPU trains in minutes. One 112 px window covers a whole 56 px page.
    Special ids are looked up by content, as the processor does; the vocabulary is padded to a multiple of 8."""
    def token(name):
        return tokenizer.token_to_id(f"<|{name}|>")

    text = TextConfig(vocab_size=8 * math.ceil(tokenizer.get_vocab_size() / 8), hidden_size=128,
                      intermediate_size=384, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      mrope_section=[4, 6, 6], max_position_embeddings=4096, bos_token_id=token("endoftext"),
                      eos_token_id=token("im_end"))
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


def build_demo(root="runs/demo", seed: int = 0, force: bool = False, sizes: dict | None = None,
               variants: dict | None = None) -> dict:
    """Build (once) the demo under `root` and return its paths: `base` (model dir), `train`, `eval` (JSONL).

    A DONE file written last marks a complete build: with it the build is skipped (unless `force`), without it
    (an interrupted run) everything is redone. Deterministic given `seed`; `sizes` / `variants` override SIZES /
    VARIANTS (tests use small ones).
    """
    root = Path(root)
    sizes, variants = {**SIZES, **(sizes or {})}, {**VARIANTS, **(variants or {})}
    paths = {"base": root / "base", "train": root / "data" / "train.jsonl", "eval": root / "data" / "eval.jsonl"}
    done = root / "DONE"
    if done.exists() and not force:
        return {k: str(v) for k, v in paths.items()}
    shutil.rmtree(root, ignore_errors=True)
    data = root / "data"
    (data / "pages").mkdir(parents=True)
    rng = random.Random(seed)
    samples = {}
    for split in ("train", "eval"):
        pool = {}
        for colour in COLOURS:
            for shape in SHAPES:
                pool[colour, shape] = []
                for _ in range(variants[split]):  # numbered names: nothing but the pixels tells what a page shows
                    rel = f"pages/{split}_{sum(map(len, pool.values())):05d}.png"
                    render_page(colour, shape, rng).save(data / rel)
                    pool[colour, shape].append(rel)
        samples[split] = [make_sample(rng, pool) for _ in range(sizes[split])]
        with open(paths[split], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s) + "\n" for s in samples[split])

    tokenizer = train_tokenizer(tokenizer_corpus(samples["train"]), VOCAB)
    side = root / "tokenizer"
    save_tokenizer_files(tokenizer, str(side), min_pixels=PAGE * PAGE, max_pixels=PAGE * PAGE)
    Qwen2VL.random(demo_model_config(tokenizer), seed=seed).save_pretrained(paths["base"], side_files_from=side)
    Processor.from_pretrained(paths["base"])  # fails now, not in the trainer, if the files do not fit together
    manifest = {"seed": seed, "sizes": sizes, "variants": variants, **{k: str(v) for k, v in paths.items()}}
    done.write_text(json.dumps(manifest, indent=2) + "\n")
    return {k: str(v) for k, v in paths.items()}
