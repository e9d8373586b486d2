"""The run log: metrics.jsonl (appended per step, rewound on resume, read back for curve.png) and the stop flag.

Pipeline: after the whole data -> processor -> model -> sampler -> rewards -> ppo line; a part of the scaffold (run.py).
"""
import json
import os
import signal
from pathlib import Path


class StopFlag:
    """First Ctrl-C (or SIGTERM): the loop finishes its step, saves a checkpoint and exits. Second: stop at once."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to stop now, without saving)", flush=True)


def append_metrics(out_dir, record: dict):
    """One JSON line in out_dir/metrics.jsonl (what curve.png and a resumed run's history are drawn from)."""
    with open(Path(out_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl file (a half-written last line, after a kill, is skipped)."""
    records = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def rewind_metrics(out_dir, step: int):
    """Drop metrics.jsonl records after `step`: a resumed run redoes those steps and logs them again."""
    path = Path(out_dir) / "metrics.jsonl"
    if path.exists():
        keep = [json.dumps(r) + "\n" for r in read_metrics(path) if r.get("step", 0) <= step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)
