"""The critic's own modules: its value head, and PageMarks, what it is told that the policy is not.

Pipeline: data -> processor -> model -> sampler -> rewards -> [ppo]; train_ppo.py attaches these to the critic (a
separate model, or the policy for `--critic shared`): they train with it and live in its checkpoints.
"""
import re

import torch
from torch import nn


class ValueHead(nn.Module):
    """V(s) = w . h + b on the last hidden state. It is attached as `model.value_head` (of the policy, or of a
    separate critic model), so DDP / FSDP treat it as part of the model.

    w starts tiny (V ~ 0, a neutral critic) but not zero: a zero w passes no gradient back, so a critic's own trunk
    could not start learning to read the response until the head had grown (Adam's steps do not depend on the
    gradient's scale, only on its direction)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, 1)
        nn.init.normal_(self.linear.weight, std=1e-3 / hidden)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h):
        return self.linear(h.to(self.linear.weight.dtype)).squeeze(-1)

    @torch.no_grad()
    def start_at(self, mean_return: float):
        """V starts at the first rollout's mean return (lam 1, no KL yet: its score). From 0, Adam's lr-sized steps
        spent the whole value pretraining on that constant and explained variance stayed at 0 (bench/README.md)."""
        self.linear.bias.fill_(mean_return)


class PageMarks(nn.Module):
    """`--critic-labels`: the critic, never the policy, is told which pages are relevant. The value is only a
    baseline, so it may know what the policy cannot (an asymmetric critic, Pinto et al. 2018), and every RL sample
    has its labels: the rerank reward is computed from them. Without them a critic must read the pages better than the
    policy to predict its return (bench/README.md).

    One of two learned vectors (zero at the start) is added to the critic's input embedding on each page id: the
    prompt's "Image k" and every in-range id the response writes, one for a relevant page and one for the rest, so
    "the page this answer lists first is relevant" is a lookup at that id's own position. It is attached as
    `critic.page_marks`, so it trains with the critic and lives in its checkpoints.

    `--critic-greedy`: early in a response the labels predict little of the return (~0.25 of its variance on the
    demo); most of it is how this policy misreads these pages, which the policy's greedy response to the prompt shows.
    Its fused reward, in one of `greedy_buckets` equal bins of [0, top], picks one more learned vector (zero at the
    start), added at every position of the prompt and its responses. Labels are [..., 2]: the page label and the
    row's bin (-1: not told)."""

    def __init__(self, hidden: int, token_texts: list[str], greedy_buckets: int = 0):
        super().__init__()
        self.vectors = nn.Parameter(torch.zeros(2, hidden))
        self.greedy = nn.Parameter(torch.zeros(greedy_buckets, hidden)) if greedy_buckets else None
        self.texts = token_texts  # each token id's text: a page id is a run of digit tokens

    def bins(self, scores: torch.Tensor, top: float) -> torch.Tensor:
        """Greedy responses' fused rewards [P] -> their bins [P]; a reward that is not finite is not told (-1)."""
        n, scores = self.greedy.shape[0], scores.float()
        bins = (scores.nan_to_num(0.0) / max(top, 1e-8) * n).floor().clamp(0, n - 1).long()
        return torch.where(torch.isfinite(scores), bins, -1)

    def with_bins(self, labels: torch.Tensor, bins: torch.Tensor | None) -> torch.Tensor:
        """[B, N] page labels and each row's bin [B] (None: not told) -> [B, N, 2]."""
        bins = torch.full(labels.shape[:1], -1, dtype=torch.long) if bins is None else bins.long().cpu()
        return torch.stack([labels, bins[:, None].expand_as(labels)], -1)

    def labels(self, ids: torch.Tensor, relevant: list[set], pages: list[int], prompt: bool) -> torch.Tensor:
        """[B, N] ids -> [B, N]: 1 on a relevant page's id, 0 on another page's, -1 elsewhere. In a prompt only its
        "Image k:" slots count (a query or the template's example may hold numbers); `pages` bounds the ids per row."""
        out = torch.full(ids.shape, -1, dtype=torch.long)
        text = lambda t: self.texts[t] if 0 <= t < len(self.texts) else ""  # noqa: E731
        for b, row in enumerate(ids.tolist()):
            i = 0
            while i < len(row):
                if not (start := re.fullmatch(r"( ?)[0-9]+", text(row[i]))):
                    i += 1
                    continue
                j = i + 1
                while j < len(row) and re.fullmatch(r"[0-9]+", text(row[j])):
                    j += 1
                k = int("".join(text(t) for t in row[i:j]))
                slot = ("".join(text(t) for t in row[max(0, i - 2):i]) + start.group(1)).endswith("Image ") and \
                    j < len(row) and text(row[j]).startswith(":")  # the prompt's "Image k: <page>"
                if 1 <= k <= pages[b] and (slot or not prompt):
                    out[b, i:j] = int(k in relevant[b])
                i = j
        return out

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(self.vectors.device)
        page, bins = labels[..., 0], labels[..., 1]
        out = self.vectors[page.clamp(min=0)] * (page >= 0).to(self.vectors.dtype)[..., None]
        if self.greedy is not None:
            out = out + self.greedy[bins.clamp(min=0)] * (bins >= 0).to(self.vectors.dtype)[..., None]
        return out
