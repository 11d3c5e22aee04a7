"""`raymed evaluate`, `raymed tune-threshold` and `raymed compare`."""

from __future__ import annotations

import argparse
import json

from raymed.data.io import join

TARGET_HELP = ("a run folder (its best checkpoint), a checkpoint folder, local or s3://, or the name of a "
               "method without weights: threshold")


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """Post-processing and image-score options; thresholds are only valid for the same ones."""
    post = parser.add_argument_group(
        "post-processing (stated in every report)",
        "Defaults are the run's own `postprocess` settings (those its validation used); each flag overrides one.")
    post.add_argument("--erode", type=int, metavar="N",
                      help="erode the brain mask by N voxels and zero the map outside it (0: off)")
    post.add_argument("--median", type=int, metavar="K", help="median filter with kernel K, e.g. 5 (0: off)")
    post.add_argument("--median-dims", type=int, choices=(2, 3),
                      help="median filter per axial slice (2) or in 3D (3)")
    post.add_argument("--min-component", type=int, metavar="N",
                      help="drop connected components smaller than N voxels from the binary maps (0: off)")
    post.add_argument("--positive-only", action="store_true", default=None,
                      help="keep only positive residuals (x > reconstruction): hyper-intense lesions")
    score = parser.add_argument_group("image scores (detection, active learning)")
    score.add_argument("--image-score", choices=("method", "topk", "max"), default="method",
                       help="slice score: the detector's own score, as served (default); the mean of the "
                            "top-k brain voxels of its post-processed map; or the map's maximum")
    score.add_argument("--topk-fraction", type=float, default=0.01,
                       help="top-k: k as a fraction of the slice's brain voxels (default 0.01)")
    parser.add_argument("--bins", type=int, default=None, help="histogram bins of the pixel metrics (default 65536)")
    parser.add_argument("--pattern", help="filename pattern for a flat folder, e.g. '{subject}_{modality}.nii.gz'")


def add_config_for_names(parser: argparse.ArgumentParser) -> None:
    from raymed.engine.commands import add_config_arguments

    add_config_arguments(parser)
    parser.epilog = ("--config/--set configure a method given by name, e.g. "
                     "--set 'data.modalities=[t2]' --set data.size=64 for threshold.")


def settings_from(args: argparse.Namespace, method):
    """The protocol settings: the method's post-processing with the flags given on top."""
    from pydantic import ValidationError

    from raymed.errors import ConfigError
    from raymed.evaluation.protocol import Settings

    flags = {"erode": args.erode, "median": args.median, "median_dims": args.median_dims,
             "min_component": args.min_component, "positive_only": args.positive_only}
    post = {**method.config.postprocess.model_dump(), **{k: v for k, v in flags.items() if v is not None}}
    values = {"postprocess": post, "image_score": {"reduction": args.image_score, "fraction": args.topk_fraction}}
    if args.bins is not None:
        values["bins"] = args.bins
    try:
        return Settings.model_validate(values)
    except ValidationError as err:
        e = err.errors()[0]
        raise ConfigError(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e['input']!r})") from None


def open_from(args: argparse.Namespace):
    from raymed.evaluation.evaluate import open_target

    return open_target(args.target, args.data, args.pattern, args.config, args.set)


def register(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser(
        "evaluate", help="evaluate a detector: metrics, figures, NIfTI maps, report",
        description="Evaluate a detector on a split as the seed papers do: pixel AUROC/AUPRC/[DICE] inside the "
                    "brain mask, Dice/precision/recall per volume at a threshold chosen on the validation "
                    "split (or stored by `raymed tune-threshold`), slice/volume detection, against the "
                    "`threshold` reference. Writes metrics.json, report.md, PNG figures and anomaly maps "
                    "as NIfTI on the input grid.")
    evaluate.add_argument("target", help=TARGET_HELP)
    evaluate.add_argument("--data", required=True, help="folder, manifest or s3:// URI with labels")
    evaluate.add_argument("--split", default="test", help="split to evaluate (default test)")
    evaluate.add_argument("--val-split", default="val", help="split thresholds are chosen on (default val)")
    evaluate.add_argument("--out", help="report folder (default TARGET/evaluation/SPLIT, or "
                                        "evaluation/METHOD/SPLIT for a method name)")
    evaluate.add_argument("--no-reference", action="store_true", help="skip the threshold reference")
    evaluate.add_argument("--no-maps", action="store_true", help="do not write NIfTI anomaly maps")
    add_protocol_arguments(evaluate)
    add_config_for_names(evaluate)
    evaluate.set_defaults(run=run_evaluate)

    tune = sub.add_parser(
        "tune-threshold", help="choose the operating threshold on validation data and store it",
        description="Choose the pixel threshold with the best Dice on a labelled split and the image "
                    "threshold by --criterion (max_dice: best F1 of slice flags; flag_rate: flag the "
                    "fraction --flag-rate of slices, for active learning). Stored as threshold.json in "
                    "the checkpoint folder; evaluate and serving use it.")
    tune.add_argument("target", help=TARGET_HELP)
    tune.add_argument("--data", required=True, help="folder, manifest or s3:// URI")
    tune.add_argument("--split", default="val", help="split to choose on (default val)")
    tune.add_argument("--criterion", choices=("max_dice", "flag_rate"), default="max_dice",
                      help="how the image threshold is chosen (default max_dice)")
    tune.add_argument("--flag-rate", type=float, help="fraction of slices to flag with --criterion flag_rate")
    tune.add_argument("--out", help="for a method name: the checkpoint folder to create")
    add_protocol_arguments(tune)
    add_config_for_names(tune)
    tune.set_defaults(run=run_tune)

    generator = sub.add_parser(
        "evaluate-generator", help="judge a generator: two-sample CNN, feature distances, MS-SSIM, figures",
        description="The GAN evaluation framework on a generator run: a CNN trained to tell synthetic from real "
                    "slices (recall, specificity; 0.5 = indistinguishable), Mahalanobis and Fréchet distances "
                    "in its features, MS-SSIM max-similarity (mode collapse, memorisation), template matching, "
                    "MMD² and MS-SSIM diversity. Writes metrics.json, report.md and PNG figures.")
    generator.add_argument("target", metavar="RUN", help="run folder or checkpoint (local or s3://) of a generator")
    generator.add_argument("--data", required=True, help="the data the generator was trained on (folder, manifest, s3://)")
    generator.add_argument("--pattern", help="file pattern, as for training")
    generator.add_argument("--out", help="report folder (default RUN/evaluation/generator)")
    generator.add_argument("--n", type=int, default=2000, help="images per set (default 2000)")
    generator.add_argument("--repeats", type=int, default=5, help="two-sample CNNs, trained as Ray tasks (default 5)")
    generator.add_argument("--epochs", type=int, default=20, help="epochs per two-sample CNN (default 20)")
    generator.add_argument("--structural", type=int, default=200,
                           help="images per set for MS-SSIM and template matching (default 200)")
    generator.add_argument("--seed", type=int, default=0)
    generator.set_defaults(run=run_evaluate_generator)

    compare = sub.add_parser(
        "compare", help="print several evaluations side by side",
        description="Print the headline metrics of several evaluations (run folders, evaluation folders "
                    "or metrics.json files) as one table, a row per method.")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run folder, evaluation folder or metrics.json")
    compare.add_argument("--split", default="test", help="which evaluation of a run folder (default test)")
    compare.add_argument("--markdown", action="store_true", help="print a Markdown table")
    compare.add_argument("--json", action="store_true", help="print JSON rows")
    compare.set_defaults(run=run_compare)


def default_out(target: str, split: str) -> str:
    from raymed.evaluation.evaluate import is_method_name

    return join("evaluation", target, split) if is_method_name(target) else join(target, "evaluation", split)


def run_evaluate(args: argparse.Namespace) -> int:
    from raymed.evaluation.evaluate import evaluate
    from raymed.evaluation.report import REPORT_FILE, headline

    target = open_from(args)
    settings = settings_from(args, target.method)
    out = args.out or default_out(args.target, args.split)
    metrics = evaluate(target, args.data, out, split=args.split, val_split=args.val_split, settings=settings,
                       reference=not args.no_reference, maps=not args.no_maps, pattern=args.pattern)
    for result in metrics["results"].values():
        print(headline(result))
    for note in metrics["notes"]:
        print(f"note: {note}")
    print(f"report: {join(out, REPORT_FILE)}")
    return 0


def run_tune(args: argparse.Namespace) -> int:
    from raymed.evaluation.evaluate import tune_threshold

    target = open_from(args)
    settings = settings_from(args, target.method)
    threshold, uri = tune_threshold(target, args.split, args.criterion, args.flag_rate, settings, args.out,
                                    source=args.data)
    shown = {k: threshold[k] for k in ("pixel", "image", "criterion", "flag_rate")}
    print(f"threshold: {json.dumps(shown)}")
    print(f"{args.split} metrics: {json.dumps({k: round(v, 4) for k, v in threshold['metrics'].items()})}")
    print(f"stored: {uri}")
    return 0


def run_evaluate_generator(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from raymed.errors import ConfigError
    from raymed.evaluation.generation import GeneratorEvaluation, evaluate_generator
    from raymed.evaluation.report import REPORT_FILE

    try:
        settings = GeneratorEvaluation(n=args.n, repeats=args.repeats, epochs=args.epochs,
                                       structural=args.structural, seed=args.seed)
    except ValidationError as err:
        e = err.errors()[0]
        raise ConfigError(f"--{e['loc'][0]}: {e['msg']} (got {e['input']!r})") from None
    out = args.out or join(args.target, "evaluation", "generator")
    metrics = evaluate_generator(args.target, args.data, out, settings, pattern=args.pattern)
    two, dist = metrics["two_sample"], metrics["distances"]
    print(f"{metrics['generator']['method']}: recall {two['recall']['mean']:.3f}, specificity "
          f"{two['specificity']['mean']:.3f}, Mahalanobis {dist['mahalanobis']['mean']:.2f}, "
          f"Fréchet {dist['frechet']['mean']:.2f}")
    print(f"report: {join(out, REPORT_FILE)}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from raymed.evaluation.report import compare_rows, markdown_table, text_table

    headers, rows = compare_rows(args.runs, args.split)
    if args.json:
        print(json.dumps([dict(zip(headers, row)) for row in rows], indent=2))
    elif args.markdown:
        print(markdown_table(headers, rows))
    else:
        print(text_table(headers, rows))
    return 0
