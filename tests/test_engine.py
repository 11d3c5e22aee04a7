"""The Ray Train engine for real: DDP over gloo with 2 workers, checkpoints on S3, volume maps.
Crash recovery and resume are tested on a two-phase method, in test_engine_contract."""

import json
import os

import numpy as np
import psutil
import pytest

from raymed.data.discovery import discover
from raymed.data.io import read_volume, write_volume
from raymed.engine import checkpoint as ckpt
from raymed.engine.inference import map_case
from raymed.engine.trainer import TrainRequest, train
from raymed.errors import DataError
from raymed.methods.registry import method_class
from tests.conftest import AFFINE, tiny_config, upload_folder


def metrics_log(run) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


@pytest.mark.parametrize("method", ["ae", "vae", "gmvae", "fanogan", "dae"])
def test_two_workers_train_and_loss_falls(trained_run, method):
    run = trained_run(method)  # 2 workers; the run other tests share
    config = ckpt.load_method(run)[0].config
    log = metrics_log(run)
    phases = [p.name for p in method_class(method)(config, 1).phases()]
    assert [r["phase"] for r in log] == [p for p in phases for _ in range(config.model_dump().get(
        {"gan": "gan_epochs", "encoder": "encoder_epochs"}.get(p, "epochs")))]
    last_phase = [r for r in log if r["phase"] == phases[-1]]
    key = next(k for k in last_phase[0] if k.startswith("train/"))
    assert last_phase[-1][key] < last_phase[0][key], f"{key} did not fall: {last_phase[0][key]} -> {last_phase[-1][key]}"
    assert 0 <= last_phase[-1]["val/auroc"] <= 1
    # DDP kept the ranks in step: every module's weights are identical on both workers
    drift = [r["sync/param_diff"] for r in log if "sync/param_diff" in r]
    assert drift and all(d == 0 for d in drift), drift
    summary = json.load(open(os.path.join(run, "result.json")))
    model, state = ckpt.load_method(run)
    assert state["uri"] == summary["best_checkpoint"] and model.name == method
    saved = open(os.path.join(run, "config.yaml")).read()
    assert f"method: {method}" in saved


def _worker_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::RayTrainWorker")]


def test_checkpoint_on_s3_gives_the_same_anomaly_map(ray_session, demo_cohort, s3_bucket, tmp_path):
    storage = f"{s3_bucket}/runs"
    result = train(TrainRequest(method="ae", source=str(demo_cohort), config=tiny_config("ae", epochs=2),
                                name="s3run", storage=storage, workers=2))
    assert result.error is None
    summary = json.loads(ckpt.read_bytes(f"{storage}/s3run/result.json"))
    assert summary["best_checkpoint"].startswith(f"{storage}/s3run/checkpoint_")
    from_s3, _ = ckpt.load_method(f"{storage}/s3run")
    # a model saved locally, uploaded and loaded back from S3 maps exactly as before saving
    case = [c for c in discover(str(demo_cohort)) if c.split == "test"][0]
    folder = tmp_path / "ckpt"
    folder.mkdir()
    ckpt.save(folder, from_s3, {}, None, {"phase": 1, "epoch": 0, "step": 0}, {})
    upload_folder(folder, f"{s3_bucket}/copy")
    reloaded, _ = ckpt.load_method(f"{s3_bucket}/copy")
    np.testing.assert_array_equal(map_case(from_s3, case).map, map_case(reloaded, case).map)


def test_anomaly_map_volume_keeps_input_geometry(ray_session, demo_cohort, tmp_path):
    method = method_class("ae")(tiny_config("ae"), in_channels=3)
    case = [c for c in discover(str(demo_cohort)) if c.split == "test"][0]
    result = map_case(method, case)
    source = read_volume(case.images["flair"])
    full = result.on_source_grid()
    assert full.shape == source.array.shape and result.slice_scores.shape == (result.map.shape[-1],)
    write_volume(str(tmp_path / "map.nii.gz"), full, source.affine)
    np.testing.assert_allclose(read_volume(str(tmp_path / "map.nii.gz")).affine, source.affine)


def test_no_healthy_training_slices_fails_before_workers(tmp_path):
    for i in range(3):
        image = np.ones((16, 16, 4), np.float32)
        write_volume(str(tmp_path / f"s{i}" / f"s{i}_flair.nii.gz"), image, AFFINE)
        write_volume(str(tmp_path / f"s{i}" / f"s{i}_seg.nii.gz"), np.ones((16, 16, 4), np.uint8), AFFINE)
    with pytest.raises(DataError, match="no healthy training slices"):
        train(TrainRequest(method="ae", source=str(tmp_path), config=tiny_config("ae"), name="x",
                           storage=str(tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()
