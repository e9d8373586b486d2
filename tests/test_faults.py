"""Faults a long run meets: SIGKILL at any moment (also mid checkpoint write), a full disk, NaN/inf."""
import json
import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_ppo
import train_sft
from mmr5.checkpoint import latest_checkpoint, load_checkpoint
from mmr5.model import Qwen2VL

ROOT = Path(__file__).resolve().parent.parent


def sft_args(model, data, out, steps=10):
    return ["--model", str(model), "--train", str(data / "train.jsonl"), "--out", str(out), "--steps", str(steps),
            "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--warmup-steps", "2", "--log-every", "1",
            "--save-every", "1"]


def logged_steps(out) -> int:
    try:  # a restarted run without a checkpoint yet deletes its old metrics.jsonl, maybe between two calls here
        return len((out / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def new_temporary_checkpoint(root, since: float) -> bool:
    """A checkpoint's temporary folder made after `since` (one left by an earlier kill does not count)."""
    for d in root.glob(".step-*.tmp"):
        try:
            if d.stat().st_mtime > since:
                return True
        except FileNotFoundError:  # renamed into place between the glob and the stat
            pass
    return False


def test_sigkill_at_random_moments_never_loses_a_checkpoint(tiny_model_dirs, data, tmp_path):
    """10 kills in a seeded loop (half at random moments, half while a checkpoint is being written): after each,
    `latest` names a complete checkpoint; resuming reaches exactly the weights of a run never interrupted.
    Kill moments are taken from the run's own progress (its logged steps), not from wall-clock guesses, so a faster
    machine cannot finish the run before the kills."""
    model = tiny_model_dirs["qwen2_5_vl"]
    steps = 40
    train_sft.main(sft_args(model, data, tmp_path / "clean", steps))
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for attempt in range(40):
        if kills == 10 or (out / "summary.json").exists():
            break
        launched, before = time.time(), logged_steps(out)
        p = subprocess.Popen([sys.executable, "train_sft.py", *sft_args(model, data, out, steps)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        if attempt % 2:  # the moment a checkpoint is being written (a fresh temporary folder exists)
            ready = lambda: new_temporary_checkpoint(out / "checkpoints", launched)  # noqa: E731
        else:  # a random moment: during start-up, or 1-2 steps in (mid step, log or write)
            ahead = rng.randint(0, 2)
            if ahead == 0:
                time.sleep(rng.uniform(0.05, 1.5))
            ready = lambda: logged_steps(out) >= before + ahead  # noqa: E731
        while p.poll() is None and time.time() < deadline and not ready():
            time.sleep(0.001)
        if attempt % 2 == 0:
            time.sleep(rng.uniform(0.0, 0.03))
        if p.poll() is not None:
            continue
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        ckpt = latest_checkpoint(out)
        if ckpt is not None:
            load_checkpoint(ckpt)  # complete and readable, or this raises
    assert kills >= 10
    train_sft.main(sft_args(model, data, out, steps))  # finish
    a, b = Qwen2VL.from_pretrained(tmp_path / "clean" / "model"), Qwen2VL.from_pretrained(out / "model")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    clean = [r for r in map(json.loads, (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines())]
    resumed = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    strip = lambda rs: [(r["step"], r["loss"]) for r in rs]  # noqa: E731
    assert strip(clean) == strip(resumed)  # the curve has no duplicated or missing steps


def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(tiny_model_dirs, data, tmp_path, monkeypatch):
    import mmr5.checkpoint as checkpoint

    model = tiny_model_dirs["qwen2_vl"]
    out = tmp_path / "run"
    train_sft.main(sft_args(model, data, out, steps=2))
    before = latest_checkpoint(out)
    files = {p.name: p.read_bytes() for p in before.iterdir()}
    real = checkpoint.save_file

    def full_disk(tensors, filename, metadata=None):
        if "optimizer" in str(filename):
            raise OSError(28, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    (out / "summary.json").unlink()
    with pytest.raises(SystemExit) as e:
        train_sft.main(sft_args(model, data, out, steps=4))
    msg = str(e.value)
    assert "No space left on device" in msg and "step-000002" in msg and "\n" not in msg
    assert latest_checkpoint(out) == before
    assert {p.name: p.read_bytes() for p in before.iterdir()} == files
    assert not list((out / "checkpoints").glob(".*"))  # no half-written folder left behind


def test_nan_loss_is_skipped_and_the_run_finishes(tiny_model_dirs, data, tmp_path, monkeypatch):
    import mmr5.sft as sft

    real = sft.sft_loss
    calls = {"n": 0}

    def sometimes_nan(*a, **k):
        loss, n = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan"), n) if calls["n"] in (3, 4) else (loss, n)  # step 2's two micro-batches

    monkeypatch.setattr(train_sft, "sft_loss", sometimes_nan)
    out = tmp_path / "run"
    train_sft.main(sft_args(model := tiny_model_dirs["qwen2_vl"], data, out, steps=4))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 2, "skipped": 1} in records
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)  # no NaN reached the curve
    weights = Qwen2VL.from_pretrained(out / "model").state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())
    del model


# Step 1 scores the 2 prompts' greedy answers (--critic-greedy, for the critic), then the 4 sampled responses.
@pytest.mark.parametrize("nan_call, skipped", [(4, 2), (2, 0)])
def test_nan_reward_is_skipped_and_the_run_finishes(tiny_model_dirs, data, tmp_path, monkeypatch, nan_call, skipped):
    """A NaN reward of a sampled response: step 1's updates are skipped; of a greedy answer: the critic is not told
    it (its bin is -1) and nothing is skipped."""
    real = train_ppo.fused_reward
    calls = {"n": 0}

    def nan_once(*a, **k):
        calls["n"] += 1
        r = real(*a, **k)
        return {**r, "reward": float("nan")} if calls["n"] == nan_call else r

    monkeypatch.setattr(train_ppo, "fused_reward", nan_once)
    out = tmp_path / "ppo"
    train_ppo.main(["--model", str(tiny_model_dirs["qwen2_vl"]), "--train", str(data / "train.jsonl"), "--out",
                    str(out), "--steps", "3", "--prompts-per-step", "2", "--samples", "2", "--max-new-tokens", "6",
                    "--minibatch-size", "4", "--micro-batch-size", "2"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["skipped"] == skipped and records[1]["skipped"] == 0  # step 1: both epochs' updates, or none
    assert (out / "model" / "config.json").exists()
    weights = Qwen2VL.from_pretrained(out / "model").state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_corrupt_replay_buffer_is_one_line(tiny_model_dirs, data, tmp_path):
    """The critic's replay buffer (each rank's file in a PPO checkpoint) damaged on disk: one clear line on resume."""
    ppo = lambda steps: ["--model", str(tiny_model_dirs["qwen2_vl"]), "--train", str(data / "train.jsonl"),  # noqa
                         "--out", str(tmp_path / "ppo"), "--steps", str(steps), "--prompts-per-step", "2",
                         "--samples", "2", "--max-new-tokens", "6", "--minibatch-size", "4", "--micro-batch-size", "2"]
    train_ppo.main(ppo(2))
    buffer = latest_checkpoint(tmp_path / "ppo") / "rank0.safetensors"
    buffer.write_bytes(buffer.read_bytes()[:100])
    with pytest.raises(SystemExit, match="rank0.safetensors is corrupt"):
        train_ppo.main(ppo(3))
