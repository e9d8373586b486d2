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


UNDERTRAINED_STEPS = 150  # held-out R@1 0.51 (the full demo: 0.89); its samples vary, so RL has signal


# Measured (2026-11-25, 2 cores) from the 150-step SFT model at the demo's settings (train_ppo.DEMO), held-out rerank
# 0.591 at the start:
# - PPO with the critic, the default: 0.628 / 0.671 / 0.720 at steps 15 / 30 / 45, format 0.944 -> 0.998, 11 min
#   16 s; on torch.multinomial's random stream (the sampler before its exponential race) 0.601 / 0.661 / 0.748 (seed
#   0) and 0.641 / 0.707 / 0.728 (seed 1). What it took: lam 1.0 and k3 in the loss, with a value head that
#   stays near its zero init (critic lr 1e-5). No critic we trained predicts this task's returns (bench/critic.py:
#   held-out explained variance -0.06 .. -0.37 for the head, 0.000 for a separate critic model), and with lam 0.95
#   the final reward reaches the per-image checks that decide the ranking at < 0.36 of its size: every lam 0.95
#   variant stayed at or below the start within 30 steps (critic lr 2e-4, a 3-step critic warm-up, no value clip).
#   A learning head (1e-3) with lam 1.0 and k3 in the loss: 0.659 / 0.689 / 0.687 (its explained variance < 0).
# - GRPO (the release's recipe): 0.640 / 0.685 / 0.685 at steps 15 / 30 / 45 (format 0.990), 11 min 42 s; on the
#   multinomial stream 0.699 / 0.698 / 0.653 (+0.107 at 30, then back down). So the GRPO case checks what the issue
#   asks of it, that it improves; the 0.1 bar is the default run's.
# - This fixture's SFT model has started at 0.619 since later vision changes moved its rounding; the 45-step default
#   run from it (2026-11-25, Zen 1): 0.619 -> 0.744 in 681 s.
# - 2026-12-02, Zen 5 (CI's CPU now: same bits as here, start 0.612): that 45-step run (48-row minibatches, 4 optimizer
#   steps per rollout) gained only 0.029 (0.648 / 0.659 / 0.641) and failed CI. Not a bug (the sampler's and the
#   update's log-probs agree to 2e-5; SFT with the vision tower frozen reaches R@1 0.89 from this model, so frozen
#   pages are not the limit): too little learning for the noise, a clip fraction of 0.002 says the trust region was
#   never near. Gains of the 45-step run over seeds (1 thread): 24-row minibatches (8 optimizer steps per rollout)
#   +0.171 / +0.098 / +0.153 (seeds 0 / 1 / 2); 12-row ones +0.108 / +0.062; lr 3e-4 +0.084; 24 rows at lr 2e-4 +0.156.
#   Hence the demo now: 24-row minibatches and 60 steps (eval every 20); at steps 20 / 40 / 60, 1 thread: seed 1 (the
#   worst above) 0.686 / 0.724 / 0.740 (+0.128), seed 3 0.724 / 0.740 / 0.757 (+0.145), seed 4 0.653 / 0.693 / 0.768
#   (+0.156), 580-610 s with two runs sharing the 2 cores; seed 0 as this test runs it (2 threads): 0.612 -> 0.756 in
#   355 s. GRPO at these settings: 0.648 / 0.698 / 0.733 (+0.121; 2 threads: 0.733 in 348 s).
@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_ppo_demo_improves_within_15_minutes(undertrained, advantage, tmp_path):
    """`python train_ppo.py` (PPO with a critic) from the under-trained SFT model raises held-out mean rerank reward
    by >= 0.1 without lowering the format reward, in 15 minutes; with `--advantage grpo` it also improves."""
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
    assert after["eval_rerank"] - before["eval_rerank"] >= (0.1 if advantage == "gae" else 0.02)
    assert after["eval_format"] >= before["eval_format"]
    assert took < 900
