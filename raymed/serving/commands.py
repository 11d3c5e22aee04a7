"""`raymed serve` (run the HTTP endpoint on Ray Serve) and `raymed client` (talk to it)."""

from __future__ import annotations

import argparse
import json
import os
import time

from raymed.errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8000"


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve", help="serve trained detectors/generators over HTTP (Ray Serve)",
        description="Serve trained models behind one HTTP endpoint on Ray Serve: GET /healthz, GET /v1/models, "
                    "POST /v1/models/NAME/detect|generate|translate; API docs at URL/docs. The Serve config is the "
                    "one of serve/raymed.yaml with your models (see --print-config). Joins the Ray cluster of "
                    "RAY_ADDRESS, or starts a local one; Ctrl-C stops the endpoint.")
    serve.add_argument("--model", action="append", required=True, metavar="NAME=RUN_OR_URI",
                       help="a model to serve: its name in URLs and a run folder or checkpoint (local or "
                            "s3://); repeat for more models")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; "
                                                            "0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    serve.add_argument("--replicas", default="1-4", metavar="N|MIN-MAX",
                       help="replicas per model: a fixed N, or autoscaling between MIN and MAX (default 1-4)")
    serve.add_argument("--target-ongoing-requests", type=int, default=8,
                       help="autoscaling target of in-flight requests per replica (default 8)")
    serve.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs per model replica (default 1)")
    serve.add_argument("--gpus-per-replica", type=float, default=0.0,
                       help="GPUs per model replica (default 0; e.g. 1, or 0.5 to share a GPU)")
    serve.add_argument("--max-batch-size", type=int, default=16, help="slices per forward pass (default 16)")
    serve.add_argument("--batch-wait-ms", type=float, default=10.0,
                       help="how long a batch waits to fill before it runs (default 10)")
    key = serve.add_mutually_exclusive_group()
    key.add_argument("--api-key-env", metavar="VAR",
                     help="require the API key that environment variable VAR holds on every node (header X-API-Key)")
    key.add_argument("--api-key-file", metavar="PATH",
                     help="require the API key held in file PATH on every node (e.g. a mounted Kubernetes Secret)")
    serve.add_argument("--max-upload-mb", type=float, default=256, help="largest upload in MiB (default 256)")
    serve.add_argument("--max-voxels", type=int, default=2**26,
                       help="most voxels in one upload, all channels (default 67108864)")
    serve.add_argument("--max-slices", type=int, default=1024,
                       help="most axial slices of one volume on the model's grid (default 1024)")
    serve.add_argument("--max-float-mb", type=float, default=256,
                       help="largest float32 copy of an upload or of its grid at the model's size (default 256 MiB)")
    serve.add_argument("--request-timeout", type=float, default=120, metavar="SECONDS",
                       help="answer 504 to a request not done by then (default 120)")
    serve.add_argument("--print-config", action="store_true",
                       help="print the Serve config as YAML (for `serve run`/`serve deploy`/a RayService) and exit")
    serve.add_argument("--detach", action="store_true",
                       help="return once the endpoint answers, leaving it on the cluster (stop it with `serve shutdown`)")
    serve.set_defaults(run=run_serve)

    client = sub.add_parser("client", help="call a raymed endpoint",
                            description="Send requests to a raymed endpoint (`raymed serve`, `serve run serve/raymed.yaml`).")
    verbs = client.add_subparsers(dest="client_command", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=DEFAULT_URL, help=f"endpoint base URL (default {DEFAULT_URL})")
    common.add_argument("--api-key-env", default="RAYMED_API_KEY", metavar="VAR",
                        help="send the API key from this environment variable when it is set (default RAYMED_API_KEY)")

    detect = verbs.add_parser("detect", parents=[common], help="anomaly score (and map) of a volume or slice",
                              description="Score FILE with a detector. Several NIfTI files are stacked as the "
                                          "channels of one multi-modality volume, in the order given.")
    detect.add_argument("files", nargs="+", metavar="FILE", help="NIfTI (.nii/.nii.gz), PNG or NPY; local or s3://")
    detect.add_argument("--model", required=True, help="model name (see `raymed client models`)")
    detect.add_argument("--out", help="also write the anomaly map: .nii.gz/.nii (input's grid and affine) or .npy")
    detect.set_defaults(run=run_detect)

    generate = verbs.add_parser("generate", parents=[common], help="sample images from a generator")
    generate.add_argument("--model", required=True, help="model name")
    generate.add_argument("--n", type=int, default=1, help="number of images (default 1)")
    generate.add_argument("--seed", type=int, help="seed for reproducible samples")
    generate.add_argument("--condition", type=float, nargs="+", metavar="P",
                          help="one value per image for conditional generators, e.g. relative slice positions "
                               "in [0, 1] for acgan")
    generate.add_argument("--out", required=True, help="output file: .npy (n, C, H, W), .png (grid) or .nii.gz")
    generate.set_defaults(run=run_generate)

    translate = verbs.add_parser("translate", parents=[common], help="translate a volume or slice with a translator",
                                 description="Translate FILE with a translator model. A model whose info has "
                                             "`translation_labels: K` (cycle: 4) takes a label map of classes "
                                             "0..K-1 (cycle: background, CSF, GM, WM) and paints the image.")
    translate.add_argument("files", nargs="+", metavar="FILE", help="NIfTI (.nii/.nii.gz), PNG or NPY; local or s3://")
    translate.add_argument("--model", required=True, help="model name")
    translate.add_argument("--out", required=True, help="output file: .nii.gz/.nii (input's grid and affine) or .npy")
    translate.set_defaults(run=run_translate)

    models = verbs.add_parser("models", parents=[common], help="list the served models")
    models.set_defaults(run=run_models)


def parse_models(items: list[str]) -> dict[str, str]:
    models = {}
    for item in items:
        name, sep, uri = item.partition("=")
        if not sep or not name or not uri:
            raise ConfigError(f"--model {item!r}: expected NAME=RUN_OR_URI")
        if name in models:
            raise ConfigError(f"--model {name}: given twice")
        models[name] = uri
    return models


def parse_replicas(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        low_n, high_n = int(low), int(high or low)
    except ValueError:
        raise ConfigError(f"--replicas {text!r}: expected N or MIN-MAX, e.g. 2 or 1-4") from None
    if not 1 <= low_n <= high_n:
        raise ConfigError(f"--replicas {text!r}: need 1 <= MIN <= MAX")
    return low_n, high_n


def build_service_config(args: argparse.Namespace) -> dict:
    from raymed.serving.service import service_config

    low, high = parse_replicas(args.replicas)
    return service_config(parse_models(args.model), host=args.host, port=args.port, min_replicas=low,
                          max_replicas=high, target_ongoing_requests=args.target_ongoing_requests,
                          cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica,
                          max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000,
                          api_key_env=args.api_key_env, api_key_file=args.api_key_file,
                          max_upload_mb=args.max_upload_mb, max_voxels=args.max_voxels, max_slices=args.max_slices,
                          max_float_mb=args.max_float_mb, request_timeout_s=args.request_timeout)


def run_serve(args: argparse.Namespace) -> int:
    import yaml

    config = build_service_config(args)
    if args.print_config:
        print(yaml.safe_dump(config, sort_keys=False), end="")
        return 0
    from raymed.engine.checkpoint import resolve
    from raymed.serving.service import deploy

    models = config["applications"][0]["args"]["models"]
    for name, uri in models.items():
        models[name] = resolve(uri)  # the deployed config names the exact checkpoint each model serves
        print(f"{name}: {models[name]}")
    url = deploy(config)
    print(f"serving {', '.join(config['applications'][0]['args']['models'])} at {url} "
          f"(API docs: {url}/docs)", flush=True)
    if args.detach:
        return 0
    from ray import serve

    print("Ctrl-C stops the endpoint", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        print("endpoint stopped")
    return 0


def _client(args: argparse.Namespace):
    from raymed.serving.client import Client

    return Client(args.url, api_key=os.environ.get(args.api_key_env) if args.api_key_env else None)


def run_detect(args: argparse.Namespace) -> int:
    from raymed.serving.client import output_format, save_output, upload_body

    client, body = _client(args), upload_body(args.files)
    if not args.out:
        print(json.dumps(client.detect(body, args.model), indent=2))
        return 0
    fmt = output_format(args.out, {".nii.gz": "nifti", ".nii": "nifti", ".npy": "npy"})
    data, verdict = client.detect_map(body, args.model, fmt)
    save_output(args.out, data)
    print(json.dumps({**verdict, "map": args.out}, indent=2))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from raymed.serving.client import output_format, save_output

    fmt = output_format(args.out, {".npy": "npy", ".png": "png", ".nii.gz": "nifti", ".nii": "nifti"})
    save_output(args.out, _client(args).generate(args.model, n=args.n, seed=args.seed, output=fmt,
                                                 condition=args.condition))
    print(f"{args.n} image{'s' * (args.n > 1)} written to {args.out}")
    return 0


def run_translate(args: argparse.Namespace) -> int:
    from raymed.serving.client import output_format, save_output, upload_body

    fmt = output_format(args.out, {".nii.gz": "nifti", ".nii": "nifti", ".npy": "npy"})
    save_output(args.out, _client(args).translate(upload_body(args.files), args.model, fmt))
    print(f"translation written to {args.out}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    print(json.dumps(_client(args).models(), indent=2))
    return 0
