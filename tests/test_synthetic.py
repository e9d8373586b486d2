"""mmr5.synthetic: the built-in demo is deterministic, well-formed, loadable, and answerable from the pixels."""
import hashlib
import random
from pathlib import Path

import numpy as np
import pytest

from mmr5.data import read_samples
from mmr5.model import Qwen2VL
from mmr5.processor import Processor
from mmr5.rewards import format_reward, parse_order, rerank_reward
from mmr5.synthetic import (CANDIDATES, COLOURS, HEIGHT, RL_CANDIDATES, SHAPES, WIDTH, build_demo, build_rl_demo,
                            make_response, render_page)

SMALL = dict(sizes=dict(train=40, eval=12))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, build_demo(root, seed=3, **SMALL)


def digest(root: Path, skip: str | None = None) -> str:
    """Hash of every file's path and bytes under root (but not under root/skip)."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not (skip and p.is_relative_to(root / skip))):
        h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()


def test_build_is_deterministic_and_idempotent(demo, tmp_path):
    root, paths = demo
    assert set(paths) == {"base", "train", "eval"}
    other = build_demo(tmp_path / "again", seed=3, **SMALL)
    assert digest(root) == digest(tmp_path / "again")
    before = (root / "DONE").stat().st_mtime_ns
    assert build_demo(root, seed=3, **SMALL) == paths  # complete: skipped
    assert (root / "DONE").stat().st_mtime_ns == before
    (tmp_path / "again" / "DONE").unlink()  # an interrupted build is redone
    assert build_demo(tmp_path / "again", seed=3, **SMALL) == other
    assert (tmp_path / "again" / "DONE").exists()
    different = build_demo(tmp_path / "seed4", seed=4, **SMALL)
    assert Path(different["train"]).read_text() != Path(paths["train"]).read_text()


def test_samples_are_valid_and_responses_answer_correctly(demo):
    _, paths = demo
    for split, n in (("train", 40), ("eval", 12)):
        samples = read_samples(paths[split], require_response=True, max_candidates=CANDIDATES)
        assert len(samples) == n
        for s in samples:
            assert len(s.images) == CANDIDATES and 1 <= len(s.positives) <= 2
            assert all(Path(p).name.startswith(split + "_") for p in s.images)  # eval pages are not training pages
            order, parsed = parse_order(s.response, CANDIDATES)
            assert parsed
            expected = sorted(s.positives) + [i for i in range(1, CANDIDATES + 1) if i not in s.positives]
            assert [i + 1 for i in order] == expected
            assert rerank_reward(s.response, s.positives) == 1.0 and format_reward(s.response, CANDIDATES) == 1.0
            assert s.domain in SHAPES
            colour, shape = s.query.rstrip("?.").split()[-2:]
            assert f"The question asks for a {colour} {shape}." in s.response
            for i in range(1, CANDIDATES + 1):  # the checks agree with the positives
                assert (f"Image {i}: {colour} yes, {shape} yes, so yes." in s.response) == (i in s.positives)
            assert f"Relevant: {', '.join(map(str, sorted(s.positives)))}.</think>" in s.response
        assert len({p for s in samples for p in s.images}) == n * CANDIDATES  # every candidate its own render


def test_rl_demo_is_harder_and_leaves_the_sft_demo_alone(demo, tmp_path):
    """The RL stage's prompts: RL_CANDIDATES pages, 1-3 relevant, every negative a near miss (one attribute shared);
    built beside the SFT demo without changing a byte of it, deterministic, skipped once complete."""
    root, _ = demo
    before = digest(root)
    small = dict(sizes=dict(train=30, eval=10))
    paths = build_rl_demo(root, seed=3, **small)
    build_rl_demo(tmp_path, seed=3, **small)
    assert digest(root / "rl") == digest(tmp_path / "rl")
    assert before == digest(root, skip="rl")
    done = (root / "rl" / "DONE").stat().st_mtime_ns
    assert build_rl_demo(root, seed=3, **small) == paths and (root / "rl" / "DONE").stat().st_mtime_ns == done
    counts = set()
    for split, n in (("train", 30), ("eval", 10)):
        samples = read_samples(paths[split], require_response=True, max_candidates=RL_CANDIDATES)
        assert len(samples) == n
        for s in samples:
            assert len(s.images) == RL_CANDIDATES and 1 <= len(s.positives) <= 3
            counts.add(len(s.positives))
            for i in range(1, RL_CANDIDATES + 1):
                check = s.response.split(f"Image {i}: ")[1].split(".")[0]  # "<colour> yes|no, <shape> yes|no, so .."
                shared = check.count(" yes,")
                assert (shared == 2) == (i in s.positives) and shared >= 1  # a negative shares exactly one
    assert counts == {1, 2, 3}


def test_make_response_two_positives():
    pages = [("red", "circle"), ("blue", "square"), ("red", "circle"), ("red", "square"), ("blue", "circle")]
    text = make_response(("red", "circle"), pages)
    assert text == ("<think>The question asks for a red circle. Image 1: red yes, circle yes, so yes. "
                    "Image 2: blue no, square no, so no. Image 3: red yes, circle yes, so yes. "
                    "Image 4: red yes, square no, so no. Image 5: blue no, circle yes, so no. Relevant: 1, 3."
                    "</think><answer>[1, 3, 2, 4, 5]</answer>")
    assert make_response(("red", "square"), pages).endswith("Relevant: 4.</think><answer>[4, 1, 2, 3, 5]</answer>")
    with pytest.raises(ValueError):
        make_response(("green", "cross"), pages)


def test_model_dir_loads_and_runs(demo):
    _, paths = demo
    model = Qwen2VL.from_pretrained(paths["base"])
    processor = Processor.from_pretrained(paths["base"])
    cfg = model.config
    assert cfg.is_qwen2_5 and cfg.text.vocab_size >= processor.vocab_size and cfg.text.vocab_size % 8 == 0
    assert cfg.image_token_id == processor.image_pad_id
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id) == (processor.vision_start_id, processor.vision_end_id)
    assert cfg.video_token_id == processor.tokenizer.token_to_id("<|video_pad|>")
    assert cfg.text.eos_token_id == processor.eos_id
    assert 0.5e6 < model.num_parameters() < 5e6
    samples = read_samples(paths["eval"])[:2]
    batch = processor.rerank_inputs([s.query for s in samples], [s.images for s in samples],
                                    [s.response for s in samples])
    assert batch["image_grid_thw"].tolist() == [[1, HEIGHT // 14, WIDTH // 14]] * 2 * CANDIDATES  # not resized
    out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"])
    assert out.logits.shape == (*batch["input_ids"].shape, cfg.text.vocab_size)
    # The tokenizer round-trips what the model reads and writes.
    prompt = processor.rerank_prompt(samples[0].query, CANDIDATES)
    assert processor.decode(processor.encode(prompt), skip_special_tokens=False) == prompt
    assert processor.decode(processor.encode(samples[0].response)) == samples[0].response
    assert len(processor.encode(samples[0].response)) < 120  # the demo's vocabulary knows its words


def colour_and_fill(page):
    """(nearest palette colour, share of the shape's bounding box it fills) read back from the pixels."""
    pixels = np.asarray(page, dtype=np.int32)
    names = list(COLOURS)
    dist = np.stack([np.abs(pixels - np.array(COLOURS[c])).sum(-1) for c in names])
    mask = dist.min(0) < 60
    colour = names[np.bincount(dist.argmin(0)[mask], minlength=len(names)).argmax()]
    ys, xs = np.nonzero(mask)
    return colour, mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))


def test_pages_show_their_colour_and_shape():
    """A cheap stand-in for learnability: colour and shape can be read back from every jittered render."""
    rng = random.Random(0)
    fills = {shape: [] for shape in SHAPES}
    for colour in COLOURS:
        for shape in SHAPES:
            for _ in range(8):
                page = render_page(colour, shape, rng)
                assert page.size == (WIDTH, HEIGHT) and page.mode == "RGB"
                got, fill = colour_and_fill(page)
                assert got == colour
                fills[shape].append(fill)
    ranges = sorted((min(f), max(f), shape) for shape, f in fills.items())
    assert [r[2] for r in ranges] == ["triangle", "cross", "circle", "square"]
    for (_, high, _), (low, _, _) in zip(ranges, ranges[1:]):
        assert high < low  # fill ratio alone tells the shapes apart
