"""Shared fixtures: tiny random Qwen2-VL / Qwen2.5-VL checkpoints written by HF transformers (the reference)."""
import json
import os

import pytest
import torch

import mmr5.run

torch.set_num_threads(min(2, os.cpu_count() or 1))

VOCAB = 320
SPECIAL = dict(image_token_id=310, video_token_id=311, vision_start_token_id=312, vision_end_token_id=313)


def hf_config(version: str = "qwen2_5_vl", tie: bool = False, vocab_size: int = VOCAB, special: dict = SPECIAL,
              window_size: int = 56, text_layers: int = 2, vision_depth: int = 3):
    """A tiny config in transformers' own classes. window_size 56 = 2 merged tokens per window side, so an image
    of 8x12 patches has 6 windows, several of them partial."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=112, num_hidden_layers=text_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=None, eos_token_id=None)
    if version == "qwen2_5_vl":
        vision = dict(depth=vision_depth, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                      window_size=window_size, fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **special)
    vision = dict(depth=vision_depth, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **special)


def hf_model(config, seed: int = 0):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    # HF's init (std 0.02) gives near-uniform logits; a wider spread makes parity and greedy tests discriminating.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 0.5)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{(version, tied): directory} of HF-saved tiny checkpoints."""
    out = {}
    for version in ("qwen2_vl", "qwen2_5_vl"):
        for tie in (False, True):
            d = tmp_path_factory.mktemp(f"{version}_{'tied' if tie else 'untied'}")
            hf_model(hf_config(version, tie)).save_pretrained(d)
            out[version, tie] = d
    return out


def tiny_corpus():
    """Sentences for a tiny BPE vocabulary, the MM-R5 prompt strings included so prompts tokenize compactly."""
    import random

    from mmr5.processor import QUESTION_TEMPLATE, SYSTEM_PROMPT

    rng = random.Random(0)
    words = ["the", "page", "shows", "a", "red", "blue", "green", "circle", "square", "triangle", "question",
             "asks", "for", "Image", "relevant", "not", "answer", "think", "so", "is", "chart", "table"]
    sentences = [" ".join(rng.choice(words) for _ in range(8)) + "." for _ in range(300)]
    return sentences + [SYSTEM_PROMPT, QUESTION_TEMPLATE, "<think>Image 1 is best.</think><answer>[1, 2, 3]</answer>"]


def make_model_dir(path, version="qwen2_5_vl", tie=False, seed=0, max_pixels=112 * 112):
    """A complete tiny model directory: HF-saved random weights + a tiny Qwen-pipeline tokenizer whose special
    token ids the config names, as a released checkpoint directory has them."""
    from mmr5.tokenizer_build import save_tokenizer_files, train_tokenizer

    tokenizer = train_tokenizer(tiny_corpus(), 500)
    special = {key: tokenizer.token_to_id(tok) for key, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    hf_model(hf_config(version, tie, vocab_size=vocab, special=special), seed=seed).save_pretrained(path)
    save_tokenizer_files(tokenizer, str(path), max_pixels=max_pixels)
    return path


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """{version: directory} of complete tiny model directories (weights + tokenizer + preprocessor config)."""
    return {v: make_model_dir(tmp_path_factory.mktemp(f"{v}_full"), v) for v in ("qwen2_vl", "qwen2_5_vl")}


def page_images(count, seed=0, sizes=((56, 84), (70, 42), (98, 98), (28, 140))):
    """Random-noise RGB pages of a few different sizes (PIL images)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8)) for i in range(count)]


def interrupt_at_step(monkeypatch, script, step: int):
    """Make `script`'s next run stop as on Ctrl-C during step `step` (its `sample_order` is called once a step);
    -> the real `sample_order`, to put back before the run resumes."""
    flags, calls = [], {"n": 0}
    real = script.sample_order

    class Stop(mmr5.run.StopFlag):
        def __init__(self):
            super().__init__()
            flags.append(self)

    def order_then_stop(*a, **k):
        calls["n"] += 1
        if calls["n"] == step:
            flags[-1].requested = True
        return real(*a, **k)

    monkeypatch.setattr(mmr5.run, "StopFlag", Stop)
    monkeypatch.setattr(script, "sample_order", order_then_stop)
    return real


def save_pages(folder, index, images):
    """Save one sample's pages as p{index}_{j}.png in `folder`; -> their names (the JSONL's relative paths)."""
    names = [f"p{index}_{j}.png" for j in range(len(images))]
    for name, image in zip(names, images):
        image.save(folder / name)
    return names


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A folder with train.jsonl: 8 samples of 3 small pages each and a short response (the training-run tests)."""
    d = tmp_path_factory.mktemp("train_data")
    rows = []
    for i in range(8):
        images = save_pages(d, i, page_images(3, seed=i))
        pos = i % 3 + 1
        rows.append({"query": f"item {i}", "images": images, "positives": [pos],
                     "response": f"<think>Image {pos} shows item {i}.</think><answer>[{pos}]</answer>"})
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d
