"""`raymed active rank` and `raymed active simulate`."""

from __future__ import annotations

import argparse

STRATEGY_HELP = ("SCORE[:SAMPLER]; SCORE: random, least_confidence, margin, expected_model_change, anomaly; "
                 "SAMPLER: top_n (default), mixture, k_nearest, core_set; or just core_set")


def register(sub: argparse._SubParsersAction) -> None:
    from raymed.engine.commands import add_config_arguments

    active = sub.add_parser("active", help="active learning: what to label next",
                            description="Choose the scans annotators should segment next, and simulate the "
                                        "labelling loop on a labelled data set.")
    commands = active.add_subparsers(dest="active_command", metavar="COMMAND", required=True)

    rank = commands.add_parser(
        "rank", help="write a ranked queue of scans for annotators",
        description="Score every scan of a pool with a detector (anomaly) or a segmentation run (least "
                    "confidence, margin, expected model change, core-set) and write the BUDGET most worth "
                    "labelling as CSV or JSON: rank, case, score, flagged, reason.")
    rank.add_argument("--model", required=True, help="detector run (anomaly) or segmentation run (the others)")
    rank.add_argument("--pool", required=True, help="the unlabelled scans (folder, manifest, s3://)")
    rank.add_argument("--pattern", help="filename pattern for a flat folder")
    rank.add_argument("--budget", type=int, required=True, help="how many scans (or slices) to queue")
    rank.add_argument("--strategy", default="anomaly", help=f"{STRATEGY_HELP} (default anomaly)")
    rank.add_argument("--threshold", type=float, help="flag rows whose score reaches this (default: flag the queue)")
    rank.add_argument("--unit", choices=("scan", "slice"), default="scan", help="queue scans (default) or slices")
    rank.add_argument("--out", default="queue.csv", help="queue file, .csv or .json (default queue.csv)")
    rank.add_argument("--seed", type=int, default=0)
    rank.set_defaults(run=run_rank)

    simulate = commands.add_parser(
        "simulate", help="simulate the labelling loop with several strategies",
        description="On a labelled data set: start from a random share of the training slices, train the "
                    "segmentation model (dae, task=segment) as a Ray Train job, let each strategy query the "
                    "next share (side by side as Ray tasks), and repeat. Writes rounds.jsonl, summary.json, "
                    "report.md and dice_per_round.png to OUT; rerunning the command continues a stopped "
                    "simulation. With --detector it also measures how well the anomaly score predicts "
                    "segmentation failure (AUROC).")
    simulate.add_argument("--data", required=True, help="labelled data set (folder, manifest, s3://)")
    simulate.add_argument("--pattern", help="filename pattern for a flat folder")
    simulate.add_argument("--strategies", nargs="+", default=["random", "margin", "core_set"], help=STRATEGY_HELP)
    simulate.add_argument("--detector", help="detector run for the anomaly score and failure prediction")
    simulate.add_argument("--rounds", type=int, default=3, help="query rounds (default 3)")
    simulate.add_argument("--start", type=float, default=0.1, help="random share to start from (default 0.1)")
    simulate.add_argument("--step", type=float, default=0.1, help="share queried per round (default 0.1)")
    simulate.add_argument("--repeats", type=int, default=5, help="repeats from different random starts (default 5)")
    simulate.add_argument("--workers", type=int, default=2, help="Ray Train workers per round (default 2)")
    simulate.add_argument("--fail-dice", type=float, default=0.5,
                          help="a test slice with Dice below this counts as a segmentation failure (default 0.5)")
    simulate.add_argument("--out", required=True, help="folder for everything the simulation makes")
    add_config_arguments(simulate)
    simulate.set_defaults(run=run_simulate)


def run_rank(args: argparse.Namespace) -> int:
    from raymed.active.queue import rank, write_queue
    from raymed.active.strategies import Strategy

    rows = rank(args.model, args.pool, args.budget, Strategy.parse(args.strategy), args.threshold, args.unit,
                args.pattern, args.seed)
    write_queue(args.out, rows)
    print(f"queued {len(rows)} {args.unit}s ({sum(r['flagged'] for r in rows)} flagged): {args.out}")
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    from raymed.active.simulate import Simulation, simulate
    from raymed.active.strategies import Strategy
    from raymed.engine.commands import parse_sets
    from raymed.errors import ConfigError
    from raymed.methods.registry import load_yaml

    if not (0 < args.start < 1 and 0 < args.step < 1 and args.rounds >= 1 and args.repeats >= 1):
        raise ConfigError("--start and --step are shares in (0, 1); --rounds and --repeats at least 1")
    summary = simulate(Simulation(args.data, args.out, [Strategy.parse(s) for s in args.strategies], args.detector,
                                  args.rounds, args.start, args.step, args.repeats, args.workers, args.fail_dice,
                                  args.pattern, load_yaml(args.config) if args.config else {},
                                  parse_sets(args.set)))
    fp = summary.get("failure_prediction")
    if fp and fp["auroc"] is not None:
        print(f"failure prediction AUROC {fp['auroc']:.3f} ({fp['failures']} of {fp['slices']} test slices fail)")
    print(f"report: {args.out}/report.md")
    return 0
