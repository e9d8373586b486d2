"""Shared fixtures: tiny random Qwen2-VL / Qwen2.5-VL checkpoints written by HF transformers (the reference)."""
import os

import pytest
import torch

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
