"""Training throughput of the `ae` step inside Ray Train (1 worker) vs a bare PyTorch loop.

Both run the same method, the same healthy slices of the demo cohort, the same batch size and
the same number of threads; the ratio (Ray Train slices/s ÷ bare slices/s) is the engine's
overhead. Usage: python benchmarks/train_throughput.py [--size 64] [--epochs 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from raymed.data.demo import build_demo_cohort
from raymed.data.discovery import discover
from raymed.data.slices import load_slices
from raymed.data.splits import assign_splits, select
from raymed.engine.trainer import TrainRequest, train
from raymed.methods.registry import build_config, method_class


def bare_loop(config, slices, epochs: int, threads: int) -> list[float]:
    """Slices/s per epoch of the plain PyTorch loop: same step, same shuffling, no Ray."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    method = method_class("ae")(config, slices.image.shape[1])
    (phase,) = method.phases()
    spec = phase.optimizers["adam"]
    opt = torch.optim.Adam(method.nets["autoencoder"].parameters(), lr=spec.lr, betas=spec.betas)
    size = config.train.batch_size
    batches = len(slices) // size
    rates = []
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(len(slices))
        tic = time.perf_counter()
        for b in range(batches):
            idx = np.sort(order[b * size:(b + 1) * size])
            opt.zero_grad(set_to_none=True)
            loss, _ = phase.updates[0].loss({"image": torch.from_numpy(slices.image[idx])})
            loss.backward()
            opt.step()
        rates.append(batches * size / (time.perf_counter() - tic))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="raymed-bench-"))
    build_demo_cohort(work / "cohort", subjects=args.subjects, size=args.size, seed=0)
    config = build_config("ae", overrides={"data.size": args.size, "epochs": args.epochs,
                                           "train.batch_size": args.batch_size, "train.val_every": args.epochs})
    cases = assign_splits(discover(str(work / "cohort")), seed=config.data.split_seed)
    slices = load_slices(select(cases, "train"), config.data, healthy_only=True)

    bare = bare_loop(config, slices, args.epochs, args.threads)
    ray.init(num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=False)
    train(TrainRequest(method="ae", source=str(work / "cohort"), config=config, name="bench",
                       storage=str(work / "runs"), workers=1, cpus_per_worker=args.threads))
    log = [json.loads(line) for line in open(work / "runs" / "bench" / "metrics.jsonl")]
    in_ray = [r["slices_per_s"] for r in log]
    # the first epoch of each includes warm-up (allocator, thread pools): compare the rest
    bare_rate, ray_rate = float(np.median(bare[1:])), float(np.median(in_ray[1:]))
    print(json.dumps({"slices": len(slices), "size": args.size, "batch_size": args.batch_size,
                      "threads": args.threads, "epochs": args.epochs,
                      "bare_pytorch_slices_per_s": round(bare_rate, 1),
                      "ray_train_slices_per_s": round(ray_rate, 1),
                      "ratio_ray_train_over_bare": round(ray_rate / bare_rate, 3)}, indent=2))


if __name__ == "__main__":
    main()
