"""torchrun support for the scripts: one process per device, DDP by default, FSDP2 (`fully_shard`) on request.

Pipeline: after the whole data -> processor -> model -> sampler -> rewards -> ppo line; a part of the scaffold (run.py).
Nothing here is home-made parallelism: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK, we call
`init_process_group` (NCCL on GPUs, gloo on CPU, so CI runs 2 processes on one machine) and wrap the model in
torch's own DDP or FSDP2. The data of a step is split across ranks by `shard`; losses are normalised by the
global token count so N ranks compute exactly the update of one process with the same global batch.
Checkpoints hold full (gathered) tensors keyed by name, so a run resumes on any number of ranks.
"""
import ctypes
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str | None) -> Dist:
    """Join the torchrun group if there is one; pick this process's device (cuda:LOCAL_RANK under torchrun)."""
    world = launcher_variable("WORLD_SIZE", "1")
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if not cuda:
        map_large_allocations()
    if world == 1:
        return Dist(0, 1, device or ("cuda" if cuda else "cpu"))
    local = launcher_variable("LOCAL_RANK", "0")
    unset = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if unset:
        raise SystemExit(f"error: WORLD_SIZE={world} is set but {', '.join(unset)} not: start the script with "
                         "torchrun, or unset WORLD_SIZE to run one process")
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), f"cuda:{local}" if cuda else "cpu")


def launcher_variable(name: str, default: str) -> int:
    """A torchrun environment variable as a non-negative integer; a typo'd export is one line, not int()'s traceback."""
    value = os.environ.get(name, default)
    if not value.strip().isdigit() or (name == "WORLD_SIZE" and int(value) < 1):
        raise SystemExit(f"error: environment variable {name}={value!r} is not a process count or index; unset it "
                         "(torchrun sets it)")
    return int(value)


def map_large_allocations(threshold: int = 8 << 20) -> bool:
    """Have glibc give every block over `threshold` bytes its own mapping, returned to the OS when freed.

    Why: CPU tensors live in malloc'd memory, and glibc raises its mmap threshold (up to 32 MB) whenever a mapped
    block is freed; from then on activation-sized tensors come from the heap, which fragments and is not given
    back, so a 3B-wide SFT step grew by gigabytes beyond its live tensors; 8 MB keeps activation-sized blocks mapped
    without the page-fault cost of a lower threshold (bench/README.md). False (and nothing changed) where the C
    library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>; setting it also turns off the dynamic adjustment
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))


def shard(items: list, d: Dist) -> list:
    """This rank's share of a step's items: contiguous blocks, so rank order is the single-process order."""
    per, extra = divmod(len(items), d.world)
    start = d.rank * per + min(d.rank, extra)
    return items[start:start + per + (d.rank < extra)]


def all_sum(x: float, d: Dist) -> float:
    """Sum of a number over ranks (itself when alone)."""
    if d.world == 1:
        return x
    t = torch.tensor(float(x), dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.item()


def wrap(model: nn.Module, d: Dist, fsdp: bool) -> nn.Module:
    """The module to run forward/backward through: the model itself when alone, else DDP or FSDP2 around it.

    FSDP2 shards every vision block, the vision tower (PPO encodes pages with it alone) and every decoder layer,
    then the rest (embeddings, norm, lm_head, a value head) at the root; the model object keeps its attributes, so
    the rest of the code does not change. DDP keeps a full copy per rank.
    """
    if d.world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in [*model.visual.blocks, model.visual, *model.model.layers]:  # the tower is run on its own too
            fully_shard(block)
        fully_shard(model)
        # FSDP2 takes the first module to run forward as its root; PPO's first is the tower alone (pages are encoded
        # before the rollout), which FSDP then refuses. One token through the whole model first settles the root;
        # the root keeps its parameters gathered after a forward, so shard them again before an optimizer sees them.
        with torch.no_grad():
            model(torch.zeros(1, 1, dtype=torch.long, device=d.device), logits=False)
        model.reshard()
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[torch.device(d.device).index] if d.device.startswith("cuda") else None)


def full_state_dict(model: nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """Unsharded parameters by name (gathered to rank 0, in CPU memory; every rank must call it, the others get {})."""
    if d.world == 1:
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]):
    """Copy full tensors (a subset is fine: adapters only, a tied head saved once) into a plain, DDP-wrapped or
    FSDP-sharded model."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def barrier(d: Dist):
    if d.world > 1:
        dist.barrier()


def cleanup(d: Dist):
    """Leave the group together: a gloo rank whose peer closes its sockets while traffic is still in flight dies
    with SIGABRT (an uncaught gloo::IoException), and torchrun then reports the whole run failed."""
    if d.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
