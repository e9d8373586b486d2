"""Supervised fine-tuning on reasoning chains: the batch, the loss and the schedule (train_sft.py loops).

Pipeline: data -> processor -> model -> sampler -> rewards -> [ppo]; sft.py is the supervised stage that comes
before ppo, on the same model. Each sample is MM-R5's rerank prompt (system turn,
question, the candidate pages) followed by the target `<think>...</think><answer>[...]</answer>`; the loss is the
next-token cross-entropy on the response tokens only (`labels_mask`): the prompt and the images are context.
"""
import math

import torch
import torch.nn.functional as F

from mmr5.data import Sample
from mmr5.model import Qwen2VL
from mmr5.processor import Processor


def sft_batch(processor: Processor, samples: list[Sample]) -> dict:
    """Model inputs for prompt + target response, with `labels_mask` marking the response tokens."""
    return processor.rerank_inputs([s.query for s in samples], [s.images for s in samples],
                                   responses=[s.response for s in samples])


def sft_loss(model: Qwen2VL, batch: dict, forward=None) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over response tokens, number of those tokens).

    Position t predicts token t+1, so the hidden states are shifted one left of the labels. The LM head runs only
    on the positions that are scored (a real vocabulary is 152k wide: logits for a whole prompt would dominate
    memory). Summed, not averaged, so gradient accumulation can divide by the tokens of the whole step.
    `forward` is the module to run (DDP's wrapper under torchrun; the model itself by default).
    """
    device = model.device
    input_ids = batch["input_ids"].to(device)
    hidden = (forward or model)(input_ids, batch["attention_mask"].to(device), batch["pixel_values"].to(device),
                                batch["image_grid_thw"], logits=False).hidden_states
    scored = batch["labels_mask"][:, 1:].to(device)
    logits = model.lm_head(hidden[:, :-1][scored]).float()
    return F.cross_entropy(logits, input_ids[:, 1:][scored], reduction="sum"), int(scored.sum())


def learning_rate(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to `min_ratio * peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
