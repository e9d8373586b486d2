"""Training checkpoints: all a run needs to continue exactly, as safetensors + JSON (never pickle).

Used by the run scaffold (mmr5/run.py). A checkpoint is a folder `checkpoints/step-000120/` holding
`weights.safetensors` (the trained tensors: adapters with LoRA, else the whole model), `optimizer.safetensors`,
`rng.safetensors` and `state.json` (step, data position, schedule, optimizer hyper-parameters, metrics...).
Folders are written under a temporary name and renamed when complete; then `checkpoints/latest` (one line, replaced
atomically) is pointed at the new one and older folders are deleted. A kill at any moment leaves `latest` naming a
complete checkpoint.

Pipeline: after the whole data -> processor -> model -> sampler -> rewards -> ppo line; a part of the scaffold (run.py).
"""
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from mmr5.weights import atomic_directory

FILES = ("weights.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


def check_output_folder(path):
    """A one-line ValueError, before any model work, if `path` cannot become the output folder: it is a file, a
    folder above it is a file, or the nearest existing folder above it is not writable."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a folder: give a folder (it is created if missing)")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {path}: {existing} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: {existing} is not writable; choose another --out")


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """torch (CPU and CUDA), Python and NumPy generator states, split into tensors and JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    return tensors, {"python": [version, list(state), gauss], "numpy": [kind, pos, has_gauss, cached]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict):
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's full (unsharded) state keyed by parameter name, as flat tensors ("<name>|<field>") plus
    its JSON-able rest. Names, not positions, so a run resumes on another number of ranks or with FSDP.
    Under torch.distributed every rank must call it (it gathers to rank 0; the others get nothing)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    sd = get_optimizer_state_dict(model, optimizer, options=options)  # empty on ranks > 0 when distributed
    tensors, scalars = {}, {}
    for name, state in sd.get("state", {}).items():
        for field, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{name}|{field}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}|{field}"] = value
    return tensors, {"param_groups": sd.get("param_groups", []), "scalars": scalars}


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                   meta: dict):
    state: dict[str, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        name, field = key.rsplit("|", 1)
        state.setdefault(name, {})[field] = value
    # strict=False: a parameter not stepped yet (the policy during critic warm-up) has no state, as when saved.
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": meta["param_groups"]},
                             options=StateDictOptions(full_state_dict=True, strict=False))


def stage_rank_state(out_dir, rank: int, tensors: dict[str, torch.Tensor]):
    """Each rank's own state (train_ppo: the critic's replay buffer) waits beside the checkpoints until rank 0's
    `save_checkpoint(..., ranks=world)` moves it into the next one."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, root / f".rank{rank}.safetensors")


def load_rank_state(checkpoint, rank: int) -> dict[str, torch.Tensor] | None:
    """What `stage_rank_state` saved for `rank` in this checkpoint, or None."""
    path = Path(checkpoint) / f"rank{rank}.safetensors"
    try:
        return load_file(path) if path.exists() else None
    except (SafetensorError, OSError) as e:
        raise SystemExit(f"error: checkpoint {path} is corrupt ({e}); delete the checkpoint to start over") from None


def save_checkpoint(out_dir, step: int, weights: dict[str, torch.Tensor], optimizer_state: tuple[dict, dict],
                    state: dict, keep: int = 1, ranks: int = 0) -> Path:
    """Write checkpoints/step-{step}/ completely, point `latest` at it, then delete all but the newest `keep`.
    `optimizer_state` is `optimizer_tensors(model, optimizer)`; `ranks` staged per-rank files move in with it. Call
    it on one process (rank 0)."""
    root = Path(out_dir) / "checkpoints"
    name = f"step-{step:06d}"
    opt_tensors, opt_meta = optimizer_state
    rng_tensors, rng_meta = rng_state()
    with atomic_directory(root / name) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "weights.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file(rng_tensors, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": opt_meta, "rng": rng_meta}))
        for r in range(ranks):
            os.replace(root / f".rank{r}.safetensors", tmp / f"rank{r}.safetensors")
    pointer = root / "latest.tmp"
    pointer.write_text(name + "\n")
    with open(pointer) as f:
        os.fsync(f.fileno())
    os.replace(pointer, root / "latest")
    stale = [p for p in sorted(root.glob("step-*")) if p.name != name]  # zero-padded names sort by step
    for old in stale[: max(0, len(stale) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


def latest_checkpoint(out_dir) -> Path | None:
    """The checkpoint `latest` names, or None when the run has none yet."""
    pointer = Path(out_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        raise ValueError(f"{pointer} names {path.name}, which does not exist; the checkpoint folder was altered")
    return path


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(weights, optimizer tensors, rng tensors, state) of a checkpoint folder, with one clear error if broken."""
    path = Path(path)
    missing = [f for f in FILES if not (path / f).exists()]
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    try:
        state = json.loads((path / "state.json").read_text())
        tensors = [load_file(path / f) for f in FILES[:3]]
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise ValueError(f"checkpoint {path} is corrupt ({e}); delete it to start over") from None
    return tensors[0], tensors[1], tensors[2], state


def resume_checkpoint(out_dir, args, run_identity: tuple[str, ...]):
    """(weights, optimizer tensors, rng tensors, state) of the run in `out_dir` to continue, or None to start fresh
    (none yet, or `args.no_resume`). Exits with one line when the checkpoint is broken or was made by a run with
    different `run_identity` flags: continuing it would silently be another run."""
    try:
        ckpt = None if args.no_resume else latest_checkpoint(out_dir)
        loaded = None if ckpt is None else load_checkpoint(ckpt)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if loaded is not None:
        changed = [k for k in run_identity if loaded[3]["args"].get(k) != vars(args).get(k)]
        if changed:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise SystemExit(f"error: {out_dir} holds a run with different {flags}; use another --out or --no-resume")
    return loaded


def write_checkpoint(out_dir, step: int, weights: dict, optimizer_state: tuple[dict, dict], state: dict,
                     ranks: int = 0):
    """save_checkpoint for the scripts: a failed write (disk full, no permission) is one clear line, and the
    previous checkpoint is still there (the new one was being written under a temporary name)."""
    try:
        save_checkpoint(out_dir, step, weights, optimizer_state, state, ranks=ranks)
    except OSError as e:
        latest = latest_checkpoint(out_dir)
        kept = f"the last complete checkpoint is {latest}" if latest else "no earlier checkpoint exists"
        raise SystemExit(f"error: could not write the step-{step} checkpoint in {out_dir}: {e.strerror or e}; {kept}")
