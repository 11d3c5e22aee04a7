"""A run's `metrics.jsonl` and the one progress line per epoch printed from it.

The log is written on the Ray Train controller (a `UserCallback`), so there is exactly one
writer whatever the number of workers, and worker restarts do not lose it. The driver follows
the log and prints the progress lines, so they reach the user whether or not Ray forwards its
processes' output, local or on a cluster.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time

from ray.train import UserCallback

from raymed.data.io import filesystem, join


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
    """Appends every report to `RUN/metrics.jsonl`."""

    def __init__(self, run_uri: str):
        self.run_uri = run_uri
        self.log_uri = join(run_uri, "metrics.jsonl")

    def after_report(self, run_context, metrics, checkpoint):
        report = dict(metrics[0]) if metrics else {}
        if "phase" not in report:
            return
        report["time"] = time.time()
        if checkpoint is not None:
            report["checkpoint"] = checkpoint.path
        fs, path = filesystem(self.log_uri)
        with fs.open(path, "ab") as log:  # one line per report, appended (not rewritten)
            log.write((json.dumps(report, default=float) + "\n").encode())


def describe(report: dict, last_step: int | None) -> list[str]:
    """The console lines for one report: a restart notice when training went back, the progress
    line, and why a phase stopped early."""
    lines = []
    if last_step is not None and report["step"] <= last_step:
        lines.append(f"[{report['phase']}] workers restarted from the last checkpoint (step {report['step']})")
    lines.append(progress_line(report, report["epoch_s"] * report["epochs_left"]))
    if "stopped" in report:
        lines.append(f"[{report['phase']}] {report['stopped']}")
    return lines


@contextlib.contextmanager
def follow(run_uri: str, interval: float = 0.5, out=print):
    """Print the progress lines of `RUN/metrics.jsonl` while the block runs (and its last lines)."""
    log_uri = join(run_uri, "metrics.jsonl")
    fs, path = filesystem(log_uri)
    state = {"offset": fs.size(path) if fs.exists(path) else 0, "step": None}
    done = threading.Event()

    def poll() -> None:
        with contextlib.suppress(FileNotFoundError):
            fs.invalidate_cache(path)
            with fs.open(path, "rb") as log:
                log.seek(state["offset"])
                data = log.read()
            complete = data[:data.rfind(b"\n") + 1]
            state["offset"] += len(complete)
            for line in complete.decode().splitlines():
                report = json.loads(line)
                for text in describe(report, state["step"]):
                    out(text)
                state["step"] = report["step"]

    def loop() -> None:
        while not done.wait(interval):
            poll()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        poll()
