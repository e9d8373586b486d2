"""torchrun on CPU with gloo: 2 ranks compute what 1 process computes, and runs resume across world sizes."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import page_images

from mmr5.model import Qwen2VL

ROOT = Path(__file__).resolve().parent.parent


def sft_args(model, data, out, steps=3):
    return ["--model", str(model), "--train", str(data / "train.jsonl"), "--out", str(out), "--steps", str(steps),
            "--batch-size", "4", "--micro-batch-size", "1", "--lr", "1e-3", "--warmup-steps", "2", "--log-every", "1",
            "--save-every", "1"]


def launch(nproc, args, script="train_sft.py"):
    """Start a run as a user would: python for 1 process, torchrun for more. Returns the Popen."""
    cmd = [sys.executable, script] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
         script]
    return subprocess.Popen(cmd + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def kill_all(marker: str):
    """SIGKILL every process whose command line holds `marker` (torchrun starts its workers in their own
    process groups, so killing the launcher's group would leave them running)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if marker in cmdline:
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_errors(out: str) -> str:
    """A failed torchrun's output for an assertion message: the lines that say what went wrong in a worker
    (torchrun's own summary at the end names only the signal), then the tail."""
    said = [line for line in out.splitlines() if any(w in line for w in ("Error", "what()", "terminate", "Abort"))]
    return "\n".join(said[-30:]) + "\n...\n" + out[-2000:]


def finish(p, timeout=600):
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, worker_errors(out)
    return out


def weights(path):
    return Qwen2VL.from_pretrained(path).state_dict()


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single_run(tiny_model_dirs, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    finish(launch(1, sft_args(tiny_model_dirs["qwen2_5_vl"], data, out)))
    return out


@pytest.fixture(scope="module")
def long_single_run(tiny_model_dirs, data, tmp_path_factory):
    """Long enough (12 steps) to be killed in the middle."""
    out = tmp_path_factory.mktemp("long") / "run"
    finish(launch(1, sft_args(tiny_model_dirs["qwen2_5_vl"], data, out, steps=12)))
    return out


@pytest.mark.parametrize("fsdp", [False, True])
def test_two_ranks_train_like_one_process(tiny_model_dirs, data, single_run, tmp_path, fsdp):
    out = tmp_path / "two"
    log = finish(launch(2, sft_args(tiny_model_dirs["qwen2_5_vl"], data, out) + (["--fsdp"] if fsdp else [])))
    assert f"2 ranks ({'FSDP2' if fsdp else 'DDP'})" in log
    assert max_diff(weights(single_run / "model"), weights(out / "model")) <= 1e-6
    losses = lambda p: [r["loss"] for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())]  # noqa
    assert losses(single_run) == pytest.approx(losses(out), abs=1e-6)


@pytest.mark.parametrize("fsdp", [False, True])
def test_ppo_script_on_two_ranks(tiny_model_dirs, data, tmp_path, fsdp):
    """train_ppo.py under torchrun with a GPU recipe's settings (LoRA, bf16 autocast) and no eval set, so that its
    first forward is the vision tower alone (FSDP2 took the tower for its root and refused the model), and
    checkpoints every step (the optimizer state gathered from the shards, each rank's replay buffer its own file);
    the critic with page marks (the default), which FSDP must have gathered when its forward adds them. Resumed by
    one process, the run goes on with its replay buffer started afresh."""
    out = tmp_path / "ppo"
    args = ["--model", str(tiny_model_dirs["qwen2_5_vl"]), "--train", str(data / "train.jsonl"), "--out", str(out),
            "--steps", "2", "--prompts-per-step", "2", "--samples", "2", "--max-new-tokens", "8", "--minibatch-size",
            "2", "--micro-batch-size", "1", "--save-every", "1", "--lora-rank", "4", "--bf16", "on"]
    log = finish(launch(2, args + (["--fsdp"] if fsdp else []), script="train_ppo.py"))
    assert f"2 ranks ({'FSDP2' if fsdp else 'DDP'})" in log
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["skipped"] == 0 for r in steps)
    assert (out / "model" / "model.safetensors").exists() and Qwen2VL.from_pretrained(out / "model") is not None
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert sorted(p.name for p in ckpt.glob("rank*")) == ["rank0.safetensors", "rank1.safetensors"]
    log = finish(launch(1, args[:args.index("--steps") + 1] + ["3"] + args[args.index("--steps") + 2:],
                        script="train_ppo.py"))
    assert "saved by 2 rank(s), this run has 1" in log and "resuming" in log
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and "replay_value_loss" not in steps[-1]


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_killed_run_resumes_with_another_world_size(tiny_model_dirs, data, long_single_run, tmp_path, first, then):
    """SIGKILL a run once it has a checkpoint, resume it with a different number of processes: the same weights
    as never interrupted (up to float reassociation, which 12 Adam steps grow past 1e-6; a wrong resume is ~1e-3)."""
    out = tmp_path / "run"
    args = sft_args(tiny_model_dirs["qwen2_5_vl"], data, out, steps=12)
    p = launch(first, args)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    kill_all(str(out))
    p.communicate()
    assert latest.exists() and not (out / "model").exists(), "the run was not caught mid-way"
    log = finish(launch(then, args))
    assert "resuming" in log
    assert max_diff(weights(long_single_run / "model"), weights(out / "model")) <= 1e-5


WORKER = r'''
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.environ["ROOT"])
from mmr5 import distributed
from mmr5.lora import add_lora
from mmr5.model import Qwen2VL
from mmr5.critic import ValueHead
from mmr5.ppo import PPOConfig, make_experience, ppo_update
from mmr5.sampler import Rollout
d = distributed.setup("cpu")
fixed = torch.load(os.environ["FIXED"], weights_only=True)
policy = Qwen2VL.from_pretrained(os.environ["MODEL"])
policy.visual.requires_grad_(False)
torch.manual_seed(0)
add_lora(policy, rank=4, alpha=8)
grpo = os.environ["ADVANTAGE"] == "grpo"
if not grpo:  # GRPO has no critic (DDP refuses parameters that get no gradient)
    policy.value_head = ValueHead(policy.config.text.hidden_size)
    torch.nn.init.normal_(policy.value_head.linear.weight, std=0.1)
forward = distributed.wrap(policy, d, fsdp=os.environ["FSDP"] == "1")
params = [p for p in policy.parameters() if p.requires_grad]
opt = torch.optim.SGD(params, lr=0.1)
R, n = fixed["tokens"].shape[0], 2
rows = distributed.shard(list(range(R // n)), d)  # this rank's prompts
sel = torch.tensor([g * n + k for g in rows for k in range(n)])
batch = {"input_ids": fixed["input_ids"][rows], "attention_mask": fixed["attention_mask"][rows],
         "image_grid_thw": torch.cat([fixed[f"grid{g}"] for g in rows])}
pages = ([fixed[f"features{g}"] for g in rows], [fixed[f"grid{g}"] for g in rows])
rollout = Rollout(fixed["tokens"][sel], fixed["mask"][sel], [], None)
cfg = PPOConfig(advantage=os.environ["ADVANTAGE"], kl_in="loss" if grpo else "reward", epochs=2,
                minibatch_size=len(sel), micro_batch_size=1)
reduce = lambda x: distributed.all_sum(x, d)
exp = make_experience(policy, batch, pages, rollout, fixed["scores"][sel], n, cfg, 0.1, reduce=reduce)
ppo_update(policy, exp, opt, params, cfg, 0.1, forwards={"policy": forward}, reduce=reduce, world=d.world)
state = distributed.full_state_dict(policy, d)  # every rank takes part (FSDP gathers the shards)
if d.main:
    torch.save(state, os.environ["RESULT"])
distributed.cleanup(d)
'''


@pytest.mark.parametrize("fsdp,advantage", [(False, "gae"), (True, "gae"), (False, "grpo")])
def test_one_ppo_update_on_a_fixed_rollout(tiny_model_dirs, tmp_path, fsdp, advantage):
    """make_experience + ppo_update on 2 DDP or FSDP2 ranks == 1 process, same rollout (each micro-batch runs the
    policy twice before its backward: prompts, then responses on their cache): GAE with whitening over all ranks
    (token mean), GRPO with the sequence mean. The responses' lengths differ (10 / 3 / 6 / 2 tokens), so each rank
    holds a different share of the tokens: a response's weight must not depend on the rank it sits on."""
    from mmr5.ppo import encode_pages
    from mmr5.processor import Processor
    from mmr5.sampler import generate

    path = tiny_model_dirs["qwen2_5_vl"]
    model, proc = Qwen2VL.from_pretrained(path), Processor.from_pretrained(path)
    batch = proc.rerank_inputs(["red circle", "blue square"], [page_images(3), page_images(2, seed=4)])
    features, grids = encode_pages(model, batch)
    rollout = generate(model, proc, batch, max_new_tokens=10, n=2, generator=torch.Generator().manual_seed(0),
                       image_features=torch.cat(features))
    T = rollout.mask.shape[1]
    mask = rollout.mask & (torch.arange(T)[None] < torch.tensor([10, 3, 6, 2])[:, None])
    fixed = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "tokens": rollout.tokens,
             "mask": mask, "scores": torch.tensor([1.0, 0.0, 0.3, 0.9]),
             **{f"features{g}": f for g, f in enumerate(features)}, **{f"grid{g}": gr for g, gr in enumerate(grids)}}
    torch.save(fixed, tmp_path / "fixed.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    results = {}
    for nproc in (1, 2):
        env = {**os.environ, "ROOT": str(ROOT), "MODEL": str(path), "FIXED": str(tmp_path / "fixed.pt"),
               "RESULT": str(tmp_path / f"result{nproc}.pt"), "OMP_NUM_THREADS": "1",
               "FSDP": str(int(fsdp)), "ADVANTAGE": advantage}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), str(tmp_path / "worker.py")]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, worker_errors(r.stdout + r.stderr)
        results[nproc] = torch.load(tmp_path / f"result{nproc}.pt", weights_only=True)
    start = Qwen2VL.from_pretrained(path).state_dict()
    moved = [k for k in results[1] if "lora_B" in k and not torch.equal(results[1][k], torch.zeros_like(results[1][k]))]
    base = {k.replace(".base.", "."): v for k, v in results[1].items()}
    assert moved and all(torch.equal(base[k], start[k]) for k in start)  # only the adapters (and head) trained
    assert max_diff(results[1], results[2]) <= 1e-6


def test_cpu_setup_fixes_the_mmap_threshold(monkeypatch):
    """On a CPU, `setup` has glibc map large blocks (freed activations then leave the process: bench/memory.py)."""
    from mmr5 import distributed

    calls = []
    monkeypatch.setattr(distributed, "map_large_allocations", lambda *args: calls.append(args) or True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.setup("cpu").device == "cpu" and calls == [()]
