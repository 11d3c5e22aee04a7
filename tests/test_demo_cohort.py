"""The built-in demo cohort and its evaluation lesions, on tiny grids (32³, a few subjects)."""

import json
import socket

import nibabel as nib
import numpy as np
import pytest

from raymed.cli import main
from raymed.data import demo, lesions
from raymed.data.io import read_volume
from raymed.errors import ConfigError

SIZE = 32
SUBJECTS = 5
IMAGES = ("t1", "t2", "flair")
TISSUES = ("gm", "wm", "csf")


def _no_network(*args, **kwargs):
    raise AssertionError("the demo cohort must build without network access")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """One cohort per module, built with sockets disabled and the template cache cleared.

    Clearing the cache makes the build load the MNI152 files under the patch too.
    """
    out = tmp_path_factory.mktemp("demo")
    demo.mni_tissue.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "socket", _no_network)
        lines = []
        summary = demo.build_demo_cohort(out, subjects=SUBJECTS, size=SIZE, seed=0, progress=lines.append)
    return out, summary, lines


def _load(out, subject, name):
    return read_volume(str(out / subject / f"{subject}_{name}.nii.gz"))


def _splits(out):
    return json.loads((out / "splits.json").read_text())


def test_summary_progress_and_splits(cohort):
    out, summary, lines = cohort
    splits = _splits(out)
    assert list(splits) == [f"demo-{i:03d}" for i in range(SUBJECTS)]
    assert summary["subjects"] == {"train": 3, "val": 1, "test": 1}
    assert sorted(splits.values()) == ["test", "train", "train", "train", "val"]
    assert summary["size"] == SIZE and summary["seconds"] > 0
    assert len(lines) == SUBJECTS and all("\n" not in line for line in lines)
    params = json.loads((out / "cohort.json").read_text())
    assert params["subjects"] == SUBJECTS and params["size"] == SIZE and params["seed"] == 0
    assert "tumour" in params["lesions"]["parameters"]


def test_files_shapes_dtypes_and_affines(cohort):
    out, summary, _ = cohort
    for subject in _splits(out):
        volumes = {name: _load(out, subject, name) for name in (*IMAGES, "seg", "mask", *TISSUES)}
        affine = volumes["t1"].affine
        for name, volume in volumes.items():
            assert volume.array.shape == (SIZE,) * 3, name
            np.testing.assert_allclose(volume.affine, affine)
            expected = np.uint8 if name in ("seg", "mask") else np.float32
            assert volume.array.dtype == expected, name
        assert nib.aff2axcodes(affine) == ("R", "A", "S")
        spacing = volumes["t1"].spacing
        assert np.allclose(spacing, summary["spacing_mm"])
        # The cube spans the MNI152 2 mm template (117 voxels), corner centres aligned.
        assert spacing[0] * (SIZE - 1) == pytest.approx(2.0 * 116)


def test_lesions_exactly_on_val_and_test(cohort):
    out, _, _ = cohort
    for subject, split in _splits(out).items():
        seg = _load(out, subject, "seg").array
        mask = _load(out, subject, "mask").array
        if split == "train":
            assert not seg.any(), subject
        else:
            assert seg.any(), subject
            assert not ((seg > 0) & (mask == 0)).any(), f"{subject}: lesion outside the brain"


def test_train_lesions_label_the_training_subjects_too(tmp_path):
    assert main(["data", "demo", "--out", str(tmp_path), "--subjects", "4", "--size", "16", "--train-lesions"]) == 0
    splits = _splits(tmp_path)
    assert "train" in splits.values()
    assert all(_load(tmp_path, subject, "seg").array.any() for subject in splits)
    assert json.loads((tmp_path / "cohort.json").read_text())["train_lesions"] is True


def test_tissue_maps_sum_to_brain_mask(cohort):
    out, _, _ = cohort
    for subject in _splits(out):
        mask = _load(out, subject, "mask").array
        total = sum(_load(out, subject, name).array for name in TISSUES)
        assert mask.sum() > 0.1 * mask.size
        np.testing.assert_allclose(total[mask > 0], 1.0, atol=1e-3)
        assert not total[mask == 0].any()
        for name in (*IMAGES, *TISSUES):
            assert not _load(out, subject, name).array[mask == 0].any(), name


def test_contrast_order_and_bright_lesions(cohort):
    out, _, _ = cohort
    for subject, split in _splits(out).items():
        gm, wm, csf = (_load(out, subject, name).array for name in TISSUES)
        seg = _load(out, subject, "seg").array > 0
        mean = {name: lambda where, image=_load(out, subject, name).array: image[where & ~seg].mean()
                for name in IMAGES}
        pure = {"gm": gm > 0.8, "wm": wm > 0.8, "csf": csf > 0.8}
        t1, t2, flair = (np.array([mean[i](pure[t]) for t in TISSUES]) for i in IMAGES)
        assert t1[1] > t1[0] > t1[2] and t2[2] > t2[0] > t2[1] and flair[0] > flair[1] > flair[2]
        if split != "train":
            images = {name: _load(out, subject, name).array for name in IMAGES}
            normal_wm = pure["wm"] & ~seg
            assert images["flair"][seg].mean() > 1.5 * images["flair"][normal_wm].mean()
            assert images["t2"][seg].mean() > images["t2"][normal_wm].mean()
            assert images["t1"][seg].mean() < images["t1"][normal_wm].mean()


def test_same_seed_same_cohort_other_seed_differs(cohort, tmp_path):
    out, _, _ = cohort
    demo.build_demo_cohort(tmp_path / "same", subjects=SUBJECTS, size=SIZE, seed=0)
    demo.build_demo_cohort(tmp_path / "other", subjects=SUBJECTS, size=SIZE, seed=1)
    assert _splits(tmp_path / "same") == _splits(out)
    for subject in _splits(out):
        for name in (*IMAGES, "seg", "mask", *TISSUES):
            np.testing.assert_array_equal(_load(tmp_path / "same", subject, name).array,
                                          _load(out, subject, name).array)
    assert not np.array_equal(_load(tmp_path / "other", "demo-000", "t1").array,
                              _load(out, "demo-000", "t1").array)


def test_each_lesion_kind_is_nonempty_and_inside_brain():
    template, _ = demo.mni_tissue()
    tissue, mask = lesions.warp_tissue(template, lesions.identity_coords((SIZE,) * 3))
    spacing = (2.0 * 116 / (SIZE - 1),) * 3
    for kind in lesions.PARAMETERS["kinds"]:
        for seed in range(5):
            found = lesions.simulate_lesions(tissue, spacing, np.random.default_rng(seed), kind=kind)
            assert found.kind == kind and found.label.any()
            assert not ((found.label > 0) & (found.mask == 0)).any()
            # the class is the larger lesion fraction: core (1) and, for tumours, oedema (2)
            lesion = (found.core + found.oedema > 0.5) & (found.mask > 0)
            np.testing.assert_array_equal(found.label > 0, lesion)
            np.testing.assert_array_equal(found.label[lesion] == lesions.CORE,
                                          (found.core >= found.oedema)[lesion])
            assert set(np.unique(found.label)) == ({0, 1, 2} if kind == "tumour" else {0, 1})
            assert (found.core + found.oedema <= 1 + 1e-6).all()
            np.testing.assert_allclose(found.tissue.sum(0), found.mask, atol=1e-3)


def test_mass_effect_pushes_tissue_away_from_centre():
    """Grey matter rising with distance from the centre: pushed outward, every voxel near the
    tumour now holds tissue from nearer the centre (less grey matter); far away nothing moves."""
    n, step = 65, 2.0
    centre = np.array([32, 32, 32])
    r = np.sqrt(sum((axis - 32) ** 2 for axis in np.ogrid[:n, :n, :n])) * step
    gm = np.clip(r / 40.0, 0.0, 1.0)
    tissue = np.stack([gm, 1.0 - gm, np.zeros_like(gm)]).astype(np.float32)
    moved, mask = lesions._mass_effect(tissue, centre, 10.0, np.full(3, step), np.random.default_rng(0))
    near, far = (r > 4) & (r < 30), r > 70
    assert (moved[0][near] < gm[near] - 1e-3).all()
    np.testing.assert_allclose(moved[:, far], tissue[:, far], atol=1e-4)
    assert mask.all()


@pytest.mark.parametrize("kwargs", [{"subjects": 0}, {"size": 8}, {"size": 32.5}])
def test_bad_arguments_name_the_argument(tmp_path, kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        demo.build_demo_cohort(tmp_path, **kwargs)
