"""Qwen2-VL / Qwen2.5-VL input processing for MM-R5: images -> patches, chat -> token ids.

Pipeline: data -> [processor] -> model -> sampler -> rewards -> ppo.
The processor turns a rerank question and its candidate images into exactly the tensors Hugging Face's
`Qwen2_5_VLProcessor` would produce for MM-R5's released prompt: `input_ids`, `attention_mask`,
`pixel_values` [patches, 3*2*14*14] and `image_grid_thw` [images, 3]. It also builds training rows
(prompt + assistant response) with a mask over the response tokens.
"""

import json
import math
import os

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from mmr5.data import MAX_ASPECT_RATIO, Sample

# MM-R5's prompts, byte-identical to i2vec/MM-R5 examples/reranker.py (including "process.For example").
SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>"
)
QUESTION_TEMPLATE = (
    "Please rank the following images according to their relevance to the question. "
    "Provide your response in the format: <think>your reasoning process here</think><answer>[image_id_1, image_id_2, ...]</answer> "
    "where the numbers in the list represent the ranking order of images'id from most to least relevant. "
    "Before outputting the answer, you need to analyze each image and provide your analysis process."
    "For example: <think>Image 1 shows the most relevant content because...</think><answer>[id_most_relevant, id_second_relevant, ...]</answer>"
    "\nThe question is: {Question}"
    "\n\nThere are {image_num} images, id from 1 to {image_num_end}, Image ID to image mapping:\n"
)

DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
# Released Qwen2.5-VL preprocessor_config.json values (qwen-vl-utils uses the same pixel bounds).
IMAGE_DEFAULTS = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=3136, max_pixels=12845056,
                      image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])


def smart_resize(height, width, factor=28, min_pixels=3136, max_pixels=12845056):
    """Nearest (h, w) that are multiples of `factor` with h*w in [min_pixels, max_pixels], keeping the aspect.

    Mirrors transformers' Qwen2-VL smart_resize, Python's half-to-even round included, so grids match.
    """
    if min(height, width) <= 0:
        raise ValueError(f"image has an empty side: {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image {height}x{width} has aspect ratio {max(height, width) / min(height, width):.1f}; "
                         f"Qwen-VL takes at most {MAX_ASPECT_RATIO}: crop or split it")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def load_rgb(image):
    """Open a path (or take a PIL image) and return it as 8-bit RGB; transparency is composited on white."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as f:
                image = f.copy()  # decodes now, inside the try, and keeps mode, palette and transparency info
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image file {os.fspath(image)!r}: {e}") from None
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image or a path, got {type(image).__name__}")
    if image.mode.startswith("I"):  # 16-bit grey ("I;16*", or "I" as older Pillow opens 16-bit PNGs)
        grey = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
        image = Image.fromarray(np.round(grey).astype(np.uint8))
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


class Processor:
    """Tokenizer + image preprocessor + chat template + MM-R5 prompt, as one object the pipeline passes around."""

    def __init__(self, tokenizer: Tokenizer, tokenizer_config: dict | None = None, **image_config):
        """`tokenizer_config` (parsed tokenizer_config.json) names pad/eos; `image_config` overrides IMAGE_DEFAULTS.

        Special ids are looked up by their text because tiny test tokenizers number them differently;
        `vocab_size` counts the tokenizer's tokens (a model's embedding table may be larger).
        """
        self.tokenizer = tokenizer
        if unknown := set(image_config) - set(IMAGE_DEFAULTS):
            raise TypeError(f"unknown image settings {sorted(unknown)}; known: {sorted(IMAGE_DEFAULTS)}")
        for key, value in {**IMAGE_DEFAULTS, **image_config}.items():
            setattr(self, key, value)
        if self.max_pixels < self.min_pixels:
            raise ValueError(f"max_pixels ({self.max_pixels}) is smaller than min_pixels ({self.min_pixels})")
        # Every normalised value comes from one of 256 byte levels: a [3, 256] table replaces per-pixel math
        # and reproduces the reference's float64 rescale -> float32 -> (x - mean) / std bit for bit.
        levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None]
        self.level_table = (levels[None, :] - mean) / std

        def token_id(token):
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"tokenizer has no {token} token; is this a Qwen2-VL / Qwen2.5-VL tokenizer?")
            return token_id

        tokenizer_config = tokenizer_config or {}
        self.image_pad_id = token_id("<|image_pad|>")
        self.vision_start_id = token_id("<|vision_start|>")
        self.vision_end_id = token_id("<|vision_end|>")
        self.im_start_id = token_id("<|im_start|>")
        self.im_end_id = token_id("<|im_end|>")
        self.endoftext_id = token_id("<|endoftext|>")
        self.pad_id = token_id(special_token_text(tokenizer_config.get("pad_token")) or "<|endoftext|>")
        self.eos_id = token_id(special_token_text(tokenizer_config.get("eos_token")) or "<|im_end|>")
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_pretrained(cls, path, min_pixels=None, max_pixels=None):
        """Load from a local Hugging Face model directory (tokenizer.json required, the configs optional)."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path} is not a checkpoint folder (config.json, *.safetensors, tokenizer.json)")
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"{tokenizer_file} not found; expected a Qwen-VL model directory")
        tokenizer_config = read_json(os.path.join(path, "tokenizer_config.json"))
        preprocessor = read_json(os.path.join(path, "preprocessor_config.json"))
        # Like transformers: explicit min/max_pixels win over the newer `size` dict, then our arguments win.
        size = preprocessor.get("size") if isinstance(preprocessor.get("size"), dict) else {}
        image_config = {key: preprocessor[key] for key in IMAGE_DEFAULTS if key in preprocessor}
        for key, size_key in [("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")]:
            value = preprocessor.get(key) or size.get(size_key)
            if value is not None:
                image_config[key] = value
        for key, value in image_config.items():  # a hand-edited export: a wrong type would fail deep in numpy
            if not _valid_image_setting(key, value):
                raise ValueError(f"{os.path.join(path, 'preprocessor_config.json')}: {key} = {value!r} is not "
                                 f"{'3 numbers' if key in ('image_mean', 'image_std') else 'a positive number'}: "
                                 "fix it or copy the release's file")
        for key, override in [("min_pixels", min_pixels), ("max_pixels", max_pixels)]:
            if override is not None:
                if not _valid_image_setting(key, override):
                    raise ValueError(f"{key} must be a positive number, got {override!r}")
                image_config[key] = override
        try:
            tokenizer = Tokenizer.from_file(tokenizer_file)
        except Exception as e:  # the tokenizers library raises a bare Exception for any unreadable file
            raise ValueError(f"{tokenizer_file} is not a readable tokenizer ({e}); a download cut short? copy it "
                             "again from the model's release") from None
        return cls(tokenizer, tokenizer_config, **image_config)

    # ---- images ----

    def images(self, images):
        """Images (PIL or paths) -> (pixel_values [sum t*h*w, 3*T*P*P] float32, image_grid_thw [n, 3] int64)."""
        patches, grids = [], []
        for i, image in enumerate(images):
            try:
                image_patches, grid = self.patchify(load_rgb(image))
            except ValueError as e:  # name the page: the message alone does not say which candidate it was
                name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"candidate {i + 1}"
                raise ValueError(f"{e}" if name in str(e) else f"{name}: {e}") from None
            patches.append(image_patches)
            grids.append(grid)
        patch_dim = 3 * self.temporal_patch_size * self.patch_size ** 2
        pixel_values = np.concatenate(patches) if patches else np.zeros((0, patch_dim), np.float32)
        return torch.from_numpy(pixel_values), torch.tensor(grids, dtype=torch.int64).reshape(-1, 3)

    def patchify(self, image):
        """Resize one RGB image to the patch grid, normalise it and flatten it in the vision tower's patch order."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        height, width = smart_resize(image.height, image.width, p * m, self.min_pixels, self.max_pixels)
        if (width, height) != image.size:
            image = image.resize((width, height), Image.BICUBIC)
        pixels = np.asarray(image)  # (H, W, 3) uint8
        chw = self.level_table[np.arange(3)[:, None, None], pixels.transpose(2, 0, 1)]  # (3, H, W) float32
        gh, gw = height // p, width // p
        # (C, gh/m, m, P, gw/m, m, P) -> (gh/m, gw/m, m, m, C, P, P): each merge block's 2x2 patches are adjacent.
        patches = chw.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        # A still image fills all `t` frames of a temporal patch: (..., C, T, P, P).
        patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
        return patches.reshape(gh * gw, 3 * t * p * p), [1, gh, gw]

    # ---- text ----

    def encode(self, text):
        """Token ids of `text`; special tokens written in it (`<|im_end|>` ...) become their single ids."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=True):
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_texts(self) -> list[str]:
        """Each token id's own text (a critic's PageMarks finds page ids by it)."""
        n = self.tokenizer.get_vocab_size(with_added_tokens=True)
        return self.tokenizer.decode_batch([[i] for i in range(n)], skip_special_tokens=False)

    def render(self, messages, add_generation_prompt=True):
        """Chat messages (HF form) -> text, as Qwen2-VL / Qwen2.5-VL's chat template renders them."""
        text = DEFAULT_SYSTEM if messages and messages[0]["role"] != "system" else ""
        for message in messages:
            text += f"<|im_start|>{message['role']}\n"
            content = message["content"]
            if isinstance(content, str):
                text += content
            else:
                for item in content:
                    if item.get("type") == "image" or "image" in item or "image_url" in item:
                        text += IMAGE_PLACEHOLDER
                    elif item.get("type") == "video" or "video" in item:
                        raise ValueError("video inputs are not supported")
                    elif "text" in item:
                        text += item["text"]
                    else:
                        raise ValueError(f"content item has neither text nor image: {item}")
            text += "<|im_end|>\n"
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def rerank_messages(self, query, n):
        """MM-R5's rerank conversation for `query` over `n` images (image i is labelled "Image i")."""
        if n < 1:
            raise ValueError(f"a rerank prompt needs at least one image, got {n}")
        if not isinstance(query, str):  # else None would be asked about as the text "None"
            raise TypeError(f"the query must be a string, got {type(query).__name__}")
        user = [{"type": "text", "text": QUESTION_TEMPLATE.format(Question=query, image_num=n, image_num_end=n)}]
        for i in range(1, n + 1):
            user += [{"type": "text", "text": f"\nImage {i}: "}, {"type": "image"}]
        return [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                {"role": "user", "content": user}]

    def rerank_prompt(self, query, n):
        """Rendered rerank prompt with one `<|image_pad|>` per image and the assistant turn opened."""
        return self.render(self.rerank_messages(query, n), add_generation_prompt=True)

    def expand_image_pads(self, ids, image_grid_thw):
        """Replace the i-th `<|image_pad|>` with t*h*w/merge^2 copies: one per merged vision token of image i."""
        pad_positions = [i for i, token in enumerate(ids) if token == self.image_pad_id]
        if len(pad_positions) != len(image_grid_thw):
            raise ValueError(f"text has {len(pad_positions)} image placeholders but {len(image_grid_thw)} images")
        expanded, start = [], 0
        for position, grid in zip(pad_positions, image_grid_thw.tolist()):
            expanded += ids[start:position] + [self.image_pad_id] * (math.prod(grid) // self.merge_size ** 2)
            start = position + 1
        return expanded + ids[start:]

    def chat_inputs(self, conversations, images_per_conversation):
        """Batch of chat prompts of one's own (message lists with one image item per image, in order) -> model
        inputs as rerank_inputs builds them, left padded, the assistant turn opened: input_ids / attention_mask,
        prompt_lengths, and pixel_values / image_grid_thw (left out when no prompt has an image)."""
        if len(conversations) != len(images_per_conversation) or not conversations:
            raise ValueError("chat_inputs needs as many image lists as conversations, at least one")
        rows, all_patches, all_grids = [], [], []
        for messages, images in zip(conversations, images_per_conversation):
            pixel_values, grid = self.images(images)
            rows.append(self.expand_image_pads(self.encode(self.render(messages)), grid))
            all_patches.append(pixel_values)
            all_grids.append(grid)
        batch = dict(input_ids=left_pad(rows, self.pad_id, torch.int64),
                     attention_mask=left_pad([[1] * len(ids) for ids in rows], 0, torch.int64),
                     prompt_lengths=torch.tensor([len(ids) for ids in rows]))
        if any(len(images) for images in images_per_conversation):
            batch.update(pixel_values=torch.cat(all_patches), image_grid_thw=torch.cat(all_grids))
        return batch

    def prompt_length(self, query, image_sizes, response=None, text_tokens: dict | None = None) -> int:
        """Tokens of the rerank prompt (+ response) for images of these (width, height), without decoding any.
        `text_tokens` caches the prompt text's count per (query, page count) over many calls."""
        text_tokens = {} if text_tokens is None else text_tokens
        key = (query, len(image_sizes))
        if key not in text_tokens:  # the prompt's text, less one <|image_pad|> per page
            text_tokens[key] = len(self.encode(self.rerank_prompt(query, len(image_sizes)))) - len(image_sizes)
        tokens = text_tokens[key]
        for width, height in image_sizes:
            h, w = smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)
            tokens += (h // self.patch_size) * (w // self.patch_size) // self.merge_size ** 2
        if response is not None:  # as rerank_inputs appends it: response, <|im_end|>, "\n"
            tokens += len(self.encode(response)) + 1 + len(self.encode("\n"))
        return tokens

    def check_prompt_lengths(self, samples: list[Sample], context: int, responses: bool = False):
        """Raise a one-line ValueError naming the first sample whose prompt (+ response, the SFT row) is longer than
        `context` tokens (max_position_embeddings): the model was never trained on positions past it."""
        sizes, text_tokens = {}, {}  # queries repeat across a file (the demo's 6000 samples ask 60 questions)
        for sample in samples:
            for path in sample.images:
                if path not in sizes:
                    with Image.open(path) as image:  # reads the header only
                        sizes[path] = image.size
            n = self.prompt_length(sample.query, [sizes[p] for p in sample.images],
                                   sample.response if responses else None, text_tokens)
            if n > context:
                raise ValueError(f"sample {sample.id}: its {'row' if responses else 'prompt'} is {n} tokens, longer "
                                 f"than the model's context of {context} (max_position_embeddings): give fewer or "
                                 "smaller pages (--max-pixels) or a shorter query")

    def rerank_inputs(self, queries, images_per_query, responses=None):
        """Batch of rerank prompts (optionally + responses) -> model inputs, left padded with `pad_id`.

        Returns input_ids / attention_mask [B, L] int64, pixel_values and image_grid_thw (images of all rows
        concatenated in row order), images_per_row [B] (which of those images belong to which row) and
        prompt_lengths [B] (unpadded prompt tokens per row).
        With `responses`, row b is prompt + response + `<|im_end|>` + "\\n" (what the chat template renders after
        an assistant message) and `labels_mask` [B, L] bool marks the tokens a policy is trained to produce:
        the response and its closing `<|im_end|>` -- not the prompt, not the trailing "\\n", not padding.
        The response is tokenized on its own, so its ids are what a sampler would have generated after the
        prompt (differs from tokenizing the joined text only if the response starts with whitespace).
        """
        if not queries:
            raise ValueError("rerank_inputs needs at least one query")
        if len(queries) != len(images_per_query) or (responses is not None and len(responses) != len(queries)):
            raise ValueError("queries, images_per_query (and responses) must have the same length")
        rows, label_masks, prompt_lengths, all_patches, all_grids = [], [], [], [], []
        for b, (query, images) in enumerate(zip(queries, images_per_query)):
            pixel_values, grid = self.images(images)
            ids = self.expand_image_pads(self.encode(self.rerank_prompt(query, len(images))), grid)
            prompt_lengths.append(len(ids))
            labels = [False] * len(ids)
            if responses is not None:
                answer = self.encode(responses[b]) + [self.im_end_id]
                newline = self.encode("\n")
                ids += answer + newline
                labels += [True] * len(answer) + [False] * len(newline)
            rows.append(ids)
            label_masks.append(labels)
            all_patches.append(pixel_values)
            all_grids.append(grid)
        batch = dict(input_ids=left_pad(rows, self.pad_id, torch.int64),
                     attention_mask=left_pad([[1] * len(ids) for ids in rows], 0, torch.int64),
                     pixel_values=torch.cat(all_patches),
                     image_grid_thw=torch.cat(all_grids), images_per_row=torch.tensor([len(g) for g in all_grids]),
                     prompt_lengths=torch.tensor(prompt_lengths))
        if responses is not None:
            batch["labels_mask"] = left_pad(label_masks, False, torch.bool)
        return batch


def left_pad(rows: list[list], fill, dtype) -> torch.Tensor:
    """[B, longest] tensor of the rows, each right-aligned after `fill`s (prompts end on the same column)."""
    out = torch.full((len(rows), max(map(len, rows))), fill, dtype=dtype)
    for b, row in enumerate(rows):
        out[b, out.shape[1] - len(row):] = torch.tensor(row, dtype=dtype)
    return out


def _valid_image_setting(key, value) -> bool:
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if key in ("image_mean", "image_std"):
        return isinstance(value, list) and len(value) == 3 and all(number(v) and (v > 0 or key == "image_mean")
                                                                   for v in value)
    return number(value) and value > 0


def special_token_text(token):
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict with "content"."""
    return token.get("content") if isinstance(token, dict) else token


def read_json(path):
    """Contents of an optional JSON config file; {} when it does not exist."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); copy it again from the model's release") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object; copy it again from the model's release")
    return config
