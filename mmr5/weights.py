"""Safetensors checkpoints in the Hugging Face layout: read them straight into a model, write them atomically.

Pipeline: data -> processor -> [model] -> sampler -> rewards -> ppo; model.py is built from config.py, layers.py,
vision.py and weights.py (this file: weights).
This file knows files and tensor names, not the architecture: `model.py` builds the modules (on the meta device)
and calls `load_into`, so a 7B model is read tensor by tensor into its final dtype and device and never needs twice
its size in RAM.
Reading is plain file reads, not a memory map: mapped pages count as the process's memory until the file is closed,
so shards kept mapped through a load add to the peak memory a large part of the weights again (bench/README.md).
"""
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
SINGLE = "model.safetensors"
# Files a model directory carries besides the weights, copied along when a model is saved from another one.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
              "generation_config.json")


def canonical_key(key: str) -> str:
    """transformers >= 4.52 may write `model.language_model.*` / `model.visual.*`; released files use `model.*` /
    `visual.*`. We name everything the released way."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def tensor_files(path) -> dict[str, Path]:
    """Every tensor name in a checkpoint directory -> the file that holds it (single file or sharded + index)."""
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not" if path.exists() else "does not exist; expected"
        raise FileNotFoundError(f"{path} {what} a checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    if (path / INDEX).exists():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path / INDEX} is not a valid safetensors index ({e}); copy it again") from None
        missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
        if missing:
            raise FileNotFoundError(f"{path}: shard(s) listed in {INDEX} are missing: {', '.join(missing)}")
        return {k: path / f for k, f in weight_map.items()}
    if (path / SINGLE).exists():
        return {k: path / SINGLE for k in read_header(path / SINGLE)[0]}
    raise FileNotFoundError(f"{path}: no {SINGLE} or {INDEX}")


def read_header(file: Path) -> tuple[dict, int]:
    """A safetensors file's header {name: {dtype, shape, data_offsets}} and where its data starts.

    The format: 8 bytes little-endian header length, the JSON header, then the tensors' bytes back to back.
    The file's size is checked against the header, so a file cut short is found before any tensor is read.
    """
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= min(size - 8, 100 * 2**20):
                raise ValueError(f"header length {n} in a file of {size} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        ends = [info["data_offsets"][1] for info in header.values()]
        if 8 + n + max(ends, default=0) > size:
            raise ValueError(f"{size} bytes, the header describes {8 + n + max(ends)}")
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{file} is not a complete safetensors file ({e}); a download or copy cut short? copy it "
                         "again") from None
    return header, 8 + n


def read_tensor(f, info: dict, data_start: int) -> torch.Tensor:
    """One tensor's bytes read into fresh memory (its own, not a view of the file)."""
    start, end = info["data_offsets"]
    buf = bytearray(end - start)
    f.seek(data_start + start)
    if f.readinto(buf) != len(buf):
        raise ValueError(f"{f.name} is truncated")
    if not buf:
        return torch.empty(info["shape"], dtype=FLOAT_DTYPES[info["dtype"]])
    return torch.frombuffer(buf, dtype=FLOAT_DTYPES[info["dtype"]]).view(info["shape"])


def _listing(title: str, names: list[str]) -> str:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"{len(names)} {title} ({shown})"


def load_into(module: nn.Module, path, dtype: torch.dtype, device, tied: set[str] = frozenset()):
    """Replace every (meta) parameter of `module` by the checkpoint's tensor, converted to `dtype` on `device`.

    `tied` names parameters that mirror another one (a tied lm_head): not required, not loaded. Missing,
    unexpected and mis-shaped tensors are all reported in one error before anything is read.
    """
    files = {canonical_key(k): (k, f) for k, f in tensor_files(path).items()}
    params = dict(module.named_parameters(remove_duplicate=False))
    wanted = {k: p for k, p in params.items() if k not in tied}
    missing = sorted(k for k in wanted if k not in files)
    unexpected = sorted(k for k in files if k not in params)
    mismatched, not_float = [], []
    headers = {file: read_header(file) for file in {f for _, f in files.values()}}
    for name, (key, file) in files.items():
        if name not in wanted:
            continue
        info = headers[file][0].get(key)
        if info is None:
            missing.append(f"{key} (listed in {INDEX}, absent from {file.name})")
            continue
        if tuple(info["shape"]) != tuple(wanted[name].shape):
            mismatched.append(f"{key}: file {info['shape']} vs model {list(wanted[name].shape)}")
        if info["dtype"] not in FLOAT_DTYPES:  # e.g. a quantised checkpoint: converting would be garbage
            not_float.append(f"{key}: {info['dtype']}")
    problems = [_listing(t, n) for t, n in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                              ("mis-shaped tensors", mismatched),
                                              ("tensors not in a float dtype", not_float)) if n]
    if problems:
        raise ValueError(f"checkpoint {path} does not fit the model in its config.json: " + "; ".join(problems))
    for file, (header, data_start) in headers.items():  # one file open at a time
        with open(file, "rb") as f:
            for name, (key, tensor_file) in files.items():
                if tensor_file != file or name not in wanted:
                    continue
                tensor = read_tensor(f, header[key], data_start).to(device=device, dtype=dtype)
                owner, _, attr = name.rpartition(".")
                param = nn.Parameter(tensor, requires_grad=wanted[name].requires_grad)
                module.get_submodule(owner)._parameters[attr] = param


@contextmanager
def atomic_directory(path):
    """Yield a temporary sibling directory; on success it replaces `path` in (nearly) one step.

    A crash before the end leaves `path` untouched (the temporary folder is cleaned up on the next save).
    The old directory is renamed aside first, then the new one into place, then the old one removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    old = path.parent / f".{path.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():  # make the data durable before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_state(state: dict[str, torch.Tensor], config: dict, path, max_shard_bytes: int = 5 * 2**30,
               side_files_from=None):
    """Write config.json + safetensors shards (+ index when more than one) into `path`, atomically.

    `side_files_from`: a model directory whose tokenizer / preprocessor / generation files are copied along, so
    the result is a complete model directory that HF transformers and vLLM load.
    """
    shards, current, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += nbytes
    shards.append(current)
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with atomic_directory(path) as tmp:
        for name, shard in zip(names, shards):
            save_file({k: v.detach().to("cpu").contiguous() for k, v in shard.items()}, tmp / name, metadata={"format": "pt"})
        if len(shards) > 1:
            total = sum(v.numel() * v.element_size() for v in state.values())
            weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if side_files_from is not None:
            for name in SIDE_FILES:
                if (Path(side_files_from) / name).exists():
                    shutil.copyfile(Path(side_files_from) / name, tmp / name)
