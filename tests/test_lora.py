"""mmr5.lora on tiny random checkpoints: identity at init, adapter-only training, disabling, exact merge (checked
against HF transformers), adapter-only checkpoints, gradient checkpointing and bf16."""

import pytest
import torch
from test_model import hf_forward, make_batch

from mmr5.lora import LoRALinear, add_lora, lora_disabled, merge_lora
from mmr5.model import Qwen2VL

GRIDS = [[[1, 4, 4], [1, 4, 8]], [[1, 8, 4]]]  # small images; the second row is left padded
LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def randomise_b(model, seed=0):
    """B = 0 at init makes every adapter a no-op; random B makes the merge and round-trip checks discriminating."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture
def path(tiny_checkpoints):
    return tiny_checkpoints["qwen2_5_vl", False]


def test_all_linear_wraps_decoder_only_and_is_identity_at_init(path):
    model = Qwen2VL.from_pretrained(path)
    batch = make_batch(GRIDS)
    base = logits(model, batch)
    names = add_lora(model, rank=8, alpha=32)
    layers = model.config.text.num_hidden_layers
    assert len(names) == layers * len(LM_LINEARS)
    assert sorted(names) == sorted(f"model.layers.{i}.{'self_attn' if p.endswith('_proj') and p[0] in 'qkvo' else 'mlp'}.{p}"
                                   for i in range(layers) for p in LM_LINEARS)
    assert not any(isinstance(m, LoRALinear) for m in model.visual.modules())
    assert not isinstance(model.lm_head, LoRALinear)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{n}.lora_{x}" for n in names for x in "AB"}
    assert model.model.layers[0].self_attn.q_proj.scaling == 4.0
    assert torch.equal(logits(model, batch), base)


def test_suffix_targets_and_errors(path):
    model = Qwen2VL.from_pretrained(path)
    names = add_lora(model, rank=4, alpha=8, targets="q_proj, v_proj")
    assert sorted(names) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    assert model.lora_settings == dict(rank=4, alpha=8, targets="q_proj, v_proj", dropout=0.0)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)
    fresh = Qwen2VL.from_pretrained(path)
    with pytest.raises(ValueError, match="match no nn.Linear"):
        add_lora(fresh, targets="qkv")  # a vision-tower name: never a target
    with pytest.raises(ValueError, match="rank must be positive"):
        add_lora(fresh, rank=0)


def test_training_moves_only_adapters(path):
    model = Qwen2VL.from_pretrained(path)
    batch = make_batch(GRIDS)
    before = logits(model, batch)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, rank=8, alpha=32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    targets = torch.randint(0, 300, batch["input_ids"].shape, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(**batch).logits.flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    state = model.state_dict()
    for k, v in frozen.items():  # base weights live on under `.base.` in wrapped layers
        key = k if k in state else k.rsplit(".", 1)[0] + ".base." + k.rsplit(".", 1)[1]
        assert torch.equal(state[key], v), k
    assert (logits(model.eval(), batch) - before).abs().max() > 1e-3


def test_lora_disabled_gives_base_and_restores(path):
    model = Qwen2VL.from_pretrained(path)
    batch = make_batch(GRIDS)
    base = logits(model, batch)
    add_lora(model)
    randomise_b(model)
    adapted = logits(model, batch)
    assert (adapted - base).abs().max() > 1e-2
    with lora_disabled(model):
        assert torch.equal(logits(model, batch), base)
    assert torch.equal(logits(model, batch), adapted)
    with pytest.raises(RuntimeError, match="boom"):
        with lora_disabled(model):
            raise RuntimeError("boom")
    assert torch.equal(logits(model, batch), adapted)


@pytest.mark.parametrize("version", ["qwen2_vl", "qwen2_5_vl"])
def test_merge_is_exact_and_loads_in_transformers(tiny_checkpoints, tmp_path, version):
    from transformers import AutoModelForImageTextToText

    model = Qwen2VL.from_pretrained(tiny_checkpoints[version, False])
    batch = make_batch(GRIDS)
    add_lora(model)
    randomise_b(model)
    adapted = logits(model, batch)
    names = merge_lora(model)
    assert len(names) == 14 and not any(isinstance(m, LoRALinear) for m in model.modules())
    merged = logits(model, batch)
    valid = batch["attention_mask"].bool()
    assert (merged[valid] - adapted[valid]).abs().max() <= 1e-5
    model.save_pretrained(tmp_path / "merged")
    ref = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    expected = hf_forward(ref, batch)
    assert (expected[valid] - adapted[valid]).abs().max() <= 1e-4


def test_gradient_checkpointing_gives_same_adapter_gradients(path):
    """Dropout included: checkpointing replays the RNG state, so the recomputed masks match."""
    model = Qwen2VL.from_pretrained(path)
    add_lora(model, dropout=0.1)
    randomise_b(model)
    model.train()
    batch = make_batch(GRIDS)
    grads = []
    for on in (False, True):
        model.set_gradient_checkpointing(on)
        model.zero_grad()
        torch.manual_seed(0)
        model(**batch).logits.pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bf16_base_keeps_float32_adapters(path):
    batch = make_batch(GRIDS)
    ref = Qwen2VL.from_pretrained(path)
    add_lora(ref)
    randomise_b(ref)
    expected = logits(ref, batch)
    model = Qwen2VL.from_pretrained(path, dtype=torch.bfloat16)
    add_lora(model)
    model.load_state_dict({k: v for k, v in ref.state_dict().items() if ".lora_" in k}, strict=False)
    q = model.model.layers[0].self_attn.q_proj
    assert q.base.weight.dtype == torch.bfloat16 and q.lora_A.dtype == q.lora_B.dtype == torch.float32
    got = logits(model, batch)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    valid = batch["attention_mask"].bool()
    err = (got.float() - expected)[valid].abs()
    assert err.mean() < 0.05 * expected[valid].abs().mean()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch).logits.float().pow(2).mean().backward()
    assert q.lora_A.grad.dtype == torch.float32 and torch.isfinite(q.lora_A.grad).all() and q.lora_A.grad.abs().max() > 0
