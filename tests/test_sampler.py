"""mmr5.sampler against HF generate and against full forwards, on tiny random checkpoints."""
import pytest
import torch
from conftest import page_images

from mmr5.model import Qwen2VL
from mmr5.processor import Processor
from mmr5.sampler import generate, pick, sampling_logits

QUERIES = ["which page shows a red circle?", "the table of sales", "a green square page"]
IMAGE_COUNTS = [3, 1, 2]


def load(path):
    return Qwen2VL.from_pretrained(path), Processor.from_pretrained(path)


def rerank_batch(proc, counts=IMAGE_COUNTS, queries=QUERIES):
    images, start = [], 0
    for c in counts:
        images.append(page_images(c, seed=start))
        start += c
    return proc.rerank_inputs(queries[: len(counts)], images)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("version", ["qwen2_vl", "qwen2_5_vl"])
def test_greedy_matches_hf_generate(tiny_model_dirs, version, dtype):
    """Also in bfloat16 (the GPU dtype; here on the CPU): same tokens as HF's generate in bfloat16."""
    from transformers import AutoModelForImageTextToText

    path = tiny_model_dirs[version]
    model, proc = Qwen2VL.from_pretrained(path, dtype=dtype), Processor.from_pretrained(path)
    ref = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval()
    batch = rerank_batch(proc)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3  # rows of different lengths: left padding
    stops = [proc.im_end_id, proc.endoftext_id]
    ours = generate(model, proc, batch, max_new_tokens=40, temperature=0.0)
    inputs = {k: v for k, v in batch.items() if k not in ("prompt_lengths", "images_per_row")}
    with torch.no_grad():
        out = ref.generate(**inputs, mm_token_type_ids=(batch["input_ids"] == proc.image_pad_id).int(),
                           max_new_tokens=40, do_sample=False, eos_token_id=stops, pad_token_id=proc.pad_id)
    expected = out[:, batch["input_ids"].shape[1]:]
    for row in range(3):
        got = ours.tokens[row][ours.mask[row]].tolist()
        assert got == expected[row][: len(got)].tolist()
        assert not any(t in stops for t in got[:-1]) and (len(got) == 40 or got[-1] in stops)
    assert ours.lengths.max() >= 32


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_decoding_equals_a_fresh_forward(tiny_model_dirs, temperature, monkeypatch):
    """The logits each step picks from are those of one forward over prompt + response (no cache), and each token is
    what that forward picks: the argmax of the allowed logits, or of probabilities over the same exponential race
    draws (the generator's stream, replayed)."""
    from mmr5 import sampler

    picked_from = []

    def spy(logits, *args, **kwargs):
        picked_from.append(logits)
        return pick(logits, *args, **kwargs)

    monkeypatch.setattr(sampler, "pick", spy)
    model, proc = load(tiny_model_dirs["qwen2_5_vl"])
    batch = rerank_batch(proc)
    T = 24
    rollout = generate(model, proc, batch, max_new_tokens=T, temperature=temperature, stop_ids=[],
                       generator=torch.Generator().manual_seed(0))
    ids = torch.cat([batch["input_ids"], rollout.tokens], 1)
    mask = torch.cat([batch["attention_mask"], rollout.mask.long()], 1)
    with torch.no_grad():
        logits = model(ids, mask, batch["pixel_values"], batch["image_grid_thw"]).logits.float()
    L = batch["input_ids"].shape[1]
    logits = logits[:, L - 1:-1]  # [3, T, V]: the states before each generated token
    assert (torch.stack(picked_from, 1) - logits).abs().max() <= 1e-4
    banned = torch.tensor([proc.image_pad_id, proc.vision_start_id, proc.vision_end_id])
    allowed = logits.index_fill(-1, banned, float("-inf"))
    if temperature == 0.0:
        expected = allowed.argmax(-1)
    else:  # stop_ids=[]: every row draws at every step, E = -log U per row and token, step by step
        gen = torch.Generator().manual_seed(0)
        race = torch.stack([torch.rand(allowed[:, 0].shape, generator=gen).log_().neg_() for _ in range(T)], 1)
        expected = (allowed.softmax(-1) / race).argmax(-1)
    assert rollout.mask.all() and torch.equal(rollout.tokens, expected)


def test_group_sampling_equals_repeated_prompts(tiny_model_dirs):
    """n samples sharing one prefill == the prompt repeated n times, on the same random stream."""
    model, proc = load(tiny_model_dirs["qwen2_5_vl"])
    batch = rerank_batch(proc, counts=[2, 1], queries=QUERIES[:2])
    grouped = generate(model, proc, batch, max_new_tokens=16, n=3, generator=torch.Generator().manual_seed(7))
    images = [page_images(2, seed=0), page_images(1, seed=2)]
    repeated = proc.rerank_inputs([q for q in QUERIES[:2] for _ in range(3)], [im for im in images for _ in range(3)])
    plain = generate(model, proc, repeated, max_new_tokens=16, n=1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(grouped.tokens, plain.tokens) and torch.equal(grouped.mask, plain.mask)
    assert len(set(map(tuple, grouped.tokens[:3].tolist()))) > 1  # the 3 samples of one prompt differ


def test_first_token_frequencies_follow_the_model(tiny_model_dirs):
    """A statistical check that can fail: 2000 group samples' first tokens vs the tempered model probabilities."""
    model, proc = load(tiny_model_dirs["qwen2_vl"])
    batch = rerank_batch(proc, counts=[1], queries=QUERIES[:1])
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k not in ("prompt_lengths", "images_per_row")}).logits[0, -1]
    banned = torch.tensor([proc.image_pad_id, proc.vision_start_id, proc.vision_end_id])
    probs = logits.index_fill(-1, banned, float("-inf")).div(0.3).softmax(-1)
    rollout = generate(model, proc, batch, max_new_tokens=1, n=2000, temperature=0.3,
                       generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(rollout.tokens[:, 0], minlength=probs.numel()).float() / 2000
    top = probs.topk(5).indices
    assert probs[top].sum() > 0.3  # the check is about tokens that actually get drawn
    sigma = (probs[top] * (1 - probs[top]) / 2000).sqrt()
    assert ((freq[top] - probs[top]).abs() <= 4 * sigma + 1e-3).all()


def test_stop_tokens_end_rows_independently(tiny_model_dirs):
    model, proc = load(tiny_model_dirs["qwen2_5_vl"])
    batch = rerank_batch(proc)
    free = generate(model, proc, batch, max_new_tokens=20, temperature=0.0)
    seqs = free.tokens.tolist()
    # A stop token that one row produces mid-way and another row never produces.
    stop = next(t for t in seqs[2][3:] + seqs[0][3:] if any(t not in s for s in seqs))
    stopped = generate(model, proc, batch, max_new_tokens=20, temperature=0.0, stop_ids=[stop], check_every=3)
    for r, seq in enumerate(seqs):
        end = seq.index(stop) + 1 if stop in seq else 20
        assert stopped.mask[r].sum() == end
        assert stopped.tokens[r, :end].tolist() == seq[:end]
        assert (stopped.tokens[r, end:] == proc.pad_id).all() and not stopped.mask[r, end:].any()
        assert bool(stopped.finished[r]) == (stop in seq)  # cut at max_new_tokens: not finished
    assert stopped.mask.sum(1).min() < 20 and stopped.mask.sum(1).max() == 20


def test_top_k_one_and_tiny_top_p_are_greedy(tiny_model_dirs):
    model, proc = load(tiny_model_dirs["qwen2_vl"])
    batch = rerank_batch(proc)
    greedy = generate(model, proc, batch, max_new_tokens=10, temperature=0.0)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        r = generate(model, proc, batch, max_new_tokens=10, temperature=1.0, generator=torch.Generator().manual_seed(1), **kw)
        assert torch.equal(r.tokens, greedy.tokens)


def test_sampling_logits_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    kept = sampling_logits(logits, 1.0, top_k=2, top_p=1.0).isfinite()
    assert kept.tolist() == [[False, False, True, True]]
    probs = logits.softmax(-1)[0]  # [0.032, 0.087, 0.237, 0.644]
    kept = sampling_logits(logits, 1.0, top_k=0, top_p=0.7).isfinite()
    assert kept.tolist() == [[False, False, True, True]]  # 0.644 < 0.7, so the second token is needed too
    assert probs[3] < 0.7 < probs[3] + probs[2]
    kept = sampling_logits(logits, 1.0, top_k=0, top_p=0.5).isfinite()
    assert kept.tolist() == [[False, False, False, True]]


def test_bad_settings_are_refused(tiny_model_dirs):
    model, proc = load(tiny_model_dirs["qwen2_vl"])
    batch = rerank_batch(proc, counts=[1], queries=QUERIES[:1])
    for kw in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(n=0)):
        with pytest.raises(ValueError):
            generate(model, proc, batch, **{"max_new_tokens": 4, **kw})


def test_static_decode_path_equals_the_eager_one(tiny_model_dirs, monkeypatch):
    """`compile=True`'s static-shape decode (whole cache read under a mask, stopped rows kept) gives the eager
    path's tokens and log-probs; torch.compile itself is replaced by the identity here (the slow test compiles)."""
    model, proc = load(tiny_model_dirs["qwen2_5_vl"])
    batch = rerank_batch(proc)
    free = generate(model, proc, batch, max_new_tokens=20, temperature=0.0)
    seqs = free.tokens.tolist()
    stop = next(t for t in seqs[2][3:] + seqs[0][3:] if any(t not in s for s in seqs))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    for kw in (dict(temperature=0.0, stop_ids=[stop], check_every=3),  # rows stop at different steps
               dict(temperature=1.0, stop_ids=[], n=2)):  # no stops: both paths draw for the same rows
        eager = generate(model, proc, batch, max_new_tokens=20, generator=torch.Generator().manual_seed(3), **kw)
        static = generate(model, proc, batch, max_new_tokens=20, generator=torch.Generator().manual_seed(3),
                          compile=True, **kw)
        assert torch.equal(static.tokens, eager.tokens) and torch.equal(static.mask, eager.mask)
        if kw["stop_ids"]:
            assert eager.lengths.min() < 20 and eager.lengths.max() == 20


@pytest.mark.slow
def test_compiled_decode_equals_the_eager_one(tiny_model_dirs):
    """The real torch.compile of the decode step (model forward and sampling, one graph for every step) decodes what
    eager does."""
    model, proc = load(tiny_model_dirs["qwen2_vl"])
    batch = rerank_batch(proc)
    for temperature in (0.0, 1.0):  # greedy, and sampling from the same random stream
        eager = generate(model, proc, batch, max_new_tokens=40, temperature=temperature,
                         generator=torch.Generator().manual_seed(5))
        compiled = generate(model, proc, batch, max_new_tokens=40, temperature=temperature, compile=True,
                            generator=torch.Generator().manual_seed(5))
        assert torch.equal(compiled.tokens, eager.tokens) and torch.equal(compiled.mask, eager.mask)
