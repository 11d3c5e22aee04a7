"""Prepared datasets: `raymed data prepare` as a real Ray Data pipeline, volumes read back as
`prepare` made them, the recorded settings enforced, bad cases, reruns, and training that streams
them from S3 (moto) into two Ray Train workers, one of which is killed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from raymed.cli import main
from raymed.data.discovery import discover
from raymed.data.io import read_volume
from raymed.data.prepared import MANIFEST, PreparedDataset, prepare_dataset
from raymed.data.preprocess import prepare, to_source_grid
from raymed.data.slices import load_slices
from raymed.engine.trainer import TrainRequest, train
from raymed.errors import ConfigError, DataError
from raymed.methods.base import DataSettings
from tests.conftest import tiny_config
from tests.test_engine import _worker_pids, metrics_log


@pytest.fixture(scope="module")
def prepared_brats(ray_session, brats_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "brats"
    assert main(["data", "prepare", str(brats_folder), "--out", str(out), "--set", "data.size=16",
                 "--set", "data.split_seed=1"]) == 0
    return out


def test_volumes_read_back_are_what_prepare_made(prepared_brats, brats_folder):
    settings = DataSettings(size=16, split_seed=1, modalities=["flair", "t1"])
    raw = {c.subject: c for c in discover(str(brats_folder))}
    cases = discover(str(prepared_brats))
    assert [c.subject for c in cases] == sorted(raw) and all(c.prepared for c in cases)
    for case in cases:
        made, read = prepare(raw[case.subject], settings), prepare(case, settings)
        for name in ("image", "mask", "label", "affine"):
            np.testing.assert_array_equal(getattr(read, name), getattr(made, name), err_msg=name)
        assert read.source.array.shape == made.source.array.shape
        np.testing.assert_array_equal(to_source_grid(read.mask, read), to_source_grid(made.mask, made))
    # one of the prepared modalities: its channel, as if prepared alone (these cases have mask files)
    t1 = DataSettings(size=16, split_seed=1, modalities=["t1"])
    np.testing.assert_array_equal(prepare(cases[0], t1).image, prepare(raw[cases[0].subject], t1).image)
    # a phase's slices: the same by subject, healthy filter and min_brain as from the files
    dataset = PreparedDataset.open(str(prepared_brats))
    for min_brain in (0.05, 0.3):
        memory = load_slices(list(raw.values()), settings, healthy_only=True, min_brain=min_brain)
        selected = dataset.selected(sorted(raw), healthy=True, min_brain=min_brain)
        assert sorted((s, i) for s, idx in selected.items() for i in idx) == sorted(memory.keys)


def test_a_run_with_other_preprocessing_is_refused_naming_the_key(prepared_brats, tmp_path):
    for key, value, message in (("data.size", 32, "data.size=16, this run has data.size=32"),
                                ("data.upper_percentile", 95.0, "data.upper_percentile=99.0"),
                                ("data.split_seed", 0, "data.split_seed=1"),
                                ("data.modalities", ["t1", "t2"], r'data.modalities=\["flair", "t1"\]')):
        request = TrainRequest(method="ae", source=str(prepared_brats), name="refused", storage=str(tmp_path),
                               config=tiny_config("ae", **{"data.size": 16, "data.split_seed": 1, key: value}))
        with pytest.raises(ConfigError, match=message):
            train(request)
    assert not (tmp_path / "refused").exists()


def test_bad_cases_stop_or_are_skipped_and_a_rerun_keeps_the_shards(ray_session, brats_folder, tmp_path):
    source = tmp_path / "cohort"
    shutil.copytree(brats_folder, source)
    (source / "case03" / "case03_t1.nii.gz").write_bytes(b"\x1f\x8b truncated")
    out = tmp_path / "prepared"
    lines = []
    with pytest.raises(DataError, match=r"1 of 6 cases cannot be prepared \(case03: .*case03_t1.nii.gz"):
        prepare_dataset(str(source), str(out), DataSettings(size=16), report=lines.append)
    assert not (out / MANIFEST).exists() and len(list((out / "slices").glob("*.parquet"))) == 5
    written = {p.name: p.stat().st_mtime_ns for p in (out / "slices").glob("*.parquet")}
    with pytest.raises(ConfigError, match="data.size=16, this run has data.size=32"):
        prepare_dataset(str(source), str(out), DataSettings(size=32))
    lines.clear()
    manifest = prepare_dataset(str(source), str(out), DataSettings(size=16, skip_bad=True), report=lines.append)
    assert sum("kept from the unfinished run" in line for line in lines) == 5
    assert {p.name: p.stat().st_mtime_ns for p in (out / "slices").glob("*.parquet")} == written
    assert [c["subject"] for c in manifest["cases"]] == ["case00", "case01", "case02", "case04", "case05"]
    assert manifest["skipped"][0]["subject"] == "case03" and "case03_t1.nii.gz" in manifest["skipped"][0]["error"]
    with pytest.raises(ConfigError, match="already a prepared dataset"):
        prepare_dataset(str(source), str(out), DataSettings(size=16))


def test_training_streams_a_prepared_dataset_from_s3_and_survives_a_killed_worker(trained_run, demo_cohort,
                                                                                  s3_bucket, tmp_path):
    """The shared 2-worker `ae` run read the raw cohort; this one streams the same cohort, prepared
    on S3, with the same config and seed, and loses a worker after its second epoch."""
    raw = trained_run("ae")
    config = tiny_config("ae", epochs=6, lr=1e-3)
    prefix = f"{s3_bucket}/prepared/demo"
    prepare_dataset(str(demo_cohort), prefix, config.data.model_copy())
    request = TrainRequest(method="ae", source=prefix, storage=str(tmp_path), name="streamed", config=config,
                           workers=2, max_failures=1)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=train(request)))
    thread.start()
    run = tmp_path / "streamed"
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and len(metrics_log(run)) >= 2):
        time.sleep(0.05)
    victims = _worker_pids()
    assert victims, "no training worker process found"
    os.kill(victims[-1], signal.SIGKILL)
    thread.join(timeout=600)
    assert outcome["result"].error is None
    log, reference = metrics_log(run), metrics_log(raw)
    assert [r["epoch"] for r in log] == list(range(1, 7)), "an epoch was lost or repeated after the restart"
    assert all(r["sync/param_diff"] == 0 for r in log)
    assert log[0]["memory/peak_rss_mb"] > log[0]["memory/private_mb"] > 0 and log[0]["startup_s"] > 0
    # the same data and seed: the loss falls as it did from the raw files (only the order differs)
    assert log[-1]["train/loss"] < log[0]["train/loss"]
    assert log[-1]["train/loss"] == pytest.approx(reference[-1]["train/loss"], rel=0.15)
    assert log[-1]["val/auprc"] == pytest.approx(reference[-1]["val/auprc"], abs=0.05)
    # evaluation reads the test volumes back from S3's records; maps land on the original files' grid
    report = tmp_path / "report"
    assert main(["evaluate", str(run), "--data", prefix, "--out", str(report)]) == 0
    subject = next(c.subject for c in discover(prefix) if c.split == "test")
    written = read_volume(str(report / "maps" / f"{subject}_anomaly.nii.gz"))
    original = read_volume(str(demo_cohort / subject / f"{subject}_t2.nii.gz"))
    assert written.array.shape == original.array.shape and np.allclose(written.affine, original.affine)
    assert json.loads((report / "metrics.json").read_text())["results"]["ae"]["pixel"]["auprc"] > 0


def test_shard_readers_import_neither_monai_nor_torch():
    """Each Ray Data read task runs in its own process; importing MONAI there cost seconds per process."""
    code = "import sys, raymed.data.shards; print(sorted({'monai', 'torch'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
