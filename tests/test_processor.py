"""Parity of mmr5.processor / mmr5.tokenizer_build with transformers' Qwen2-VL image processor and Qwen2.5-VL processor.

transformers is the reference here only. Its `AutoProcessor.from_pretrained` also builds a video processor,
which needs torchvision (not installed), so the reference processor is assembled from the pieces it would
load from the same directory: AutoTokenizer, AutoImageProcessor (the PIL backend) and chat_template.json.
"""

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmr5.processor import QUESTION_TEMPLATE, SYSTEM_PROMPT, Processor, smart_resize
from mmr5.tokenizer_build import QWEN2_5_VL_CHAT_TEMPLATE, SPECIAL_TOKENS, save_tokenizer_files, train_tokenizer

transformers = pytest.importorskip("transformers")
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor  # noqa: E402
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_image  # noqa: E402

TEMPLATE_FILE = Path(__file__).parent / "fixtures" / "qwen2_5_vl_chat_template.jinja"
# sha256 of json.dumps(chat_template) of Qwen/Qwen2.5-VL-7B-Instruct@cc594898, as recorded by a public renderer audit.
OFFICIAL_TEMPLATE_JSON_SHA256 = "4df95d05455c2a6f762616492bba63d0f9bef904ef47daabad35f5715d6d2e4e"
RELEASED_MAX_PIXELS = 12845056


def make_corpus():
    """A few hundred deterministic English sentences plus the MM-R5 prompt strings."""
    rng = random.Random(0)
    subjects = ["the model", "a reranker", "this page", "the chart", "our table", "Image 3", "the user", "she"]
    verbs = ["shows", "ranks", "describes", "compares", "answers", "contains", "explains", "lists"]
    objects = ["the revenue in 2023", "relevant images", "a bar chart of sales", "the question's answer",
               "financial statements", "a map of Europe", "12 photos", "the reasoning process"]
    sentences = [f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(400)]
    return sentences + [SYSTEM_PROMPT, QUESTION_TEMPLATE, "<think>Image 1 is best.</think><answer>[1, 2]</answer>"]


class HFProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without a video processor (see module docstring)."""

    def check_argument_for_proper_class(self, name, arg):
        return None if arg is None else super().check_argument_for_proper_class(name, arg)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_qwen_tokenizer")
    save_tokenizer_files(train_tokenizer(make_corpus(), 600), str(directory), TEMPLATE_FILE.read_text())
    return str(directory)


@pytest.fixture(scope="session")
def proc(model_dir):
    return Processor.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def hf(model_dir):
    with open(os.path.join(model_dir, "chat_template.json")) as f:
        chat_template = json.load(f)["chat_template"]
    hf = HFProcessor(image_processor=AutoImageProcessor.from_pretrained(model_dir),
                     tokenizer=AutoTokenizer.from_pretrained(model_dir), video_processor=None,
                     chat_template=chat_template)
    hf.tokenizer.padding_side = "left"
    return hf


def noise_image(height, width, seed, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (height, width) if channels is None else (height, width, channels)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode=mode)


# ---------------------------------------------------------------- images


def test_smart_resize_matches_reference():
    rng = random.Random(0)
    cases = [(3, 3), (10, 40), (28, 28), (42, 42), (70, 14), (30, 5000), (4000, 3000), (1, 200), (6000, 7000)]
    cases += [(rng.randint(1, 5000), rng.randint(1, 5000)) for _ in range(300)]
    for height, width in cases:
        if max(height, width) / min(height, width) > 200:
            continue
        for min_pixels, max_pixels in [(3136, RELEASED_MAX_PIXELS), (3136, 1003520), (50000, 60000), (784, 784)]:
            assert smart_resize(height, width, 28, min_pixels, max_pixels) == \
                hf_image.smart_resize(height, width, 28, min_pixels, max_pixels), (height, width, min_pixels)


def test_smart_resize_rejects_extreme_aspect_ratio():
    assert smart_resize(10, 2000) == hf_image.smart_resize(10, 2000, 28, 3136, RELEASED_MAX_PIXELS)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2001)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(5000, 3)


@pytest.mark.parametrize("height, width, min_pixels, max_pixels", [
    (3, 3, 3136, RELEASED_MAX_PIXELS),
    (10, 40, 3136, RELEASED_MAX_PIXELS),
    (28, 28, 3136, RELEASED_MAX_PIXELS),
    (57, 83, 3136, RELEASED_MAX_PIXELS),
    (224, 224, 3136, RELEASED_MAX_PIXELS),
    (333, 517, 3136, 1003520),
    (30, 5000, 3136, RELEASED_MAX_PIXELS),
    (5000, 30, 3136, RELEASED_MAX_PIXELS),
    (20, 3999, 3136, RELEASED_MAX_PIXELS),  # aspect ratio 199.95
    (30, 5000, 3136, 50000),
    (4000, 3000, 3136, RELEASED_MAX_PIXELS),
    (4000, 3000, 3136, 200704),
    (1000, 700, 256 * 28 * 28, 512 * 28 * 28),
    (60, 90, 100000, 200000),  # upscaled by the min_pixels branch
])
def test_image_parity(proc, height, width, min_pixels, max_pixels):
    image = noise_image(height, width, seed=height * 7 + width)
    ours = Processor(proc.tokenizer, min_pixels=min_pixels, max_pixels=max_pixels)
    reference = hf_image.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    pixel_values, grid = ours.images([image])
    expected = reference(images=[image], return_tensors="pt")
    assert torch.equal(grid, expected["image_grid_thw"])
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == expected["pixel_values"].shape
    assert (pixel_values - expected["pixel_values"]).abs().max().item() <= 1e-6


def test_several_images_concatenate_in_order(proc, hf):
    images = [noise_image(100 + 37 * i, 300 - 29 * i, seed=i) for i in range(4)]
    pixel_values, grid = proc.images(images)
    expected = hf.image_processor(images=images, return_tensors="pt")
    assert torch.equal(grid, expected["image_grid_thw"])
    assert (pixel_values - expected["pixel_values"]).abs().max().item() <= 1e-6
    empty_values, empty_grid = proc.images([])
    assert empty_values.shape == (0, 1176) and empty_grid.shape == (0, 3)


def test_conversions_to_rgb(proc, hf):
    """Alpha is composited on white; palette, CMYK, 16-bit and grey images become sane RGB."""
    transparent = Image.new("RGBA", (56, 56), (10, 200, 30, 0))
    white = proc.images([Image.new("RGB", (56, 56), (255, 255, 255))])[0]
    assert torch.equal(proc.images([transparent])[0], white)
    assert torch.equal(proc.images([Image.new("LA", (56, 56), (0, 0))])[0], white)
    palette = Image.new("P", (56, 56), 3)
    palette.info["transparency"] = 3
    assert torch.equal(proc.images([palette])[0], white)
    # Partial alpha and grey match the reference's own conversion.
    for image in [noise_image(64, 48, seed=1, mode="RGBA"), noise_image(64, 48, seed=2, mode="L")]:
        expected = hf.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        assert (proc.images([image])[0] - expected).abs().max().item() <= 1e-6
    black = proc.images([Image.new("RGB", (56, 56), (0, 0, 0))])[0]
    assert torch.equal(proc.images([Image.new("CMYK", (56, 56), (0, 0, 0, 255))])[0], black)
    assert torch.equal(proc.images([Image.new("CMYK", (56, 56), (0, 0, 0, 0))])[0], white)
    sixteen_bit = Image.fromarray(np.full((56, 56), 65535, dtype=np.uint16))
    assert sixteen_bit.mode == "I;16"
    assert torch.equal(proc.images([sixteen_bit])[0], white)
    assert torch.equal(proc.images([Image.new("I", (56, 56), 0)])[0], black)
    mid_grey = proc.images([Image.new("RGB", (56, 56), (128, 128, 128))])[0]
    assert torch.equal(proc.images([Image.new("I", (56, 56), 128 * 257)])[0], mid_grey)


def test_image_files(proc, tmp_path):
    image = noise_image(90, 70, seed=3, mode="RGBA")
    image.save(tmp_path / "page.png")
    from_file, grid = proc.images([tmp_path / "page.png", str(tmp_path / "page.png")])
    in_memory, _ = proc.images([image, image])
    assert torch.equal(from_file, in_memory) and grid.tolist() == [[1, 6, 4], [1, 6, 4]]
    with pytest.raises(ValueError, match="missing.png"):
        proc.images([tmp_path / "missing.png"])
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(ValueError, match="corrupt.jpg"):
        proc.images([tmp_path / "corrupt.jpg"])
    with pytest.raises(ValueError, match="PIL image or a path"):
        proc.images([np.zeros((10, 10, 3))])


def test_image_settings(model_dir, tmp_path):
    with pytest.raises(ValueError, match="max_pixels"):
        Processor.from_pretrained(model_dir, min_pixels=10000, max_pixels=5000)
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        (tmp_path / name).write_bytes((Path(model_dir) / name).read_bytes())
    default = Processor.from_pretrained(str(tmp_path))  # no preprocessor_config.json: released defaults
    assert (default.min_pixels, default.max_pixels, default.patch_size) == (3136, RELEASED_MAX_PIXELS, 14)
    config = {"size": {"shortest_edge": 1000, "longest_edge": 90000}, "image_processor_type": "Qwen2VLImageProcessor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    sized = Processor.from_pretrained(str(tmp_path))
    assert (sized.min_pixels, sized.max_pixels) == (1000, 90000)
    reference = AutoImageProcessor.from_pretrained(str(tmp_path))
    assert (reference.size["shortest_edge"], reference.size["longest_edge"]) == (1000, 90000)
    overridden = Processor.from_pretrained(str(tmp_path), min_pixels=2000, max_pixels=80000)
    assert (overridden.min_pixels, overridden.max_pixels) == (2000, 80000)


# ---------------------------------------------------------------- tokenizer and template


def test_chat_template_fixture_is_the_released_one():
    template = TEMPLATE_FILE.read_text()
    assert hashlib.sha256(json.dumps(template).encode()).hexdigest() == OFFICIAL_TEMPLATE_JSON_SHA256
    assert template == QWEN2_5_VL_CHAT_TEMPLATE


def test_prompt_literals():
    assert "provide your analysis process.For example: <think>Image 1" in QUESTION_TEMPLATE
    assert QUESTION_TEMPLATE.endswith("Image ID to image mapping:\n")
    assert SYSTEM_PROMPT.endswith("<think> reasoning process here </think><answer> answer here </answer>")


def test_tokenizer_matches_reference(proc, hf):
    tokenizer = proc.tokenizer
    bpe_size = tokenizer.get_vocab_size() - len(SPECIAL_TOKENS)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(bpe_size, bpe_size + len(SPECIAL_TOKENS)))
    assert proc.vocab_size == tokenizer.get_vocab_size() == 600 and proc.pad_id == proc.endoftext_id == hf.tokenizer.pad_token_id
    assert proc.eos_id == proc.im_end_id == hf.tokenizer.eos_token_id
    assert proc.image_pad_id == hf.image_token_id
    texts = ["Hello  world\n\n  it's 12345 THE'LL", "  leading\r\n\ttabs   \n", "日本語 テキスト 😀 café",
             "e\u0301 vs \u00e9 (NFC)", "<|im_start|>user\nhi<|im_end|>\n<|image_pad|><|vision_end|>x",
             SYSTEM_PROMPT, QUESTION_TEMPLATE.format(Question="What's 2+2?", image_num=3, image_num_end=3)]
    for text in texts:
        ids = proc.encode(text)
        assert ids == hf.tokenizer(text)["input_ids"], text
        assert proc.decode(ids) == hf.tokenizer.decode(ids, skip_special_tokens=True)
        assert proc.decode(torch.tensor(ids), skip_special_tokens=False) == hf.tokenizer.decode(ids)


@pytest.mark.parametrize("messages, add_generation_prompt", [
    ([{"role": "user", "content": "Hi there"}], True),
    ([{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}], False),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What is this?"}, {"type": "image", "image": "x.png"}]}], True),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": "u"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "<think>b</think>"}]},
      {"role": "user", "content": "c"}], True),
])
def test_render_matches_chat_template(proc, hf, messages, add_generation_prompt):
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert proc.render(messages, add_generation_prompt) == expected


def test_rerank_prompt_matches_reference_construction(proc, hf):
    """Messages built the way i2vec/MM-R5 examples/reranker.py builds them render to our prompt."""
    query, pages = "Which page shows the 2023 revenue?", ["a.png", "b.png", "c.png"]
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                {"role": "user", "content": [{"type": "text", "text": QUESTION_TEMPLATE.format(
                    Question=query, image_num=len(pages), image_num_end=len(pages))}]}]
    for i, page in enumerate(pages):
        messages[-1]["content"].extend([{"type": "text", "text": f"\nImage {i+1}: "}, {"type": "image", "image": page}])
    prompt = proc.rerank_prompt(query, len(pages))
    assert prompt == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == hf.apply_chat_template(proc.rerank_messages(query, 3), tokenize=False, add_generation_prompt=True)
    assert prompt.count("<|image_pad|>") == 3 and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "mapping:\n\nImage 1: <|vision_start|><|image_pad|><|vision_end|>\nImage 2: " in prompt


def batch_images(counts, seed=0):
    rng = np.random.default_rng(seed)
    return [[noise_image(int(rng.integers(40, 260)), int(rng.integers(40, 260)), seed=seed * 100 + 10 * row + i)
             for i in range(count)] for row, count in enumerate(counts)]


def test_rerank_inputs_match_reference_processor(proc, hf):
    queries = ["Which page has the table?", "Show me the map of Europe", "revenue in 2023?"]
    images = batch_images([1, 5, 10])
    batch = proc.rerank_inputs(queries, images)
    texts = [proc.rerank_prompt(q, len(ims)) for q, ims in zip(queries, images)]
    expected = hf(text=texts, images=[im for ims in images for im in ims], padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    assert torch.equal(batch["image_grid_thw"], expected["image_grid_thw"])
    assert (batch["pixel_values"] - expected["pixel_values"]).abs().max().item() <= 1e-6
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.int64
    assert batch["input_ids"][0, 0].item() == proc.pad_id and batch["attention_mask"][:, -1].all()
    assert batch["prompt_lengths"].tolist() == batch["attention_mask"].sum(1).tolist()
    assert batch["images_per_row"].tolist() == [len(i) for i in images]
    assert (batch["input_ids"] == proc.image_pad_id).sum().item() == (batch["image_grid_thw"].prod(1) // 4).sum().item()
    assert "labels_mask" not in batch


def test_chat_inputs_match_reference_processor(proc, hf):
    """Prompts of one's own (mmr5.chains' teacher questions): one page then a text, and a text-only one."""
    images = batch_images([1, 0, 1], seed=2)
    conversations = [[{"role": "user", "content": ([{"type": "image"}] if ims else [])
                       + [{"type": "text", "text": f"Why does this page help? {row}"}]}]
                     for row, ims in enumerate(images)]
    batch = proc.chat_inputs(conversations, images)
    texts = [hf.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    expected = hf(text=texts, images=[im for ims in images for im in ims], padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "image_grid_thw"):
        assert torch.equal(batch[key], expected[key]), key
    assert (batch["pixel_values"] - expected["pixel_values"]).abs().max().item() <= 1e-6
    assert batch["prompt_lengths"].tolist() == batch["attention_mask"].sum(1).tolist()
    text_only = proc.chat_inputs(conversations[1:2], [[]])
    assert "pixel_values" not in text_only and text_only["attention_mask"].all()
    assert torch.equal(text_only["input_ids"][0], batch["input_ids"][1][batch["attention_mask"][1].bool()])


def test_labels_mask_covers_exactly_the_response(proc, hf):
    queries = ["Which page has the table?", "map?"]
    images = batch_images([2, 3], seed=1)
    responses = ["<think>Image 2 has a table.</think><answer>[2, 1]</answer>", "<answer>[3, 1, 2]</answer>"]
    batch = proc.rerank_inputs(queries, images, responses)
    conversations = [proc.rerank_messages(q, len(ims)) + [{"role": "assistant", "content": r}]
                     for q, ims, r in zip(queries, images, responses)]
    texts = [hf.apply_chat_template(c, tokenize=False, add_generation_prompt=False) for c in conversations]
    expected = hf(text=texts, images=[im for ims in images for im in ims], padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    for row, response in enumerate(responses):
        ids, mask = batch["input_ids"][row], batch["labels_mask"][row]
        labelled = ids[mask].tolist()
        assert labelled == proc.encode(response) + [proc.im_end_id]
        assert proc.decode(labelled, skip_special_tokens=False) == response + "<|im_end|>"
        start = len(ids) - batch["attention_mask"][row].sum().item() + batch["prompt_lengths"][row].item()
        assert mask[start:-1].all() and not mask[:start].any() and not mask[-1]
        assert proc.decode(ids[-1:], skip_special_tokens=False) == "\n"


def test_prompt_length_counts_what_rerank_inputs_builds(proc):
    """The pre-pass's count from image sizes alone equals the built rows' lengths, prompt and prompt + response."""
    queries, responses = ["Which page has the table?", "map?"], ["<think>x</think><answer>[2, 1]</answer>", "[1]"]
    images = batch_images([2, 3], seed=1)
    prompts = proc.rerank_inputs(queries, images)["prompt_lengths"].tolist()
    rows = proc.rerank_inputs(queries, images, responses)["attention_mask"].sum(1).tolist()
    sizes = [[im.size for im in ims] for ims in images]
    assert [proc.prompt_length(q, s) for q, s in zip(queries, sizes)] == prompts
    assert [proc.prompt_length(q, s, r) for q, s, r in zip(queries, sizes, responses)] == rows


def test_user_errors(proc, model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Processor.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="image placeholders"):
        proc.rerank_inputs(["q <|image_pad|>"], [[noise_image(56, 56, 0)]])
    with pytest.raises(ValueError, match="at least one image"):
        proc.rerank_prompt("q", 0)
    with pytest.raises(TypeError, match="query must be a string, got NoneType"):
        proc.rerank_inputs([None], [[noise_image(56, 56, 0)]])
    with pytest.raises(ValueError, match="same length"):
        proc.rerank_inputs(["a", "b"], [[noise_image(56, 56, 0)]])
    with pytest.raises(ValueError, match="video"):
        proc.render([{"role": "user", "content": [{"type": "video"}]}])
    tokenizer = train_tokenizer(["plain text only"], 300)
    tokenizer_without_vision = type(tokenizer).from_str(tokenizer.to_str().replace("<|image_pad|>", "<|nothing|>"))
    with pytest.raises(ValueError, match="image_pad"):
        Processor(tokenizer_without_vision)
