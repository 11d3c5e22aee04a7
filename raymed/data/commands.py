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


def run_demo(args: argparse.Namespace) -> int:
    from raymed.data.demo import build_demo_cohort

    summary = build_demo_cohort(args.out, subjects=args.subjects, size=args.size, seed=args.seed, progress=print,
                                train_lesions=args.train_lesions)
    print(f"demo cohort written to {args.out}: {json.dumps(summary)}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from raymed.data.inspect import format_report, inspect_source

    report = inspect_source(args.source, pattern=args.pattern, seed=args.seed)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
