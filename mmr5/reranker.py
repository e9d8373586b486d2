"""`Reranker`: query + candidate pages in, ranking (with the model's reasoning and per-candidate scores) out.

Pipeline: data -> processor -> model -> [sampler] -> rewards -> ppo; reranker.py is inference: processor, model and
sampler behind one call. This is the inference entry point a user
calls on a real checkpoint (Qwen2.5-VL / the released MM-R5): it renders MM-R5's prompt, generates the
`<think>...</think><answer>[...]</answer>` text with the sampler and reads the order as the release does.

Scores: a listwise generator gives an order, not a number per candidate. After the reasoning, the model's next-token
distribution right after `<answer>[` is its belief about which candidate ranks first; one extra forward over the
prompt + the generated text up to `<answer>[` reads it out. Candidate ids are written as digits, one token each for
1..9, so scores are given for up to 9 candidates (None beyond, and when the output has no `<answer>[`).
"""
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mmr5.config import Config
from mmr5.model import Qwen2VL
from mmr5.processor import Processor
from mmr5.rewards import parse_order
from mmr5.sampler import generate
from mmr5.weights import read_header, tensor_files

ANSWER_OPEN = "<answer>["


@dataclass
class RerankResult:
    order: list[int]  # 0-based candidate indices, most relevant first (as the release's QueryReranker returns)
    text: str  # the full output, reasoning included
    parsed: bool  # False: no readable <answer>[...]</answer>, `order` is the retriever's order
    scores: list[float] | None  # P(candidate i is ranked first) in input order, or None (see module docstring)
    num_tokens: int = 0  # length of the generated text in tokens


def default_device_dtype(device=None, dtype=None) -> tuple[str, torch.dtype]:
    """CUDA in bfloat16 when there is a GPU (as the release runs), else CPU in float32."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        cuda = str(device).startswith("cuda")
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return device, dtype


def check_pair(model: Qwen2VL, processor: Processor):
    """The tokenizer and the weights must belong together (see check_tokenizer_fits)."""
    check_tokenizer_fits(model.config, processor)


def check_tokenizer_fits(cfg: Config, processor: Processor):
    """Every token id must have an embedding row, and the image placeholder the processor writes must be the one
    the model replaces by vision features."""
    if processor.vocab_size > cfg.text.vocab_size:
        raise ValueError(f"the tokenizer has {processor.vocab_size} tokens but the model's vocabulary has "
                         f"{cfg.text.vocab_size}: tokenizer.json does not belong to these weights")
    pairs = [("<|image_pad|>", processor.image_pad_id, cfg.image_token_id),
             ("<|vision_start|>", processor.vision_start_id, cfg.vision_start_token_id),
             ("<|vision_end|>", processor.vision_end_id, cfg.vision_end_token_id)]
    for token, ours, theirs in pairs:
        if ours != theirs:
            raise ValueError(f"the tokenizer's {token} is id {ours} but config.json says {theirs}: "
                             "tokenizer.json does not belong to these weights")


def check_before_loading(path, samples, min_pixels=None, max_pixels=None, responses: bool = False):
    """Every check that needs no model, so a broken checkpoint or an over-long prompt costs seconds, not a model
    load: config.json, each weight file's header and size, the tokenizer and preprocessor files, the tokenizer
    against config.json, and each sample's prompt (+ response) against the context."""
    config = Config.from_file(path)
    for file in set(tensor_files(path).values()):
        read_header(file)
    processor = Processor.from_pretrained(path, min_pixels=min_pixels, max_pixels=max_pixels)
    check_tokenizer_fits(config, processor)
    processor.check_prompt_lengths(samples, config.text.max_position_embeddings, responses)


class Reranker:
    def __init__(self, model: Qwen2VL, processor: Processor, batch_size: int = 4):
        check_pair(model, processor)
        self.model, self.processor, self.batch_size = model.eval(), processor, batch_size

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, min_pixels=None, max_pixels=None, batch_size: int = 4):
        device, dtype = default_device_dtype(device, dtype)
        processor = Processor.from_pretrained(path, min_pixels=min_pixels, max_pixels=max_pixels)  # seconds, first
        return cls(Qwen2VL.from_pretrained(path, dtype=dtype, device=device), processor, batch_size)

    def rerank(self, query: str, images, temperature: float = 0.0, max_new_tokens: int = 1024,
               scores: bool = True) -> RerankResult:
        """Rank `images` (paths or PIL images) by relevance to `query`."""
        return self.rerank_batch([query], [images], temperature, max_new_tokens, scores=scores)[0]

    def rerank_batch(self, queries: list[str], images_lists: list, temperature: float = 0.0,
                     max_new_tokens: int = 1024, scores: bool = True, generator: torch.Generator | None = None,
                     progress: bool = False) -> list[RerankResult]:
        """Rank many queries' candidates, `batch_size` queries per generate call."""
        if isinstance(queries, str) or any(isinstance(images, (str, Path)) for images in images_lists):
            raise TypeError("rerank_batch takes a list of queries and a list of image lists; rerank takes one query "
                            "and a list of images (a single path is not a list)")
        if len(queries) != len(images_lists):
            raise ValueError(f"{len(queries)} queries but {len(images_lists)} image lists")
        results = []
        starts = range(0, len(queries), self.batch_size)
        for s in tqdm(starts, desc="rerank", unit="batch", disable=not progress):
            qs, ims = queries[s:s + self.batch_size], images_lists[s:s + self.batch_size]
            batch = self.processor.rerank_inputs(qs, ims)
            context = self.model.config.text.max_position_embeddings
            if int(batch["prompt_lengths"].max()) > context:
                raise ValueError(f"a prompt of {int(batch['prompt_lengths'].max())} tokens is longer than the model's "
                                 f"context of {context} (max_position_embeddings): give fewer or smaller pages")
            rollout = generate(self.model, self.processor, batch, max_new_tokens=max_new_tokens, temperature=temperature,
                               generator=generator)
            first = self.first_id_scores(batch, rollout.texts, [len(i) for i in ims]) if scores else [None] * len(qs)
            for text, images, sc, length in zip(rollout.texts, ims, first, rollout.lengths.tolist()):
                order, parsed = parse_order(text, len(images))
                results.append(RerankResult(order, text, parsed, sc, length))
        return results

    def rank(self, query: str, images, top_k: int | None = None, return_documents: bool = False,
             **rerank_options) -> list[dict]:
        """`images` ranked as sentence-transformers' CrossEncoder.rank answers: [{"corpus_id": i, "score": s}], best
        first, the top_k of them (all when None), each with its "image" when return_documents. The score is
        P(candidate i is ranked first) where the first-id scores exist (the list is then sorted by it, ties in the
        generated order), else 1 - position / n in the generated order. `rerank_options` go to rerank."""
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        result = self.rerank(query, images, **rerank_options)
        n = len(result.order)
        if result.scores is None:
            ranked = [(i, 1 - position / n) for position, i in enumerate(result.order)]
        else:
            ranked = sorted(((i, result.scores[i]) for i in result.order), key=lambda pair: -pair[1])
        return [{"corpus_id": i, "score": score, **({"image": images[i]} if return_documents else {})}
                for i, score in ranked[:top_k]]

    @torch.no_grad()
    def first_id_scores(self, batch: dict, texts: list[str], counts: list[int]) -> list[list[float] | None]:
        """P(first listed id = i) for i in 1..n, read right after `<answer>[` in one forward over the batch."""
        proc = self.processor
        digit_ids = [proc.encode(str(i)) for i in range(1, 10)]
        prefixes = [text[: text.find(ANSWER_OPEN) + len(ANSWER_OPEN)] if ANSWER_OPEN in text else None for text in texts]
        if all(p is None for p in prefixes) or any(len(d) != 1 for d in digit_ids):
            return [None] * len(texts)
        suffixes = [proc.encode(p or "") for p in prefixes]
        width = max(map(len, suffixes))
        B, L = batch["input_ids"].shape
        # Each row: its unpadded prompt + its prefix, left padded again so all rows end on the last column.
        ids = torch.full((B, L + width), proc.pad_id, dtype=torch.long)
        mask = torch.zeros(B, L + width, dtype=torch.long)
        for b, suffix in enumerate(suffixes):
            row = torch.cat([batch["input_ids"][b][batch["attention_mask"][b].bool()], torch.tensor(suffix, dtype=torch.long)])
            ids[b, -len(row):], mask[b, -len(row):] = row, 1
        device = self.model.device
        logits = self.model(ids.to(device), mask.to(device), batch["pixel_values"].to(device),
                            batch["image_grid_thw"], keep_last=1).logits[:, -1].float()
        digit_logits = logits[:, [d[0] for d in digit_ids]].cpu()
        out = []
        for b, n in enumerate(counts):
            if prefixes[b] is None or n > 9:
                out.append(None)
            else:
                out.append(digit_logits[b, :n].softmax(-1).tolist())
        return out
