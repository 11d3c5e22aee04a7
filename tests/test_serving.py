"""The HTTP endpoint on a real Ray Serve: started by `raymed serve` on 127.0.0.1 with a detector
(ae, local checkpoint with a threshold), a detector+generator (vae, checkpoint on S3), a
detector+translator from tissue label maps (cycle) and conditional generators (acgan, stylegan_ad),
and talked to over real HTTP."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from raymed.cli import main
from raymed.data.discovery import Case
from raymed.data.io import encode_nifti, read_volume
from raymed.data.preprocess import TISSUES
from raymed.engine.checkpoint import load_method, resolve
from raymed.engine.inference import map_case
from raymed.evaluation.thresholds import save_threshold
from tests.conftest import free_port, upload_folder

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "RAYMED_TEST_API_KEY"
KEY = "test-key-7f3a"
IMAGE_THRESHOLD = 0.3
# ae's threshold was chosen on median-filtered maps scored by their maximum: serving must do the same.
POSTPROCESS = {"median": 3, "erode": 1}
IMAGE_SCORE = {"reduction": "max"}
MAX_UPLOAD_MB = 2
MAX_SLICES = 256


@pytest.fixture(scope="module")
def models(trained_run, s3_server, tmp_path_factory):
    """ae: a local checkpoint folder with a stored threshold; vae: a checkpoint folder on S3;
    cycle: the run its 2-worker test trained."""
    import boto3

    ae = tmp_path_factory.mktemp("served") / "ae-checkpoint"
    shutil.copytree(resolve(trained_run("ae")), ae)
    save_threshold(str(ae), {"pixel": 0.2, "image": IMAGE_THRESHOLD, "split": "val", "criterion": "max_dice",
                             "postprocess": POSTPROCESS, "image_score": IMAGE_SCORE})
    bucket = f"raymed-serve-{time.time_ns()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    upload_folder(resolve(trained_run("vae")), f"s3://{bucket}/vae-checkpoint")
    return {"ae": str(ae), "vae": f"s3://{bucket}/vae-checkpoint", "ae_run": trained_run("ae"),
            "cycle": trained_run("cycle", workers=2, keep_checkpoints=10), "acgan": trained_run("acgan", workers=2),
            "stylegan_ad": trained_run("stylegan_ad", workers=2)}


@pytest.fixture(scope="module")
def endpoint(ray_session, models, tmp_path_factory):
    """`raymed serve --detach` in a subprocess joins the test Ray; Serve is shut down at the end.

    The API key is in a file on the node (as a mounted Secret would be), named by --api-key-file."""
    from ray import serve

    port = free_port()
    key_file = tmp_path_factory.mktemp("secret") / "key"
    key_file.write_text(KEY + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "raymed.cli", "serve", "--model", f"ae={models['ae']}", "--model", f"vae={models['vae']}",
         "--model", f"cycle={models['cycle']}", "--model", f"acgan={models['acgan']}",
         "--model", f"stylegan_ad={models['stylegan_ad']}",
         "--host", "127.0.0.1", "--port", str(port), "--replicas", "2", "--cpus-per-replica", "0.1",
         "--api-key-file", str(key_file), "--max-upload-mb", str(MAX_UPLOAD_MB), "--max-slices", str(MAX_SLICES),
         "--request-timeout", "60", "--detach"],
        capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    url = f"http://127.0.0.1:{port}"
    assert f"at {url}" in out.stdout
    session = requests.Session()
    session.headers["X-API-Key"] = KEY
    yield {"url": url, "port": port, "http": session}
    serve.shutdown()


def test_config_file_is_what_raymed_serve_runs(capsys):
    from ray.serve.schema import ServeDeploySchema

    from raymed.serving.service import EXAMPLE_MODELS, service_config

    for name, extra in (("raymed.yaml", []), ("raymed-gpu.yaml", ["--gpus-per-replica", "1", "--max-batch-size", "64"])):
        shipped = yaml.safe_load((ROOT / "serve" / name).read_text())
        ServeDeploySchema.model_validate(shipped)
        models = [f"--model={k}={v}" for k, v in EXAMPLE_MODELS.items()]
        assert main(["serve", *models, "--host", "0.0.0.0", *extra, "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out) == shipped
    assert service_config(EXAMPLE_MODELS) == yaml.safe_load((ROOT / "serve" / "raymed.yaml").read_text())
    app = shipped["applications"][0]
    assert app["import_path"] == "raymed.serving.app:build"
    assert {d["name"] for d in app["deployments"]} == {"Gateway", *EXAMPLE_MODELS}


@pytest.mark.parametrize("args, message", [
    (["--model", "ae"], "expected NAME=RUN_OR_URI"),
    (["--model", "a=x", "--replicas", "3-1"], "MIN <= MAX"),
    (["--model", "bad/name=x"], "model name"),
    (["--model", "a=/no/such/run"], "no raymed checkpoint"),
])
def test_raymed_serve_refuses_bad_arguments_in_one_line(args, message, capsys):
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def demo_subject(demo_cohort) -> tuple[list[str], Case]:
    """A test subject's modalities in the models' channel order (sorted, as in training)."""
    subject = json.loads((demo_cohort / "splits.json").read_text())
    name = sorted(s for s, split in subject.items() if split == "test")[0]
    files = [str(demo_cohort / name / f"{name}_{m}.nii.gz") for m in ("flair", "t1", "t2")]
    return files, Case(subject=name, images=dict(zip(("flair", "t1", "t2"), files)))


def stacked_volume(files: list[str]) -> tuple[bytes, np.ndarray, tuple]:
    volumes = [read_volume(f) for f in files]
    array = np.stack([v.array for v in volumes], axis=-1).astype(np.float32)
    return encode_nifti(array, volumes[0].affine), volumes[0].affine, array.shape[:3]


def slice_png(files: list[str], z: int = 16) -> bytes:
    """An RGB PNG of one axial slice: the three modalities as the three colour channels."""
    rgb = np.stack([read_volume(f).array[:, :, z] for f in files], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray((255 * rgb / rgb.max()).astype(np.uint8), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def slice_npy(files: list[str], z: int = 16) -> bytes:
    return npy_bytes(np.stack([read_volume(f).array[:, :, z] for f in files]).astype(np.float32))


def test_health_and_model_list(endpoint):
    url, http = endpoint["url"], endpoint["http"]
    served = ["acgan", "ae", "cycle", "stylegan_ad", "vae"]
    assert requests.get(f"{url}/healthz").json() == {"status": "ok", "models": served}
    models = {m["name"]: m for m in http.get(f"{url}/v1/models").json()["models"]}
    assert models["ae"]["method"] == "ae" and models["ae"]["kind"] == ["detector"]
    assert models["vae"]["kind"] == ["detector", "generator"] and models["vae"]["operations"] == ["detect", "generate"]
    assert models["ae"]["input"]["channels"] == 3 and models["ae"]["input"]["size"] == 32
    assert models["ae"]["threshold"] == IMAGE_THRESHOLD and models["vae"]["threshold"] is None
    assert models["ae"]["image_score"]["reduction"] == "max" and len(models["ae"]["postprocess"]) == 2
    assert models["vae"]["image_score"]["reduction"] == "method" and models["vae"]["postprocess"] == []
    assert "val/auroc" in models["vae"]["metrics"] and models["vae"]["checkpoint"].startswith("s3://")
    assert models["ae"]["limits"]["max_slices"] == MAX_SLICES and models["ae"]["limits"]["max_upload_mb"] == MAX_UPLOAD_MB
    assert {"max_voxels", "max_float_mb", "request_timeout_s", "max_generate"} <= set(models["ae"]["limits"])
    openapi = requests.get(f"{url}/openapi.json").json()
    assert {"/healthz", "/v1/models", "/v1/models/{name}/detect", "/v1/models/{name}/generate",
            "/v1/models/{name}/translate"} <= set(openapi["paths"])


def test_detect_volume_matches_evaluation_and_map_keeps_affine(endpoint, models, demo_cohort):
    """The served scores and map are those evaluation computes for the stored threshold's settings."""
    from raymed.data.preprocess import to_source_grid
    from raymed.evaluation.detection import ImageScore, slice_scores
    from raymed.evaluation.postprocess import PostProcessing, smooth_map

    url, http = endpoint["url"], endpoint["http"]
    files, case = demo_subject(demo_cohort)
    body, affine, shape = stacked_volume(files)
    verdict = http.post(f"{url}/v1/models/ae/detect", data=body).json()
    method, _ = load_method(models["ae"])
    mapped = map_case(method, case)
    mask = mapped.prepared.mask
    smoothed = smooth_map(mapped.map, mask, PostProcessing(**POSTPROCESS))
    expected = slice_scores(smoothed, mask, ImageScore(**IMAGE_SCORE), mapped.slice_scores)
    assert np.allclose(verdict["slice_scores"], expected, atol=1e-4)
    assert not np.allclose(expected, mapped.slice_scores, atol=1e-3)  # the settings do change the scores
    brain = mask.reshape(-1, mask.shape[-1]).mean(axis=0) >= method.config.data.min_brain
    assert verdict["score"] == pytest.approx(expected[brain].max(), abs=1e-4)
    assert verdict["threshold"] == IMAGE_THRESHOLD and verdict["flagged"] == (verdict["score"] >= IMAGE_THRESHOLD)

    response = http.post(f"{url}/v1/models/ae/detect", data=body, headers={"Accept": "application/gzip"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/gzip"
    assert json.loads(response.headers["X-Anomaly-Score"]) == pytest.approx(verdict["score"])
    image = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
    assert image.shape == shape and np.allclose(image.affine, affine)
    amap = np.asarray(image.dataobj)
    assert np.allclose(amap, to_source_grid(smoothed, mapped.prepared), atol=1e-4) and amap.max() > 0

    no_threshold = http.post(f"{url}/v1/models/vae/detect?output=json", data=body).json()
    assert no_threshold["threshold"] is None and no_threshold["flagged"] is None


def test_detect_2d_slices_png_and_npy(endpoint, demo_cohort):
    url, http = endpoint["url"], endpoint["http"]
    files, _ = demo_subject(demo_cohort)
    png = http.post(f"{url}/v1/models/ae/detect", data=slice_png(files)).json()
    assert len(png["slice_scores"]) == 1 and png["score"] == png["slice_scores"][0] and png["flagged"] in (True, False)
    npy = http.post(f"{url}/v1/models/vae/detect", data=slice_npy(files))
    assert npy.status_code == 200 and len(npy.json()["slice_scores"]) == 1
    amap = http.post(f"{url}/v1/models/vae/detect?output=npy", data=slice_npy(files))
    assert np.load(io.BytesIO(amap.content)).shape == read_volume(files[0]).array.shape[:2]


def test_generate_is_reproducible_in_every_format(endpoint):
    url, http = endpoint["url"], endpoint["http"]
    first = http.post(f"{url}/v1/models/vae/generate", json={"n": 3, "seed": 7})
    again = http.post(f"{url}/v1/models/vae/generate", json={"n": 3, "seed": 7})
    images = np.load(io.BytesIO(first.content))
    assert images.shape == (3, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert first.content == again.content
    other = np.load(io.BytesIO(http.post(f"{url}/v1/models/vae/generate", json={"n": 3, "seed": 8}).content))
    assert not np.allclose(images, other)
    png = http.post(f"{url}/v1/models/vae/generate?output=png", json={"n": 2, "seed": 1})
    assert Image.open(io.BytesIO(png.content)).size == (3 * 32, 2 * 32)
    nifti = http.post(f"{url}/v1/models/vae/generate", json={"n": 2}, headers={"Accept": "application/gzip"})
    assert nib.Nifti1Image.from_bytes(gzip.decompress(nifti.content)).shape == (32, 32, 2, 3)
    assert http.post(f"{url}/v1/models/ae/generate", json={"n": 1}).json()["error"] == "unsupported_operation"
    assert http.post(f"{url}/v1/models/vae/translate", data=b"x").status_code == 405


@pytest.mark.parametrize("name", ["acgan", "stylegan_ad"])
def test_a_conditional_generator_generates_the_slice_position_asked_for(endpoint, tmp_path, monkeypatch, capsys,
                                                                      name):
    """The condition is the relative slice position: one seed, two positions, two images;
    the same position again (also from `raymed client generate --condition`), the same image."""
    url, http = endpoint["url"], endpoint["http"]

    def generate(condition):
        answer = http.post(f"{url}/v1/models/{name}/generate", json={"n": 2, "seed": 3, "condition": condition})
        assert answer.status_code == 200, answer.text
        return np.load(io.BytesIO(answer.content))

    low, high, again = generate([0.1, 0.1]), generate([0.9, 0.9]), generate([0.1, 0.1])
    assert low.shape == (2, 3, 32, 32) and np.array_equal(low, again) and not np.allclose(low, high)
    monkeypatch.setenv(KEY_ENV, KEY)
    assert main(["client", "generate", "--url", url, "--model", name, "--n", "2", "--seed", "3", "--condition",
                 "0.1", "0.1", "--out", str(tmp_path / "low.npy"), "--api-key-env", KEY_ENV]) == 0
    assert np.array_equal(np.load(tmp_path / "low.npy"), low) and "2 images written" in capsys.readouterr().out
    assert http.post(f"{url}/v1/models/{name}/generate", json={"n": 2, "condition": [0.5]}).json()["error"] == \
        "bad_condition"


def with_sform(body: bytes, srow) -> bytes:
    """A gzipped NIfTI whose affine (sform, the qform switched off) is replaced by the 3 rows `srow`."""
    raw = bytearray(gzip.decompress(body))
    raw[252:256] = np.array([0, 1], "<i2").tobytes()  # qform_code 0, sform_code 1
    raw[280:328] = np.asarray(srow, "<f4").tobytes()
    return gzip.compress(bytes(raw))


def bad_inputs(files: list[str]) -> list[tuple[str, dict, int, str]]:
    """(path, request kwargs, expected status, expected error code) for every kind of bad request."""
    body, affine, shape = stacked_volume(files)
    single = read_volume(files[0])
    nan = np.stack([read_volume(f).array[:, :, 16] for f in files]).astype(np.float32)
    nan[0, 3, 3] = np.nan
    grey = io.BytesIO()
    Image.fromarray(np.zeros((32, 32), np.uint8) + 100, mode="L").save(grey, format="PNG")
    zeros_gzip = gzip.compress(b"\0" * (8 * MAX_UPLOAD_MB * 2**20 + 1024))
    huge_header = gzip.compress(encode_nifti(np.ones((8, 8, 8, 3), np.float32), affine, compress=False)[:348]
                                .replace(b"\x04\x00\x08\x00\x08\x00\x08\x00\x03\x00",
                                         b"\x04\x00\x00\x04\x00\x04\x00\x04\x03\x00") + b"\0" * 2**20)
    five_d = encode_nifti(np.ones((8, 8, 8, 3, 2), np.float32), affine)
    zeros = encode_nifti(np.zeros((*shape, 3), np.float32), affine)
    detect = "/v1/models/ae/detect"
    return [
        (detect, {"data": os.urandom(MAX_UPLOAD_MB * 2**20 + 1)}, 413, "too_large"),
        (detect, {"data": zeros_gzip}, 415, "unsupported_format"),
        (detect, {"data": huge_header}, 413, "too_large"),
        (detect, {"data": with_sform(body, np.zeros(12))}, 422, "no_geometry"),
        (detect, {"data": with_sform(body, [np.nan] + [0.0] * 11)}, 422, "no_geometry"),
        (detect, {"data": encode_nifti(np.ones((8, 8, MAX_SLICES + 1, 3), np.float32), affine)}, 413, "too_large"),
        (detect, {"data": b""}, 400, "empty_body"),
        (detect, {"data": b"definitely not an image" * 20}, 415, "unsupported_format"),
        (detect, {"data": body[: len(body) // 2]}, 400, "undecodable"),
        (detect, {"data": five_d}, 422, "bad_shape"),
        (detect, {"data": encode_nifti(single.array, single.affine)}, 422, "wrong_channels"),
        (detect, {"data": grey.getvalue()}, 422, "wrong_channels"),
        (detect, {"data": npy_bytes(nan)}, 422, "non_finite"),
        (detect, {"data": npy_bytes(np.ones((2, 3, 32, 32), np.float32))}, 422, "bad_shape"),
        (detect, {"data": npy_bytes(np.ones((3, 32, 32), np.complex64))}, 422, "bad_dtype"),
        (detect, {"data": zeros}, 422, "unusable_input"),
        (detect + "?output=tiff", {"data": body}, 406, "unsupported_output"),
        ("/v1/models/nope/detect", {"data": body}, 404, "unknown_model"),
        ("/v1/models/vae/generate", {"json": {"n": 0}}, 422, "invalid_request"),
        ("/v1/models/vae/generate", {"json": {"n": 10_000}}, 422, "too_many"),
        ("/v1/models/vae/generate", {"json": {"n": 2, "condition": [0.5]}}, 422, "bad_condition"),
        ("/v1/models/vae/generate", {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
         422, "invalid_request"),
    ]


def test_every_bad_input_gets_its_4xx_and_the_next_request_succeeds(endpoint, demo_cohort):
    url, http = endpoint["url"], endpoint["http"]
    files, _ = demo_subject(demo_cohort)
    good = slice_npy(files)
    for path, kwargs, status, error in bad_inputs(files):
        response = http.post(f"{url}{path}", **kwargs)
        assert (response.status_code, response.json()["error"]) == (status, error), (path, response.text)
        assert response.json()["detail"] and response.json()["request_id"] == response.headers["x-request-id"]
        assert http.post(f"{url}/v1/models/ae/detect", data=good).status_code == 200


def test_a_volume_of_32000_slices_is_refused_from_its_header_within_a_second(endpoint):
    """8×8×32000×3 (a few MB on the wire) would be ~6 GB of float copies at the model's size."""
    url, http = endpoint["url"], endpoint["http"]
    volume = np.broadcast_to(np.linspace(0, 1, 32000, dtype=np.float32)[None, None, :, None], (8, 8, 32000, 3))
    body = encode_nifti(np.ascontiguousarray(volume), np.eye(4))
    assert len(body) < MAX_UPLOAD_MB * 2**20  # small enough on the wire: the header is what refuses it
    began = time.perf_counter()
    response = http.post(f"{url}/v1/models/ae/detect", data=body)
    elapsed = time.perf_counter() - began
    assert response.status_code in (413, 422) and elapsed < 1.0, (response.text, elapsed)
    assert "32000 axial slices" in response.json()["detail"]


def test_the_api_key_is_in_no_deployed_config_and_is_enforced(endpoint, ray_session):
    import ray

    from raymed.cluster.jobs import auth_headers

    api = f"http://{ray.init(ignore_reinit_error=True).dashboard_url}/api/serve/applications/"
    answer = requests.get(api, headers=auth_headers(api), timeout=30)
    assert answer.status_code == 200, answer.text
    details = answer.json()
    assert KEY not in json.dumps(details)
    assert details["applications"]["raymed"]["deployed_app_config"]["args"]["api_key_file"].endswith("key")
    # run folders are pinned to one checkpoint when deployed
    pinned = details["applications"]["raymed"]["deployed_app_config"]["args"]["models"]
    assert pinned["ae"].rstrip("/").split("/")[-1] == "ae-checkpoint"


def test_api_key_is_enforced(endpoint, demo_cohort):
    url = endpoint["url"]
    files, _ = demo_subject(demo_cohort)
    for headers in ({}, {"X-API-Key": "wrong"}):
        assert requests.get(f"{url}/v1/models", headers=headers).status_code == 401
        response = requests.post(f"{url}/v1/models/ae/detect", data=slice_npy(files), headers=headers)
        assert response.status_code == 401 and response.json()["error"] == "unauthorized"
    assert requests.get(f"{url}/healthz").status_code == 200


def test_client_command_writes_the_map(endpoint, demo_cohort, tmp_path, capsys, monkeypatch):
    files, _ = demo_subject(demo_cohort)
    monkeypatch.setenv(KEY_ENV, KEY)
    out = tmp_path / "map.nii.gz"
    assert main(["client", "detect", *files, "--url", endpoint["url"], "--model", "ae", "--out", str(out),
                 "--api-key-env", KEY_ENV]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["flagged"] == (printed["score"] >= IMAGE_THRESHOLD)
    assert np.allclose(read_volume(str(out)).affine, read_volume(files[0]).affine)
    assert main(["client", "models", "--url", endpoint["url"], "--api-key-env", "RAYMED_NO_SUCH_VAR"]) == 2
    assert "401" in capsys.readouterr().err


def tissue_labels(demo_cohort, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A test subject's tissue label map (0 background, 1 CSF, 2 GM, 3 WM) from its tissue maps, written to `path`."""
    _, case = demo_subject(demo_cohort)
    maps = [read_volume(str(demo_cohort / case.subject / f"{case.subject}_{t}.nii.gz")) for t in TISSUES]
    tissue = np.stack([m.array for m in maps])
    labels = np.concatenate([1 - tissue.sum(0, keepdims=True), tissue]).argmax(0).astype(np.uint8)
    path.write_bytes(encode_nifti(labels, maps[0].affine))
    return labels, maps[0].affine


def test_cycle_paints_a_tissue_label_map_as_its_generator_does(endpoint, models, demo_cohort, tmp_path, capsys,
                                                                monkeypatch):
    """`raymed client translate` sends a label map; the image comes back on its grid, equal to G run in-process."""
    import torch

    from raymed.data.io import Volume
    from raymed.data.preprocess import prepare_labels, to_source_grid

    url, http = endpoint["url"], endpoint["http"]
    labels, affine = tissue_labels(demo_cohort, tmp_path / "labels.nii.gz")
    monkeypatch.setenv(KEY_ENV, KEY)
    out = tmp_path / "painted.nii.gz"
    assert main(["client", "translate", str(tmp_path / "labels.nii.gz"), "--url", url, "--model", "cycle",
                 "--out", str(out), "--api-key-env", KEY_ENV]) == 0
    assert "translation written" in capsys.readouterr().out
    painted = read_volume(str(out))
    assert painted.array.shape == (*labels.shape, 3) and np.allclose(painted.affine, affine)

    method, _ = load_method(models["cycle"])
    prepared = prepare_labels(labels, Volume(labels, affine), method.config.data, 4, "labels")
    with torch.no_grad():
        images = method.translate(torch.from_numpy(np.moveaxis(prepared.image, -1, 0))).numpy()
    expected = np.stack([to_source_grid(np.moveaxis(images[:, c], 0, -1), prepared) for c in range(3)], axis=-1)
    assert np.allclose(painted.array, expected, atol=1e-4)

    info = {m["name"]: m for m in http.get(f"{url}/v1/models").json()["models"]}["cycle"]
    assert info["operations"] == ["detect", "translate"] and info["translation_labels"] == 4
    buffer = io.BytesIO()
    Image.fromarray(labels[:, :, 16], mode="L").save(buffer, format="PNG")
    painted_slice = np.load(io.BytesIO(http.post(f"{url}/v1/models/cycle/translate?output=npy",
                                                 data=buffer.getvalue()).content))
    assert painted_slice.shape == (1, 3, 32, 32)
    refused = http.post(f"{url}/v1/models/cycle/translate", data=npy_bytes(np.full((32, 32), 7, np.float32)))
    assert refused.status_code == 422 and "whole numbers 0-3; found 7" in refused.json()["detail"]


def run_load(url: str, http_headers: dict, bodies: list[bytes], clients: int, requests_each: int,
             during=None) -> list[int]:
    """`clients` threads each sending `requests_each` detect requests; returns every status code."""
    statuses, lock = [], threading.Lock()

    def client(index: int) -> None:
        with requests.Session() as session:
            session.headers.update(http_headers)
            for i in range(requests_each):
                model = "ae" if (index + i) % 3 else "vae"
                code = session.post(f"{url}/v1/models/{model}/detect", data=bodies[(index + i) % len(bodies)],
                                    timeout=120).status_code
                with lock:
                    statuses.append(code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    if during:
        during()
    for thread in threads:
        thread.join()
    return statuses


def test_concurrent_load_has_no_server_errors(endpoint, demo_cohort):
    files, _ = demo_subject(demo_cohort)
    bodies = [slice_npy(files, z) for z in (10, 14, 18, 22)] + [slice_png(files, 16)]
    statuses = run_load(endpoint["url"], {"X-API-Key": KEY}, bodies, clients=16, requests_each=25)
    assert len(statuses) == 400 and set(statuses) == {200}


def replica_actors(deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::raymed#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def test_killed_replica_is_replaced_and_the_endpoint_keeps_answering(endpoint, demo_cohort):
    import ray
    from ray import serve

    files, _ = demo_subject(demo_cohort)
    before = replica_actors("ae")
    assert len(before) == 2
    victim = before[0]

    def kill_one() -> None:
        time.sleep(1.0)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

    statuses = run_load(endpoint["url"], {"X-API-Key": KEY}, [slice_npy(files, z) for z in (12, 16, 20)],
                        clients=8, requests_each=20, during=kill_one)
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 0.9 * len(statuses), statuses
    assert endpoint["http"].post(f"{endpoint['url']}/v1/models/ae/detect", data=slice_npy(files)).status_code == 200
    deadline = time.time() + 180
    while time.time() < deadline:
        now = replica_actors("ae")
        deployment = serve.status().applications["raymed"].deployments["ae"]
        if victim not in now and len(now) == 2 and deployment.replica_states.get("RUNNING") == 2:
            break
        time.sleep(1)
    else:
        pytest.fail(f"Serve did not replace the killed replica: {now}, {deployment}")
    assert endpoint["http"].post(f"{endpoint['url']}/v1/models/ae/detect", data=slice_npy(files)).status_code == 200


def test_serve_and_probe_serves_a_run_and_answers_one_request(endpoint, models, demo_cohort):
    from raymed.serving.service import serve_and_probe

    result = serve_and_probe(models["ae_run"], str(demo_cohort), port=endpoint["port"])
    assert result["model"] == "ae" and result["url"] == endpoint["url"]
    assert [Path(f).name.split("_")[-1] for f in result["files"]] == ["flair.nii.gz", "t1.nii.gz", "t2.nii.gz"]
    response = result["response"]
    assert response["score"] > 0 and response["threshold"] is None and len(response["slice_scores"]) == 32
    assert requests.get(f"{endpoint['url']}/healthz").json()["models"] == ["ae"]


def test_translate_runs_a_translator_and_returns_the_input_grid(demo_cohort):
    """The image-to-image branch (no registered method translates images: cycle takes label maps)
    runs on a model server object holding the ae network as a translator, outside Serve."""
    import asyncio

    import torch

    from raymed.methods.ae import AutoEncoderMethod
    from raymed.serving.codecs import Limits, RequestError
    from raymed.serving.model import ModelServer
    from tests.conftest import tiny_config

    class Translator(AutoEncoderMethod):
        kind = ("translator",)

        def translate(self, x):
            return self.reconstruct(x)

    server = object.__new__(ModelServer.func_or_class)
    server.name, server.method = "t", Translator(tiny_config("ae"), 3)
    server.device, server.limits, server.volumes = torch.device("cpu"), Limits(2**26, 1024, 2**30), asyncio.Semaphore(2)
    server.method.nets.eval()
    files, _ = demo_subject(demo_cohort)
    body, affine, shape = stacked_volume(files)
    out = nib.Nifti1Image.from_bytes(gzip.decompress(asyncio.run(server.translate(body, "nifti"))))
    assert out.shape == (*shape, 3) and np.allclose(out.affine, affine)
    translated_slice = np.load(io.BytesIO(asyncio.run(server.translate(slice_npy(files), "npy"))))
    assert translated_slice.shape == (1, 3, 32, 32)
    with pytest.raises(RequestError, match="cannot detect"):
        asyncio.run(server.detect(body, "json"))


def test_an_unexpected_error_is_a_json_500_with_the_request_id():
    """Whatever escapes a route (a torch or MONAI failure, a bug) still answers JSON, over real HTTP."""
    import uvicorn
    from fastapi import FastAPI

    from raymed.serving.gateway import JsonErrors

    app = FastAPI()
    app.add_middleware(JsonErrors)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("CUDA error: an illegal memory access\nmore lines")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        response = requests.get(f"http://127.0.0.1:{port}/boom", headers={"x-request-id": "r-1"}, timeout=10)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert response.status_code == 500
    assert response.json() == {"error": "internal_error", "detail": "RuntimeError: CUDA error: an illegal memory access",
                               "request_id": "r-1"}
