"""Driver-side view of a run: one progress line per epoch and the run's `metrics.jsonl`.

Runs on the Ray Train controller (a `UserCallback`), so there is exactly one writer whatever
the number of workers, and worker restarts do not lose the log.
"""

from __future__ import annotations

import json
import math
import time

from ray.train import UserCallback

from raymed.data.io import exists, join, read_bytes, write_bytes_atomic


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def progress_line(metrics: dict, eta: float) -> str:
    losses = " ".join(f"{k.removeprefix('train/')}={v:.4g}" for k, v in metrics.items() if k.startswith("train/"))
    vals = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("val/"))
    return (f"[{metrics['phase']}] epoch {metrics['epoch']}/{metrics['epochs']} step {metrics['step']} "
            f"{losses} {vals} | {metrics['slices_per_s']:.0f} slices/s | ETA {format_seconds(eta)}").replace("  ", " ")


class ProgressCallback(UserCallback):
    """Prints progress with throughput and ETA; appends every report to `RUN/metrics.jsonl`."""

    def __init__(self, run_uri: str):
        self.run_uri = run_uri
        self.log_uri = join(run_uri, "metrics.jsonl")

    def after_report(self, run_context, metrics, checkpoint):
        report = dict(metrics[0]) if metrics else {}
        if "phase" not in report:
            return
        eta = report["epoch_s"] * report["epochs_left"]
        print(progress_line(report, eta), flush=True)
        report["time"] = time.time()
        if checkpoint is not None:
            report["checkpoint"] = checkpoint.path
        old = read_bytes(self.log_uri) if exists(self.log_uri) else b""
        write_bytes_atomic(self.log_uri, old + (json.dumps(report, default=float) + "\n").encode())
