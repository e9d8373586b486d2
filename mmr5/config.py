"""Qwen2-VL / Qwen2.5-VL configuration: the dataclasses the model is built from, and HF config.json translation.

Pipeline: data -> processor -> [model] -> sampler -> rewards -> ppo; model.py is built from config.py, layers.py,
vision.py and weights.py (this file: config).
A config.json comes in either layout (released flat, or transformers-5 nested `text_config`); `Config.from_dict`
reads both, `Config.to_dict` writes the released one, which HF transformers 4.x/5.x and vLLM all read.
"""
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from mmr5.vision import VisionConfig


@dataclass
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: list = field(default_factory=lambda: [16, 24, 24])
    max_position_embeddings: int = 128000
    bos_token_id: int | None = 151643
    eos_token_id: int | list | None = 151645


@dataclass
class Config:
    model_type: str = "qwen2_5_vl"  # or "qwen2_vl"
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"  # the dtype the weights are stored in

    @property
    def is_qwen2_5(self) -> bool:
        return self.model_type == "qwen2_5_vl"

    @property
    def stored_dtype(self) -> torch.dtype:
        """`torch_dtype` as a torch dtype (float32 when it names none we save in)."""
        known = ("float32", "bfloat16", "float16")
        return getattr(torch, self.torch_dtype) if self.torch_dtype in known else torch.float32

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        model_type = d.get("model_type")
        if model_type not in ("qwen2_vl", "qwen2_5_vl"):
            raise ValueError(f"model_type {model_type!r} is not supported: mmr5 runs 'qwen2_vl' and 'qwen2_5_vl' checkpoints")
        t = d.get("text_config") or d  # transformers 5 nests the text fields; released configs keep them flat
        v = dict(d.get("vision_config") or {})
        rope = t.get("rope_parameters") or t.get("rope_scaling") or d.get("rope_scaling") or {}
        text = TextConfig(**{f.name: t[f.name] for f in fields(TextConfig) if f.name in t and t[f.name] is not None})
        text.rope_theta = float(rope.get("rope_theta", t.get("rope_theta", d.get("rope_theta", text.rope_theta))))
        text.mrope_section = list(rope.get("mrope_section", text.mrope_section))
        if model_type == "qwen2_vl":  # ViT width is `embed_dim`, `hidden_size` is the LM width it projects to
            v["out_hidden_size"] = v.get("hidden_size", text.hidden_size)
            v["hidden_size"] = v.get("embed_dim", 1280)
            v["intermediate_size"] = int(v["hidden_size"] * v.get("mlp_ratio", 4))
            v.setdefault("hidden_act", "quick_gelu")
        v["rope_theta"] = float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        vision = VisionConfig(**{f.name: v[f.name] for f in fields(VisionConfig) if f.name in v})
        tie = d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
        top = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id") if k in d}
        dtype = d.get("torch_dtype") or d.get("dtype") or t.get("torch_dtype") or "bfloat16"
        cfg = cls(model_type=model_type, text=text, vision=vision, tie_word_embeddings=bool(tie), torch_dtype=dtype, **top)
        if sum(cfg.text.mrope_section) * 2 != cfg.text.hidden_size // cfg.text.num_attention_heads:
            raise ValueError(f"mrope_section {cfg.text.mrope_section} must sum to head_dim/2")
        return cfg

    @classmethod
    def from_file(cls, path) -> "Config":
        """From a checkpoint folder (or its config.json), with a one-line error for each way either can be wrong."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        elif path.name != "config.json":
            what = "is a file, not" if path.exists() else "does not exist; expected"
            raise FileNotFoundError(f"{path} {what} a checkpoint folder (config.json, *.safetensors, tokenizer.json)")
        if not path.exists():
            inner = path.parent / "model" / "config.json"  # a training run's --out holds the model in model/
            hint = f"; did you mean {inner.parent}?" if inner.exists() else ""
            raise FileNotFoundError(f"no config.json at {path}{hint}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); copy it again from the model's release") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} is not a JSON object; copy it again from the model's release")
        try:
            return cls.from_dict(d)
        except (TypeError, AttributeError) as e:  # a field of the wrong JSON type
            raise ValueError(f"{path} has a field of the wrong type ({e}); compare it with the release's "
                             "config.json") from None

    def to_dict(self) -> dict:
        """The released (flat) layout, which HF transformers 4.x/5.x and vLLM all read."""
        t, v = self.text, self.vision
        vision = dict(depth=v.depth, num_heads=v.num_heads, hidden_act=v.hidden_act, patch_size=v.patch_size,
                      temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
                      in_channels=v.in_channels, model_type=self.model_type + "_vision")
        if self.is_qwen2_5:
            vision.update(hidden_size=v.hidden_size, out_hidden_size=v.out_hidden_size, intermediate_size=v.intermediate_size,
                          window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
                          tokens_per_second=v.tokens_per_second)
        else:
            vision.update(embed_dim=v.hidden_size, hidden_size=v.out_hidden_size, mlp_ratio=v.intermediate_size // v.hidden_size)
        arch = "Qwen2_5_VLForConditionalGeneration" if self.is_qwen2_5 else "Qwen2VLForConditionalGeneration"
        return dict(
            architectures=[arch], model_type=self.model_type, torch_dtype=self.torch_dtype,
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads, hidden_act=t.hidden_act, rms_norm_eps=t.rms_norm_eps,
            rope_theta=t.rope_theta, rope_scaling={"type": "mrope", "mrope_section": list(t.mrope_section)},
            max_position_embeddings=t.max_position_embeddings, max_window_layers=t.num_hidden_layers,
            use_sliding_window=False, sliding_window=None, attention_dropout=0.0, use_cache=True,
            bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, tie_word_embeddings=self.tie_word_embeddings,
            image_token_id=self.image_token_id, video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id, vision_end_token_id=self.vision_end_token_id,
            vision_config=vision,
        )
