"""Rewards for MM-R5 reranking: completion text in, numbers out.

Pipeline: data -> processor -> model -> sampler -> [rewards] -> ppo. The sampler decodes each rollout to text; the
trainer scores it with `fused_reward` (GRPO needs one float per rollout, the parts are for logging), and evaluation
turns a completion into the final ranking with `parse_order`. Pure text processing: no torch, no mmr5 imports.

Reference: the MM-R5 release, i2vec/MM-R5 -- `examples/reranker.py` (QueryReranker.rerank, how an answer becomes a
ranking) and `src/rl/VLM-R1/src/open-r1-multimodal/src/open_r1/vlm_modules/qwen_module.py` (`rerank_reward` and
`format_rerank_reward`, summed 1:1 in GRPO; the released grpo_rerank.py names a `format_rerank_reward_v3` that the
released module lacks, so we follow the one it has). Each function says where it departs from them, and why.

How an answer list is read (`_entries`), as in the release: the text between `[` and `]` is split on commas, blank
entries are skipped, and each entry goes through Python's int(): surrounding whitespace, a sign, `_` between digits
and digits of any script ("٣" is 3) are accepted; anything else ("2a", "2.0", "²") makes the whole answer unreadable.
One difference: int() refuses strings of more than 4300 digits (a CPython guard against slow conversion), which the
release turns into "unreadable"; we read such an entry as what it is, an integer far outside any image range.

Every function takes any str and returns a finite float (or a valid ranking) quickly. The release's patterns are
used with the same match semantics as `re.search`, but found with str.find scans: `re.search` with a lazy `.*?` is
quadratic on text with many opening tags and no closing one (27 kB of "<answer>[" takes a second, 1 MB ~20 minutes).
"""
import math
import re

# Entries int() accepts; used only to tell "too many digits for int()" apart from "not an integer".
_INT = re.compile(r"\s*[+-]?\d+(?:_\d+)*\s*")
# The release's format pattern from `</think>` on; the `<think>.*?` part before it is done by `_format_match`.
_FORMAT_TAIL = re.compile(r"</think>\s*<answer>\[([0-9]+(?:,\s*[0-9]+)*)\]</answer>")
# "Image 3" / "image 3" as the prompt names the candidates; greedy digits, so "Image 12" is 12, never 1.
_IMAGE_NAME = re.compile(r"\bimage\s+([0-9]+)", re.IGNORECASE)


def _answer_match(text: str) -> str | None:
    """Group 1 of the release's `re.search(r'<answer>\\[(.*?)\\]</answer>', text)` (first match; no DOTALL, so the
    list sits on one line), or None. A line whose first `<answer>[` has no `]</answer>` after it holds no match."""
    start = 0
    while (p := text.find("<answer>[", start)) >= 0:
        eol = text.find("\n", p)
        eol = len(text) if eol < 0 else eol
        q = text.find("]</answer>", p + 9, eol)
        if q >= 0:
            return text[p + 9:q]
        start = eol + 1
    return None


def _format_match(text: str) -> str | None:
    """Group 1 of the release's format pattern, `re.search(..., re.DOTALL)`, or None. The match starts at the first
    `<think>` if at all (any later one could only end at the same places), and `.*?` stops at the first `</think>`
    after it from which the rest of the pattern matches."""
    p = text.find("<think>")
    if p < 0:
        return None
    t = p + 7
    while (t := text.find("</think>", t)) >= 0:
        if m := _FORMAT_TAIL.match(text, t):
            return m.group(1)
        t += 1
    return None


def _entries(inside: str) -> list[int | float] | None:
    """The release's reading of an answer list (see the module docstring); None when an entry is not an integer.
    An entry too long for int() becomes math.inf: it only ever gets compared with ids, and it is out of range
    (true unless someone pads a small number with thousands of leading zeros)."""
    ids = []
    for entry in inside.split(","):
        if not entry.strip():
            continue
        try:
            ids.append(int(entry))
        except ValueError:
            if not _INT.fullmatch(entry):
                return None
            ids.append(math.inf)
    return ids


def parse_order(text: str, n: int) -> tuple[list[int], bool]:
    """The ranking a completion asks for, as a 0-based permutation of range(n), and whether an answer was read.

    As QueryReranker.rerank: the FIRST `<answer>[...]</answer>` (re.search), ids 1-based, ids outside 1..n dropped,
    ids never mentioned appended ascending; no answer, or an entry that is not an integer -> the retriever's order
    `list(range(n))`. We also drop repeated ids (keeping the first): the release keeps them, returning a list longer
    than n with an image twice. `parsed` is False when no answer was found or it holds no integer at all ("[]").
    """
    inside = _answer_match(text)
    ids = None if inside is None else _entries(inside)
    if not ids:
        return list(range(n)), False
    order, seen = [], set()
    for i in ids:
        if 1 <= i <= n and i not in seen:
            seen.add(i)
            order.append(i - 1)
    return order + [i for i in range(n) if i + 1 not in seen], True


def rerank_reward(text: str, positives: list[int]) -> float:
    """How close to the top the answer puts the relevant images, in [0, 1] for distinct 1-based `positives`.

    The release's formula: sum over positives p of 1/rank(p)^3 (0 if p is not in the list), over the ideal
    sum_{i=1..|positives|} 1/i^3. rank(p) is the 1-based position of p's first occurrence in the list as written --
    repeated and out-of-range ids still take places, so padding an answer cannot raise the reward. 0.0 when there is
    no answer, an entry is not an integer, or there are no positives. The cube makes rank 1 worth 8x rank 2.
    """
    inside = _answer_match(text)
    ids = None if inside is None else _entries(inside)
    if ids is None or not positives:
        return 0.0
    rank = {}
    for r, i in enumerate(ids, 1):
        rank.setdefault(i, r)
    ideal = sum(1 / i**3 for i in range(1, len(positives) + 1))
    return sum(1 / rank[p] ** 3 for p in positives if p in rank) / ideal


def format_reward(text: str, n: int) -> float:
    """Whether the completion has the shape `<think>...</think><answer>[i, j, ...]</answer>` and lists n valid ids.

    The release's reward: 0 unless the text matches `<think>.*?</think>\\s*<answer>\\[([0-9]+(?:,\\s*[0-9]+)*)\\]
    </answer>` (re.search, DOTALL; ASCII digits only, so "[٣]" or "[-1]" score 0); else
    (n - |len(list) - n|) / n  *  (share of listed ids within 1..n). Two departures: the length factor is clamped
    at 0 (the release goes negative for lists longer than 2n, punishing a malformed list more than no answer), and a
    one-element list is scored by the formula (the release `eval`s the list, gets an int, fails on len() and scores
    0; `eval` also fails on a leading zero, "[01, 2]", and on a list broken over lines, which the pattern admits).
    """
    inside = _format_match(text)
    if inside is None or n < 1:
        return 0.0
    ids = _entries(inside)  # never None: the pattern admits only digit runs between commas
    length = max(0.0, (n - abs(len(ids) - n)) / n)
    return length * sum(1 <= i <= n for i in ids) / len(ids)


def think_reward(text: str, n: int) -> float:
    """Share of the images 1..n the reasoning discusses by name ("Image 3"), in [0, 1].

    Our extension, not in the release: MM-R5's prompt asks the model to analyse each image before answering, and
    this rewards that directly. Reads the first `<think>...</think>` block (0 without one); case-insensitive, and
    a name counts once however often it appears.
    """
    start = text.find("<think>")
    end = text.find("</think>", start + 7) if start >= 0 else -1
    if end < 0 or n < 1:
        return 0.0
    named = {int(d) for d in _IMAGE_NAME.findall(text, start + 7, end) if len(d) < 10}
    return sum(1 <= i <= n for i in named) / n


def fused_reward(text: str, positives: list[int], n: int, w_rerank: float = 1.0, w_format: float = 1.0,
                 w_think: float = 0.0) -> dict[str, float]:
    """The scalar GRPO optimises (`reward`) and its parts for logging. The default weights are the release's
    rerank + format; w_think > 0 adds our `think_reward`."""
    parts = {"rerank": rerank_reward(text, positives), "format": format_reward(text, n), "think": think_reward(text, n)}
    reward = w_rerank * parts["rerank"] + w_format * parts["format"] + w_think * parts["think"]
    return {"reward": reward, **parts}
