"""`raymed tune`."""

from __future__ import annotations

import argparse
import time

from raymed.errors import ConfigError

# Settings a new sweep takes from the command line and a resumed one from its sweep.yaml.
SWEEP_SETTINGS = ("data", "space", "trials", "config", "set", "pattern", "metric", "mode", "workers_per_trial",
                  "cpus_per_worker", "gpus_per_trial", "max_concurrent", "search", "scheduler", "grace_period",
                  "reduction_factor", "max_failures", "seed")


def register(sub: argparse._SubParsersAction) -> None:
    from raymed.engine.commands import add_classes_argument, add_config_arguments
    from raymed.methods.registry import METHODS

    tune = sub.add_parser(
        "tune", help="sweep a method's hyperparameters with Ray Tune (Optuna TPE + ASHA)",
        description="Sweep METHOD's config over a search space: every trial is a Ray Train run of the base "
                    "config (--config/--set, as for `raymed train`) with the sampled keys; Optuna's TPE proposes "
                    "configs and ASHA stops trials whose metric falls behind. The sweep folder STORAGE/NAME gets "
                    "trials.csv, best_config.yaml (for `raymed train --config`), best.json, plots and optuna.db.")
    tune.add_argument("method", help=f"one of: {', '.join(sorted(METHODS))}")
    tune.add_argument("--data", help="folder, manifest or s3:// URI (see `raymed data inspect`)")
    tune.add_argument("--space", help="search space YAML, e.g. tune_spaces/METHOD.yaml")
    tune.add_argument("--trials", type=int, help="number of trials")
    tune.add_argument("--metric", help="metric to optimise (default val/auprc; any reported val/… or train/… key)")
    tune.add_argument("--mode", choices=("max", "min"), help="maximise or minimise the metric (default max)")
    tune.add_argument("--pattern", help="filename pattern for a flat folder, e.g. '{subject}_{modality}.nii.gz'")
    add_config_arguments(tune)
    tune.add_argument("--workers-per-trial", type=int, help="Ray Train workers per trial (default 1)")
    tune.add_argument("--cpus-per-worker", type=float, help="CPUs per Train worker (default 1)")
    tune.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, shared by its workers (default 0)")
    tune.add_argument("--max-concurrent", type=int,
                      help="trials at once (default: as many as the cluster's CPUs/GPUs hold)")
    tune.add_argument("--search", choices=("tpe", "random"), help="Optuna sampler (default tpe)")
    tune.add_argument("--scheduler", choices=("asha", "fifo"),
                      help="asha stops trials early; fifo runs every trial to the end (default asha)")
    tune.add_argument("--grace-period", type=int, help="epochs before ASHA may stop a trial (default 1)")
    tune.add_argument("--reduction-factor", type=float,
                      help="ASHA keeps the best 1/η of the trials at each rung (default 3)")
    tune.add_argument("--max-failures", type=int, help="restarts of a trial's Train run after a worker crash (default 0)")
    tune.add_argument("--seed", type=int, help="sampler seed (default 0)")
    tune.add_argument("--storage", default="sweeps", help="local folder or s3://bucket/prefix (default ./sweeps)")
    tune.add_argument("--name", help="sweep name (default METHOD-YYYYmmdd-HHMMSS)")
    tune.add_argument("--resume", action="store_true",
                      help="continue the interrupted sweep STORAGE/NAME with its saved settings")
    tune.set_defaults(run=run_tune)

    study = sub.add_parser(
        "study", help="studies made of many Ray Train runs (label-efficiency)",
        description="label-efficiency: fine-tune RUN as a segmenter and train the same network from scratch on "
                    "K labelled subjects for every K and seed (a grid of Ray Train runs that Ray Tune runs side "
                    "by side), evaluate each on the test split, and plot Dice and AP against K with the "
                    "unsupervised detector as a line (Holzschuh et al., MIDL 2023).")
    study.add_argument("study", choices=("label-efficiency",), help="which study")
    study.add_argument("pretrained", metavar="RUN", help="the pre-trained detector's run folder")
    study.add_argument("--data", required=True, help="folder, manifest or s3:// URI with lesion labels")
    study.add_argument("--labelled", nargs="+", default=["1", "2", "5", "10", "all"],
                       help="labelled-subject counts K (default 1 2 5 10 all)")
    study.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="draws of the K subjects (default 0 1 2)")
    study.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key of every run, e.g. --set epochs=20")
    add_classes_argument(study)
    study.add_argument("--workers-per-run", type=int, default=1, help="Ray Train workers per run (default 1)")
    study.add_argument("--pattern", help="filename pattern for a flat folder, e.g. '{subject}_{modality}.nii.gz'")
    study.add_argument("--storage", default="studies", help="local folder or s3://bucket/prefix (default ./studies)")
    study.add_argument("--name", help="study name (default label-efficiency-YYYYmmdd-HHMMSS)")
    study.set_defaults(run=run_study)


def new_request(args: argparse.Namespace):
    from raymed.engine.commands import resolve_config
    from raymed.tuning.space import load_space
    from raymed.tuning.sweep import SweepRequest

    missing = [flag for flag, value in (("--data", args.data), ("--space", args.space), ("--trials", args.trials))
               if value is None]
    if missing:
        raise ConfigError(f"a new sweep needs {', '.join(missing)}")
    space = {p.key: p.to_yaml() for p in load_space(args.space, args.method).values()}
    given = {key: getattr(args, key) for key in SWEEP_SETTINGS if getattr(args, key) is not None}
    options = {k: v for k, v in given.items() if k not in ("data", "space", "config", "set")}
    return SweepRequest(
        method=args.method, source=args.data, space=space, storage=args.storage,
        name=args.name or f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}",
        base=resolve_config(args.method, args.config, args.set).model_dump(mode="json"), **options)


def resumed_request(args: argparse.Namespace):
    from raymed.tuning.sweep import load_request

    if not args.name:
        raise ConfigError("--resume needs the --name of the sweep to continue")
    given = [f"--{key.replace('_', '-')}" for key in SWEEP_SETTINGS if getattr(args, key) not in (None, [])]
    if given:
        raise ConfigError(f"--resume continues the sweep with its saved settings: drop {', '.join(given)}")
    request = load_request(args.storage, args.name)
    if request.method != args.method:
        raise ConfigError(f"--resume: sweep {request.uri} tunes {request.method}, not {args.method}")
    return request


def run_tune(args: argparse.Namespace) -> int:
    from raymed.methods.registry import method_class
    from raymed.tuning.sweep import run_sweep

    method_class(args.method)
    request = resumed_request(args) if args.resume else new_request(args)
    outcome = run_sweep(request, resume=args.resume)
    shown = outcome.table.drop(columns=["checkpoint", "error"] if not (outcome.table["error"] != "").any()
                               else ["checkpoint"])
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\nsweep: {request.uri} (trials.csv, metric_by_trial.png, param_importance.png, optuna.db)")
    if outcome.best:
        best = outcome.best
        print(f"best trial: {best['trial']} ({best['status']}, {best['epochs']} epochs) "
              f"{request.metric}={best['value']:.4f} {best['params']}")
        print(f"best config: {best['config']}")
        print(f"best checkpoint: {best['checkpoint']}")
    if outcome.interrupted:
        print(f"sweep interrupted: continue with `raymed tune {request.method} --resume --name {request.name} "
              f"--storage {request.storage}`")
        return 130
    return 0


def run_study(args: argparse.Namespace) -> int:
    from raymed.engine.commands import parse_sets
    from raymed.engine.finetune import parse_labelled
    from raymed.tuning.study import markdown, run_study as study, study_request

    request = study_request(args.pretrained, args.data, [parse_labelled(k) for k in args.labelled], args.seeds,
                            args.storage, args.name or f"label-efficiency-{time.strftime('%Y%m%d-%H%M%S')}",
                            parse_sets(args.set), args.workers_per_run, args.pattern, args.classes)
    table, detector = study(request, args.pretrained)
    print(markdown(table, detector))
    print(f"\nstudy: {request.uri} (label_efficiency.csv, label_efficiency.md, label_efficiency.png)")
    return 0
