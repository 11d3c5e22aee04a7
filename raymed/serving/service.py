"""The Serve config of the endpoint and deploying it, the same way `serve deploy CONFIG` does.

`service_config(...)` is the single source of serve/raymed.yaml (and of the RayService's
serveConfigV2); `raymed serve` builds its config with it and hands it to `deploy`.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

from raymed.errors import ConfigError, RaymedError
from raymed.serving.app import GATEWAY, parse_args

APP_NAME = "raymed"
IMPORT_PATH = "raymed.serving.app:build"
# The example models of serve/raymed.yaml: replace them by your runs (run folder or checkpoint).
EXAMPLE_MODELS = {
    "brain-ae": "s3://raymed-models/runs/ae-brats",
    "brain-vae": "s3://raymed-models/runs/vae-brats/checkpoint_000012",
}


def service_config(models: dict[str, str], *, host: str = "0.0.0.0", port: int = 8000, min_replicas: int = 1,
                   max_replicas: int = 4, target_ongoing_requests: int = 8, cpus_per_replica: float = 1.0,
                   gpus_per_replica: float = 0.0, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.01,
                   api_key_env: str | None = None, api_key_file: str | None = None, max_upload_mb: float = 256,
                   max_generate: int = 64, max_voxels: int = 2**26, max_slices: int = 1024,
                   max_float_mb: float = 256, request_timeout_s: float = 120) -> dict:
    """The Serve config (the schema of `serve run`/`serve deploy`) serving `models`.

    Every model gets its own deployment named after it, autoscaled between `min_replicas` and
    `max_replicas` on `target_ongoing_requests`, with the given CPUs/GPUs per replica and
    per-slice batching (`user_config`, changeable on a running service). The API key is named
    (a variable or a file on the nodes), never included.
    """
    if not 1 <= min_replicas <= max_replicas:
        raise ConfigError(f"replicas: need 1 <= min ({min_replicas}) <= max ({max_replicas})")
    if max_batch_size < 1 or batch_wait_timeout_s < 0:
        raise ConfigError("batching: max_batch_size must be >= 1 and batch_wait_timeout_s >= 0")
    args = {"models": dict(models), "api_key_env": api_key_env, "api_key_file": api_key_file,
            "max_upload_mb": max_upload_mb, "max_generate": max_generate, "max_voxels": max_voxels,
            "max_slices": max_slices, "max_float_mb": max_float_mb, "request_timeout_s": request_timeout_s}
    parse_args(args)
    gateway = {"name": GATEWAY, "max_ongoing_requests": 256,
               "autoscaling_config": {"min_replicas": 1, "max_replicas": max_replicas, "target_ongoing_requests": 64},
               "ray_actor_options": {"num_cpus": min(cpus_per_replica, 0.5)}}
    model_deployments = [
        {"name": name, "max_ongoing_requests": max(64, 4 * max_batch_size),
         "autoscaling_config": {"min_replicas": min_replicas, "max_replicas": max_replicas,
                                "target_ongoing_requests": target_ongoing_requests},
         "ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
         "user_config": {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s}}
        for name in models]
    return {
        "proxy_location": "EveryNode",
        # The gateway answers a slow request with a JSON 504 at request_timeout_s; the proxy's own
        # timeout is the backstop should the gateway itself hang.
        "http_options": {"host": host, "port": port, "request_timeout_s": request_timeout_s + 30},
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": args,
                          "deployments": [gateway, *model_deployments]}],
    }


def base_url(config: dict) -> str:
    """Where a client on this machine reaches the endpoint of `config`."""
    http = config.get("http_options", {})
    host = http.get("host", "127.0.0.1")
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{http.get('port', 8000)}"


def deploy(config: dict, timeout_s: float = 600) -> str:
    """Deploy `config` on the connected Ray cluster (or a new local one) and wait until it answers.

    This is what `serve deploy CONFIG` does: the config goes to Serve's REST API on the cluster's
    dashboard, whose controller builds every application from its import path and args. Returns
    the endpoint's base URL.
    """
    import ray
    import requests
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from raymed.cluster.jobs import auth_headers

    try:
        schema = ServeDeploySchema.model_validate(config)
    except ValidationError as err:
        raise ConfigError(f"invalid Serve config: {err.errors()[0]['msg']}") from None
    context = ray.init(ignore_reinit_error=True, include_dashboard=True, log_to_driver=False)
    dashboard = context.dashboard_url
    if not dashboard:
        raise ConfigError("this Ray cluster runs without its dashboard, which serves Serve's REST API: "
                          "start Ray with the dashboard (`ray start --head --include-dashboard=true`)")
    api = f"{dashboard if '://' in dashboard else 'http://' + dashboard}/api/serve/applications/"
    headers = auth_headers(api)
    try:
        running = requests.get(api, headers=headers, timeout=30).json().get("http_options") or {}
        wanted = schema.http_options
        if running.get("host") and (running["host"], running["port"]) != (wanted.host, wanted.port):
            raise ConfigError(f"Serve already runs on this Ray cluster at {running['host']}:{running['port']}, not "
                              f"{wanted.host}:{wanted.port}: use that host/port, or stop it first (`serve shutdown`)")
        started = time.time()
        answer = requests.put(api, json=config, headers=headers, timeout=120)
    except requests.RequestException as err:
        raise RaymedError(f"Serve's REST API at {api} did not answer ({type(err).__name__})") from None
    if answer.status_code != 200:
        raise RaymedError(f"Serve refused the config: HTTP {answer.status_code} {_last_line(answer.text)}")
    deadline = time.monotonic() + timeout_s
    for app in schema.applications:
        wait_running(app.name, started, deadline)
    url = base_url(config)
    wait_healthy(url, deadline)
    return url


def wait_running(app: str, since: float, deadline: float) -> None:
    """Block until the application deployed at `since` is RUNNING; a failure raises Serve's reason."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and status.last_deployed_time_s >= since - 1:
            if status.status == ApplicationStatus.RUNNING:
                return
            if status.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
                reasons = [d.message for d in status.deployments.values() if d.message] + [status.message]
                raise RaymedError(f"Serve application {app!r} failed: {_last_line(reasons[0])}")
        time.sleep(0.5)
    raise RaymedError(f"Serve application {app!r} did not become RUNNING in time")


def wait_healthy(url: str, deadline: float) -> None:
    """Block until GET URL/healthz answers 200 (the proxy routes to the new gateway)."""
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as err:
            last = str(err)
        time.sleep(0.5)
    raise RaymedError(f"{url}/healthz did not answer ({last})")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no reason given"


def serve_and_probe(run_uri: str, data: str, port: int = 8000, host: str = "127.0.0.1",
                    name: str | None = None) -> dict:
    """Serve one trained model and send it one real detect request with a test subject of `data`.

    The subject is the first of the test split (else the first case); its modalities are stacked
    in the model's channel order. Returns `{url, model, subject, files, response}`; the endpoint
    keeps running on the Ray cluster afterwards.
    """
    import json

    from raymed.data.discovery import discover
    from raymed.data.io import join, read_bytes
    from raymed.data.splits import assign_splits, select
    from raymed.engine.checkpoint import META_FILE, resolve
    from raymed.serving.client import Client, upload_body

    meta = json.loads(read_bytes(join(resolve(run_uri), META_FILE)))
    name = name or meta["method"]
    settings = meta["config"]["data"]
    cases = assign_splits(discover(data), seed=settings.get("split_seed", 0))
    case = (select(cases, "test") or cases)[0]
    modalities = settings.get("modalities") or sorted(case.images)
    if len(modalities) != meta["in_channels"]:
        raise ConfigError(f"{data}: subject {case.subject} has {len(modalities)} modalities; "
                          f"model {name} takes {meta['in_channels']} channels")
    missing = [m for m in modalities if m not in case.images]
    if missing:
        raise ConfigError(f"{data}: subject {case.subject} has no {', '.join(missing)} image")
    files = [case.images[m] for m in modalities]
    url = deploy(service_config({name: run_uri}, host=host, port=port, max_replicas=1))
    response = Client(url).detect(upload_body(files), name)
    return {"url": url, "model": name, "subject": case.subject, "files": files, "response": response}
