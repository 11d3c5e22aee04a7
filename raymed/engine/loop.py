"""The per-worker training function run by Ray Train: one loop for every method and phase.

Each phase trains on its own data (its split, healthy or all slices, k labelled subjects): each
worker's share, read into memory or streamed from a prepared dataset (`raymed.engine.feed`);
every worker takes the same number of steps per epoch, so DDP's collectives line up. The method's
modules stay bare: each optimizer's modules sit inside one DDP wrapper whose forward runs the
update's loss, so their gradients are all-reduced however the method calls them. Validation is
sharded over the workers; early stopping is decided on rank 0 and broadcast; rank 0 writes
checkpoints and every worker reports equally often.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import tempfile
import time

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from raymed.data.augment import augment, transforms
from raymed.data.discovery import Case, discover
from raymed.data.prepared import PreparedDataset
from raymed.data.slices import SliceSet, load_slices
from raymed.data.splits import assign_splits, select
from raymed.engine import checkpoint as ckpt
from raymed.engine.feed import MemoryShare, StreamShare, load_share, phase_fields
from raymed.engine.validation import (AnomalyValidation, all_reduce, broadcast, run_validator,
                                     validation_subjects)
from raymed.methods.base import Method, MethodConfig, Phase, Schedule
from raymed.methods.registry import build_config, method_class

PHASE_WEIGHT = 1e6  # checkpoint score = phase index × this + metric: later phases outrank earlier ones


def train_loop(job: dict) -> None:
    """Ray Train entry point. `job`: method, config (dict), source, pattern, in_channels, cpus_per_worker,
    and for a prepared dataset `streams`: phase index → the rows of each worker's split."""
    started = time.time()
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # the driver prints one line per epoch instead
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(job.get("cpus_per_worker", 1))))
    config = build_config(job["method"], job["config"])
    device = ray.train.torch.get_device()

    cases = assign_splits(discover(job["source"], job.get("pattern")), seed=config.data.split_seed)
    torch.manual_seed(config.train.seed)  # the same initial weights on every worker
    method = method_class(job["method"])(config, in_channels=job["in_channels"])
    torch.manual_seed(config.train.seed + rank)  # and different random draws in the losses
    method.nets.to(device)
    state = _restore(method)
    if state is None and config.train.init_from:
        ckpt.init_from(method, config.train.init_from, config.train.init_strict)
        method.nets.to(device)
    saved = state["position"] if state else {"phase": 0, "epoch": 0, "step": 0}
    position = dict(saved)
    phases = method.phases()
    val_cases = validation_subjects(select(cases, "val"), config.train.max_val_subjects)[rank::world]
    validation = Validation(method, val_cases, config)
    streams = {int(k): v for k, v in (job.get("streams") or {}).items()}
    prepared = PreparedDataset.open(job["source"]) if streams else None
    clock = {"started": started}
    for index in range(position["phase"], len(phases)):
        mid_phase = state is not None and index == saved["phase"] and saved["epoch"] > 0
        data = phases[index].data
        batch_size = data.batch_size or config.train.batch_size
        if streams:
            share = StreamShare(f"phase{index}", streams[index], batch_size, config.train.shuffle_buffer, prepared,
                                prepared.channels(config.data.modalities), device)
        else:
            share = MemoryShare(load_share(cases, data, config, rank, world), batch_size, device)
        PhaseRun(method, phases, index, share, validation, device, rank, world, clock).run(
            position, state if mid_phase else None)


def _restore(method: Method) -> dict | None:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        state = ckpt.load_state(folder)
    for name, weights in state["nets"].items():
        method.nets[name].load_state_dict(weights)
    return state


class Validation:
    """The validation data of this worker, loaded on first use, and the phase's validation run."""

    def __init__(self, method: Method, cases: list[Case], config: MethodConfig):
        self.method, self.cases, self.config = method, cases, config
        self.volumes: AnomalyValidation | None = None
        self.slices: dict[tuple, SliceSet] = {}

    def __call__(self, phase: Phase, device) -> dict:
        if phase.validation is None:
            return {}
        if phase.validation == "anomaly":
            if self.volumes is None:
                self.volumes = AnomalyValidation(self.method, self.cases, self.config.data.skip_bad)
            return self.volumes(self.method)
        fields = tuple(phase.data.fields)
        if fields not in self.slices:
            self.slices[fields] = load_slices(self.cases, self.config.data, min_brain=self.config.data.min_brain,
                                              skip_bad=self.config.data.skip_bad, tissue="tissue" in fields)
        return run_validator(phase.validation, self.slices[fields], fields, device)


class Objective(nn.Module):
    """The modules one optimizer trains; DDP wraps this, and its forward runs an update's loss,
    so every gradient of these modules is all-reduced however the method reaches them."""

    def __init__(self, nets: dict[str, nn.Module]):
        super().__init__()
        self.trained = nn.ModuleDict(nets)

    def forward(self, loss, batch):
        return loss(batch)


class PhaseRun:
    """One phase on one worker: data, wrappers, optimizers, schedulers, epochs, early stopping."""

    def __init__(self, method: Method, phases: list[Phase], index: int, share: MemoryShare | StreamShare,
                 validation: Validation, device, rank: int, world: int, clock: dict):
        self.method, self.phases, self.index, self.phase = method, phases, index, phases[index]
        self.config, self.validation, self.device, self.rank, self.world = method.config, validation, device, rank, world
        data = self.phase.data
        self.fields = phase_fields(data)
        self.share, self.batch_size, self.batches = share, share.batch_size, share.batches
        self.clock = clock  # when this worker started, and (once) how long until its first step
        self.augmentation = data.augment or self.config.train.augment
        self.early = {"best": None, "bad": 0, "best_epoch": 0}
        self.best_nets: dict | None = None

        for name, net in method.nets.items():
            trained = name in self.phase.trained
            net.requires_grad_(trained)
            net.train(trained)
        self.wrappers = {
            name: ray.train.torch.prepare_model(
                Objective({m: method.nets[m] for m in spec.modules}), move_to_device=False,
                parallel_strategy_kwargs={"find_unused_parameters": True})
            for name, spec in self.phase.optimizers.items()
        }
        self.optimizers = {name: optimizer(method, spec) for name, spec in self.phase.optimizers.items()}
        self.schedulers = {name: scheduler(self.optimizers[name], spec.schedule, self.phase.epochs)
                           for name, spec in self.phase.optimizers.items() if spec.schedule}
        amp = self.config.train.amp
        self.scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and amp == "fp16" else None

    def restore(self, state: dict) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][name])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        early = dict(state.get("early") or {})
        self.best_nets = early.pop("best_nets", None)
        self.early.update(early)

    def run(self, position: dict, state: dict | None) -> None:
        if state:
            self.restore(state)
        phase, config = self.phase, self.config
        total = sum(p.epochs for p in self.phases)
        for epoch in range(position["epoch"], phase.epochs):
            tic = time.perf_counter()
            logs = self.epoch(epoch, position)
            seconds = time.perf_counter() - tic
            for sched in self.schedulers.values():
                sched.step()
            position.update(phase=self.index, epoch=epoch + 1)
            done = sum(p.epochs for p in self.phases[:self.index]) + epoch + 1
            metrics = {"phase": phase.name, "epoch": epoch + 1, "epochs": phase.epochs, "step": position["step"],
                       "progress": done / total, "epochs_done": done, "epochs_left": total - done,
                       **{f"train/{k}": v for k, v in logs.items()},
                       "slices_per_s": self.batches * self.batch_size * self.world / max(seconds, 1e-9),
                       "epoch_s": seconds}
            if self.optimizers:
                metrics["lr"] = next(iter(self.optimizers.values())).param_groups[0]["lr"]
            metrics.update(self.footprint())
            if (epoch + 1) % config.train.val_every and epoch + 1 < phase.epochs:
                ray.train.report(metrics)
                continue
            with evaluation_mode(self.method):
                metrics.update(self.validation(phase, self.device))
            metrics["sync/param_diff"] = parameter_spread(self.method)
            stop = self.early_stopping(metrics, epoch + 1) or epoch + 1 == phase.epochs
            if stop and self.best_nets and phase.early_stopping and phase.early_stopping.restore_best:
                for name, weights in self.best_nets.items():
                    self.method.nets[name].load_state_dict(weights)
                metrics["restored_best_epoch"] = self.early["best_epoch"]
            metrics["checkpoint_score"] = self.score(metrics, epoch + 1, restored="restored_best_epoch" in metrics)
            self.report(metrics, position, boundary=stop)
            if stop:
                break
        position.update(phase=self.index + 1, epoch=0)

    def epoch(self, epoch: int, position: dict) -> dict:
        config = self.config
        seed = config.train.seed * 100003 + self.index * 1009 + epoch + self.rank * 7919
        pipeline = transforms(self.augmentation, self.fields, config.data.size, seed)
        sums: dict[str, list[float]] = {}
        for batch in self.share.epoch(seed, self.fields):
            batch = augment(batch, pipeline)
            for update in self.phase.updates:
                if position["step"] % update.every:
                    continue
                for k, v in self.step(update, batch, position["step"]).items():
                    acc = sums.setdefault(k, [0.0, 0])
                    acc[0] += v
                    acc[1] += 1
            position["step"] += 1
            self.clock.setdefault("first_step", time.time() - self.clock["started"])
        return {k: total / n for k, (total, n) in sums.items()}

    def footprint(self) -> dict:
        """The largest peak resident memory of any worker (MB), the largest private memory now
        (MB, Linux: resident memory less the pages it shares, such as Ray's object store, which
        streamed blocks pass through) and, in the first epoch after the workers start, the
        longest any took from starting to its first step (s)."""
        first = "reported" not in self.clock
        mine = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, private_mb(),
                self.clock["first_step"] if first else 0]
        peak, private, startup = all_reduce(torch.tensor(mine, dtype=torch.float64), dist.ReduceOp.MAX).tolist()
        self.clock["reported"] = True
        return {"memory/peak_rss_mb": peak, **({"memory/private_mb": private} if private >= 0 else {}),
                **({"startup_s": startup} if first else {})}

    def step(self, update, batch, step: int) -> dict:
        """One optimizer step: only this optimizer's modules take gradients."""
        mine = set(self.phase.optimizers[update.optimizer].modules)
        for name in self.phase.trained:
            self.method.nets[name].requires_grad_(name in mine)
        opt = self.optimizers[update.optimizer]
        opt.zero_grad(set_to_none=True)
        with autocast(self.device, self.config.train.amp):
            loss, logs = self.wrappers[update.optimizer](update.loss, batch)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{self.method.name}/{self.phase.name}: loss became {loss.item()} at step {step}")
        scaler = self.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(opt)
        if self.config.train.grad_clip:
            params = [p for group in opt.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.config.train.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        return logs

    def early_stopping(self, metrics: dict, epoch: int) -> bool:
        """Track the phase metric; True when early stopping ends the phase (rank 0's decision)."""
        phase, rule = self.phase, self.phase.early_stopping
        value = metrics.get(phase.metric)
        if value is None or not math.isfinite(value):
            return False
        best = self.early["best"]
        sign = 1 if phase.mode == "max" else -1
        margin = rule.min_delta if rule else 0.0
        if best is None or sign * (value - best) > margin:
            self.early.update(best=value, bad=0, best_epoch=epoch)
            if rule and rule.restore_best:
                self.best_nets = {m: {k: v.detach().to("cpu", copy=True) for k, v in self.method.nets[m].state_dict().items()}
                                  for m in phase.trained}
        else:
            self.early["bad"] += 1
        stop = broadcast(torch.tensor([bool(rule and self.early["bad"] >= rule.patience)], dtype=torch.int32))
        if stop.item():
            metrics["stopped"] = (f"early stopping: {phase.metric} did not improve for {rule.patience} "
                                  f"validation(s); best {self.early['best']:.4g} at epoch {self.early['best_epoch']}")
        return bool(stop.item())

    def score(self, metrics: dict, epoch: int, restored: bool) -> float:
        """Rank checkpoints: phase first, then the phase metric (or recency when it has none)."""
        value = self.early["best"] if restored else metrics.get(self.phase.metric)
        if value is None or not math.isfinite(value):
            return self.index * PHASE_WEIGHT - 1e5 + epoch / self.phase.epochs
        return self.index * PHASE_WEIGHT + (value if self.phase.mode == "max" else -value)

    def report(self, metrics: dict, position: dict, boundary: bool) -> None:
        """Checkpoint (rank 0) and report (every rank). At a phase boundary the checkpoint points at
        the next phase and holds no optimizer state: the next phase builds its own."""
        if self.rank:
            ray.train.report(metrics)
            return
        early = {**self.early, **({"best_nets": self.best_nets} if self.best_nets else {})}
        with tempfile.TemporaryDirectory() as folder:
            if boundary:
                ckpt.save(folder, self.method, {}, None, {**position, "phase": self.index + 1, "epoch": 0}, metrics)
            else:
                ckpt.save(folder, self.method, self.optimizers, self.scaler, dict(position), metrics,
                          self.schedulers, early)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"checkpoint_{position['step']:09d}")


def optimizer(method: Method, spec) -> torch.optim.Optimizer:
    """Adam/AdamW over the spec's modules, one parameter group per module (its own lr)."""
    rates = spec.lr if isinstance(spec.lr, dict) else {m: spec.lr for m in spec.modules}
    groups = [{"params": list(method.nets[m].parameters()), "lr": rates[m]} for m in spec.modules]
    cls = torch.optim.AdamW if spec.algorithm == "adamw" else torch.optim.Adam
    return cls(groups, betas=spec.betas, weight_decay=spec.weight_decay, amsgrad=spec.amsgrad)


def scheduler(opt: torch.optim.Optimizer, schedule: Schedule, epochs: int):
    if schedule.kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    if schedule.kind == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=schedule.step_size, gamma=schedule.gamma)
    decay = max(epochs - schedule.hold, 1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 - max(0, e - schedule.hold) / decay)


def parameter_spread(method: Method) -> float:
    """Largest difference between workers of any parameter tensor's sum and sum of squares:
    0 when the ranks hold the same weights (a drift check that costs two all-reduces)."""
    params = [p.detach().double() for p in method.nets.parameters()]
    if not params:
        return 0.0
    finger = torch.stack([torch.stack([p.sum(), p.pow(2).sum()]) for p in params]).flatten().cpu()
    high, low = all_reduce(finger.clone(), dist.ReduceOp.MAX), -all_reduce(-finger, dist.ReduceOp.MAX)
    return float((high - low).abs().max())


@contextlib.contextmanager
def evaluation_mode(method: Method):
    """Eval mode and no gradients for validation; the modules' training modes come back after."""
    modes = {name: net.training for name, net in method.nets.items()}
    method.nets.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for name, net in method.nets.items():
            net.train(modes[name])


def autocast(device, amp: str):
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def private_mb() -> float:
    """This process's anonymous resident memory (MB) from /proc; -1 where there is none."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return -1.0
