"""CPU memory (Linux): what a checkpoint load adds at its peak, and what glibc keeps of freed activations.

(1) A 128 MB bf16 safetensors file read into 256 MB of float32 by `mmr5.weights.load_into`, and by safetensors'
`load_file` plus a cast (the file's bytes resident beside the result): peak RSS added / the loaded weights' bytes.
(2) 288 MB of 12 MB activations freed between small live tensors: the MiB the process keeps with glibc's default
(dynamic) mmap threshold, and after `mmr5.distributed.setup` fixes it (`map_large_allocations`).
Each runs in a fresh process. Usage: python bench/memory.py
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import in_own_process, rss_kib
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHAPES = {f"w{i}": (1024, 4096) for i in range(16)}


def load_peak(path, how, queue):
    """Peak RSS a load adds (VmHWM reset first), over the loaded weights' bytes."""
    from torch import nn

    from mmr5.weights import load_into

    with torch.device("meta"):
        module = nn.ParameterDict({k: nn.Parameter(torch.empty(shape)) for k, shape in SHAPES.items()})
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = rss_kib("VmRSS")
    if how == "mmr5":
        load_into(module, path, dtype=torch.float32, device="cpu")
        weights = list(module.values())
    else:
        weights = [t.float() for t in load_file(Path(path) / "model.safetensors").values()]
    queue.put((rss_kib("VmHWM") - before) * 1024 / sum(w.numel() * 4 for w in weights))


FRAGMENTING_ALLOCATIONS = """
import sys, torch
from mmr5.distributed import setup
if sys.argv[1] == "setup":
    setup("cpu")  # what every script calls first
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
big = torch.ones(6 << 20); del big  # a freed 24 MB block: glibc now serves blocks up to 24 MB from its heap
base = rss_mib()
keep, activations = [], []
for _ in range(24):  # 12 MB activations between small long-lived tensors (checkpoints, statistics)
    activations.append(torch.ones(3 << 20))
    keep.append(torch.ones(1000))
del activations
print(rss_mib() - base)
"""


def kept_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", FRAGMENTING_ALLOCATIONS, mode], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return float(out.stdout.split()[-1])


def main():
    with tempfile.TemporaryDirectory() as d:
        save_file({k: torch.randn(shape).to(torch.bfloat16) for k, shape in SHAPES.items()}, Path(d) / "model.safetensors")
        ours, theirs = (in_own_process(load_peak, d, how) for how in ("mmr5", "load_file"))
    print(f"(1) load peak / weights: mmr5 {ours:.2f}x, safetensors load_file + cast {theirs:.2f}x")
    default, fixed = kept_mib("default"), kept_mib("setup")
    print(f"(2) freed activations kept: glibc default {default:.0f} MiB, after setup {fixed:.0f} MiB (of 288)")


if __name__ == "__main__":
    main()
