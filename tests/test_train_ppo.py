"""train_ppo.py as a user runs it: both estimators end to end, resume = uninterrupted run, clear errors."""
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import interrupt_at_step, page_images, save_pages

import train_ppo

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ppo_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo_data")
    rows = []
    for i in range(6):
        images = save_pages(d, i, page_images(3, seed=i))
        rows.append({"query": f"item {i}", "images": images, "positives": [i % 3 + 1]})
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def args(model, data, out, *extra):
    return ["--model", str(model), "--train", str(data / "train.jsonl"), "--out", str(out), "--steps", "4",
            "--prompts-per-step", "2", "--samples", "2", "--max-new-tokens", "8", "--lr", "1e-3",
            "--save-every", "1", "--minibatch-size", "2", "--micro-batch-size", "1", *map(str, extra)]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra", [["--advantage", "gae", "--w-think", "1"],
                                   ["--advantage", "grpo", "--save-dtype", "bfloat16", "--anneal-lr"],
                                   ["--advantage", "reinforce"],
                                   ["--advantage", "gae", "--critic", "separate", "--lora-rank", "4",
                                    "--target-kl", "0.1", "--critic-warmup", "1", "--critic-replay", "2",
                                    "--no-critic-greedy"],
                                   ["--advantage", "gae", "--no-critic-labels", "--critic-replay", "0",
                                    "--critic-warmup", "1"],
                                   ["--advantage", "gae", "--critic", "shared"],
                                   # a GPU recipe's settings (bf16 autocast is the CUDA default), here on the CPU
                                   ["--advantage", "gae", "--bf16", "on", "--lora-rank", "4", "--grad-checkpointing"]])
def test_runs_end_to_end(tiny_model_dirs, ppo_data, tmp_path, extra):
    out = tmp_path / "run"
    train_ppo.main(args(tiny_model_dirs["qwen2_5_vl"], ppo_data, out, *extra, "--eval", ppo_data / "train.jsonl",
                        "--eval-limit", 2, "--eval-max-new-tokens", 8))
    records = metrics(out)
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["skipped"] == 0 and math.isfinite(r["kl"]) for r in steps)
    assert all(("value_loss" in r) == ("gae" in extra) and ("explained_variance" in r) == ("gae" in extra)
               for r in steps)
    # a separate critic (the default) is told the labels and replays earlier rollouts unless told otherwise
    separate = "gae" in extra and "shared" not in extra
    labels, replays = separate and "--no-critic-labels" not in extra, separate and "0" not in extra
    if "gae" in extra:
        replayed = [("replay_value_loss" in r) for r in steps]  # from step 2 on: step 1 has no earlier rollout
        assert replayed == ([False, True, True, True] if replays else [False] * 4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_before"] and summary["eval_after"]
    if "gae" in extra:  # the critic's medians over the last 20 logged steps (all 4 here), as metrics.jsonl has them
        for key in ("explained_variance", "explained_variance_last"):
            logged = [r[key] for r in steps if r.get(key) is not None]
            got = summary["critic_last_20_steps"][key]
            assert got is None if not logged else got == pytest.approx(statistics.median(logged))
    else:
        assert "critic_last_20_steps" not in summary
    assert (out / "model" / "config.json").exists() and (out / "curve.png").exists()
    checkpoint = next((out / "checkpoints").glob("step-*"))
    policy_lr = json.loads((checkpoint / "state.json").read_text())["optimizer"]["param_groups"][0]["lr"]
    assert policy_lr == pytest.approx(1e-3 * (0.25 if "--anneal-lr" in extra else 1))  # step 4 of 4: 1 - 3/4
    weights = load_file(checkpoint / "weights.safetensors")
    marks = weights.get("critic.page_marks.vectors")  # trained with the critic, kept in its checkpoints
    assert (marks is not None and marks.abs().sum() > 0) == labels
    greedy = weights.get("critic.page_marks.greedy")  # --critic-greedy (the default with a separate critic)
    assert (greedy is not None and greedy.abs().sum() > 0) == (separate and "--no-critic-greedy" not in extra)
    assert not any("page_marks" in k for k in load_file(out / "model" / "model.safetensors"))
    # The vision tower is frozen: the saved one is the base's to the bit (also when a LoRA base sat in bf16)
    vision = lambda path: {k.split("visual.")[1]: v for k, v in load_file(path).items() if "visual." in k}  # noqa: E731
    base, saved = vision(tiny_model_dirs["qwen2_5_vl"] / "model.safetensors"), vision(out / "model/model.safetensors")
    assert base.keys() == saved.keys() and all(torch.equal(saved[k], v.to(saved[k].dtype)) for k, v in base.items())
    assert {v.dtype for v in saved.values()} == {torch.bfloat16 if "bfloat16" in extra else torch.float32}


def test_critic_summary_is_the_median_of_the_last_20_logged_values(tmp_path):
    records = [{"step": i, "explained_variance": float(i), "explained_variance_last": None if i % 2 else -float(i)}
               for i in range(1, 31)] + [{"step": 30, "eval_rerank": 0.5}]  # an evaluation record: no critic figures
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    medians = train_ppo.critic_summary(tmp_path)
    assert medians["explained_variance"] == statistics.median(range(11, 31))  # steps 11..30
    assert medians["explained_variance_last"] == statistics.median([-i for i in range(2, 31, 2)][-20:])  # nulls skipped
    assert train_ppo.critic_summary(tmp_path / "nowhere") == {"explained_variance": None,
                                                              "explained_variance_last": None}


@pytest.mark.parametrize("extra", [[], ["--no-critic-labels", "--critic-replay", "0"]])
def test_resume_reproduces_the_uninterrupted_run(tiny_model_dirs, ppo_data, tmp_path, monkeypatch, extra):
    """Also the critic's replay buffer (the default): the checkpoint holds it, so step 3 replays steps 1-2's rollouts
    as the uninterrupted run does."""
    model = tiny_model_dirs["qwen2_vl"]
    train_ppo.main(args(model, ppo_data, tmp_path / "full", *extra))
    real = interrupt_at_step(monkeypatch, train_ppo, 2)
    train_ppo.main(args(model, ppo_data, tmp_path / "resumed", *extra))
    assert [r["step"] for r in metrics(tmp_path / "resumed")] == [1, 2]
    saved = next((tmp_path / "resumed" / "checkpoints").glob("step-*")) / "rank0.safetensors"
    if extra:
        assert not saved.exists()
    else:  # the rollouts of steps 1 and 2
        assert sorted({k.split(".")[0] for k in load_file(saved)}) == ["0", "1"]
    monkeypatch.setattr(train_ppo, "sample_order", real)
    train_ppo.main(args(model, ppo_data, tmp_path / "resumed", *extra))
    drop = ("step_s", "tokens_per_s")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in drop} for r in rs]  # noqa: E731
    assert strip(metrics(tmp_path / "full")) == strip(metrics(tmp_path / "resumed"))


def test_bad_flags_are_one_line_errors(tiny_model_dirs, ppo_data, tmp_path):
    model = tiny_model_dirs["qwen2_5_vl"]
    for extra in (["--lr", "-1"], ["--samples", "0"], ["--critic-replay", "-1"],
                  ["--advantage", "grpo", "--samples", "1"], ["--min-pixels", "5000", "--max-pixels", "100"],
                  ["--critic-labels", "--critic", "shared"], ["--critic-labels", "--advantage", "grpo"]):
        r = subprocess.run([sys.executable, "train_ppo.py", "--model", str(model), "--train",
                            str(ppo_data / "train.jsonl"), "--out", str(tmp_path / "x"), *extra],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "error:" in r.stderr, r.stderr
    with pytest.raises(SystemExit, match="no config.json"):
        train_ppo.main(["--model", str(tmp_path), "--train", str(ppo_data / "train.jsonl"), "--out", str(tmp_path / "y")])
