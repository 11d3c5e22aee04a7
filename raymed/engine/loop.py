"""The per-worker training function run by Ray Train: one loop for every method.

Each worker prepares only its shard of the training subjects; all workers take the same
number of steps per epoch (the smallest shard's), so DDP's collectives line up. Rank 0
validates on the validation split and writes the checkpoint; every worker reports equally often.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
import tempfile
import time

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raymed.data.discovery import discover
from raymed.data.slices import SliceSet, load_slices
from raymed.data.splits import assign_splits, select
from raymed.engine import checkpoint as ckpt
from raymed.evaluation.metrics import pixel_metrics
from raymed.methods.base import Method, Phase
from raymed.methods.registry import build_config, method_class


def train_loop(job: dict) -> None:
    """Ray Train entry point. `job`: method, config (dict), source, pattern, cpus_per_worker."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # the driver prints one line per epoch instead
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(job.get("cpus_per_worker", 1))))
    config = build_config(job["method"], job["config"])
    torch.manual_seed(config.train.seed + rank)
    device = ray.train.torch.get_device()

    cases = assign_splits(discover(job["source"], job.get("pattern")), seed=config.data.split_seed)
    shard = select(cases, "train")[rank::world]
    train = load_slices(shard, config.data, healthy_only=True, min_brain=config.data.min_brain,
                        skip_bad=config.data.skip_bad)
    val = load_slices(select(cases, "val"), config.data, min_brain=config.data.min_brain,
                      skip_bad=config.data.skip_bad) if rank == 0 else None

    method = method_class(job["method"])(config, in_channels=job["in_channels"])
    method.nets.to(device)
    state = _restore(method)
    position = state["position"] if state else {"phase": 0, "epoch": 0, "step": 0}
    phases = method.phases()
    batches = _common_batches(len(train), config.train.batch_size, world, device)
    total_epochs = sum(p.epochs for p in phases)

    for index in range(position["phase"], len(phases)):
        phase = phases[index]
        start_epoch = position["epoch"] if index == position["phase"] else 0
        wrapped, optimizers, scaler = _setup_phase(method, phase, device, config.train.amp)
        if state and index == state["position"]["phase"]:
            for name, opt in optimizers.items():
                opt.load_state_dict(state["optimizers"][name])
            if scaler is not None and state["scaler"]:
                scaler.load_state_dict(state["scaler"])
        for epoch in range(start_epoch, phase.epochs):
            tic = time.perf_counter()
            logs = _run_epoch(method, phase, wrapped, optimizers, scaler, train, batches, position, device,
                              config, seed=config.train.seed * 100003 + index * 1009 + epoch + rank * 7919)
            seconds = time.perf_counter() - tic
            position.update(phase=index, epoch=epoch + 1)
            done = sum(p.epochs for p in phases[:index]) + epoch + 1
            metrics = {"phase": phase.name, "epoch": epoch + 1, "epochs": phase.epochs, "step": position["step"],
                       "progress": done / total_epochs, "epochs_done": done, "epochs_left": total_epochs - done, **{f"train/{k}": v for k, v in logs.items()},
                       "slices_per_s": batches * config.train.batch_size * world / max(seconds, 1e-9),
                       "epoch_s": seconds}
            last = epoch + 1 == phase.epochs
            if not ((epoch + 1) % config.train.val_every == 0 or last):
                ray.train.report(metrics)
                continue
            if rank == 0 and phase.validate and val is not None and len(val):
                with _raw(method, wrapped):
                    metrics.update(validate(method, val, config.train.max_val_slices, device))
            # later phases outrank earlier ones; inside a phase the validation AUPRC (else recency) decides
            metrics["checkpoint_score"] = index * 10 + metrics.get("val/auprc", (epoch + 1) / phase.epochs)
            if rank == 0:
                with tempfile.TemporaryDirectory() as folder:
                    pos = {**position, "phase": index + 1 if last else index, "epoch": 0 if last else epoch + 1}
                    ckpt.save(folder, method, optimizers, scaler, pos, metrics)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                                     checkpoint_dir_name=f"checkpoint_{position['step']:09d}")
            else:
                ray.train.report(metrics)
        _unwrap_all(method, wrapped)


def _restore(method: Method) -> dict | None:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        state = ckpt.load_state(folder)
    for name, weights in state["nets"].items():
        method.nets[name].load_state_dict(weights)
    return state


def _common_batches(n: int, batch_size: int, world: int, device) -> int:
    """Batches per epoch that every worker can supply (the smallest shard decides)."""
    mine = torch.tensor([n // batch_size if n >= batch_size else min(n, 1)], device=device)
    if world > 1:
        dist.all_reduce(mine, op=dist.ReduceOp.MIN)
    if int(mine.item()) == 0:
        raise RuntimeError("a worker has no healthy training slices in its shard; use fewer workers")
    return int(mine.item())


def _setup_phase(method: Method, phase: Phase, device, amp: str):
    """Wrap the phase's trained modules for DDP, freeze the rest, build optimizers."""
    wrapped = {}
    for name, net in method.nets.items():
        trained = name in phase.trained
        net.requires_grad_(trained)
        net.train(trained)
        if trained:
            wrapped[name] = ray.train.torch.prepare_model(net, move_to_device=False)
    optimizers = {
        name: torch.optim.Adam([p for m in spec.modules for p in method.nets[m].parameters()], lr=spec.lr,
                               betas=spec.betas, weight_decay=spec.weight_decay)
        for name, spec in phase.optimizers.items()
    }
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and amp == "fp16" else None
    _swap(method, wrapped)
    return wrapped, optimizers, scaler


def _swap(method: Method, nets: dict) -> None:
    for name, net in nets.items():
        method.nets[name] = net


def _unwrap_all(method: Method, wrapped: dict) -> None:
    _swap(method, {name: ckpt.unwrap(net) for name, net in wrapped.items()})


@contextlib.contextmanager
def _raw(method: Method, wrapped: dict):
    """Use the bare modules (no DDP collectives) and eval mode, e.g. for rank-0 validation."""
    _unwrap_all(method, wrapped)
    modes = {name: net.training for name, net in method.nets.items()}
    method.nets.eval()
    try:
        yield
    finally:
        for name, net in method.nets.items():
            net.train(modes[name])
        _swap(method, wrapped)


def _autocast(device, amp: str):
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _run_epoch(method, phase, wrapped, optimizers, scaler, train: SliceSet, batches: int, position, device,
               config, seed: int) -> dict:
    order = np.random.default_rng(seed).permutation(len(train))
    size = config.train.batch_size
    sums: dict[str, float] = {}
    for b in range(batches):
        idx = np.sort(order[b * size:(b + 1) * size])
        batch = {"image": torch.from_numpy(train.image[idx]).to(device, non_blocking=True)}
        for update in phase.updates:
            if position["step"] % update.every:
                continue
            opt = optimizers[update.optimizer]
            opt.zero_grad(set_to_none=True)
            with _autocast(device, config.train.amp):
                loss, logs = update.loss(batch)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{method.name}/{phase.name}: loss became {loss.item()} at step {position['step']}")
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if config.train.grad_clip:
                params = [p for group in opt.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, config.train.grad_clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
                sums[f"_n_{k}"] = sums.get(f"_n_{k}", 0) + 1
        position["step"] += 1
    return {k: v / sums[f"_n_{k}"] for k, v in sums.items() if not k.startswith("_n_")}


@torch.no_grad()
def validate(method: Method, val: SliceSet, max_slices: int, device) -> dict:
    """Pixel AUROC/AUPRC inside the brain on validation slices (lesion slices first)."""
    chosen = np.sort(np.argsort(~val.lesion, kind="stable")[:max_slices])
    maps, scores = [], []
    for start in range(0, len(chosen), 64):
        amap, score = method.anomaly_map(torch.from_numpy(val.image[chosen[start:start + 64]]).to(device))
        maps.append(amap.float().cpu().numpy())
        scores.append(score.float().cpu().numpy())
    maps_all = np.concatenate(maps)
    mask = val.mask[chosen]
    out = {"val/score_healthy": float(np.concatenate(scores)[~val.lesion[chosen]].mean())
           if (~val.lesion[chosen]).any() else float("nan")}
    if val.lesion[chosen].any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            pm = pixel_metrics(maps_all[mask], val.label[chosen][mask])
        out.update({f"val/{k}": v for k, v in pm.items()})
    return out
