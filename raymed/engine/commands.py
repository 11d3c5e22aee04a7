"""`raymed train`."""

from __future__ import annotations

import argparse
import json
import time

from raymed.data.io import join, read_bytes

from raymed.errors import ConfigError


def parse_sets(items: list[str]) -> dict:
    from raymed.methods.registry import parse_value

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        overrides[key.strip()] = parse_value(value)
    return overrides


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of config keys (as in `raymed train --help`)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, dotted for sections: --set lr=2e-4 --set data.size=64")


def add_scaling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP processes; default 1)")
    parser.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per worker (default 0: CPU)")
    parser.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs per worker (default 1)")


def register(sub: argparse._SubParsersAction) -> None:
    from raymed.methods.registry import METHODS

    train = sub.add_parser(
        "train", help="train a method with Ray Train",
        description="Train METHOD on the healthy training slices of a data source with Ray Train. "
                    "Progress (epoch, losses, throughput, ETA) is printed per epoch; the run folder "
                    "STORAGE/NAME holds config.yaml, metrics.jsonl, checkpoints and result.json.")
    train.add_argument("method", help=f"one of: {', '.join(sorted(METHODS))}")
    train.add_argument("--data", required=True, help="folder, manifest or s3:// URI (see `raymed data inspect`)")
    train.add_argument("--pattern", help="filename pattern for a flat folder, e.g. '{subject}_{modality}.nii.gz'")
    add_config_arguments(train)
    add_scaling_arguments(train)
    train.add_argument("--storage", default="runs", help="local folder or s3://bucket/prefix (default ./runs)")
    train.add_argument("--name", help="run name (default METHOD-YYYYmmdd-HHMMSS)")
    train.add_argument("--max-failures", type=int, default=1,
                       help="restarts from the last checkpoint after a worker crash (default 1)")
    train.add_argument("--resume", action="store_true", help="continue the run STORAGE/NAME from its last checkpoint")
    train.set_defaults(run=run_train)


def resolve_config(method: str, config_file: str | None, sets: list[str]):
    from raymed.methods.registry import build_config, load_yaml

    base = load_yaml(config_file) if config_file else {}
    return build_config(method, base, parse_sets(sets))


def run_train(args: argparse.Namespace) -> int:
    from raymed.engine.trainer import TrainRequest, train
    from raymed.methods.registry import method_class

    method_class(args.method)
    if args.resume and not args.name:
        raise ConfigError("--resume needs the --name of the run to continue")
    request = TrainRequest(
        method=args.method, source=args.data, pattern=args.pattern,
        config=resolve_config(args.method, args.config, args.set),
        name=args.name or f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}", storage=args.storage,
        workers=args.workers, gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures, resume=args.resume,
    )
    train(request)
    summary = json.loads(read_bytes(join(request.run_uri, "result.json")))
    print(f"run: {request.run_uri}")
    print(f"best checkpoint: {summary['best_checkpoint']}")
    shown = {k: round(v, 4) for k, v in summary["best_metrics"].items() if k.startswith("val/")}
    if shown:
        print(f"best validation metrics: {shown}")
    return 0
