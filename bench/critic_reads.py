"""A critic that reads the pages by writing first: the demo's PPO run with the reader's reading marked on the critic's
input, per seed (bench/README.md, "A critic that writes its reading first").

The separate critic starts from a reader (the demo's SFT model fine-tuned on the RL train set's chains: built under
--reader on first use, ~2 min) instead of the SFT model. Each step a frozen copy of the reader writes its own greedy
response to every prompt; the ids it lists after "Relevant:" are its reading. Then one of four learned vectors
(zero at the start, trained with the critic) is added to the critic's input embedding at each page id: on the
"Image k:" slots of the prompt and on every id the policy's response writes, "the reader read page k as relevant" or
"not" (`--reading rank` instead marks each page's rank in the writer's answer: 1st, 2nd, 3rd or later, eight
vectors; a reading any MM-R5 response gives). The policy never sees the reading. Everything else is `train_ppo.py`
with the demo's settings (run in a child process of this script, its critic patched in), plus `--critic-replay 3`
unless --replay says otherwise.
A measurement, not a library feature: the patches below are how it was built (see bench/README.md for what a
library version needs). Needs `python train_sft.py` first.
Usage: python bench/critic_reads.py [--seeds 0 1 2] [--replay 3] [--marks all|response|none] [--reading rank]
       [--lam 0.95]
"""
import argparse
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import mmr5.ppo as ppo  # noqa: E402
import train_ppo  # noqa: E402
from bench.ppo_vs_grpo import evals_of  # noqa: E402
from mmr5.run import Run  # noqa: E402
from mmr5.sampler import generate  # noqa: E402
from mmr5.synthetic import build_rl_demo  # noqa: E402

# the reader: train_sft.py on the RL train set's chains (the runs in bench/README.md used exactly these)
READER_SFT = dict(steps=150, batch_size=16, micro_batch_size=8, lr=5e-4, eval_limit=60, eval_max_new_tokens=128,
                  save_every=1000)


def patch_train_ppo(reader: str, marks: str, reading_kind: str):
    """Load the critic from `reader`, let a frozen copy of it write a reading per prompt each step, and add the
    reading marks to the critic's input embeddings (`marks`: where; `reading_kind`: relevant or rank)."""
    classes = 2 if reading_kind == "relevant" else 4  # relevant: no / yes; rank: 1st, 2nd, 3rd, later or unlisted
    state = {"loads": 0, "ctx": None}
    load_model, rollout, response_forward = Run.load_model, train_ppo.rollout, ppo.response_forward

    def embed_hook(module, inputs, out):
        if state["ctx"] is None or marks == "none":
            return out
        exp, rows = state["ctx"]
        ids = inputs[0].cpu()
        digit = state["digit_of"][ids]  # the page id a token names (0: none)
        response = exp.tokens[rows][:, :ids.shape[1]]
        if ids.shape == response.shape and torch.equal(ids, response):
            on, kind = digit > 0, exp.reading[exp.group[rows]].gather(1, digit) + classes
        else:  # the prompt pass: marks on the "Image", " ", "k" slots only
            prompts = exp.group[rows].unique()
            if marks != "all" or not torch.equal(ids, exp.prompt_ids[prompts][:, -ids.shape[1]:]):
                return out
            slot = torch.zeros_like(ids, dtype=torch.bool)
            slot[:, 2:] = ids[:, :-2] == state["image_word"]
            on, kind = (digit > 0) & slot, exp.reading[prompts].gather(1, digit)
        return out + state["critic"].marks[kind.to(out.device)] * on.to(out.device, out.dtype)[..., None]

    def load(self, freeze_vision, lora_dropout=0.0):
        state["loads"] += 1
        if state["loads"] != 2:  # build_models loads the policy first, then the critic
            return load_model(self, freeze_vision, lora_dropout)
        keep, self.args.model = self.args.model, reader
        try:
            critic = load_model(self, freeze_vision, lora_dropout)
        finally:
            self.args.model = keep
        critic.marks = torch.nn.Parameter(torch.zeros(2 * classes, critic.config.text.hidden_size))
        critic.model.embed_tokens.register_forward_hook(embed_hook)
        tok = self.processor.tokenizer
        digit_of = torch.zeros(critic.config.text.vocab_size, dtype=torch.long)
        for k in range(1, 10):
            if (token := tok.token_to_id(str(k))) is not None:
                digit_of[token] = k
        # value training wrecks the critic's own text within one update, so a frozen copy writes the reading
        state.update(critic=critic, digit_of=digit_of, image_word=tok.token_to_id("Image"),
                     writer=copy.deepcopy(critic).eval().requires_grad_(False))
        return critic

    def rollout_and_read(run, cfg, policy, samples, step, keep_going):
        batch, pages, out, greedy = rollout(run, cfg, policy, samples, step, keep_going)
        with torch.no_grad(), run.autocast:
            own = generate(state["writer"], run.processor, batch, cfg.max_new_tokens, temperature=0.0,
                           image_features=torch.cat(pages[0]))
        reading = torch.full((len(samples), 10), 0 if reading_kind == "relevant" else 3)
        right = 0
        for i, text in enumerate(own.texts):
            if reading_kind == "relevant":  # the ids after the demo chain's "Relevant:"
                found = re.search(r"Relevant:\s*([\d,\s]+)", text)
                read = {int(d) for d in re.findall(r"\d", found.group(1))} if found else set()
                reading[i, sorted(read)] = 1
                right += read == set(samples[i].positives)
            else:  # the rank of each page in the writer's answer (any MM-R5 response has one)
                found = re.search(r"<answer>\[([\d,\s]+)", text)
                order = [int(d) for d in re.findall(r"\d", found.group(1))] if found else []
                for r, k in reversed(list(enumerate(order[:3]))):
                    reading[i, k] = r
                right += bool(order) and order[0] in samples[i].positives
        state["reading"] = reading
        run.say(f"step {step}: the reader's reading is right for {right} of {len(samples)} prompts "
                f"({'exactly' if reading_kind == 'relevant' else 'its first listed page'})")
        return batch, pages, out, greedy

    def forward_with_marks(model, exp, rows, *args, **kwargs):
        if model is not state.get("critic"):
            return response_forward(model, exp, rows, *args, **kwargs)
        if not hasattr(exp, "reading"):  # a fresh rollout: this step's reading (replayed ones keep theirs)
            exp.reading = state["reading"]
        state["ctx"] = (exp, rows)
        try:
            return response_forward(model, exp, rows, *args, **kwargs)
        finally:
            state["ctx"] = None

    Run.load_model, train_ppo.rollout, ppo.response_forward = load, rollout_and_read, forward_with_marks


def build_reader(out: Path, paths: dict):
    if (out / "model" / "config.json").exists():
        return
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in READER_SFT.items()]
    cmd = [sys.executable, str(REPO / "train_sft.py"), "--model", str(REPO / train_ppo.DEMO_SFT / "model"),
           "--train", paths["train"], "--eval", paths["eval"], "--freeze-vision", "--out", str(out), *flags]
    print("building the reader:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (sampling, data order)")
    p.add_argument("--replay", type=int, default=3, help="--critic-replay of the runs")
    p.add_argument("--marks", default="all", choices=["all", "response", "none"],
                   help="where the reading is marked: prompt and response ids, response ids only, nowhere")
    p.add_argument("--reading", default="relevant", choices=["relevant", "rank"],
                   help="what is marked: the ids after the writer's \"Relevant:\" (the demo's chains), or each page's "
                        "rank in the writer's answer (1st, 2nd, 3rd, later)")
    p.add_argument("--lam", type=float, default=None, help="the policy's GAE lambda (default: the demo's 1.0)")
    p.add_argument("--reader", default="runs/demo/reader", help="the reader's train_sft.py output (built if missing)")
    p.add_argument("--out", default="runs/bench_critic_reads", help="one folder per run under this")
    p.add_argument("--run", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # internal: one run, these flags
    args = p.parse_args()
    if args.run is not None:
        patch_train_ppo(str(Path(args.reader) / "model"), args.marks, args.reading)
        return train_ppo.main(args.run)
    if not (REPO / train_ppo.DEMO_SFT / "model" / "config.json").exists():
        sys.exit("error: no built-in SFT model: run `python train_sft.py` first")
    paths = build_rl_demo(REPO / "runs" / "demo")
    build_reader(Path(args.reader), paths)
    lam = train_ppo.DEMO["lam"] if args.lam is None else args.lam
    for seed in args.seeds:
        out = Path(args.out) / f"{args.reading}_marks_{args.marks}_replay{args.replay}_lam{lam}_seed{seed}"
        flags = {**train_ppo.DEMO, "out": str(out), "seed": seed, "eval_every": 10, "critic_replay": args.replay,
                 "lam": lam}
        argv = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
        argv += ["--model", str(REPO / train_ppo.DEMO_SFT / "model"), "--train", paths["train"], "--eval",
                 paths["eval"], "--no-resume", "--no-critic-labels",
                 "--no-critic-greedy",  # the marks here are this harness's own
                 "--prompt-baseline", "critic"]  # as measured (2026-12-05, before the batch baseline)
        subprocess.run([sys.executable, __file__, "--reader", args.reader, "--marks", args.marks, "--reading",
                        args.reading, "--run", *argv], check=True, stdout=subprocess.DEVNULL)
        summary = json.loads((out / "summary.json").read_text())
        evals = evals_of(out)
        print(f"seed {seed}: critic, median of the last 20 steps {summary['critic_last_20_steps']}; held-out rerank "
              + ", ".join(f"{e['eval_rerank']:.3f} (step {e['step']})" for e in evals), flush=True)


if __name__ == "__main__":
    main()
