"""`raymed train` and `raymed finetune`."""

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


def add_classes_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", type=int, nargs="+", metavar="VALUE",
                        help="segment these label values apart (multi-class, e.g. --classes 1 2 4 for BraTS); "
                             "default: the whole lesion as one class")


def add_run_arguments(parser: argparse.ArgumentParser, default_name: str) -> None:
    """Scaling, where the run goes, and restarts: what every command that trains takes."""
    add_scaling_arguments(parser)
    parser.add_argument("--storage", default="runs", help="local folder or s3://bucket/prefix (default ./runs)")
    parser.add_argument("--name", help=f"run name (default {default_name})")
    parser.add_argument("--max-failures", type=int, default=1,
                        help="restarts from the last checkpoint after a worker crash (default 1)")
    parser.add_argument("--resume", action="store_true", help="continue the run STORAGE/NAME from its last checkpoint")


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
    add_run_arguments(train, "METHOD-YYYYmmdd-HHMMSS")
    train.set_defaults(run=run_train)

    finetune = sub.add_parser(
        "finetune", help="fine-tune a trained detector as a segmenter on a few labelled subjects",
        description="Train RUN's method as a segmenter (task=segment: a new head, soft Dice + cross-entropy) on "
                    "K labelled subjects of the train split, starting from RUN's weights (all but the head), "
                    "keeping the weights of lowest validation loss. --from-scratch trains the same network "
                    "from random weights, the baseline it is compared with. Writes an ordinary run folder; "
                    "served, its `detect` returns the lesion probability map.")
    finetune.add_argument("pretrained", metavar="RUN", help="the pre-trained run folder, local or s3://")
    finetune.add_argument("--data", required=True, help="folder, manifest or s3:// URI with lesion labels")
    finetune.add_argument("--labelled", default="5", help="labelled subjects to train on, or 'all' (default 5)")
    finetune.add_argument("--from-scratch", action="store_true", help="do not load RUN's weights (the baseline)")
    add_classes_argument(finetune)
    finetune.add_argument("--pattern", help="filename pattern for a flat folder, e.g. '{subject}_{modality}.nii.gz'")
    finetune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override one config key, e.g. --set epochs=30 --set labelled_seed=1")
    add_run_arguments(finetune, "METHOD-finetune-K-YYYYmmdd-HHMMSS")
    finetune.set_defaults(run=run_finetune)


def resolve_config(method: str, config_file: str | None, sets: list[str]):
    from raymed.methods.registry import build_config, load_yaml

    base = load_yaml(config_file) if config_file else {}
    return build_config(method, base, parse_sets(sets))


def run_train(args: argparse.Namespace) -> int:
    from raymed.methods.registry import method_class

    method_class(args.method)
    config = resolve_config(args.method, args.config, args.set)
    return train_and_summarise(args, args.method, config, f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}")


def run_finetune(args: argparse.Namespace) -> int:
    from raymed.engine.finetune import finetune_config, parse_labelled

    labelled = parse_labelled(args.labelled)
    method, config = finetune_config(args.pretrained, labelled, args.from_scratch, parse_sets(args.set), args.classes)
    kind = "scratch" if args.from_scratch else "finetune"
    return train_and_summarise(args, method, config,
                               f"{method}-{kind}-{args.labelled}-{time.strftime('%Y%m%d-%H%M%S')}")


def train_and_summarise(args: argparse.Namespace, method: str, config, default_name: str) -> int:
    """Train with the command line's data, scaling and storage; print where the result is."""
    from raymed.engine.trainer import TrainRequest, train

    if args.resume and not args.name:
        raise ConfigError("--resume needs the --name of the run to continue")
    request = TrainRequest(
        method=method, source=args.data, pattern=args.pattern, config=config,
        name=args.name or default_name, storage=args.storage,
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
