"""Driver side of training: check everything that can be checked before a worker starts,
then run the method's loop on Ray Train (`TorchTrainer`) and record where the best checkpoint is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import yaml
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raymed.console import start_ray, train_logging
from raymed.data.discovery import discover
from raymed.data.io import exists, join, read_bytes, write_bytes_atomic
from raymed.data.prepared import PreparedDataset
from raymed.data.slices import load_slices
from raymed.data.splits import assign_splits, select
from raymed.engine.checkpoint import init_from, resolve
from raymed.engine.feed import phase_subjects, streams
from raymed.engine.loop import train_loop
from raymed.engine.progress import ProgressCallback, follow
from raymed.engine.storage import ray_storage, storage_uri
from raymed.errors import ConfigError, DataError
from raymed.methods.base import MethodConfig
from raymed.methods.registry import method_class


@dataclass
class TrainRequest:
    method: str
    source: str
    config: MethodConfig
    name: str
    storage: str = "runs"
    pattern: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    max_failures: int = 0
    resume: bool = False
    keep_checkpoints: int = 2
    callbacks: tuple = ()

    def __post_init__(self):
        # Ray workers and the controller run in other working directories: make local paths absolute
        self.source = absolute(self.source)
        self.storage = absolute(self.storage)

    @property
    def run_uri(self) -> str:
        return join(self.storage, self.name)


def absolute(uri: str) -> str:
    return uri if "://" in str(uri) else os.path.abspath(uri)


def preflight(request: TrainRequest) -> tuple[int, list]:
    """Fail fast on the driver: data found, modalities pinned, a train split with healthy slices,
    enough subjects (labelled ones too), `init_from` readable.

    Pins `config.data.modalities` (the first subject's, sorted, unless given) so the run, its
    checkpoints and the endpoint agree on which channel is which (a prepared dataset's recorded
    ones, whose settings the run must share); returns the channel count and the cases.
    Stops reading at the first train subject that has healthy slices.
    """
    config = request.config
    phases = method_class(request.method)(config, 1).phases()
    if not phases:
        raise ConfigError(f"{request.method} has nothing to train: evaluate it directly "
                          f"(raymed evaluate {request.method})")
    cases = assign_splits(discover(request.source, request.pattern), seed=config.data.split_seed)
    if cases[0].prepared:
        PreparedDataset.open(cases[0].prepared).adopt(config.data)
    if not config.data.modalities:
        config.data.modalities = sorted(cases[0].images)
    train = select(cases, "train")
    if not train:
        raise DataError(f"{request.source}: no subjects in the train split")
    for phase in phases:
        phase_subjects(cases, phase.data)
    channels = len(config.data.modalities)
    if config.train.init_from:
        config.train.init_from = resolve(config.train.init_from)
        print(init_from(method_class(request.method)(config, channels), config.train.init_from,
                        config.train.init_strict), flush=True)
    for case in train:
        slices = load_slices([case], config.data, healthy_only=True, min_brain=config.data.min_brain,
                             skip_bad=config.data.skip_bad)
        if len(slices):
            return channels, cases
    raise DataError(f"{request.source}: no healthy training slices in {len(train)} train subjects "
                    "(every brain slice has lesion voxels, or no slice has enough brain)")


def run_exists(run_uri: str) -> bool:
    return exists(join(run_uri, "config.yaml"))


def build_trainer(request: TrainRequest) -> TorchTrainer:
    """Check the request and build its `TorchTrainer` (also used per trial by Ray Tune); from a
    prepared dataset, with one Ray Dataset per phase for the workers to stream."""
    in_channels, cases = preflight(request)
    if run_exists(request.run_uri) and not request.resume:
        raise ConfigError(f"run {request.run_uri} already exists: pass --resume to continue it or choose another --name")
    if request.resume and not run_exists(request.run_uri):
        raise ConfigError(f"--resume: no run at {request.run_uri}")
    if request.resume:
        saved = yaml.safe_load(read_bytes(join(request.run_uri, "config.yaml")))
        if saved["method"] != request.method:
            raise ConfigError(f"--resume: run {request.run_uri} is a {saved['method']} run, not {request.method}")
    write_bytes_atomic(join(request.run_uri, "config.yaml"), yaml.safe_dump(
        {"method": request.method, "source": request.source, "pattern": request.pattern,
         "config": request.config.model_dump(mode="json")}, sort_keys=False).encode())
    storage_path, storage_fs = ray_storage(request.storage)
    datasets, rows = {}, {}
    if cases[0].prepared:
        start_ray()
        phases = method_class(request.method)(request.config, in_channels).phases()
        datasets, rows = streams(request.source, cases, phases, request.config, request.workers)
    use_gpu = request.gpus_per_worker > 0
    resources = {"CPU": request.cpus_per_worker, **({"GPU": request.gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        train_loop,
        train_loop_config={"method": request.method, "config": request.config.model_dump(mode="json"),
                           "source": request.source, "pattern": request.pattern, "in_channels": in_channels,
                           "cpus_per_worker": request.cpus_per_worker, "streams": rows},
        datasets=datasets,
        scaling_config=ScalingConfig(num_workers=request.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=request.name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=request.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=request.keep_checkpoints,
                                               checkpoint_score_attribute="checkpoint_score",
                                               checkpoint_score_order="max"),
            callbacks=[ProgressCallback(request.run_uri), *request.callbacks],
            logging_config=train_logging(),
        ),
    )


def train(request: TrainRequest):
    """Run training; returns the Ray `Result` after writing `RUN/result.json`."""
    trainer = build_trainer(request)
    start_ray()
    warn_if_short(request)
    with follow(request.run_uri, out=lambda line: print(line, flush=True)):
        result = trainer.fit()
    record_result(request, result)
    return result


def warn_if_short(request: TrainRequest) -> None:
    """Ray Train waits for its workers' resources: say so when the cluster has fewer right now
    (an autoscaling cluster adds nodes; a fixed one waits for ever)."""
    import ray

    have = ray.cluster_resources()
    needs = {"CPU": request.workers * request.cpus_per_worker, "GPU": request.workers * request.gpus_per_worker}
    short = [f"{need:g} {name}s (the cluster has {have.get(name, 0):g})"
             for name, need in needs.items() if need > have.get(name, 0)]
    if short:
        print(f"warning: {request.workers} workers need {' and '.join(short)}: waiting for the cluster to grow",
              flush=True)


def record_result(request: TrainRequest, result) -> dict:
    """Write `RUN/result.json`: best and latest checkpoint URIs with their metrics."""
    best = result.get_best_checkpoint(metric="checkpoint_score", mode="max") if result.best_checkpoints else None
    best_metrics = next((m for c, m in result.best_checkpoints if best is not None and c.path == best.path), {})
    summary = {
        "method": request.method,
        "best_checkpoint": storage_uri(request.storage, best.path) if best else None,
        "best_metrics": {k: v for k, v in best_metrics.items() if isinstance(v, (int, float, str))},
        "latest_checkpoint": storage_uri(request.storage, result.checkpoint.path) if result.checkpoint else None,
        "final_metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str))},
    }
    write_bytes_atomic(join(request.run_uri, "result.json"), json.dumps(summary, indent=2, default=float).encode())
    return summary
