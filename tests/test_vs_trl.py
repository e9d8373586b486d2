"""bench/vs_trl.py runs both sides (mmr5 and TRL's GRPOTrainer / SFTTrainer) on a tiny model: TRL's Qwen2.5-VL
processor is assembled from its parts here (no torchvision), so a TRL or transformers change that breaks it shows up
in the tests, not first in a benchmark run."""
import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import page_images, save_pages

ROOT = Path(__file__).resolve().parent.parent


def test_both_sides_run_the_same_grpo_and_sft_work(tiny_model_dirs, tmp_path):
    rows = [{"query": f"item {i}", "images": save_pages(tmp_path, i, page_images(3, seed=i)), "positives": [i % 3 + 1],
             "response": "<think>Image 1 is best.</think><answer>[1, 2, 3]</answer>"} for i in range(4)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = subprocess.run([sys.executable, "bench/vs_trl.py", "--model", str(tiny_model_dirs["qwen2_5_vl"]),
                           "--train", str(tmp_path / "train.jsonl"), "--prompts", "2", "--samples", "2",
                           "--max-new-tokens", "8", "--minibatch", "4", "--steps", "1", "--repeat", "1",
                           "--sft-batch", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for kind in ("GRPO", "SFT"):
        block = done.stdout[done.stdout.index(kind + ","):]
        for side in ("mmr5", "TRL"):
            seconds = float(re.search(rf"^  {side}\s+([0-9.]+) s/step", block, re.M).group(1))
            assert seconds > 0
        assert re.search(r"TRL/mmr5 step time [0-9.]+x", block)
