"""Checkpoint loading and saving: both key layouts, shards, round trips through HF, and clear errors."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_model import hf_forward, make_batch

from mmr5.model import Qwen2VL
from mmr5.weights import INDEX


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("version", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("tie", [False, True])
def test_save_then_hf_loads_same_logits(tiny_checkpoints, tmp_path, version, tie):
    """mmr5 save_pretrained (flat released config) -> HF from_pretrained: identical logits."""
    from transformers import AutoModelForImageTextToText

    ours = Qwen2VL.from_pretrained(tiny_checkpoints[version, tie])
    ours.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "text_config" not in config and config["model_type"] == version
    assert ("lm_head.weight" in load_file(tmp_path / "out" / "model.safetensors")) == (not tie)
    ref = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    batch = make_batch()
    valid = batch["attention_mask"].bool()
    assert (hf_forward(ref, batch)[valid] - logits(ours, batch)[valid]).abs().max() <= 1e-4


def test_sharded_checkpoint_round_trip(tiny_checkpoints, tmp_path):
    src = Qwen2VL.from_pretrained(tiny_checkpoints["qwen2_5_vl", False])
    src.save_pretrained(tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "sharded" / INDEX).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "sharded" / "model.safetensors").exists()
    again = Qwen2VL.from_pretrained(tmp_path / "sharded")
    batch = make_batch()
    assert torch.equal(logits(src, batch), logits(again, batch))


def test_hf_sharded_checkpoint_loads(tiny_checkpoints, tmp_path):
    """A checkpoint sharded by HF itself (its index format and shard names)."""
    from transformers import AutoModelForImageTextToText

    ref = AutoModelForImageTextToText.from_pretrained(tiny_checkpoints["qwen2_vl", False]).eval()
    ref.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / INDEX).exists()
    ours = Qwen2VL.from_pretrained(tmp_path / "hf")
    batch = make_batch()
    valid = batch["attention_mask"].bool()
    assert (hf_forward(ref, batch)[valid] - logits(ours, batch)[valid]).abs().max() <= 1e-4


def test_language_model_key_layout(tiny_checkpoints, tmp_path):
    """Keys as transformers >= 4.52 may write them: model.language_model.* and model.visual.*."""
    src = tiny_checkpoints["qwen2_5_vl", False]
    state = load_file(src / "model.safetensors")
    renamed = {}
    for k, v in state.items():
        if k.startswith("model."):
            k = "model.language_model." + k[len("model."):]
        elif k.startswith("visual."):
            k = "model." + k
        renamed[k] = v
    dst = tmp_path / "new_layout"
    dst.mkdir()
    save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(src / "config.json", dst / "config.json")
    batch = make_batch()
    assert torch.equal(logits(Qwen2VL.from_pretrained(src), batch), logits(Qwen2VL.from_pretrained(dst), batch))


def test_bfloat16_load(tiny_checkpoints):
    model = Qwen2VL.from_pretrained(tiny_checkpoints["qwen2_5_vl", True], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = make_batch()
    ref = logits(Qwen2VL.from_pretrained(tiny_checkpoints["qwen2_5_vl", True]), batch)
    got = logits(model, batch).float()
    valid = batch["attention_mask"].bool()
    assert (ref[valid] - got[valid]).abs().max() < 0.1 * ref[valid].abs().max()


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Qwen2VL.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope does not exist; expected a checkpoint folder"):
        Qwen2VL.from_pretrained(tmp_path / "nope")


def test_missing_weights_file(tiny_checkpoints, tmp_path):
    d = copy_checkpoint(tiny_checkpoints["qwen2_vl", False], tmp_path / "c")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Qwen2VL.from_pretrained(d)


def test_missing_shard(tiny_checkpoints, tmp_path):
    Qwen2VL.from_pretrained(tiny_checkpoints["qwen2_vl", False]).save_pretrained(tmp_path / "s", max_shard_bytes=100_000)
    victim = sorted((tmp_path / "s").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"missing: {victim.name}"):
        Qwen2VL.from_pretrained(tmp_path / "s")


def test_wrong_model_type(tiny_checkpoints, tmp_path):
    d = copy_checkpoint(tiny_checkpoints["qwen2_vl", False], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llava"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'llava' is not supported"):
        Qwen2VL.from_pretrained(d)


def test_missing_and_misshaped_tensors_named(tiny_checkpoints, tmp_path):
    d = copy_checkpoint(tiny_checkpoints["qwen2_5_vl", False], tmp_path / "c")
    state = load_file(d / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    state["visual.blocks.0.attn.qkv.bias"] = torch.zeros(7)
    state["model.extra.weight"] = torch.zeros(2)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        Qwen2VL.from_pretrained(d)
    msg = str(e.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "missing" in msg
    assert "visual.blocks.0.attn.qkv.bias: file [7] vs model [96]" in msg
    assert "unexpected" in msg and "model.extra.weight" in msg
    assert "\n" not in msg


def test_failed_save_keeps_previous_checkpoint(tiny_checkpoints, tmp_path, monkeypatch):
    """Atomic write: a save that dies halfway leaves the previous directory as it was and no temp files."""
    import mmr5.weights as weights

    model = Qwen2VL.from_pretrained(tiny_checkpoints["qwen2_vl", False])
    model.save_pretrained(tmp_path / "m", max_shard_bytes=100_000)
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    calls = []

    def dying_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(weights, "save_file", dying_save_file)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path / "m", max_shard_bytes=100_000)
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
