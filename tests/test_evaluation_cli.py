"""`raymed evaluate / tune-threshold / compare / demo` for real: a trained run, NIfTI, PNG, Ray Train."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from raymed.cli import main
from raymed.data.discovery import discover
from raymed.data.io import read_bytes, read_volume
from raymed.engine.checkpoint import resolve
from raymed.evaluation.thresholds import load_threshold
from tests.conftest import free_port, upload_folder

FIGURES = ["slices_ae.png", "slices_threshold.png", "curves.png", "histograms.png"]


@pytest.fixture(scope="module")
def ae_evaluation(trained_run, demo_cohort, tmp_path_factory):
    """`raymed evaluate` of the session's tiny ae run: (run, out folder, exit code, stdout)."""
    run = trained_run("ae")
    out = tmp_path_factory.mktemp("evaluation") / "ae"
    return run, out, main(["evaluate", run, "--data", str(demo_cohort), "--out", str(out)])


def test_evaluate_writes_metrics_figures_maps_and_report(ae_evaluation, demo_cohort):
    run, out, code = ae_evaluation
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["results"]) == ["ae", "threshold"] and metrics["data"]["split"] == "test"
    for name, result in metrics["results"].items():
        assert 0 <= result["pixel"]["auroc"] <= 1 and 0 <= result["pixel"]["auprc"] <= 1
        assert 0 <= result["pixel"]["dice_best"] <= 1 and result["thresholds"]["pixel"] is not None
        assert result["segmentation"]["volumes"] == 2 and 0 <= result["segmentation"]["dice"] <= 1
        assert result["detection"]["slice"]["count"] > 0 and "flag_rate" in result["detection"]["slice"]
    assert metrics["results"]["threshold"]["modalities"] == ["flair"]
    assert metrics["results"]["ae"]["reconstruction"]["ssim"] > 0
    for name in FIGURES:
        with Image.open(out / name) as png:
            assert png.format == "PNG" and min(png.size) > 300
            assert np.asarray(png.convert("L")).std() > 10, f"{name} is blank"
    with Image.open(out / "slices_ae.png") as grid, Image.open(out / "slices_threshold.png") as reference:
        assert grid.size[0] > reference.size[0]  # the ae grid has a reconstruction column
    report = (out / "report.md").read_text()
    assert "[DICE]" in report and "upper bound" in report and "post-processing: none" in report
    assert all(f"]({name})" in report for name in FIGURES)

    # the maps line up with the inputs, and the metrics can be recomputed from them
    test_cases = [c for c in discover(str(demo_cohort)) if c.split == "test"]
    scores, labels = [], []
    for case in test_cases:
        source = read_volume(case.images["flair"])
        amap = read_volume(str(out / "maps" / f"{case.subject}_anomaly.nii.gz"))
        segmentation = read_volume(str(out / "maps" / f"{case.subject}_segmentation.nii.gz"))
        assert amap.array.shape == source.array.shape == segmentation.array.shape
        np.testing.assert_allclose(amap.affine, source.affine, atol=1e-5)
        assert set(np.unique(segmentation.array)) <= {0, 1}
        mask = read_volume(case.mask).array > 0
        scores.append(amap.array[mask])
        labels.append(read_volume(case.label).array[mask] > 0)
    exact = roc_auc_score(np.concatenate(labels), np.concatenate(scores))
    assert metrics["results"]["ae"]["pixel"]["auroc"] == pytest.approx(exact, abs=1e-3)


def test_tuned_threshold_is_stored_and_used(ae_evaluation, demo_cohort, tmp_path, capsys):
    run, _, _ = ae_evaluation
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(resolve(run), checkpoint)
    (checkpoint / "threshold.json").unlink(missing_ok=True)
    assert main(["tune-threshold", str(checkpoint), "--data", str(demo_cohort), "--split", "val"]) == 0
    stored = load_threshold(str(checkpoint))
    assert stored["split"] == "val" and stored["criterion"] == "max_dice" and stored["pixel"] is not None
    assert "stored:" in capsys.readouterr().out

    assert main(["evaluate", str(checkpoint), "--data", str(demo_cohort), "--out", str(tmp_path / "e1"),
                 "--no-reference", "--no-maps"]) == 0
    result = json.loads((tmp_path / "e1" / "metrics.json").read_text())["results"]["ae"]
    assert result["thresholds"]["origin"].startswith("stored with the model (chosen on val by max_dice)")
    assert (result["thresholds"]["pixel"], result["thresholds"]["image"]) == (stored["pixel"], stored["image"])
    assert "stored with the model" in (tmp_path / "e1" / "report.md").read_text()
    assert not (tmp_path / "e1" / "maps").exists() and list(json.loads(
        (tmp_path / "e1" / "metrics.json").read_text())["results"]) == ["ae"]

    # a threshold chosen for other post-processing is not reused, and the report says so
    assert main(["evaluate", str(checkpoint), "--data", str(demo_cohort), "--out", str(tmp_path / "e2"),
                 "--no-reference", "--no-maps", "--median", "5", "--erode", "1", "--min-component", "3",
                 "--image-score", "topk"]) == 0
    metrics = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert "chosen on the val split" in metrics["results"]["ae"]["thresholds"]["origin"]
    assert any("other post-processing (none)" in note for note in metrics["notes"])
    assert metrics["settings"]["image_score"]["reduction"] == "topk"
    assert metrics["results"]["ae"]["postprocess"] == ["median filter k=5 (2D)", "brain mask eroded by 1 voxel(s)",
                                                      "connected components < 3 voxels removed (binary maps)"]

    # active learning: an image threshold that flags a target fraction of validation slices
    assert main(["tune-threshold", str(checkpoint), "--data", str(demo_cohort), "--criterion", "flag_rate",
                 "--flag-rate", "0.25"]) == 0
    stored = load_threshold(str(checkpoint))
    assert stored["criterion"] == "flag_rate" and 0 < stored["metrics"]["flag_rate"] <= 0.25


def test_threshold_reference_by_name_and_as_a_stored_model(demo_cohort, tmp_path):
    out = tmp_path / "t2"
    assert main(["evaluate", "threshold", "--data", str(demo_cohort), "--out", str(out),
                 "--set", "data.modalities=[t2]", "--set", "data.size=32", "--no-maps"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["results"]) == ["threshold"] and metrics["results"]["threshold"]["modalities"] == ["t2"]
    assert metrics["checkpoint"] is None

    model = tmp_path / "threshold-flair"
    assert main(["tune-threshold", "threshold", "--data", str(demo_cohort), "--out", str(model),
                 "--set", "data.size=32"]) == 0
    assert (model / "state.pt").exists() and load_threshold(str(model))["pixel"] is not None
    assert main(["evaluate", str(model), "--data", str(demo_cohort), "--out", str(tmp_path / "t3"), "--no-maps"]) == 0
    result = json.loads((tmp_path / "t3" / "metrics.json").read_text())["results"]["threshold"]
    assert result["modalities"] == ["flair"] and result["thresholds"]["origin"].startswith("stored")


def test_compare_prints_runs_side_by_side(ae_evaluation, capsys):
    run, out, _ = ae_evaluation
    assert main(["compare", str(out), str(out / "metrics.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["evaluation", "method", "AUROC", "AUPRC", "[DICE]"]
    assert sum(" ae " in line for line in lines) == 2 and sum(" threshold " in line for line in lines) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"{metrics['results']['ae']['pixel']['auroc']:.3f}" in lines[2]
    assert main(["compare", str(out), "--markdown"]) == 0
    assert capsys.readouterr().out.startswith("| evaluation | method | AUROC |")


def test_checkpoint_on_s3_and_report_to_s3(ae_evaluation, demo_cohort, s3_bucket, capsys):
    run, _, _ = ae_evaluation
    upload_folder(resolve(run), f"{s3_bucket}/model")
    out = f"{s3_bucket}/evaluation"
    assert main(["evaluate", f"{s3_bucket}/model", "--data", str(demo_cohort), "--out", out, "--no-reference"]) == 0
    subject = next(c.subject for c in discover(str(demo_cohort)) if c.split == "test")
    assert read_volume(f"{out}/maps/{subject}_anomaly.nii.gz").array.shape == (32, 32, 32)
    assert read_bytes(f"{out}/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["compare", out]) == 0
    assert f"{out}  ae " in capsys.readouterr().out


def test_user_errors_are_one_line(demo_cohort, ae_evaluation, tmp_path, capsys):
    run, out, _ = ae_evaluation
    cases = [
        (["evaluate", "ae", "--data", str(demo_cohort)], "ae learns its weights"),
        (["evaluate", run, "--data", str(demo_cohort), "--split", "holdout"], "unknown split 'holdout'"),
        (["evaluate", run, "--data", str(demo_cohort), "--set", "data.size=64"], "configure a method given by name"),
        (["evaluate", "threshold", "--data", str(demo_cohort), "--median", "-1"], "postprocess.median"),
        (["evaluate", str(tmp_path), "--data", str(demo_cohort)], "no raymed checkpoint"),
        (["tune-threshold", "threshold", "--data", str(demo_cohort)], "pass --out"),
        (["tune-threshold", run, "--data", str(demo_cohort), "--criterion", "flag_rate"], "needs --flag-rate"),
        (["compare", str(tmp_path)], "no metrics.json"),
        (["train", "threshold", "--data", str(demo_cohort)], "threshold has nothing to train"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)


def test_demo_runs_end_to_end_on_ray(ray_session, tmp_path):
    """`raymed demo` as a user runs it, joining the session's Ray through RAY_ADDRESS."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    port = free_port()
    try:
        proc = subprocess.run([sys.executable, "-m", "raymed.cli", "demo", "--data", "cohort", "--out", "runs",
                               "--subjects", "6", "--size", "32", "--epochs", "2", "--workers", "1", "--name", "d",
                               "--serve", "--port", str(port)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    finally:
        from ray import serve

        serve.shutdown()  # the demo's endpoint lives on the shared Ray instance
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = proc.stdout[proc.stdout.index("serving dae at"):]
    # apart from the step headers, progress lines and results, nothing (no Ray internals) is printed
    shown = re.compile(r"(\[[1-4]/4\] |\[denoise\] epoch \d+/2 |      pixel |dae  |threshold  |report: |$)")
    unexpected = [line for line in proc.stdout[:proc.stdout.index("serving dae at")].splitlines() if not shown.match(line)]
    assert not unexpected and "[denoise] epoch 2/2" in proc.stdout, unexpected
    assert f"http://127.0.0.1:{port}" in served and '"score"' in served and '"slice_scores"' in served
    assert "building the demo cohort" in proc.stdout
    report = tmp_path / "runs" / "d" / "evaluation" / "test" / "report.md"
    assert f"report: {report}" in proc.stdout and report.exists()
    assert (tmp_path / "runs" / "d" / "metrics.jsonl").exists()  # the run's log is in the run, whatever Ray's cwd
    assert [line.split()[0] for line in proc.stdout.splitlines() if "AUROC" in line] == ["dae", "threshold"]
    assert load_threshold(resolve(str(tmp_path / "runs" / "d")))["split"] == "val"
    metrics = json.loads((report.parent / "metrics.json").read_text())
    assert metrics["results"]["dae"]["postprocess"] == ["median filter k=5 (2D)", "brain mask eroded by 2 voxel(s)"]
    assert all((report.parent / name.replace("_ae", "_dae")).exists() for name in FIGURES)
