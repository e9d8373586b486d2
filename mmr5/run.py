"""The scaffold train_sft.py and train_ppo.py share, so that each script's `main` shows only its algorithm.

Pipeline: after the whole data -> processor -> model -> sampler -> rewards -> ppo line; the scripts' scaffold.
`Run` owns what every training run does the same way: ranks and device, bf16 autocast, data and model loading with
one-line errors, resume, checkpoints on a schedule and on Ctrl-C, the metrics log and curve, held-out evaluation and
the final HF-layout model. A checkpoint holds every trained tensor of `Run.models` by name, so a run resumes exactly.
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from mmr5 import distributed
from mmr5.checkpoint import (check_output_folder, latest_checkpoint, load_optimizer, load_rank_state, optimizer_tensors,
                             resume_checkpoint, set_rng_state, stage_rank_state, write_checkpoint)
from mmr5.data import DataError, read_samples
from mmr5.lora import add_lora, merge_lora
from mmr5.metrics import evaluation_records
from mmr5.model import Qwen2VL, check_device
from mmr5.plots import plot_curves
from mmr5.processor import Processor
from mmr5.reranker import Reranker, check_before_loading, check_pair
from mmr5.runlog import StopFlag, append_metrics, read_metrics, rewind_metrics

# Held-out numbers every evaluation logs, from `evaluation_records`' fields.
EVAL_KEYS = {"eval_rerank": "reward_rerank", "eval_format": "reward_format", "eval_recall@1": "recall@1",
             "eval_parsed": "parsed"}


def add_run_flags(p: argparse.ArgumentParser, model_help: str, train_help: str, lora_release: str,
                  lora_alpha: float, save_every: int):
    """The flags both trainers take: inputs and outputs, model and device, evaluation and checkpoints."""
    io = p.add_argument_group("inputs and outputs (all four unset: the built-in demo)")
    io.add_argument("--model", help=model_help)
    io.add_argument("--train", help=train_help)
    io.add_argument("--eval", help="held-out JSONL: rewards and Recall@1 before, during and after training")
    io.add_argument("--out", help="output folder: checkpoints/, metrics.jsonl, curve.png, model/ (the final model)")
    m = p.add_argument_group("model and device")
    m.add_argument("--lora-rank", type=int, default=0, help=f"LoRA rank (0 = full fine-tuning; {lora_release})")
    m.add_argument("--lora-alpha", type=float, default=lora_alpha, help="LoRA alpha")
    m.add_argument("--lora-targets", default="all-linear", help="'all-linear' or suffixes like 'q_proj,v_proj'")
    m.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (less "
                   "memory for long image prompts)")
    m.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    m.add_argument("--fsdp", action="store_true", help="under torchrun, shard the models with FSDP2 (default: DDP)")
    m.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast (auto: on for CUDA GPUs that have bf16, Ampere and later)")
    m.add_argument("--save-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="dtype of the final model's weights (auto: the base checkpoint's, e.g. bfloat16 for the "
                        "released Qwen models and MM-R5; float32 keeps updates smaller than a bfloat16 step)")
    m.add_argument("--min-pixels", type=int, help="override the checkpoint's preprocessor min_pixels")
    m.add_argument("--max-pixels", type=int, help="override the checkpoint's preprocessor max_pixels")
    m.add_argument("--seed", type=int, default=0, help="seed for data order, initialisation and sampling")
    e = p.add_argument_group("evaluation, checkpoints, logging")
    e.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0 = before and after only)")
    e.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N eval samples (0 = all)")
    e.add_argument("--eval-max-new-tokens", type=int, default=1024, help="generation budget per eval answer")
    e.add_argument("--save-every", type=int, default=save_every, help="checkpoint every N steps (and at the end, "
                   "and on Ctrl-C)")
    e.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    e.add_argument("--max-bad-steps", type=int, default=3, help="stop after this many non-finite steps in a row")


def add_config_flags(group, config_class):
    """One flag per dataclass field, its default, type, choices and help read from the field."""
    for f in dataclasses.fields(config_class):
        extra = {k: v for k, v in f.metadata.items() if k != "help"}
        boolean = isinstance(f.default, bool) or "action" in extra
        kind = {"action": argparse.BooleanOptionalAction} if boolean else {"type": type(f.default)}
        group.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=f.metadata["help"],
                           **{**kind, **extra})


def config_from_args(p: argparse.ArgumentParser, args, config_class):
    """The dataclass from the parsed flags; its own checks become argparse's one-line errors."""
    try:
        return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})
    except ValueError as e:
        p.error(str(e))


def parse_run_args(p: argparse.ArgumentParser, argv, demo: dict):
    """-> (args, is_demo). With none of --model/--train/--eval/--out the built-in demo's settings replace the
    defaults (flags given win); otherwise --model, --train and --out are required."""
    args = p.parse_args(argv)
    is_demo = not any((args.model, args.train, args.eval, args.out))
    if is_demo:
        for k, v in demo.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    elif not (args.model and args.train and args.out):
        p.error("--model, --train and --out are required unless all of --model/--train/--eval/--out are unset (demo)")
    for name in ("save_every", "max_bad_steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.min_pixels and args.max_pixels and args.max_pixels < args.min_pixels:
        p.error(f"--max-pixels ({args.max_pixels}) is smaller than --min-pixels ({args.min_pixels})")
    return args, is_demo


def use_bf16(choice: str, device: str) -> bool:
    """bf16 autocast: on request, or by default on CUDA GPUs that have it (a T4 or V100 gets float32)."""
    return choice == "on" or (choice == "auto" and device.startswith("cuda") and torch.cuda.is_bf16_supported())


class Run:
    """One training run in `args.out`: call `start` once its models and optimizer exist, then `end_step` after
    each step, and `finish` at the end."""

    def __init__(self, args, script: str, identity: tuple[str, ...], curves: list[str]):
        self.args, self.script, self.identity, self.curves = args, script, identity, curves
        try:
            check_device(args.device)
        except ValueError as e:
            sys.exit(f"error: {e}")
        self.d = distributed.setup(args.device)
        self.main = self.d.main
        self.out = Path(args.out)
        self.bf16 = use_bf16(args.bf16, self.d.device)
        self.autocast = torch.autocast(self.d.device.split(":")[0], dtype=torch.bfloat16, enabled=self.bf16)
        self.models, self.optimizer, self.processor, self.evals, self.eval_batch_size = {}, None, None, [], 16
        self.step, self.state, self.stop = 0, {"eval_before": None, "bad_steps": 0}, None
        self.rank_state = None  # this rank's own tensors from the checkpoint resumed (train_ppo: its replay buffer)

    def say(self, *a, **k):
        if self.main:
            print(*a, **k)

    def load_data(self, require_response: bool = False) -> list:
        """The training samples (and `self.evals`), every line and image checked before any model work."""
        a = self.args
        torch.manual_seed(a.seed)  # from here on every random draw (LoRA, value head) is the seed's
        try:
            check_output_folder(self.out)
            train = read_samples(a.train, require_response=require_response)
            self.evals = read_samples(a.eval) if a.eval else []
            self.evals = self.evals[: a.eval_limit] if a.eval_limit else self.evals
            check_before_loading(a.model, train + self.evals, a.min_pixels, a.max_pixels, responses=require_response)
        except (DataError, FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
        return train

    def load_model(self, freeze_vision: bool, lora_dropout: float = 0.0) -> Qwen2VL:
        """The model to train: a frozen base may sit in bf16 under LoRA (autocast computes in bf16 anyway);
        trained weights stay float32."""
        a = self.args
        dtype = torch.bfloat16 if self.bf16 and a.lora_rank > 0 else torch.float32
        try:
            model = Qwen2VL.from_pretrained(a.model, dtype=dtype, device=self.d.device)
            if freeze_vision:
                model.visual.requires_grad_(False)
            if a.lora_rank > 0:
                add_lora(model, a.lora_rank, a.lora_alpha, a.lora_targets, lora_dropout)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
        return model

    def load_processor(self, model: Qwen2VL) -> Processor:
        try:
            processor = Processor.from_pretrained(self.args.model, min_pixels=self.args.min_pixels,
                                                  max_pixels=self.args.max_pixels)
            check_pair(model, processor)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
        self.processor = processor
        return processor

    def trained(self, names=None) -> dict:
        """Every trained tensor of the models `names` (default all), prefixed by its model's name, unsharded.
        Collective."""
        out = {}
        for name in names or self.models:
            m = self.models[name]
            full = distributed.full_state_dict(m, self.d)
            out.update({f"{name}.{k}": full[k] for k, p in m.named_parameters() if p.requires_grad and k in full})
        return out

    def start(self, models: dict, optimizer, total: int, describe: str) -> bool:
        """Resume from `args.out`'s last checkpoint (or start fresh), print the banner, evaluate the starting model.
        -> False when `args.out` already holds this finished run."""
        self.models, self.optimizer, self.total = models, optimizer, total
        resumed = resume_checkpoint(self.out, self.args, self.identity)
        if resumed is not None:
            weights, opt_tensors, rng, self.state = resumed
            for name, m in models.items():
                distributed.load_full_state_dict(m, {k[len(name) + 1:]: v for k, v in weights.items()
                                                     if k.startswith(name + ".")})
            load_optimizer(torch.nn.ModuleDict(models), optimizer, opt_tensors, self.state["optimizer"])
            set_rng_state(rng, self.state["rng"])
            self.step = self.state["step"]
            self.rank_state = self.resume_rank_state()
            if self.step >= total and (self.out / "summary.json").exists():
                self.say(f"{self.out} already holds a finished run; --no-resume starts it over")
                distributed.cleanup(self.d)
                return False
            if self.main:
                rewind_metrics(self.out, self.step)
            self.say(f"resuming {self.out} from step {self.step}/{total}")
        elif self.main and (self.out / "metrics.jsonl").exists():
            (self.out / "metrics.jsonl").unlink()  # a fresh run in an old folder: its curve starts over
        self.out.mkdir(parents=True, exist_ok=True)
        ranks = f", {self.d.world} ranks ({'FSDP2' if self.args.fsdp else 'DDP'})" if self.d.world > 1 else ""
        self.say(f"{describe}; {self.d.device}{' bf16' if self.bf16 else ''}{ranks}")
        if self.evals and self.state.get("eval_before") is None:
            self.say(f"evaluating the starting model on {len(self.evals)} held-out samples ...")
            self.state["eval_before"] = self.evaluate()
            self.log({"step": 0, **self.state["eval_before"]})
            self.say("before: " + ", ".join(f"{k} {v:.3f}" for k, v in self.state["eval_before"].items()))
        self.stop = StopFlag()
        return True

    def evaluate(self, model: str = None) -> dict:
        """Greedy held-out rewards and Recall@1 of the first model. DDP ranks split the samples; FSDP ranks all run
        all of them, so their collective forwards take the same steps."""
        policy = self.models[model or next(iter(self.models))]
        mine = self.evals if self.args.fsdp else distributed.shard(self.evals, self.d)
        was_training = policy.training
        reranker = Reranker(policy, self.processor, batch_size=self.eval_batch_size)
        with self.autocast:
            results = reranker.rerank_batch([s.query for s in mine], [s.images for s in mine],
                                            max_new_tokens=self.args.eval_max_new_tokens)
        records = evaluation_records(mine, results)
        policy.train(was_training)
        if self.args.fsdp:
            return {k: sum(r[v] for r in records) / len(records) for k, v in EVAL_KEYS.items()}
        return {k: distributed.all_sum(sum(r[v] for r in records), self.d) / len(self.evals)
                for k, v in EVAL_KEYS.items()}

    def log(self, record: dict):
        """Append to metrics.jsonl and redraw curve.png (rank 0)."""
        if self.main:
            append_metrics(self.out, record)
            plot_curves(read_metrics(self.out / "metrics.jsonl"), self.curves, self.out / "curve.png",
                        title=f"{self.script}  {self.out}")

    def end_step(self, record: dict | None, finite: bool, extra_state: dict | None = None, rank_state=None) -> bool:
        """After step `self.step` (already advanced): log, count non-finite steps, evaluate and checkpoint on
        schedule or on Ctrl-C (`rank_state()`: this rank's own tensors for it). -> whether to go on."""
        a = self.args
        self.state["bad_steps"] = 0 if finite else self.state["bad_steps"] + 1
        if self.evals and a.eval_every and self.step % a.eval_every == 0 and self.step < self.total:
            record = {**(record or {"step": self.step}), **self.evaluate()}
            self.say(f"step {self.step}: held-out " + ", ".join(f"{k[5:]} {record[k]:.3f}" for k in EVAL_KEYS))
        if record:
            self.log(record)
        if self.state["bad_steps"] >= a.max_bad_steps:
            sys.exit(f"error: {self.state['bad_steps']} steps in a row had only non-finite updates; stopping "
                     f"(last good checkpoint in {self.out / 'checkpoints'}). Lower --lr?")
        stopping = distributed.all_sum(float(self.stop.requested), self.d) > 0  # every rank stops at the same step
        if self.step % a.save_every == 0 or self.step == self.total or stopping:
            self.state.update(extra_state or {})
            self.save(rank_state() if rank_state else None)
        if stopping and self.step < self.total:
            self.say(f"stopped at step {self.step}/{self.total}; checkpoint saved in {self.out / 'checkpoints'}; "
                     "run again to resume")
        return not stopping and self.step < self.total

    def resume_rank_state(self) -> dict | None:
        """This rank's tensors in the checkpoint resumed from; None on every rank unless every rank has its own (a
        run resumed with another number of ranks starts that state afresh)."""
        ckpt = latest_checkpoint(self.out)
        saved_world = self.state.get("world", 1)
        tensors = load_rank_state(ckpt, self.d.rank) if saved_world == self.d.world else None
        if distributed.all_sum(float(tensors is not None), self.d) == self.d.world:
            return tensors
        if any(ckpt.glob("rank*.safetensors")):
            self.say(f"{ckpt.name} was saved by {saved_world} rank(s), this run has {self.d.world}: each rank's own "
                     "state in it (train_ppo: the critic's replay buffer) starts afresh")
        return None

    def save(self, rank_tensors: dict | None = None):
        weights = self.trained()
        opt_state = optimizer_tensors(torch.nn.ModuleDict(self.models), self.optimizer)  # collectives: every rank
        if rank_tensors is not None:
            stage_rank_state(self.out, self.d.rank, rank_tensors)
            distributed.barrier(self.d)  # every rank's file is staged before rank 0 moves them in
        if self.main:
            keep = {k: v for k, v in self.state.items() if k not in ("optimizer", "rng", "step")}
            write_checkpoint(self.out, self.step, weights, opt_state, {**keep, "args": vars(self.args),
                                                                       "world": self.d.world},
                             ranks=self.d.world if rank_tensors is not None else 0)
        distributed.barrier(self.d)

    def finish(self, final: str = None, summary=None):
        """Evaluate the final model, save it (HF layout, LoRA merged, no value head) and summary.json."""
        if self.step < self.total:
            return distributed.cleanup(self.d)
        after = self.evaluate() if self.evals else None
        name = final or next(iter(self.models))
        weights = {k[len(name) + 1:]: v for k, v in self.trained([name]).items()}  # not a separate critic's
        if self.main:
            if after is not None:
                self.log({"step": self.step, **after})
            save_final_model(self.args, weights, self.out / "model", getattr(self.args, "lora_dropout", 0.0))
            before = self.state["eval_before"]
            record = summary(before, after) if summary else {"eval_before": before, "eval_after": after}
            (self.out / "summary.json").write_text(json.dumps({"steps": self.step, **record,
                                                               "model": str(self.out / "model")}, indent=2) + "\n")
            print(f"final model (HF layout, loads in transformers / vLLM / evaluate.py / train_ppo.py): "
                  f"{self.out / 'model'}")
            for k in after or {}:
                print(f"held-out {k[5:]}: {before[k]:.3f} -> {after[k]:.3f}")
        distributed.barrier(self.d)
        distributed.cleanup(self.d)


def save_final_model(args, weights: dict, path: Path, lora_dropout: float = 0.0):
    """A plain HF-layout checkpoint: the trained tensors put into a fresh copy of the base model, LoRA merged, no
    value head. Frozen tensors are the base's own (under LoRA they sat in bf16 for memory only), not rounded copies."""
    model = Qwen2VL.from_pretrained(args.model)
    if args.lora_rank > 0:
        add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets, lora_dropout)
    distributed.load_full_state_dict(model, {k: v for k, v in weights.items() if not k.startswith("value_head.")})
    merge_lora(model)
    dtype = model.config.stored_dtype if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
    model.to(dtype).save_pretrained(path, side_files_from=args.model)
