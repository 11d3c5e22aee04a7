"""The engine's contract for multi-phase methods, for real on Ray Train: every batch field, a
labelled subset sharded by slice, schedules, early stopping, init_from, phase-boundary restarts
and resumes, and validation that agrees with `raymed evaluate`."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml

from raymed.engine import checkpoint as ckpt
from raymed.engine.progress import ProgressCallback
from raymed.engine.trainer import TrainRequest, train
from raymed.errors import ConfigError, DataError
from raymed.evaluation.evaluate import evaluate, open_target
from raymed.methods.registry import build_config
from tests.conftest import TINY, TINY_NETS, tiny_config
from tests.test_engine import _worker_pids, metrics_log

PROBE = "tests.probe_method:Probe"


def probe_request(demo_cohort, storage, name, **overrides) -> TrainRequest:
    config = build_config(PROBE, overrides={"data.size": 32, **overrides})
    return TrainRequest(method=PROBE, source=str(demo_cohort), config=config, name=name, storage=str(storage),
                        workers=2)


def test_probe_uses_every_field_schedule_early_stopping_and_init_from(ray_session, demo_cohort, tmp_path):
    result = train(probe_request(demo_cohort, tmp_path, "first"))
    assert result.error is None
    log = metrics_log(tmp_path / "first")
    # the metric never improves: patience 1 ends the 6-epoch phase at its second validation
    assert [r["epoch"] for r in log] == [1, 2] and "early stopping: val/constant" in log[-1]["stopped"]
    assert log[-1]["restored_best_epoch"] == 1
    assert log[0]["lr"] == pytest.approx(5e-3) and log[1]["lr"] == pytest.approx(2.5e-3)  # step schedule, γ 0.5
    assert all(r["sync/param_diff"] == 0 for r in log) and all("val/loss" in r for r in log)
    saved = yaml.safe_load((tmp_path / "first" / "config.yaml").read_text())
    assert saved["config"]["data"]["modalities"] == ["flair", "t1", "t2"]  # pinned before any worker started

    with pytest.raises(DataError, match="module head does not match"):
        train(probe_request(demo_cohort, tmp_path, "strict", head=3, **{"train.init_from": str(tmp_path / "first")}))
    second = probe_request(demo_cohort, tmp_path, "second", head=3, lr=0.0,
                           **{"train.init_from": str(tmp_path / "first"), "train.init_strict": False})
    assert train(second).error is None
    first_model, first_state = ckpt.load_method(str(tmp_path / "first"))
    second_model, _ = ckpt.load_method(str(tmp_path / "second"))
    for name, tensor in first_model.nets["body"].state_dict().items():
        torch.testing.assert_close(second_model.nets["body"].state_dict()[name], tensor, rtol=0, atol=0)
    assert second_model.nets["head"].weight.shape[0] == 3
    recorded = yaml.safe_load((tmp_path / "second" / "config.yaml").read_text())["config"]["train"]
    assert recorded["init_from"] == first_state["uri"] and recorded["init_strict"] is False


FANOGAN = {**TINY, **TINY_NETS["fanogan"], "n_critic": 2, "train.val_every": 100}


def test_fanogan_worker_killed_in_phase_two_restarts_from_the_boundary(ray_session, demo_cohort, tmp_path):
    request = TrainRequest(method="fanogan", source=str(demo_cohort), storage=str(tmp_path), name="crash",
                           config=tiny_config("fanogan", gan_epochs=2, encoder_epochs=8, **{"train.val_every": 100}),
                           workers=2, max_failures=1)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=train(request)))
    thread.start()
    run = tmp_path / "crash"
    deadline = time.time() + 180
    # the phase-boundary checkpoint, once the controller has committed it (its report is logged)
    while time.time() < deadline and not (list(run.glob("checkpoint_*")) and (run / "metrics.jsonl").exists()
                                          and any(r["phase"] == "gan" and r["epoch"] == 2 for r in metrics_log(run))):
        time.sleep(0.05)
    victims = _worker_pids()
    assert victims, "no training worker process found"
    os.kill(victims[-1], signal.SIGKILL)
    thread.join(timeout=400)
    result = outcome["result"]
    assert result.error is None
    log = metrics_log(run)
    assert [r["phase"] for r in log].count("gan") == 2, "the GAN phase was trained again after the restart"
    assert log[-1]["phase"] == "encoder" and log[-1]["epoch"] == 8 and result.metrics["step"] == log[-1]["step"]


def test_fanogan_interrupted_in_phase_two_resumes(ray_session, demo_cohort, tmp_path):
    args = [sys.executable, "-m", "raymed.cli", "train", "fanogan", "--data", str(demo_cohort), "--storage",
            str(tmp_path), "--name", "cut", "--workers", "1", "--set", "gan_epochs=2", "--set", "encoder_epochs=12"]
    args += [f"--set={k}={v}" for k, v in FANOGAN.items()]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    run = tmp_path / "cut"
    deadline = time.time() + 180
    while time.time() < deadline and not any(
            r["phase"] == "encoder" for r in (metrics_log(run) if (run / "metrics.jsonl").exists() else [])):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = metrics_log(run)
    assert before[-1]["phase"] == "encoder" and before[-1]["epoch"] < 12
    with pytest.raises(ConfigError, match="already exists"):  # a new run may not take over its folder
        train(TrainRequest(method="fanogan", source=str(demo_cohort), config=tiny_config("fanogan"), name="cut",
                           storage=str(tmp_path)))
    out = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-2000:]
    after = metrics_log(run)[len(before):]
    assert {r["phase"] for r in after} == {"encoder"} and after[-1]["epoch"] == 12
    boundary = [r for r in before if r["phase"] == "gan"][-1]["step"]
    assert after[0]["step"] > boundary, "resume went back before the phase boundary"
    assert "best checkpoint:" in out.stdout


def test_validation_agrees_with_evaluate(trained_run, demo_cohort, tmp_path):
    """Checkpoint choice and Tune's metric use the number `raymed evaluate --split val` reports."""
    run = trained_run("ae", **{"postprocess.median": 3})
    summary = json.loads(open(os.path.join(run, "result.json")).read())
    metrics = evaluate(open_target(run, str(demo_cohort)), str(demo_cohort), str(tmp_path / "val"), split="val",
                       reference=False, maps=False, progress=lambda line: None)
    result = metrics["results"]["ae"]
    assert result["postprocess"] == ["median filter k=3 (2D)"]  # the run's own post-processing by default
    assert abs(result["pixel"]["auprc"] - summary["best_metrics"]["val/auprc"]) < 0.02


def test_metrics_log_is_appended(tmp_path):
    callback = ProgressCallback(str(tmp_path))
    report = {"phase": "p", "epoch": 1, "epochs": 2, "step": 1, "epochs_left": 1, "epoch_s": 0.1, "slices_per_s": 1}
    callback.after_report(None, [report], None)
    inode = os.stat(tmp_path / "metrics.jsonl").st_ino
    callback.after_report(None, [{**report, "epoch": 2}], None)
    assert os.stat(tmp_path / "metrics.jsonl").st_ino == inode  # written in place, not replaced
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2]
