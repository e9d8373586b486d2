"""Build a tiny Qwen2-style tokenizer and write it out in the Hugging Face layout.

Pipeline: [data] -> processor -> model -> sampler -> rewards -> ppo; tokenizer_build.py serves the built-in demo and
the tests.

Tests and the synthetic demo cannot download Qwen's 151k-token vocabulary, so they train a small
byte-level BPE here. It uses exactly the pipeline transformers' `Qwen2Tokenizer` rebuilds from
`tokenizer.json` (NFC, Qwen's split regex, byte-level without prefix space), so our processor and the
reference tokenize the same text to the same ids. The files written by `save_tokenizer_files` load with
`AutoProcessor.from_pretrained` just like a released Qwen2.5-VL checkpoint's.
"""

import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

# Qwen2's pre-tokenization regex (transformers models/qwen2/tokenization_qwen2.py).
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Qwen's added special tokens, in vocabulary order (they follow the BPE vocab, 151643.. in the real one).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# The `chat_template` of Qwen/Qwen2.5-VL-7B-Instruct's chat_template.json (Qwen2-VL ships the same).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(corpus: list[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of at most `vocab_size` tokens, special tokens included, on `corpus`.

    Fewer come out when the corpus runs out of pairs to merge.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
    tokenizer = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                              fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    # All 256 byte symbols are in the alphabet so any text can be encoded, whatever the corpus held.
    trainer = BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def save_tokenizer_files(tokenizer: Tokenizer, out_dir: str, chat_template: str | None = QWEN2_5_VL_CHAT_TEMPLATE,
                         min_pixels: int = 3136, max_pixels: int = 12845056) -> None:
    """Write tokenizer.json, tokenizer_config.json, preprocessor_config.json and chat_template.json to `out_dir`.

    The configs mirror the released Qwen2.5-VL-7B-Instruct files (eos `<|im_end|>`, pad `<|endoftext|>`,
    the template in the legacy chat_template.json that transformers still reads).
    """
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    added = {str(tokenizer.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                             "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    tokenizer_config = {
        "add_prefix_space": False, "added_tokens_decoder": added, "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    preprocessor_config = {
        "min_pixels": min_pixels, "max_pixels": max_pixels, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }
    files = {"tokenizer_config.json": tokenizer_config, "preprocessor_config.json": preprocessor_config}
    if chat_template is not None:
        files["chat_template.json"] = {"chat_template": chat_template}
    for name, content in files.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
