"""`raymed demo`: the whole job on the built-in cohort, in minutes on a laptop.

Builds the demo cohort when it is missing, trains a detector with Ray Train (DDP over the given
workers), chooses its thresholds on the validation split (stored with the checkpoint), then
evaluates it on the test split against the `threshold` reference and writes the report. Works
with a fresh local Ray (started here) or the cluster named by RAY_ADDRESS.
"""

from __future__ import annotations

import argparse
import os
import time

from raymed.data.io import exists, join

# Demo settings per method (all three modalities of the cohort: lesions are bright on T2/FLAIR
# and dark on T1): epochs, a learning rate and batch size that converge in minutes on a laptop's
# CPU. The DAE gets a UNet of half the paper's width (32 base channels) and the paper's cell size
# relative to the slice (8 px cells: noise_res 8 at 64 px, as 16 at 128 px).
DEMO_CONFIG = {
    "dae": {"epochs": 60, "lr": 1e-3, "train.batch_size": 16, "noise_res": 8, "channels": [32, 64, 128, 256]},
    "ae": {"epochs": 40, "lr": 1e-3, "train.batch_size": 16},
    "vae": {"epochs": 40, "lr": 1e-3, "train.batch_size": 16, "kl_weight": 0.1},
    "fanogan": {"epochs": 40, "lr": 2e-4, "train.batch_size": 16},
}
# Residual maps are noisy voxel by voxel; the seed papers median-filter them (k = 5). This is the
# run's post-processing: its validation uses it, and evaluation applies it to the threshold
# reference too.
DEMO_POSTPROCESS = {"postprocess.median": 5}


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo", help="train, tune, evaluate and report on the built-in cohort (start here)",
        description="The main job end to end on the built-in demo cohort: build the cohort if missing, "
                    "train a detector with Ray Train, choose its thresholds on the validation split, "
                    "evaluate it on the test split against the threshold reference and write the report. "
                    "Uses the Ray cluster in RAY_ADDRESS if set, else starts a local one.")
    demo.add_argument("--data", default="demo-cohort",
                      help="cohort folder; built there if missing (default ./demo-cohort)")
    demo.add_argument("--out", default="runs", help="run storage, local or s3:// (default ./runs)")
    demo.add_argument("--method", default="dae", choices=sorted(DEMO_CONFIG),
                      help="detector to train (default dae, the one that beats the threshold reference here)")
    demo.add_argument("--epochs", type=int, help="training epochs (default 60 for dae, 40 for the others)")
    demo.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    demo.add_argument("--subjects", type=int, default=16, help="subjects when building the cohort (default 16)")
    demo.add_argument("--size", type=int, default=64,
                      help="slice size in voxels; also the cohort's edge length when it is built (default 64)")
    demo.add_argument("--name", help="run name (default METHOD-demo-YYYYmmdd-HHMMSS)")
    demo.add_argument("--serve", action="store_true",
                      help="finish by serving the trained model on Ray Serve and sending it one real request")
    demo.add_argument("--port", type=int, default=8000, help="HTTP port with --serve (default 8000)")
    demo.add_argument("--keep-serving", action="store_true", help="with --serve: keep the endpoint up until Ctrl-C")
    demo.set_defaults(run=run_demo)


def epoch_overrides(method: str, epochs: int) -> dict:
    """Every `epochs` / `*_epochs` key of the method's config set to `epochs`."""
    from raymed.methods.registry import config_keys, method_class

    return {key: epochs for key in config_keys(method_class(method).Config)
            if key == "epochs" or key.endswith("_epochs")}


def run_demo(args: argparse.Namespace) -> int:
    from raymed.console import start_ray
    from raymed.data.demo import build_demo_cohort
    from raymed.engine.trainer import TrainRequest, train
    from raymed.errors import ConfigError
    from raymed.evaluation.evaluate import evaluate, open_target, tune_threshold
    from raymed.evaluation.report import REPORT_FILE, fmt, headline
    from raymed.methods.registry import build_config

    started = time.perf_counter()
    # Ray's workers and train controller have their own working directories: pass absolute paths
    data, storage = (uri if "://" in uri else os.path.abspath(uri) for uri in (args.data, args.out))
    settings = dict(DEMO_CONFIG[args.method])
    default_epochs = settings.pop("epochs")
    epochs = args.epochs or default_epochs
    if epochs < 1 or args.workers < 1:
        raise ConfigError("--epochs and --workers must be at least 1")
    if exists(join(data, "splits.json")):
        print(f"[1/4] using the cohort in {data}")
    else:
        print(f"[1/4] building the demo cohort in {data} ({args.subjects} subjects, {args.size}³ voxels)")
        build_demo_cohort(data, subjects=args.subjects, size=args.size, seed=0)
    config = build_config(args.method, overrides={**DEMO_POSTPROCESS, **settings, "data.size": args.size,
                                                  **epoch_overrides(args.method, epochs)})
    start_ray()
    request = TrainRequest(method=args.method, source=data, config=config, storage=storage,
                           name=args.name or f"{args.method}-demo-{time.strftime('%Y%m%d-%H%M%S')}",
                           workers=args.workers, max_failures=1)
    print(f"[2/4] training {args.method} with Ray Train ({args.workers} workers, {epochs} epochs) "
          f"-> {request.run_uri}")
    train(request)
    print("[3/4] choosing thresholds on the validation split")
    threshold, stored = tune_threshold(open_target(request.run_uri, data), "val", source=data)
    print(f"      pixel {fmt(threshold['pixel'], '.4g')}, image {fmt(threshold['image'], '.4g')} -> {stored}")
    print("[4/4] evaluating on the test split against the threshold reference")
    out = join(request.run_uri, "evaluation", "test")
    metrics = evaluate(open_target(request.run_uri, data), data, out, progress=lambda line: None)
    print()
    for result in metrics["results"].values():
        print(headline(result))
    print(f"\nreport: {join(out, REPORT_FILE)}  ({time.perf_counter() - started:.0f} s in all)")
    if args.serve:
        probe_endpoint(request.run_uri, data, args.port, args.keep_serving)
    return 0


def probe_endpoint(run_uri: str, data: str, port: int, keep: bool) -> None:
    """Serve the run, send one detect request with a test subject, print the answer."""
    import json

    from raymed.serving.service import serve_and_probe

    probe = serve_and_probe(run_uri, data, port=port)
    response = dict(probe["response"])
    scores = response.get("slice_scores") or []
    if len(scores) > 6:
        response["slice_scores"] = [*scores[:3], "...", *scores[-3:]]
    print(f"\nserving {probe['model']} at {probe['url']}; POST {probe['subject']} -> /v1/models/{probe['model']}/detect:")
    print(json.dumps(response, indent=2))
    if not keep:
        print("(the endpoint stops with this command; `raymed serve --model NAME=RUN` keeps one running)")
        return
    print("serving until Ctrl-C")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
