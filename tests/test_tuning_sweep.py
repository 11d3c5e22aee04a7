"""Sweeps for real: Ray Tune trials of Ray Train runs on the demo cohort, OptunaSearch + ASHA,
the exported best config retrained, an interrupted `raymed tune` resumed, a failing trial recorded."""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from ray import tune

from raymed.cli import main
from raymed.engine import checkpoint as ckpt
from raymed.engine.trainer import TrainRequest, train
from raymed.methods.registry import build_config, load_yaml
from raymed.tuning.sweep import SweepRequest, run_sweep
from tests.conftest import TINY, TINY_NETS, tiny_config


def log(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def study(sweep_folder, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_folder}/optuna.db")


def test_sweep_schedules_on_validation_epochs_and_its_best_config_retrains(ray_session, demo_cohort, tmp_path):
    # validation (and so val/auprc) only every 2nd epoch and at the end: epochs 2 and 3
    base = tiny_config("ae", epochs=3, **{"train.val_every": 2}).model_dump(mode="json")
    request = SweepRequest(method="ae", source=str(demo_cohort), trials=2, name="sweep", storage=str(tmp_path),
                           base=base, space={"lr": {"loguniform": [3e-4, 3e-3]}, "loss": {"grid": ["l1", "l2"]}})
    outcome = run_sweep(request)
    table, folder = outcome.table, tmp_path / "sweep"
    assert len(table) == 2 and table["trial"].is_unique and not outcome.interrupted
    assert set(table["status"]) <= {"completed", "stopped"}, table.to_string()
    assert list(table["loss"]) == ["l1", "l2"]  # every grid value is run first
    assert set(table["epochs"]) <= {2, 3} and table["val/auprc"].between(0, 1).all()
    assert (table["epochs"][table["status"] == "completed"] == 3).all()  # Tune got every last epoch's report

    # Tune saw only reports that carry the metric, each with the epoch counter ASHA schedules on
    analysis = tune.ExperimentAnalysis(str(folder))
    for trial_id, frame in analysis.trial_dataframes.items():
        assert frame["val/auprc"].notna().all() and set(frame["epochs_done"]) <= {2, 3}
        assert list(frame["training_iteration"]) == list(range(1, len(frame) + 1))
        train_log = log(folder / "train" / trial_id / "metrics.jsonl")
        assert train_log[0]["epochs_done"] == 1 and "val/auprc" not in train_log[0]
    # ... and Optuna got every trial's last value, in a study that Optuna's own tools open
    finished = study(folder, "sweep").get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert sorted(t.value for t in finished) == pytest.approx(sorted(table["val/auprc"]))

    best = json.loads((folder / "best.json").read_text())
    assert best["status"] == "completed" and best["value"] == pytest.approx(table["val/auprc"][
        table["status"] == "completed"].max())
    assert (folder / "trials.csv").read_text().startswith("trial,status,epochs,val/auprc,lr,loss,checkpoint")
    for png in ("metric_by_trial.png", "param_importance.png"):
        assert (folder / png).read_bytes()[:4] == b"\x89PNG"
    assert set(best["importance"]) == {"lr", "loss"}

    # the exported config is exactly what the best trial trained with, and `raymed train` takes it
    exported = build_config("ae", load_yaml(str(folder / "best_config.yaml")))
    trained_with = yaml.safe_load((folder / "train" / best["trial"] / "config.yaml").read_text())["config"]
    assert exported == build_config("ae", trained_with)
    model, state = ckpt.load_method(best["checkpoint"])
    assert model.config == exported and state["position"]["phase"] == 1
    again = train(TrainRequest(method="ae", source=str(demo_cohort), config=exported, name="retrained",
                               storage=str(tmp_path)))
    assert again.metrics["val/auprc"] == pytest.approx(best["value"], abs=0.01)


def tune_args(demo_cohort, tmp_path, name, space, *extra):
    (tmp_path / f"{name}.yaml").write_text(space)
    args = ["tune", "ae", "--data", str(demo_cohort), "--space", str(tmp_path / f"{name}.yaml"),
            "--storage", str(tmp_path), "--name", name, "--max-concurrent", "1", *extra]
    return args + [f"--set={k}={v}" for k, v in {**TINY, **TINY_NETS["ae"]}.items()]


def test_asha_stops_a_trial_that_falls_behind(prepared_demo, tmp_path, capsys):
    # the second trial's learning rate is far too small: its first epoch's loss is worse than the
    # first trial's at ASHA's first rung, so it is stopped there; the trials stream a prepared dataset
    args = tune_args(prepared_demo, tmp_path, "asha", "lr: {grid: [3.0e-3, 1.0e-6]}\n", "--trials", "2",
                     "--metric", "train/loss", "--mode", "min", "--set", "epochs=3")
    assert main(args) == 0
    printed = capsys.readouterr().out
    rows = [row.split(",") for row in (tmp_path / "asha" / "trials.csv").read_text().splitlines()[1:]]
    assert [(row[1], row[2], float(row[4])) for row in rows] == [("completed", "3", 3e-3), ("stopped", "1", 1e-6)]
    assert "stopped" in printed and f"best config: {tmp_path}/asha/best_config.yaml" in printed
    # one line per trial event instead of Tune's status and per-trial tables
    assert f"trial {rows[1][0]} started: lr=1e-06" in printed and f"trial {rows[0][0]} epoch 3: train/loss " in printed
    assert "Trial status:" not in printed and "started with configuration" not in printed
    assert f"best checkpoint: {tmp_path}/asha/train/{rows[0][0]}/checkpoint_" in printed


def test_interrupted_sweep_resumes_without_repeating_finished_trials(ray_session, demo_cohort, tmp_path, capsys):
    # two trials one after the other, a short one and a long one; the sweep is killed during the
    # long one (Tune saves its state every second here, so the kill can be timed on it)
    args = [sys.executable, "-m", "raymed.cli", *tune_args(demo_cohort, tmp_path, "resumable",
            "epochs: {grid: [2, 6]}\n", "--trials", "2", "--scheduler", "fifo")]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"})
    folder = tmp_path / "resumable"

    def long_trial_log():
        for path in folder.glob("train/*/metrics.jsonl"):
            try:
                lines = log(path)
            except ValueError:  # a line being written
                continue
            if lines and lines[0]["epochs_left"] > 2:  # the file is created before its first line
                return lines
        return []

    def saved_statuses():
        """Trial statuses in Tune's last saved experiment state."""
        for path in folder.glob("experiment_state-*.json"):
            try:
                return [json.loads(trial[0])["status"] for trial in json.loads(path.read_text())["trial_data"]]
            except ValueError:  # being written
                pass
        return []

    deadline = time.time() + 240
    while time.time() < deadline and not (long_trial_log() and len(saved_statuses()) == 2
                                          and "TERMINATED" in saved_statuses()):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [p.parent for p in folder.glob("train/*/result.json")]
    assert len(done) == 1, "the short trial had not finished when the sweep was killed"
    before = {"log": (done[0] / "metrics.jsonl").read_text(), "result": (done[0] / "result.json").stat().st_mtime_ns,
              "long": len(long_trial_log())}
    assert 0 < before["long"] < 6, "the long trial was not interrupted"

    assert main(["tune", "ae", "--resume", "--storage", str(tmp_path), "--name", "resumable"]) == 0
    assert (done[0] / "metrics.jsonl").read_text() == before["log"], "the finished trial trained again"
    assert (done[0] / "result.json").stat().st_mtime_ns == before["result"]
    # the interrupted trial went on from its Train checkpoint, not from its first epoch
    resumed = long_trial_log()[before["long"]:]
    assert resumed[0]["epochs_done"] > 1 and resumed[-1]["epochs_done"] == 6
    rows = [row.split(",") for row in (folder / "trials.csv").read_text().splitlines()[1:]]
    assert [(row[1], row[2]) for row in rows] == [("completed", "2"), ("completed", "6")]
    assert len(study(folder, "resumable").get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2
    assert "sweep interrupted" not in capsys.readouterr().out


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(ray_session, demo_cohort, tmp_path):
    request = SweepRequest(method="ae", source=str(demo_cohort), trials=1, name="failing", storage=str(tmp_path),
                           base=tiny_config("ae", epochs=1).model_dump(mode="json"), metric="train/accuracy",
                           space={"lr": {"loguniform": [1e-4, 1e-3]}})
    outcome = run_sweep(request)
    assert list(outcome.table["status"]) == ["error"] and outcome.best is None
    assert "metric 'train/accuracy' was never reported" in outcome.table["error"][0]
    assert "train/loss" in outcome.table["error"][0]
    assert (tmp_path / "failing" / "trials.csv").exists() and not (tmp_path / "failing" / "best_config.yaml").exists()
