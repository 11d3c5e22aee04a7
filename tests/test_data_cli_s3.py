"""`raymed data inspect` on local folders and on the same cohort in S3 (moto server)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from raymed.cli import main
from raymed.data.discovery import discover
from raymed.data.io import read_volume, write_volume
from raymed.data.preprocess import Preprocessing
from raymed.data.slices import load_slices
from tests.conftest import AFFINE, upload_folder


def test_inspect_brats_folder_reports_bad_cases_and_continues(brats_folder, tmp_path, capsys):
    root = tmp_path / "cohort"
    shutil.copytree(brats_folder, root)
    (root / "case01" / "case01_flair.nii.gz").write_bytes(b"\x1f\x8b broken")
    assert main(["data", "inspect", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["cases"]) == 5
    assert report["bad"][0]["subject"] == "case01" and "case01_flair.nii.gz" in report["bad"][0]["error"]
    lesions = {c["subject"]: c["lesion_voxels"] for c in report["cases"]}
    assert lesions["case00"] == 0 and lesions["case04"] > 0
    assert report["cases"][0]["shape"] == [32, 32, 12] and report["cases"][0]["spacing"] == [2.0, 2.0, 3.0]
    assert main(["data", "inspect", str(root)]) == 0
    text = capsys.readouterr().out
    assert "BAD case01" in text and "case04" in text


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nothing: no such folder" in err


def test_help_for_every_subcommand(capsys):
    out = subprocess.run([sys.executable, "-m", "raymed.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "data" in out and "active" in out  # the installed entry point lists every area
    for args in (["data", "demo", "--help"], ["data", "inspect", "--help"], ["data", "prepare", "--help"],
                 ["active", "rank", "--help"], ["active", "simulate", "--help"]):
        with pytest.raises(SystemExit) as exit_code:
            main(args)
        assert exit_code.value.code == 0 and f"usage: raymed {' '.join(args[:2])}" in capsys.readouterr().out


def test_cohort_read_from_s3(brats_folder, s3_bucket, capsys):
    uri = f"{s3_bucket}/cohorts/brats"
    upload_folder(brats_folder, uri)
    cases = discover(uri)
    assert [c.subject for c in cases] == [f"case{i:02d}" for i in range(6)]
    assert cases[0].images["flair"] == f"{uri}/case00/case00_flair.nii.gz"
    volume = read_volume(cases[4].label)
    local = read_volume(str(brats_folder / "case04" / "case04_seg.nii.gz"))
    np.testing.assert_array_equal(volume.array, local.array)
    np.testing.assert_allclose(volume.affine, AFFINE)
    slices = load_slices(cases[:2], Preprocessing(size=16))
    assert len(slices) > 0
    assert main(["data", "inspect", uri, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["cases"]) == 6 and not report["bad"]


def test_write_volume_to_s3(s3_bucket):
    uri = f"{s3_bucket}/out/map.nii.gz"
    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    write_volume(uri, data, AFFINE)
    back = read_volume(uri)
    np.testing.assert_array_equal(back.array, data)
    np.testing.assert_allclose(back.affine, AFFINE)


def test_inspect_demo_cohort_locally_and_in_s3(demo_cohort, s3_bucket, capsys):
    assert main(["data", "inspect", str(demo_cohort), "--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    uri = f"{s3_bucket}/demo"
    upload_folder(demo_cohort, uri)
    assert main(["data", "inspect", uri, "--json"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert len(local["cases"]) == 6 and not local["bad"]
    assert local["splits"] == remote["splits"] == {"train": 3, "val": 1, "test": 2}
    assert remote["cases"] == local["cases"]
    assert all((c["lesion_voxels"] > 0) == (c["split"] != "train") for c in local["cases"])
