"""The reward functions on adversarial completions: mmr5's str.find scans vs the release's `re.search`.

Prints, per input shape, mmr5's seconds for `fused_reward` + `parse_order` on 1 MB, and on `--kb` kB the release's
two `re.search` calls' time over mmr5's (a lazy `.*?` is quadratic on text with many opening tags and no closing one;
at 1 MB the release would take minutes). Usage: python bench/rewards.py [--kb 30]
"""
import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mmr5.rewards import fused_reward, parse_order  # noqa: E402

ANSWER_RE = r"<answer>\[(.*?)\]</answer>"  # the release's patterns (mmr5/rewards.py cites where)
FORMAT_RE = r"<think>.*?</think>\s*<answer>\[([0-9]+(?:,\s*[0-9]+)*)\]</answer>"
SHAPES = {  # name: text of about `size` characters
    "<answer>[ repeated": lambda size: "<answer>[" * (size // 9),
    "<answer>[\\n repeated": lambda size: "<answer>[\n" * (size // 10),
    "<think> repeated": lambda size: "<think>" * (size // 7),
    "<think></think> repeated": lambda size: "<think></think>" * (size // 15),
    "</think> after one <think>": lambda size: "<think>" + "</think> " * (size // 9),
    "unclosed answer list": lambda size: "<think>x</think><answer>[" + "1," * (size // 2),
    "long answer list": lambda size: "<think>x</think><answer>[" + "1, " * (size // 3) + "1]</answer>",
    "Image repeated": lambda size: "<think>" + "Image " * (size // 6) + "</think>",
    "one huge id": lambda size: "<answer>[" + "9" * size + "]</answer>",
    "trailing whitespace": lambda size: "<think>x</think>" + " " * size,
}


def seconds(fn, text) -> float:
    t0 = time.perf_counter()
    fn(text)
    return time.perf_counter() - t0


def ours(text):
    fused_reward(text, [1, 2], 5, w_think=1.0)
    parse_order(text, 5)


def release(text):
    re.search(ANSWER_RE, text)
    re.search(FORMAT_RE, text, re.DOTALL)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--kb", type=int, default=30, help="size of the inputs both sides run on, in kB")
    args = p.parse_args()
    print(f"{'input':<28} {'mmr5 s, 1 MB':>13} {f'release/mmr5, {args.kb} kB':>22}")
    for name, make in SHAPES.items():
        small = make(args.kb * 1000)
        ratio = seconds(release, small) / max(seconds(ours, small), 1e-9)
        print(f"{name:<28} {seconds(ours, make(1_000_000)):>13.3f} {ratio:>22.1f}")


if __name__ == "__main__":
    main()
