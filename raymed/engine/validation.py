"""Validation inside training, sharded over the workers and scored as `raymed evaluate` scores.

Detectors: every validation volume (or `train.max_val_subjects` of them, spread over the split)
is mapped whole, post-processed with the run's `postprocess` settings and counted in one pixel
histogram inside the brain mask; the workers split the volumes and add their counts, so the
validation AUPRC is the number `raymed evaluate --split val` reports. Other phases pass their
own `Validator`, whose (sum, count) pairs are added over batches and workers.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.distributed as dist

from raymed.data.discovery import Case
from raymed.data.preprocess import prepare
from raymed.data.slices import SliceSet
from raymed.engine.inference import map_prepared
from raymed.errors import DataError
from raymed.evaluation.metrics import ScoreHistogram
from raymed.evaluation.postprocess import configure, smooth_map
from raymed.methods.base import Method, Validator

BATCH = 64


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective(tensor: torch.Tensor, run) -> torch.Tensor:
    """Run a collective on a copy of `tensor` on the backend's device (NCCL needs CUDA tensors)."""
    if not distributed():
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
    moved = tensor.to(device, copy=True)
    run(moved)
    return moved.to(tensor.device)


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    return _collective(tensor, lambda t: dist.all_reduce(t, op=op))


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s value of `tensor` on every worker (a decision taken once)."""
    return _collective(tensor, lambda t: dist.broadcast(t, src=src))


def gathered(obj) -> list:
    """`obj` from every worker, in rank order."""
    if not distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def validation_subjects(cases: list[Case], limit: int | None) -> list[Case]:
    """All validation cases, or `limit` of them evenly spread (subjects are sorted by name)."""
    if limit is None or limit >= len(cases):
        return list(cases)
    return [cases[i] for i in np.linspace(0, len(cases) - 1, limit).round().astype(int)]


class AnomalyValidation:
    """Pixel AUROC/AUPRC/[DICE] of the method's post-processed maps on this worker's share of
    the validation volumes (prepared once), combined over all workers."""

    def __init__(self, method: Method, cases: list[Case], skip_bad: bool, bins: int = 2**16):
        self.prepared = []
        for case in cases:
            try:
                self.prepared.append(prepare(case, method.config.data))
            except DataError:
                if not skip_bad:
                    raise
        self.bins = bins
        configure(method, method.config.postprocess)  # the residual's sign, once

    @torch.no_grad()
    def __call__(self, method: Method) -> dict:
        scored = []
        for prepared in self.prepared:
            amap = smooth_map(map_prepared(method, prepared).map, prepared.mask, method.config.postprocess)
            label = prepared.label if prepared.label is not None else np.zeros(prepared.mask.shape, np.uint8)
            scored.append((amap[prepared.mask], label[prepared.mask]))
        low = min((float(s.min()) for s, _ in scored if s.size), default=np.inf)
        high = max((float(s.max()) for s, _ in scored if s.size), default=-np.inf)
        bounds = all_reduce(torch.tensor([low, -high], dtype=torch.float64), dist.ReduceOp.MIN)
        low, high = float(bounds[0]), -float(bounds[1])
        if not np.isfinite(low):
            return {}
        hist = ScoreHistogram.spanning(low, high, self.bins)
        for scores, labels in scored:
            hist.add(scores, labels)
        counts = all_reduce(torch.from_numpy(np.stack([hist.pos, hist.neg])))
        hist.pos, hist.neg = counts[0].numpy(), counts[1].numpy()
        if not hist.positives:
            return {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            pixel = hist.metrics()
        return {f"val/{k}": pixel[k] for k in ("auroc", "auprc", "dice_best")}


@torch.no_grad()
def run_validator(validator: Validator, slices: SliceSet, fields: tuple[str, ...], device) -> dict:
    """Sum a `Validator`'s (sum, count) pairs over this worker's slices and every worker's."""
    sums: dict[str, list[float]] = {}
    for start in range(0, len(slices), BATCH):
        idx = np.arange(start, min(start + BATCH, len(slices)))
        for name, (total, count) in validator(slices.batch(idx, fields, device)).items():
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += float(total)
            acc[1] += float(count)
    merged: dict[str, list[float]] = {}
    for part in gathered(sums):
        for name, (total, count) in part.items():
            acc = merged.setdefault(name, [0.0, 0.0])
            acc[0] += total
            acc[1] += count
    return {f"val/{name}": total / count if count else float("nan") for name, (total, count) in merged.items()}
