"""PPO with the critic (the demo's default) against GRPO (the release's recipe) on the demo's RL stage, per seed.

Runs `train_ppo.py` with the built-in demo's settings from the full built-in SFT model on the demo's RL prompts
(`mmr5.synthetic.build_rl_demo`), once per advantage and seed, at equal samples (same steps, prompts and samples per
step), each in its own folder under --out. Then prints held-out rerank reward, Recall@1 and format reward at every
evaluation, against the step and the wall-clock seconds the run had spent in training steps by then, and the mean
over seeds, and each PPO run's critic (median explained variance over its last 20 steps). `gae` is the default (its
critic told the labels and the greedy answer's reward, replaying the last 3 rollouts; each prompt's baseline the
batch's mean value); `gae-replay2` the same replaying 2; `gae-critic-baseline` the default before (2026-12-05
afternoon), each prompt's baseline its own value, replaying 2; `gae-labels-replay2` the default before the greedy
reward (2026-12-05 noon), `gae-plain` the one before that, neither labels nor replay; `gae-replay` replay alone,
`gae-labels` labels alone; `reinforce` is PPO's objective with the critic taken out (`--advantage reinforce`): what
the critic adds. Needs `python train_sft.py` first.
Usage: python bench/ppo_vs_grpo.py [--seeds 0 1 2] [--steps 60] [--advantages gae grpo gae-replay2
       gae-critic-baseline gae-labels-replay2 gae-plain gae-replay gae-labels reinforce]
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from mmr5.synthetic import build_rl_demo  # noqa: E402
from train_ppo import DEMO, DEMO_SFT  # noqa: E402


# each setting compared: train_ppo.py flags on top of the demo's (OLD: the critics before 2026-12-05 noon)
OLD = {"advantage": "gae", "prompt_baseline": "critic", "critic_greedy": False, "critic_replay": 2}
SETTINGS = {"gae": {"advantage": "gae"}, "grpo": {"advantage": "grpo"},
            "gae-replay2": {"advantage": "gae", "critic_replay": 2},
            "gae-critic-baseline": {"advantage": "gae", "prompt_baseline": "critic", "critic_replay": 2},
            "gae-labels-replay2": OLD,
            "gae-plain": {**OLD, "critic_labels": False, "critic_replay": 0},
            "gae-replay": {**OLD, "critic_labels": False, "critic_replay": 3},
            "gae-labels": {**OLD, "critic_labels": True, "critic_replay": 0},
            "reinforce": {"advantage": "reinforce"}}


def run(setting: str, seed: int, out: Path, steps: int | None, rerun: bool) -> list[dict]:
    """One demo run; -> its evaluation records, each with `seconds` spent in training steps up to it."""
    if (out / "summary.json").exists() and not rerun:  # finished earlier: its metrics stand
        return evals_of(out)
    paths = build_rl_demo(REPO / "runs" / "demo")
    flags = {**DEMO, "out": str(out), "seed": seed, **SETTINGS[setting], "eval_every": 10,
             **({"steps": steps} if steps else {})}
    argv = [f"--{'no-' if v is False else ''}{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f"={v}")
            for k, v in flags.items()]
    argv += ["--model", str(REPO / DEMO_SFT / "model"), "--train", paths["train"], "--eval", paths["eval"], "--no-resume"]
    done = subprocess.run([sys.executable, str(REPO / "train_ppo.py"), *argv], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"train_ppo.py ({setting}) --seed {seed} failed:\n{done.stderr[-3000:]}")
    return evals_of(out)


def evals_of(out: Path) -> list[dict]:
    evals, seconds = [], 0.0
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        seconds += record.get("step_s", 0.0)
        if "eval_rerank" in record:
            evals.append({**record, "seconds": seconds})
    return evals


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (sampling, data order)")
    p.add_argument("--advantages", nargs="+", default=["gae", "grpo"], choices=list(SETTINGS),
                   help="settings to run (gae: PPO as train_ppo.py's defaults, its critic told the labels and the "
                        "greedy answer's reward, replaying 3, the batch's mean value each prompt's baseline; "
                        "gae-replay2: replaying 2; gae-critic-baseline: that, each prompt's own value; "
                        "gae-labels-replay2: that, without the greedy reward; gae-plain: none; gae-replay / "
                        "gae-labels: one of them; reinforce: PPO with no critic)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: the demo's)")
    p.add_argument("--out", default="runs/bench_ppo_vs_grpo", help="one folder per run under this")
    p.add_argument("--rerun", action="store_true", help="rerun finished runs (default: reuse their metrics)")
    args = p.parse_args()
    if not (REPO / DEMO_SFT / "model" / "config.json").exists():
        sys.exit("error: no built-in SFT model: run `python train_sft.py` first")
    results = {}
    for seed in args.seeds:  # seeds outermost: this machine's speed drifts, so each seed's pair runs back to back
        for advantage in args.advantages:
            evals = run(advantage, seed, Path(args.out) / f"{advantage}_seed{seed}", args.steps, args.rerun)
            results[advantage, seed] = evals
            summary = json.loads((Path(args.out) / f"{advantage}_seed{seed}" / "summary.json").read_text())
            critic = summary.get("critic_last_20_steps")
            print(f"{advantage} seed {seed}: " + ", ".join(
                f"step {e['step']} ({e['seconds']:.0f} s) rerank {e['eval_rerank']:.3f} R@1 {e['eval_recall@1']:.3f} "
                f"format {e['eval_format']:.3f}" for e in evals)
                + (f"; critic, median of the last 20 steps: {critic}" if critic else ""), flush=True)
    print("\nmean over seeds: held-out rerank / Recall@1 / format at each evaluation (seconds in training steps)")
    for advantage in args.advantages:
        runs = [results[advantage, s] for s in args.seeds]
        for i, e in enumerate(runs[0]):
            mean = {k: statistics.mean(r[i][k] for r in runs) for k in ("eval_rerank", "eval_recall@1", "eval_format",
                                                                         "seconds")}
            spread = statistics.pstdev(r[i]["eval_rerank"] for r in runs)
            print(f"{advantage:<10} step {e['step']:>3} ({mean['seconds']:4.0f} s): rerank {mean['eval_rerank']:.3f} "
                  f"(+-{spread:.3f}), R@1 {mean['eval_recall@1']:.3f}, format {mean['eval_format']:.3f}")


if __name__ == "__main__":
    main()
