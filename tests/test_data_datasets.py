"""Dataset discovery (three layouts), splits, preprocessing and the healthy-only filter."""

import json

import numpy as np
import pytest

from raymed.data.discovery import discover
from raymed.data.io import write_volume
from raymed.data.preprocess import Preprocessing, prepare, to_source_grid
from raymed.data.slices import axial_slices, load_slices, patches3d
from raymed.data.splits import assign_splits, select
from raymed.errors import DataError
from tests.conftest import AFFINE


def test_brats_layout(brats_folder):
    cases = discover(str(brats_folder))
    assert [c.subject for c in cases] == [f"case{i:02d}" for i in range(6)]
    first = cases[0]
    assert sorted(first.images) == ["flair", "t1"]
    assert first.label.endswith("case00_seg.nii.gz") and first.mask.endswith("case00_mask.nii.gz")


def test_pattern_layout(tmp_path):
    rng = np.random.default_rng(0)
    for s in ("a1", "b2", "c3"):
        write_volume(str(tmp_path / f"{s}_flair.nii.gz"), rng.random((8, 8, 4)), AFFINE)
        write_volume(str(tmp_path / f"{s}_seg.nii.gz"), np.zeros((8, 8, 4), np.uint8), AFFINE)
    (tmp_path / "notes.txt").write_text("ignored")
    cases = discover(str(tmp_path), pattern="{subject}_{modality}.nii.gz")
    assert [c.subject for c in cases] == ["a1", "b2", "c3"]
    assert list(cases[1].images) == ["flair"] and cases[1].label.endswith("b2_seg.nii.gz")
    single = discover(str(tmp_path), pattern="{subject}_flair.nii.gz")
    assert [list(c.images) for c in single] == [["image"]] * 3
    with pytest.raises(DataError, match="no cases found"):
        discover(str(tmp_path), pattern="{subject}.png")


@pytest.mark.parametrize("kind", ["csv", "json"])
def test_manifest_layout(brats_folder, tmp_path, kind):
    rows = [{"subject": f"s{i}", "image": str(brats_folder / f"case0{i}" / f"case0{i}_flair.nii.gz"),
             "label": f"{brats_folder}/case0{i}/case0{i}_seg.nii.gz", "split": "test" if i == 4 else ""}
            for i in (0, 1, 4)]
    path = tmp_path / f"manifest.{kind}"
    if kind == "json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("subject,image,label,split\n" + "\n".join(
            f"{r['subject']},{r['image']},{r['label']},{r['split']}" for r in rows))
    cases = discover(str(path))
    assert [c.subject for c in cases] == ["s0", "s1", "s4"]
    assert cases[2].split == "test" and cases[0].split is None
    assert cases[0].images == {"image": rows[0]["image"]}


def test_manifest_relative_paths_and_errors(tmp_path):
    write_volume(str(tmp_path / "x.nii.gz"), np.ones((4, 4, 4)), AFFINE)
    (tmp_path / "m.csv").write_text("image,label\nx.nii.gz,\n")
    (case,) = discover(str(tmp_path / "m.csv"))
    assert case.images["image"] == f"{tmp_path}/x.nii.gz" and case.label is None and case.subject == "x"
    (tmp_path / "bad.json").write_text('[{"label": "y.nii.gz"}]')
    with pytest.raises(DataError, match="entry 1 has no 'image'"):
        discover(str(tmp_path / "bad.json"))
    (tmp_path / "empty.csv").write_text("image,label\n")
    with pytest.raises(DataError, match="empty.csv: no cases found"):
        discover(str(tmp_path / "empty.csv"))
    with pytest.raises(DataError, match="no such folder"):
        discover(str(tmp_path / "nowhere"))


def test_splits_reproducible_and_by_subject(brats_folder):
    def splits(seed):
        return {c.subject: c.split for c in assign_splits(discover(str(brats_folder)), seed=seed)}

    assert splits(3) == splits(3)
    assert any(splits(s) != splits(3) for s in range(4, 10))
    result = splits(3)
    assert set(result.values()) == {"train", "val", "test"}
    cases = assign_splits(discover(str(brats_folder)), seed=3)
    train_subjects = {c.subject for c in select(cases, "train")}
    test_subjects = {c.subject for c in select(cases, "test")}
    assert train_subjects and test_subjects and not train_subjects & test_subjects
    settings = Preprocessing(size=16)
    train_slices = load_slices(select(cases, "train"), settings)
    assert set(train_slices.subject) == train_subjects


def test_splits_json_overrides_random_split(brats_folder, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(brats_folder, root)
    (root / "splits.json").write_text(json.dumps({"case00": "test", "case01": "val"}))
    cases = {c.subject: c.split for c in assign_splits(discover(str(root)), seed=0)}
    assert cases["case00"] == "test" and cases["case01"] == "val"
    (root / "splits.json").write_text(json.dumps({"case00": "holdout"}))
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        assign_splits(discover(str(root)))


def test_preprocess_orients_resizes_and_normalises_inside_mask(brats_folder):
    case = discover(str(brats_folder))[5]
    prepared = prepare(case, Preprocessing(size=24, modalities=["t1", "flair"]))
    assert prepared.image.shape == (2, 24, 24, 12)
    assert prepared.label.shape == prepared.mask.shape == (24, 24, 12)
    inside = prepared.image[:, prepared.mask]
    assert inside.min() >= 0 and inside.max() <= 1 and np.isclose(inside.max(), 1)
    assert (prepared.image[:, ~prepared.mask] == 0).all()
    assert prepared.label.sum() > 0
    # the label maps back onto the input grid where it came from
    back = to_source_grid(prepared.label.astype(np.float32), prepared, mode="nearest") > 0.5
    from raymed.data.io import read_volume

    original = read_volume(case.label).array > 0
    assert (back == original).mean() > 0.98


def test_healthy_only_filter_drops_every_lesion_slice(brats_folder):
    case = discover(str(brats_folder))[4]
    prepared = prepare(case, Preprocessing(size=16))
    lesion_slices = set(np.flatnonzero(prepared.label.reshape(-1, 12).any(0)))
    assert lesion_slices
    everything = axial_slices(prepared)
    healthy = axial_slices(prepared, healthy_only=True)
    assert everything.lesion.any() and not healthy.lesion.any()
    assert set(everything.index) - set(healthy.index) == lesion_slices
    assert healthy.image.shape[1:] == (2, 16, 16)
    patches = patches3d(prepared, size=8, stride=4, healthy_only=True)
    assert patches and all(not p["label"].any() for p in patches)
    assert len(patches) < len(patches3d(prepared, size=8, stride=4))


def test_unknown_modality_and_geometry_mismatch(brats_folder, tmp_path):
    case = discover(str(brats_folder))[0]
    with pytest.raises(DataError, match="subject case00: no t2 image"):
        prepare(case, Preprocessing(modalities=["t2"]))
    write_volume(str(tmp_path / "seg.nii.gz"), np.zeros((30, 32, 12), np.uint8), AFFINE)
    case.label = str(tmp_path / "seg.nii.gz")
    with pytest.raises(DataError, match=r"seg.nii.gz: shape \(30, 32, 12\) does not match"):
        prepare(case, Preprocessing(size=16))
    shifted = AFFINE.copy()
    shifted[0, 3] += 5
    write_volume(str(tmp_path / "seg2.nii.gz"), np.zeros((32, 32, 12), np.uint8), shifted)
    case.label = str(tmp_path / "seg2.nii.gz")
    with pytest.raises(DataError, match="seg2.nii.gz: affine does not match"):
        prepare(case, Preprocessing(size=16))


def test_label_classes_survive_preprocessing_and_soft_masks_round(tmp_path):
    """BraTS numbering (1, 2, 4) is kept through orientation and resizing; a soft mask is lesion
    above one half; a negative label is refused by name."""
    image = np.ones((16, 16, 4), np.float32)
    label = np.zeros((16, 16, 4), np.float32)
    label[2:6, 2:6], label[8:12, 8:12], label[12:16, 2:6] = 1, 2, 4
    soft = np.where(label > 0, 0.6, 0.4).astype(np.float32)
    for subject, seg in (("c", label), ("s", soft), ("n", -label)):
        write_volume(str(tmp_path / f"{subject}_flair.nii.gz"), image, AFFINE)
        write_volume(str(tmp_path / f"{subject}_seg.nii.gz"), seg, AFFINE)
    cases = {c.subject: c for c in discover(str(tmp_path), pattern="{subject}_{modality}.nii.gz")}
    prepared = prepare(cases["c"], Preprocessing(size=8))
    assert prepared.label.dtype == np.uint8 and set(np.unique(prepared.label)) == {0, 1, 2, 4}
    for value in (1, 2, 4):  # each class keeps its share of the slice
        assert (prepared.label == value).mean() == pytest.approx((label == value).mean())
    assert set(np.unique(prepare(cases["s"], Preprocessing(size=16)).label)) == {0, 1}
    with pytest.raises(DataError, match="n_seg.nii.gz: label values must be class numbers 0-255, found -4"):
        prepare(cases["n"], Preprocessing(size=8))


def test_nan_volume_and_empty_mask(tmp_path):
    data = np.ones((8, 8, 4), np.float32)
    data[0, 0, 0] = np.nan
    write_volume(str(tmp_path / "n_flair.nii.gz"), data, AFFINE)
    write_volume(str(tmp_path / "z_flair.nii.gz"), np.ones((8, 8, 4)), AFFINE)
    write_volume(str(tmp_path / "z_mask.nii.gz"), np.zeros((8, 8, 4), np.uint8), AFFINE)
    cases = {c.subject: c for c in discover(str(tmp_path), pattern="{subject}_{modality}.nii.gz")}
    with pytest.raises(DataError, match="n_flair.nii.gz: contains NaN"):
        prepare(cases["n"], Preprocessing(size=8))
    with pytest.raises(DataError, match="mask is empty"):
        prepare(cases["z"], Preprocessing(size=8))
    report = []
    slices = load_slices(list(cases.values()), Preprocessing(size=8), skip_bad=True, report=report.append)
    assert len(slices) == 0 and len(report) == 2


def test_ct_window_and_organ_mask(tmp_path):
    """CT in Hounsfield units: a liver window maps [-100, 200] HU to [0, 1]; the organ mask file
    is the foreground (not the body found from intensities)."""
    hu = np.full((16, 16, 4), -1000.0, np.float32)  # air
    hu[2:14, 2:14] = 40.0  # soft tissue
    hu[4:10, 4:10] = 100.0  # liver
    hu[6:8, 6:8] = 400.0  # contrast-filled vessel, above the window
    organ = np.zeros(hu.shape, np.uint8)
    organ[4:10, 4:10] = 1
    write_volume(str(tmp_path / "p_ct.nii.gz"), hu, AFFINE)
    write_volume(str(tmp_path / "p_mask.nii.gz"), organ, AFFINE)
    (case,) = discover(str(tmp_path), pattern="{subject}_{modality}.nii.gz")
    prepared = prepare(case, Preprocessing(size=16, window=(-100, 200)))
    assert (prepared.mask == organ.astype(bool)).all()
    values, liver = prepared.image[0], prepared.mask & (hu < 200)
    assert np.allclose(values[liver], (100 + 100) / 300) and np.allclose(values[hu > 200], 1.0)
    assert (values[~prepared.mask] == 0).all()
    # without an organ mask, the body is what lies inside the window's range
    case.mask = None
    body = prepare(case, Preprocessing(size=16, window=(-100, 200))).mask
    assert body[2:14, 2:14].all() and not body[0].any()
    with pytest.raises(ValueError, match="upper bound"):
        Preprocessing(window=(200, -100))
