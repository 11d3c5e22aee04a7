"""`raymed data demo|inspect`."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="build the demo cohort, inspect a data source",
                          description="Build the built-in demo cohort or inspect a data source.")
    verbs = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    demo = verbs.add_parser("demo", help="build the built-in demo cohort (offline, from MNI152)",
                            description="Build synthetic subjects from the MNI152 template and tissue "
                                        "maps shipped in nilearn: train subjects are lesion-free, val/test "
                                        "subjects carry simulated lesions with masks in *_seg.nii.gz.")
    demo.add_argument("--out", required=True, help="output folder (BraTS-like layout)")
    demo.add_argument("--subjects", type=int, default=16, help="number of subjects (default 16)")
    demo.add_argument("--size", type=int, default=128, help="volume edge length in voxels (default 128)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--train-lesions", action="store_true",
                      help="lesions in the training subjects too (labelled data for supervised baselines; "
                           "detectors still train on their healthy slices)")
    demo.set_defaults(run=run_demo)

    inspect = verbs.add_parser("inspect", help="list cases, shapes, spacings, modalities, label stats",
                               description="Inspect a data source: a BraTS-layout folder, a folder with "
                                           "--pattern, or a CSV/JSON manifest; local path or s3:// URI. Bad "
                                           "cases are reported and skipped.")
    inspect.add_argument("source", help="folder, manifest (.csv/.json), or s3:// URI")
    inspect.add_argument("--pattern", help="filename pattern, e.g. '{subject}_{modality}.nii.gz'")
    inspect.add_argument("--seed", type=int, default=0, help="seed for subject-level splits (default 0)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(run=run_inspect)

    prepare = verbs.add_parser(
        "prepare", help="preprocess a data source once into slice records (Ray Data) for training at scale",
        description="Read, check and preprocess every case of SOURCE once, as a Ray Data pipeline over the "
                    "cluster's CPUs, into OUT: a Parquet shard of slice records per case and a manifest "
                    "(prepared.json) of the preprocessing settings, modalities and splits. Training, tuning and "
                    "evaluation take OUT as --data; training then streams slices into its workers. Bad cases stop "
                    "it, or are listed and skipped with --set data.skip_bad=true; running the same command "
                    "again after an interruption keeps the shards already written.")
    prepare.add_argument("source", help="folder, manifest (.csv/.json), or s3:// URI")
    prepare.add_argument("--out", required=True, help="local folder or s3:// prefix for the prepared dataset")
    prepare.add_argument("--pattern", help="filename pattern for a flat folder, e.g. '{subject}_{modality}.nii.gz'")
    prepare.add_argument("--config", help="YAML file whose data section sets the preprocessing (a run's config works)")
    prepare.add_argument("--set", action="append", default=[], metavar="data.KEY=VALUE",
                         help="one preprocessing key, e.g. --set data.size=64 --set data.modalities=[flair]")
    prepare.set_defaults(run=run_prepare)


def run_demo(args: argparse.Namespace) -> int:
    from raymed.data.demo import build_demo_cohort

    summary = build_demo_cohort(args.out, subjects=args.subjects, size=args.size, seed=args.seed, progress=print,
                                train_lesions=args.train_lesions)
    print(f"demo cohort written to {args.out}: {json.dumps(summary)}")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from raymed.data.prepared import prepare_dataset
    from raymed.engine.commands import parse_sets
    from raymed.errors import ConfigError
    from raymed.methods.base import DataSettings
    from raymed.methods.registry import load_yaml, set_dotted, validated

    loaded = load_yaml(args.config) if args.config else {}
    tree = {"data": dict(loaded.get("config", loaded).get("data") or {})}  # a config file or a run's config.yaml
    for key, value in parse_sets(args.set).items():
        if not key.startswith("data."):
            raise ConfigError(f"--set {key}: data prepare takes preprocessing keys only (data.KEY)")
        set_dotted(tree, key, value)
    data = validated(DataSettings, tree["data"], "invalid data settings", prefix="data.")
    manifest = prepare_dataset(args.source, args.out, data, pattern=args.pattern)
    splits = {}
    for case in manifest["cases"]:
        splits[case["split"]] = splits.get(case["split"], 0) + 1
    print(f"prepared {len(manifest['cases'])} cases ({sum(c['slices'] for c in manifest['cases'])} slices; "
          f"splits {splits}; {len(manifest['skipped'])} skipped) into {args.out}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from raymed.data.inspect import format_report, inspect_source

    report = inspect_source(args.source, pattern=args.pattern, seed=args.seed)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
