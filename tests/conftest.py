"""Shared fixtures: tiny synthetic NIfTI cases, a local S3 (moto server on 127.0.0.1)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from raymed.data.io import write_volume

# Ray Train's controller collects each report on its health-check poll (every 2 s by default) and a
# worker blocks on its next report until then: seconds per epoch that tiny test runs would spend idle.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.05")

AFFINE = np.array([[2.0, 0, 0, -30], [0, 2.0, 0, -40], [0, 0, 3.0, -20], [0, 0, 0, 1]])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def brain_case(rng: np.random.Generator, shape=(32, 32, 12), lesion: bool = False):
    """A bright ellipsoid 'brain' with texture; optionally a hyper-intense blob and its mask."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (grid**2).sum(0) < 0.8
    image = brain * (0.5 + 0.1 * rng.standard_normal(shape))
    label = np.zeros(shape, np.uint8)
    if lesion:
        centre = rng.uniform(-0.3, 0.3, 3)
        blob = ((grid - centre[:, None, None, None]) ** 2).sum(0) < 0.06
        label[blob & brain] = 1
        image[label > 0] += 0.6
    return image.astype(np.float32), label, brain.astype(np.uint8)


@pytest.fixture(scope="session")
def brats_folder(tmp_path_factory):
    """Six BraTS-layout subjects (t1 + flair + seg + mask); the last two carry lesions."""
    root = tmp_path_factory.mktemp("brats")
    rng = np.random.default_rng(0)
    for i in range(6):
        subject = f"case{i:02d}"
        image, label, mask = brain_case(rng, lesion=i >= 4)
        for modality, scale in (("t1", 1.0), ("flair", 1.3)):
            write_volume(str(root / subject / f"{subject}_{modality}.nii.gz"), image * scale, AFFINE)
        write_volume(str(root / subject / f"{subject}_seg.nii.gz"), label, AFFINE)
        write_volume(str(root / subject / f"{subject}_mask.nii.gz"), mask, AFFINE)
    return root


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 in its own process; env vars point s3fs/boto3 at it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket; returns its s3:// URI."""
    import boto3
    import s3fs

    name = f"raymed-{time.time_ns()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{name}"


def upload_folder(local, s3_uri: str) -> None:
    """Copy a local folder tree into S3 (through s3fs, the same client the product uses)."""
    from raymed.data.io import filesystem

    fs, path = filesystem(s3_uri)
    fs.put(str(local).rstrip("/") + "/", path, recursive=True)
    fs.invalidate_cache()


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory):
    """The built-in demo cohort at test size: 6 subjects of 32³ (3 train, 1 val, 2 test)."""
    from raymed.data.demo import build_demo_cohort

    root = tmp_path_factory.mktemp("demo") / "cohort"
    build_demo_cohort(str(root), subjects=6, size=32, seed=0)
    return root


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray instance for the whole test session (2 CPUs, like CI's machine).

    Started after the S3 settings are in the environment, as on a cluster whose nodes carry
    them; its address is exported as RAY_ADDRESS so `raymed` subprocesses join it. The dashboard
    runs as on any cluster: Ray Train's placement-group cleaner and the Serve REST API need it.
    """
    import ray

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port(),
             log_to_driver=True)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield ray
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()


TINY = {"data.size": 32, "train.batch_size": 8}
TINY_NETS = {"ae": {"channels": [8, 16], "latent_size": 16}, "vae": {"channels": [8, 16], "latent_size": 16},
             "gmvae": {"channels": [8, 16], "latent_size": 16, "components": 3},
             "fanogan": {"channels": [8, 16, 32], "latent_size": 16},
             "dae": {"channels": [8, 16, 32], "norm_groups": 4, "noise_res": 8},
             "pas": {"channels": [8, 16, 32], "res_units": 1},
             "cycle": {"unet_channels": [8, 16, 32], "generator_features": 8, "residual_blocks": 1,
                       "discriminator_features": 8, "discriminator_layers": 2},
             **{gan: {"channels": [8, 16, 32], "latent_size": 16} for gan in ("dcgan", "lsgan", "wgangp", "acgan")},
             "stylegan_ad": {"channels": [8, 16, 32], "latent_size": 16, "mapping_layers": 2}}


def tiny_config(method: str, **overrides):
    """A method's config at test size (small nets, 32² slices); overrides are dotted keys."""
    from raymed.methods.registry import build_config

    return build_config(method, overrides={**TINY, **TINY_NETS[method], **overrides})


@pytest.fixture(scope="session")
def prepared_demo(ray_session, demo_cohort, tmp_path_factory):
    """The demo cohort prepared once (`raymed data prepare`) at the tiny config's data settings."""
    from raymed.data.prepared import prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "demo"
    prepare_dataset(str(demo_cohort), str(out), tiny_config("ae").data, report=lambda line: None)
    return out


_RUNS: dict = {}


@pytest.fixture(scope="session")
def trained_run(ray_session, demo_cohort, tmp_path_factory):
    """Factory: `trained_run("ae")` → run folder of a tiny model trained once per session (2 Ray
    Train workers); `workers` and `keep_checkpoints` go to the Train run, other keywords to the config."""
    from raymed.engine.trainer import TrainRequest, train

    def make(method: str, workers: int = 2, keep_checkpoints: int = 2, **overrides) -> str:
        key = (method, workers, keep_checkpoints, tuple(sorted(overrides.items())))
        if key not in _RUNS:
            storage = tmp_path_factory.mktemp("runs")
            epochs = EPOCHS.get(method, {"epochs": 3})
            result = train(TrainRequest(method=method, source=str(demo_cohort), name=method, storage=str(storage),
                                        config=tiny_config(method, **{**epochs, **overrides}), workers=workers,
                                        keep_checkpoints=keep_checkpoints))
            assert result.error is None, result.error
            _RUNS[key] = str(storage / method)
        return _RUNS[key]

    return make


# Each method's shared run; the engine's 2-worker test of a method checks this very run.
EPOCHS = {**{m: {"epochs": 6, "lr": 1e-3} for m in ("ae", "vae", "gmvae")}, "dae": {"epochs": 4, "lr": 1e-3},
          "fanogan": {"gan_epochs": 2, "encoder_epochs": 6, "n_critic": 2, "lr": 1e-3, "train.batch_size": 4},
          "cycle": {"segmentation_epochs": 2, "synthesis_epochs": 2},
          "stylegan_ad": {"gan_epochs": 10, "encoder_epochs": 2},
          **{gan: {"epochs": 10} for gan in ("dcgan", "lsgan", "wgangp", "acgan")}}  # ~20 steps: D can learn


def changed_since_phase_two(run, name: str) -> bool:
    """Whether module `name` of a run's final model differs from the phase-boundary checkpoint
    (the run must keep its checkpoints: `keep_checkpoints` above the epoch count)."""
    import torch

    from raymed.engine import checkpoint

    states = [checkpoint.load_state(str(folder)) for folder in sorted(run.glob("checkpoint_*")) if folder.is_dir()]
    boundary = next(s for s in states if s["position"]["phase"] == 1 and s["position"]["epoch"] == 0)
    final, _ = checkpoint.load_method(str(run))
    return not all(torch.equal(boundary["nets"][name][k], v) for k, v in final.nets[name].state_dict().items())
