"""Training from a prepared dataset vs from the files, as the cohort grows.

For each cohort size this builds a demo cohort, prepares it (`raymed data prepare`), and trains
`ae` twice with the same workers, config and seed: once reading the files into memory (the
baseline: every worker loads and preprocesses its subjects, then holds them) and once streaming
the prepared records through Ray Data. It prints, per path: the peak resident memory of the most
loaded training worker, the time from a worker starting to its first step, and training slices/s
(median over the epochs after the first), with prepared ÷ in-memory ratios, and each path's peak
memory at the largest cohort over the smallest.

Usage: python benchmarks/data_scale.py [--subjects 16 64 256] [--size 64] [--epochs 3] [--workers 2]
       [--modalities flair t1 t2] [--ray-cpus N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ray

from raymed.data.demo import build_demo_cohort
from raymed.data.prepared import prepare_dataset
from raymed.engine.trainer import TrainRequest, train
from raymed.methods.registry import build_config


def run(source: str, storage: Path, name: str, config, workers: int) -> dict:
    """Train once; the footprint the engine reports (largest over workers) and throughput."""
    train(TrainRequest(method="ae", source=source, config=config.model_copy(deep=True), name=name,
                       storage=str(storage), workers=workers, keep_checkpoints=1))
    log = [json.loads(line) for line in open(storage / name / "metrics.jsonl")]
    return {"peak_rss_mb": max(r["memory/peak_rss_mb"] for r in log),
            "private_mb": max(r["memory/private_mb"] for r in log), "startup_s": log[0]["startup_s"],
            "slices_per_s": statistics.median(r["slices_per_s"] for r in log[1:] or log)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--modalities", nargs="+", default=["flair", "t1", "t2"])
    parser.add_argument("--ray-cpus", type=int, help="logical CPUs of the local Ray (default: --workers, at least 2)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="raymed-data-scale-"))
    ray.init(num_cpus=args.ray_cpus or max(2, args.workers), include_dashboard=False, log_to_driver=False)
    config = build_config("ae", overrides={
        "data.size": args.size, "data.modalities": args.modalities, "epochs": args.epochs,
        "train.batch_size": args.batch_size, "train.val_every": args.epochs, "train.max_val_subjects": 1})
    rows = []
    for n in args.subjects:
        cohort, prepared = work / f"cohort-{n}", str(work / f"prepared-{n}")
        build_demo_cohort(cohort, subjects=n, size=args.size, seed=0)
        tic = time.perf_counter()
        prepare_dataset(str(cohort), prepared, config.data.model_copy(), report=lambda line: None)
        prepare_s = time.perf_counter() - tic
        memory = run(str(cohort), work / "runs", f"memory-{n}", config, args.workers)
        streamed = run(prepared, work / "runs", f"prepared-{n}", config, args.workers)
        rows.append({"subjects": n, "prepare_s": round(prepare_s, 1),
                     **{f"memory_{k}": round(v, 1) for k, v in memory.items()},
                     **{f"prepared_{k}": round(v, 1) for k, v in streamed.items()},
                     **{f"ratio_{k}": round(streamed[k] / memory[k], 3) for k in memory}})
        print(json.dumps(rows[-1]), flush=True)
    first, last = rows[0], rows[-1]
    print(json.dumps({
        "size": args.size, "modalities": args.modalities, "workers": args.workers, "ray_cpus": args.ray_cpus,
        "epochs": args.epochs, "batch_size": args.batch_size,
        **{f"{path}_{key}_growth_{first['subjects']}_to_{last['subjects']}":
           round(last[f"{path}_{key}_mb"] / first[f"{path}_{key}_mb"], 3)
           for path in ("memory", "prepared") for key in ("peak_rss", "private")}},
        indent=2))
    header = ("| subjects | path | peak RSS per worker (MB) | private memory per worker (MB) | time to first step (s) "
              "| slices/s |\n| --- | --- | --- | --- | --- | --- |")
    print(header)
    for row in rows:
        for path in ("memory", "prepared"):
            print(f"| {row['subjects']} | {'in memory' if path == 'memory' else 'prepared'} | "
                  f"{row[f'{path}_peak_rss_mb']:.0f} | {row[f'{path}_private_mb']:.0f} | {row[f'{path}_startup_s']:.1f} | "
                  f"{row[f'{path}_slices_per_s']:.0f} |")


if __name__ == "__main__":
    main()
