"""Trial-epochs that TPE + ASHA needs to reach a validation metric, against random search
without early stopping, with the same trial budget.

Both sweeps run the same method, space, base config and number of trials on the demo cohort,
through `run_sweep` (Ray Tune, one Ray Train run per trial). Every validated epoch of every
trial is put on one timeline (the Train runs' report times); a sweep's cost to reach the target
is the number of epochs all its trials had trained when the first report reached the target.
An epoch counts only if Tune received it (a worker can run ahead of ASHA's stop on tiny epochs).
The target defaults to the lower of the two sweeps' best values, so both reach it; with
--repeats the sweeps are run again with other seeds and the ratio is the geometric mean.
Ratio = random-search trial-epochs ÷ TPE+ASHA trial-epochs (above 1: TPE+ASHA is cheaper).

Usage: python benchmarks/tune_efficiency.py [--data COHORT] [--space tune_spaces/ae.yaml]
[--trials 8] [--epochs 6] [--size 32] [--repeats 1] [--target 0.1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile

import ray
from ray import tune

from raymed.data.demo import build_demo_cohort
from raymed.data.io import exists, join
from raymed.engine.commands import parse_sets
from raymed.engine.storage import ray_storage
from raymed.methods.registry import build_config, load_yaml
from raymed.tuning.driver import TIME_ATTR
from raymed.tuning.sweep import SweepRequest, run_sweep


def timeline(request: SweepRequest) -> list[tuple[float, str, int, float]]:
    """(time, trial, epochs done, metric) for every validated epoch Tune received, in time order."""
    path, fs = ray_storage(request.storage)
    analysis = tune.ExperimentAnalysis(join(path, request.name), storage_filesystem=fs)
    events = []
    for trial in analysis.trials:
        seen = (trial.last_result or {}).get(TIME_ATTR, 0)
        log = os.path.join(request.uri, "train", trial.trial_id, "metrics.jsonl")
        for line in open(log) if exists(log) else []:
            report = json.loads(line)
            if request.metric in report and report[TIME_ATTR] <= seen:
                events.append((report["time"], trial.trial_id, report[TIME_ATTR], report[request.metric]))
    return sorted(events)


def epochs_to_reach(events, target: float, mode: str) -> int | None:
    """Epochs trained by all trials together when a report first reached the target."""
    done: dict[str, int] = {}
    for _, trial, epochs, value in events:
        done[trial] = max(done.get(trial, 0), epochs)
        if value >= target if mode == "max" else value <= target:
            return sum(done.values())
    return None


def best_value(events, mode: str) -> float:
    values = [value for *_, value in events]
    return max(values) if mode == "max" else min(values)


def trial_epochs(events) -> int:
    """Epochs trained by the whole sweep."""
    done: dict[str, int] = {}
    for _, trial, epochs, _ in events:
        done[trial] = max(done.get(trial, 0), epochs)
    return sum(done.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="cohort folder (default: a demo cohort built in a temporary folder)")
    parser.add_argument("--space", default=os.path.join(os.path.dirname(__file__), "..", "tune_spaces", "ae.yaml"))
    parser.add_argument("--method", default="ae")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--size", type=int, default=32, help="slice size (and cohort size when one is built)")
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--metric", default="val/auprc")
    parser.add_argument("--mode", default="max", choices=("max", "min"))
    parser.add_argument("--target", type=float, help="metric value to reach (default: the lower sweep best)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="base config override (default: channels=[16, 32], latent_size=32)")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="tune-efficiency-")
    data = args.data or os.path.join(work, "cohort")
    if not args.data:
        build_demo_cohort(data, subjects=args.subjects, size=args.size, seed=0)
    sets = parse_sets(args.set or ["channels=[16, 32]", "latent_size=32"])
    base = build_config(args.method, {}, {**sets, "data.size": args.size, "epochs": args.epochs,
                                          "train.batch_size": 16}).model_dump(mode="json")
    if "RAY_ADDRESS" in os.environ:
        ray.init()
    else:
        ray.init(num_cpus=2)
    runs = []
    for repeat in range(args.repeats):
        sweeps = {}
        for label, search, scheduler in (("tpe+asha", "tpe", "asha"), ("random", "random", "fifo")):
            request = SweepRequest(method=args.method, source=data, space=load_yaml(args.space), trials=args.trials,
                                   name=f"{label}-{repeat}", storage=os.path.join(work, "sweeps"), base=base,
                                   metric=args.metric, mode=args.mode, search=search, scheduler=scheduler,
                                   seed=repeat)
            run_sweep(request)
            sweeps[label] = timeline(request)
        target = args.target if args.target is not None else (
            min if args.mode == "max" else max)(best_value(events, args.mode) for events in sweeps.values())
        cost = {label: epochs_to_reach(events, target, args.mode) for label, events in sweeps.items()}
        total = {label: trial_epochs(events) for label, events in sweeps.items()}
        run = {"repeat": repeat, "target": target, "epochs_to_target": cost, "trial_epochs_total": total,
               "best": {label: best_value(events, args.mode) for label, events in sweeps.items()},
               "ratio": cost["random"] / cost["tpe+asha"] if cost["random"] and cost["tpe+asha"] else None}
        runs.append(run)
        print(f"repeat {repeat}: target {args.metric}={target:.4f}  trial-epochs to reach it: "
              f"tpe+asha {cost['tpe+asha']}, random {cost['random']}  (whole sweeps: {total['tpe+asha']} vs "
              f"{total['random']}; best {run['best']['tpe+asha']:.4f} vs {run['best']['random']:.4f})")
    ratios = [r["ratio"] for r in runs if r["ratio"]]
    summary = {"trials": args.trials, "epochs": args.epochs, "size": args.size, "metric": args.metric,
               "runs": runs, "ratio_geomean": math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None}
    print(f"ratio (random ÷ tpe+asha trial-epochs to target): {summary['ratio_geomean']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
