"""mmr5.config: HF config.json in both layouts, and the released checkpoints' fields."""
import json

import pytest

from mmr5.config import Config


def test_config_reads_both_layouts(tiny_checkpoints):
    """The nested transformers-5 layout and our flat released layout give the same config."""
    nested = json.loads((tiny_checkpoints["qwen2_5_vl", True] / "config.json").read_text())
    assert "text_config" in nested
    a = Config.from_dict(nested)
    flat = a.to_dict()
    assert "text_config" not in flat and flat["rope_scaling"]["mrope_section"] == [2, 3, 3]
    b = Config.from_dict(flat)
    assert a == b
    assert a.tie_word_embeddings and a.vision.window_size == 56 and a.text.num_key_value_heads == 2


def test_config_released_qwen2_5_vl_7b_and_qwen2_vl_2b():
    """Released flat configs (fields as published for Qwen2.5-VL-7B-Instruct and Qwen2-VL-2B-Instruct)."""
    q25 = dict(architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl", hidden_size=3584,
               intermediate_size=18944, num_attention_heads=28, num_hidden_layers=28, num_key_value_heads=4,
               rms_norm_eps=1e-6, rope_theta=1000000.0, vocab_size=152064, tie_word_embeddings=False,
               rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, torch_dtype="bfloat16",
               vision_config=dict(depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
                                  in_chans=3, out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
                                  spatial_patch_size=14, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                                  tokens_per_second=2, temporal_patch_size=2))
    c = Config.from_dict(q25)
    assert (c.text.hidden_size, c.vision.hidden_size, c.vision.out_hidden_size, c.text.mrope_section) == (3584, 1280, 3584, [16, 24, 24])
    q2 = dict(model_type="qwen2_vl", hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
              num_hidden_layers=28, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
              vocab_size=151936, tie_word_embeddings=True, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
              vision_config=dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_chans=3, hidden_size=1536,
                                 patch_size=14, spatial_merge_size=2, temporal_patch_size=2))
    c = Config.from_dict(q2)
    assert (c.vision.hidden_size, c.vision.out_hidden_size, c.vision.intermediate_size, c.vision.hidden_act) == (1280, 1536, 5120, "quick_gelu")
    assert c.tie_word_embeddings


def test_wrong_model_type_is_refused():
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        Config.from_dict({"model_type": "llama"})
