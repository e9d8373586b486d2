"""mmr5.model against HF transformers on tiny random checkpoints on CPU: float32, and bfloat16 where said."""
import pytest
import torch
from conftest import SPECIAL, hf_config, hf_model

from mmr5.model import Qwen2VL, rope_positions

# Two rows, images of different sizes, the second row shorter (so it is left padded). Grids are in patches.
GRIDS = [[[1, 8, 12], [1, 6, 4], [1, 4, 10]], [[1, 10, 10], [1, 4, 4]]]


def make_batch(grids=GRIDS, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, all_grids = [], []
    for row_grids in grids:
        ids = torch.randint(0, 300, (3,), generator=g).tolist()
        for t, h, w in row_grids:
            ids += [SPECIAL["vision_start_token_id"]] + [SPECIAL["image_token_id"]] * (t * h * w // 4)
            ids += [SPECIAL["vision_end_token_id"]] + torch.randint(0, 300, (4,), generator=g).tolist()
            all_grids.append([t, h, w])
        rows.append(ids)
    L = max(map(len, rows))
    input_ids = torch.zeros(len(rows), L, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, L - len(r):] = torch.tensor(r)
        attention_mask[i, L - len(r):] = 1
    grid = torch.tensor(all_grids)
    pixel_values = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=g)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_grid_thw=grid)


def hf_forward(ref, batch):
    mm = (batch["input_ids"] == SPECIAL["image_token_id"]).int()  # without it HF silently uses 1-D positions
    with torch.no_grad():
        return ref(**batch, mm_token_type_ids=mm).logits


@pytest.mark.parametrize("version", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_reference(tiny_checkpoints, version, tie):
    from transformers import AutoModelForImageTextToText

    path = tiny_checkpoints[version, tie]
    ref = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    ours = Qwen2VL.from_pretrained(path)
    batch = make_batch()
    expected = hf_forward(ref, batch)
    with torch.no_grad():
        got = ours(**batch).logits
    valid = batch["attention_mask"].bool()
    assert expected[valid].abs().max() > 1.0  # the comparison is not between two near-zero tensors
    assert (expected[valid] - got[valid]).abs().max() <= 1e-4


@pytest.mark.parametrize("version", ["qwen2_vl", "qwen2_5_vl"])
def test_bfloat16_logits_track_the_reference(tiny_checkpoints, version):
    """In bfloat16 (what GPUs run) our logits round as HF's bfloat16 ones do: on average 4x nearer to them than HF's
    own rounding error (its bfloat16 against its float32). Measured: 0 (Qwen2.5-VL, bit for bit) and 0.14 of it
    (Qwen2-VL: the patch embedding is a matmul here and a Conv3d in HF, so a few bfloat16 sums round one step apart);
    a norm or a rotary kept in bfloat16 where HF goes to float32 gives 0.5-1.0."""
    from transformers import AutoModelForImageTextToText

    path = tiny_checkpoints[version, False]
    batch = make_batch()
    valid = batch["attention_mask"].bool()
    exact = hf_forward(AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval(), batch)[valid]
    expected = hf_forward(AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16).eval(), batch)
    with torch.no_grad():
        got = Qwen2VL.from_pretrained(path, dtype=torch.bfloat16)(**batch).logits
    assert got.dtype == torch.bfloat16
    expected, got = expected[valid].float(), got[valid].float()
    hf_rounding = (expected - exact).abs()
    assert 0 < hf_rounding.mean() and hf_rounding.max() < 0.1
    assert (got - expected).abs().mean() <= 0.25 * hf_rounding.mean()
    assert (got - expected).abs().max() <= hf_rounding.max()


@pytest.mark.parametrize("version", ["qwen2_vl", "qwen2_5_vl"])
def test_gradients_match_reference(tiny_checkpoints, version):
    """Training goes through the same forward (residuals added in place, among others): a loss on the real positions'
    logits gives HF's gradients in the vision tower, the language model and the head."""
    from transformers import AutoModelForImageTextToText

    path = tiny_checkpoints[version, False]
    ref = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).train()
    ours = Qwen2VL.from_pretrained(path).train()
    batch = make_batch()
    valid = batch["attention_mask"].bool()
    mm = (batch["input_ids"] == SPECIAL["image_token_id"]).int()
    ref(**batch, mm_token_type_ids=mm).logits[valid].pow(2).mean().backward()
    ours(**batch).logits[valid].pow(2).mean().backward()
    mlp_in = "fc1" if version == "qwen2_vl" else "gate_proj"
    pairs = {"patch embed": (ref.model.visual.patch_embed.proj, ours.visual.patch_embed.proj),
             "vision block 0": (getattr(ref.model.visual.blocks[0].mlp, mlp_in), getattr(ours.visual.blocks[0].mlp, mlp_in)),
             "vision qkv": (ref.model.visual.blocks[-1].attn.qkv, ours.visual.blocks[-1].attn.qkv),
             "text layer 0": (ref.model.language_model.layers[0].mlp.up_proj, ours.model.layers[0].mlp.up_proj),
             "text last q": (ref.model.language_model.layers[-1].self_attn.q_proj, ours.model.layers[-1].self_attn.q_proj),
             "head": (ref.lm_head, ours.lm_head)}
    for name, (a, b) in pairs.items():
        assert a.weight.grad.abs().max() > 0, name
        assert (a.weight.grad - b.weight.grad).abs().max() <= 1e-4 * max(1.0, a.weight.grad.abs().max().item()), name


@pytest.mark.parametrize("version", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("grids", [GRIDS, [[[1, 8, 8], [1, 8, 8]], [[1, 8, 8]]]], ids=["sizes", "one-size"])
@pytest.mark.parametrize("budget", [8 << 20, 40_000], ids=["one-group", "groups"])
def test_vision_tower_matches_reference(tiny_checkpoints, version, grids, budget, monkeypatch):
    """Images of several sizes, and of one size (every full-attention segment equally long: the reshape path);
    encoded in one call, and in groups of whole images (what a CPU does with many or large pages)."""
    from transformers import AutoModelForImageTextToText

    from mmr5 import vision

    path = tiny_checkpoints[version, False]
    ref = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    ours = Qwen2VL.from_pretrained(path)
    batch = make_batch(grids)
    calls = []
    monkeypatch.setattr(vision.VisionTransformer, "encode",
                        lambda self, *a, real=vision.VisionTransformer.encode: calls.append(1) or real(self, *a))
    monkeypatch.setattr(vision, "image_groups", lambda *a, real=vision.image_groups: real(*a, budget=budget))
    with torch.no_grad():
        expected = torch.cat(ref.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
        got = ours.visual(batch["pixel_values"], batch["image_grid_thw"])
        assert (len(calls) > 1) == (budget < 8 << 20)
        whole = vision.VisionTransformer.encode(ours.visual, batch["pixel_values"], batch["image_grid_thw"])
    assert got.shape == expected.shape
    assert (expected - got).abs().max() <= 1e-5
    assert (whole - got).abs().max() <= 1e-6


def test_image_groups_cut_between_whole_images():
    from mmr5.vision import VisionConfig, image_groups

    cfg = VisionConfig(hidden_size=16, intermediate_size=64)  # 64 floats = 256 bytes per patch at its widest
    grid = torch.tensor([[1, 4, 4], [1, 4, 4], [1, 8, 8], [1, 2, 2], [1, 2, 2]])  # 16, 16, 64, 4, 4 patches
    cuts = lambda budget: [g[:, 1:].prod(-1).tolist() for g in image_groups(grid, cfg, 4, budget)]  # noqa: E731
    assert cuts(32 * 256) == [[16, 16], [64], [4, 4]]  # the 64-patch image is over budget: a group of its own
    assert cuts(16 * 256) == [[16], [16], [64], [4, 4]]
    assert cuts(1) == [[16], [16], [64], [4], [4]]
    assert cuts(1 << 30) == [[16, 16, 64, 4, 4]]
    assert sum(map(len, cuts(16 * 256))) == 5


def test_window_attention_is_exercised():
    """The 8x12-patch image (4x6 merged) with 2x2-token windows: 6 windows; the 10x10 one: 9, some partial."""
    from mmr5.vision import VisionConfig, vision_windows

    cfg = VisionConfig(window_size=56, patch_size=14, spatial_merge_size=2)
    index, lengths = vision_windows(torch.tensor([[1, 8, 12], [1, 10, 10]]), cfg)
    assert len(lengths) == 6 + 9
    assert sorted(index.tolist()) == list(range(24 + 25))
    assert lengths[:6] == [16] * 6 and 4 in lengths  # a 1x1-token corner window holds 4 patches


def test_positions_match_reference(tiny_checkpoints):
    from transformers import AutoModelForImageTextToText

    ref = AutoModelForImageTextToText.from_pretrained(tiny_checkpoints["qwen2_5_vl", False]).eval()
    batch = make_batch()
    mm = (batch["input_ids"] == SPECIAL["image_token_id"]).int()
    expected, expected_delta = ref.model.get_rope_index(batch["input_ids"], mm, batch["image_grid_thw"],
                                                        attention_mask=batch["attention_mask"])
    got, delta = rope_positions(batch["input_ids"], batch["image_grid_thw"], batch["attention_mask"],
                                SPECIAL["image_token_id"], 2)
    valid = batch["attention_mask"].bool()
    assert torch.equal(expected[:, valid], got[:, valid])
    assert delta.tolist() == expected_delta.flatten().tolist()
    assert delta.tolist()[0] < 0  # images compress positions, so decoding offsets are negative


def test_text_only_and_unpadded(tiny_checkpoints):
    """No images, no padding: the fast causal path, still equal to the reference."""
    from transformers import AutoModelForImageTextToText

    path = tiny_checkpoints["qwen2_5_vl", False]
    ref = AutoModelForImageTextToText.from_pretrained(path).eval()
    ours = Qwen2VL.from_pretrained(path)
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ref(input_ids=ids).logits - ours(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("padded", [True, False])
def test_keep_last_equals_the_full_forward_tail(tiny_checkpoints, padded):
    """With keep_last = k the last layer runs only the last k positions (its other outputs feed nothing):
    the logits, the hidden states and the cache it fills are those of a full forward, with and without padding."""
    from mmr5.model import KVCache

    model = Qwen2VL.from_pretrained(tiny_checkpoints["qwen2_5_vl", False])
    batch = make_batch() if padded else make_batch(grids=GRIDS[:1])
    L = batch["input_ids"].shape[1]
    with torch.no_grad():
        full = model(**batch)
        full_cache = KVCache(model.config.text, len(batch["input_ids"]), L, torch.float32, "cpu")
        model(**batch, cache=full_cache)
        for k in (1, 3):
            cache = KVCache(model.config.text, len(batch["input_ids"]), L, torch.float32, "cpu")
            out = model(**batch, keep_last=k, cache=cache)
            assert out.logits.shape[1] == out.hidden_states.shape[1] == k
            assert (out.logits - full.logits[:, -k:]).abs().max() <= 1e-5
            assert (out.hidden_states - full.hidden_states[:, -k:]).abs().max() <= 1e-5
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(cache.k + cache.v, full_cache.k + full_cache.v))
            out = model(**batch, keep_last=k)  # no cache: unpadded rows take SDPA's causal path
            assert (out.logits - full.logits[:, -k:]).abs().max() <= 1e-5


def test_kv_cache_decoding_matches_full_forward(tiny_checkpoints):
    """Prefill + token-by-token decoding with the per-row offset gives the logits of one full forward."""
    from mmr5.model import KVCache

    model = Qwen2VL.from_pretrained(tiny_checkpoints["qwen2_5_vl", False])
    batch = make_batch()
    new = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(2))
    full_ids = torch.cat([batch["input_ids"], new], 1)
    full_mask = torch.cat([batch["attention_mask"], torch.ones_like(new)], 1)
    with torch.no_grad():
        full = model(full_ids, full_mask, batch["pixel_values"], batch["image_grid_thw"]).logits
        cache = KVCache(model.config.text, 2, full_ids.shape[1], torch.float32, "cpu")
        pos, delta = model.rope_positions(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"])
        model(**batch, position_ids=pos, cache=cache)
        prompt_len = batch["attention_mask"].sum(1)
        for k in range(new.shape[1]):
            p = (prompt_len + k + delta).view(1, 2, 1).expand(3, 2, 1)
            mask = full_mask[:, : batch["input_ids"].shape[1] + k + 1]
            step = model(new[:, k:k + 1], mask, position_ids=p, cache=cache).logits[:, -1]
            assert (step - full[:, batch["input_ids"].shape[1] + k]).abs().max() <= 1e-4


def test_gradient_checkpointing_gives_same_gradients(tiny_checkpoints):
    model = Qwen2VL.from_pretrained(tiny_checkpoints["qwen2_5_vl", False]).train()
    batch = make_batch()
    grads = []
    for on in (False, True):
        model.set_gradient_checkpointing(on)
        model.zero_grad()
        model(**batch).logits.float().pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_hf_model_helper_spreads_logits():
    """Guard for the fixtures themselves: random models must not be near-uniform (else greedy tests are weak)."""
    ref = hf_model(hf_config("qwen2_vl"))
    with torch.no_grad():
        logits = ref(input_ids=torch.arange(20)[None]).logits
    assert logits.std() > 0.5


@pytest.mark.parametrize("shape", [(1, 1), (4, 1), (2, 32), (65, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_few_rows_path_matches_f_linear(shape, bias):
    """The decode-time (W @ x^T)^T path (few rows, big weight) gives F.linear's values and gradients."""
    from mmr5.layers import Linear

    torch.manual_seed(0)
    layer = Linear(512, 1024, bias=bias)
    with torch.no_grad():
        if bias:
            layer.bias.normal_()
    x = torch.randn(*shape, 512, requires_grad=True)
    y = layer(x)
    ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert y.shape == ref.shape and y.is_contiguous()
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, layer.weight], g)
    ref_grads = torch.autograd.grad(ref, [x, layer.weight], g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
