"""Evaluation building blocks against hand-computed values and scikit-learn (no Ray needed)."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from raymed.data.discovery import Case, discover
from raymed.data.preprocess import prepare
from raymed.engine.inference import map_prepared
from raymed.errors import DataError
from raymed.evaluation.detection import (ImageScore, best_f1_threshold, detection_metrics, flag_rate_threshold,
                                         slice_scores)
from raymed.evaluation.generation import paired_metrics
from raymed.evaluation.metrics import ScoreHistogram, class_dice, overlap, pixel_metrics, ranking_metrics
from raymed.evaluation.protocol import class_summary
from raymed.evaluation.postprocess import PostProcessing, binarise, configure, smooth_map
from raymed.evaluation.thresholds import load_threshold, save_threshold
from raymed.methods.registry import build_config, method_class
from raymed.methods.threshold import resolve_modality


def exact_best_dice(scores, labels):
    order = np.argsort(-scores, kind="stable")
    tp, fp = np.cumsum(labels[order]), np.cumsum(~labels[order])
    last = np.r_[scores[order][1:] != scores[order][:-1], True]
    return float((2 * tp / (tp + fp + labels.sum()))[last].max())


def test_hand_computed_example():
    scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    h = ScoreHistogram()
    h.add(scores, labels)
    m = h.metrics()
    # 3 of the 4 (positive, negative) pairs are ordered correctly; AP = (1/2)(1) + (1/2)(2/3)
    assert m["auroc"] == pytest.approx(0.75, abs=1e-12) and m["auroc_error_bound"] == 0
    assert m["auprc"] == pytest.approx(5 / 6, abs=1e-12)
    # best Dice: flag {0.8, 0.35, 0.4} -> 2*2 / (2*2 + 1 + 0) = 0.8
    assert m["dice_best"] == pytest.approx(0.8)
    assert set(np.flatnonzero(scores >= m["dice_best_threshold"])) == {1, 2, 3}
    assert (m["positives"], m["negatives"]) == (2, 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_histogram_matches_sklearn_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n = 300_000
    labels = rng.random(n) < rng.uniform(0.01, 0.2)
    scores = rng.gamma(2.0, 0.1, n) + labels * rng.uniform(0.05, 0.3)
    h = ScoreHistogram()
    # volumes arrive in chunks whose ranges differ: the range grows (in both directions) as they come
    for chunk in np.array_split(np.argsort(np.abs(scores - np.median(scores)), kind="stable"), 9):
        h.add(scores[chunk], labels[chunk])
    m = h.metrics()
    auroc, ap = roc_auc_score(labels, scores), average_precision_score(labels, scores)
    assert abs(m["auroc"] - auroc) <= m["auroc_error_bound"] + 1e-12
    assert abs(m["auroc"] - auroc) < 1e-4 and abs(m["auprc"] - ap) < 1e-3
    assert abs(m["dice_best"] - exact_best_dice(scores, labels)) < 1e-3
    assert (m["positives"], m["negatives"]) == (labels.sum(), (~labels).sum())
    assert h.lo <= scores.min() and h.hi > scores.max() and h.pos.size == h.bins  # memory stays fixed


def test_ties_are_handled_like_sklearn():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, 2000) / 4.0  # five distinct values, many ties
    labels = rng.random(2000) < 0.3 + 0.1 * scores
    m = pixel_metrics(scores, labels)
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert m["auprc"] == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert m["dice_best"] == pytest.approx(exact_best_dice(scores, labels), abs=1e-9)


def test_degenerate_inputs_warn_and_give_defined_values():
    with pytest.warns(RuntimeWarning, match="no lesion voxels"):
        m = pixel_metrics(np.random.rand(100), np.zeros(100))
    assert math.isnan(m["auroc"]) and m["auprc"] == 0.0 and math.isnan(m["dice_best"])
    labels = np.r_[np.ones(10), np.zeros(30)]
    with pytest.warns(RuntimeWarning, match="constant"):
        m = pixel_metrics(np.full(40, 0.3), labels)
    assert m["auroc"] == pytest.approx(0.5) and m["auprc"] == pytest.approx(0.25)  # AP = prevalence
    assert m["auprc"] == pytest.approx(average_precision_score(labels, np.full(40, 0.3)))
    with pytest.warns(RuntimeWarning, match="every scored voxel is lesion"):
        m = pixel_metrics(np.random.rand(20), np.ones(20))
    assert math.isnan(m["auroc"]) and m["auprc"] == 1.0 and m["dice_best"] == 1.0
    with pytest.warns(RuntimeWarning, match="no voxels"):
        assert math.isnan(ScoreHistogram().metrics()["auroc"])
    with pytest.raises(DataError, match="NaN"):
        ScoreHistogram().add(np.array([0.1, np.nan]), np.array([0, 1]))


def test_overlap_and_ranking_metrics():
    prediction = np.array([1, 1, 1, 0, 0, 0], bool)
    label = np.array([1, 1, 0, 1, 0, 0], bool)
    o = overlap(prediction, label)  # TP 2, FP 1, FN 1
    assert (o["dice"], o["precision"], o["recall"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert (o["flagged_voxels"], o["lesion_voxels"]) == (3, 3)
    empty = overlap(np.zeros(5), np.zeros(5))
    assert math.isnan(empty["dice"]) and math.isnan(empty["recall"])
    rng = np.random.default_rng(0)
    scores, labels = rng.random(200), rng.random(200) < 0.3
    r = ranking_metrics(scores, labels, "slice")
    assert r == pytest.approx({"auroc": roc_auc_score(labels, scores), "ap": average_precision_score(labels, scores)})
    with pytest.warns(RuntimeWarning, match="every volume is lesion"):
        assert math.isnan(ranking_metrics(scores[:3], [1, 1, 1], "volume")["auroc"])


def test_class_dice_per_volume_and_over_patients():
    label = np.zeros((4, 4, 2), np.uint8)
    label[0, :2, 0], label[1, :2, 0] = 1, 2  # two voxels of each class
    prediction = label.copy()
    prediction[1, 0, 0], prediction[3, 3, 1] = 0, 2  # class 2: TP 1, FN 1, FP 1 → Dice 0.5
    prediction[2, 2, 1] = 3  # a value outside `classes` is background
    assert class_dice(prediction, label, (1, 2)) == {"1": 1.0, "2": 0.5}
    absent = class_dice(prediction, label, (1, 4))  # no class-4 lesion: undefined, not 0
    assert absent["1"] == 1.0 and np.isnan(absent["4"])
    # per patient the mean over the classes it has, then over patients
    volumes = [{"dice_class_1": 1.0, "dice_class_4": float("nan")}, {"dice_class_1": 0.2, "dice_class_4": 0.6}]
    summary = class_summary(volumes, (1, 4))
    assert summary["dice"] == pytest.approx((1.0 + 0.4) / 2) and summary["volumes"] == 2
    assert summary["per_class"] == pytest.approx({"1": 0.6, "4": 0.6})


def test_postprocessing_steps():
    amap = np.zeros((16, 16, 8), np.float32)
    amap[8, 8, 4] = 1.0  # a lone hot voxel
    amap[2:7, 2:7, 1:6] = 0.8  # a blob
    mask = np.ones_like(amap, bool)
    median = smooth_map(amap, mask, PostProcessing(median=5))
    assert median[8, 8, 4] == 0 and median[4, 4, 3] == pytest.approx(0.8)
    plate = np.zeros_like(amap)
    plate[9:16, 9:16, 5:7] = 0.8  # two slices thick: kept by a 2D median, removed by a 3D one
    assert smooth_map(plate, mask, PostProcessing(median=5))[12, 12, 5] == pytest.approx(0.8)
    assert smooth_map(plate, mask, PostProcessing(median=5, median_dims=3))[12, 12, 5] == 0
    eroded = smooth_map(amap + 0.1, mask, PostProcessing(erode=2))
    assert eroded[0, 5, 4] == 0 and eroded[1, 5, 4] == 0 and eroded[2, 5, 4] == pytest.approx(0.9)
    binary = binarise(amap, 0.5, min_component=10)
    assert not binary[8, 8, 4] and binary[4, 4, 3] and binary.sum() == 125
    assert binarise(amap, 0.5).sum() == 126
    ae = method_class("ae")(build_config("ae", overrides={"data.size": 32, "channels": [4], "latent_size": 4}), 1)
    settings = PostProcessing(positive_only=True, median=5, erode=1, min_component=3)
    assert configure(ae, settings).config.positive_only
    assert settings.describe(ae) == ["positive residual only", "median filter k=5 (2D)",
                                     "brain mask eroded by 1 voxel(s)",
                                     "connected components < 3 voxels removed (binary maps)"]
    threshold = method_class("threshold")(build_config("threshold"), 1)
    assert "not applicable" in settings.describe(threshold)[0]
    assert PostProcessing().describe(ae) == []


def test_slice_scores_and_image_thresholds():
    amap = np.zeros((4, 4, 3))
    amap[..., 0] = np.arange(16).reshape(4, 4) / 16
    amap[..., 1] = 0.5
    mask = np.ones((4, 4, 3), bool)
    mask[..., 2] = False
    assert slice_scores(amap, mask, ImageScore(reduction="max")) == pytest.approx([15 / 16, 0.5, 0.0])
    top = slice_scores(amap, mask, ImageScore(reduction="topk", fraction=0.25))  # k = 4 of 16 voxels
    assert top == pytest.approx([(12 + 13 + 14 + 15) / 64, 0.5, 0.0])
    own = np.array([0.2, 0.1, 0.05])  # the detector's own scores pass through (the default, as served)
    assert slice_scores(amap, mask, ImageScore(), own) == pytest.approx(own)
    with pytest.raises(ValueError, match="detector's slice scores"):
        slice_scores(amap, mask, ImageScore())
    scores = np.array([0.9, 0.8, 0.8, 0.5, 0.2, 0.1, 0.1, 0.05, 0.0, 0.0])
    t = flag_rate_threshold(scores, 0.2)  # 0.8 is tied at the cut: flag fewer, never more
    assert (scores >= t).sum() == 1 and (scores >= flag_rate_threshold(scores, 0.3)).sum() == 3
    assert (scores >= flag_rate_threshold(scores, 0.4)).mean() == pytest.approx(0.4)
    assert (scores >= flag_rate_threshold(scores, 1.0)).all()
    assert not (scores >= flag_rate_threshold(scores, 0.05)).any()
    labels = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0], bool)
    # at 0.8: 3 of 4 lesion slices, F1 6/7; at 0.2: all 4 and one false alarm, F1 8/9 (best)
    assert best_f1_threshold(scores, labels) == 0.2
    assert math.isnan(best_f1_threshold(scores, np.zeros(10, bool)))
    d = detection_metrics(scores, labels, 0.8, "slice")
    assert (d["flag_rate"], d["flag_precision"], d["flag_recall"]) == pytest.approx((0.3, 1.0, 0.75))


def test_paired_generation_metrics():
    x = torch.rand(2, 1, 32, 32)
    same = paired_metrics(x, x)
    assert same["mae"] == 0 and same["ssim"] == pytest.approx(1.0) and math.isinf(same["psnr"])
    shifted = paired_metrics((x + 0.1), x)
    assert shifted["mae"] == pytest.approx(0.1, abs=1e-6) and shifted["psnr"] == pytest.approx(20.0, abs=1e-3)
    mask = torch.zeros(2, 32, 32)
    mask[:, :16] = 1
    y = x.clone()
    y[:, :, 16:] += 0.5  # differences only outside the mask
    assert paired_metrics(y, x, mask)["mae"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="one shape"):
        paired_metrics(x, x[:, :, :16])


def test_threshold_method_maps_the_normalised_intensity(brats_folder):
    cases = discover(str(brats_folder))
    config = resolve_modality(build_config("threshold", overrides={"data.size": 32}), cases)
    assert config.data.modalities == ["flair"]
    method = method_class("threshold")(config, 1)
    assert method.phases() == [] and len(list(method.nets.parameters())) == 0
    prepared = prepare(cases[4], config.data)
    volume = map_prepared(method, prepared)
    np.testing.assert_allclose(volume.map, prepared.image[0] * prepared.mask, atol=1e-6)
    brightest = np.sort(prepared.image[0, :, :, 6].ravel())[-(32 * 32 // 100):].mean()  # top 1 % of the slice
    assert volume.slice_scores[6] == pytest.approx(brightest, abs=1e-6)
    t1_only = [Case(c.subject, {"t1": c.images["t1"]}) for c in cases]
    assert resolve_modality(build_config("threshold"), t1_only).data.modalities == ["t1"]
    with pytest.raises(DataError, match="share no modality"):
        resolve_modality(build_config("threshold"), [Case("a", {"t1": "x"}), Case("b", {"t2": "y"})])


def test_threshold_file_round_trip(tmp_path):
    stored = {"pixel": 0.3, "image": 0.7, "split": "val", "criterion": "max_dice", "flag_rate": None,
              "metrics": {"dice": 0.5}, "postprocess": PostProcessing().model_dump(),
              "image_score": ImageScore().model_dump(), "source": "x"}
    save_threshold(str(tmp_path), stored)
    assert load_threshold(str(tmp_path)) == json.loads(json.dumps(stored))
    with pytest.raises(DataError, match="unknown fields: colour"):
        save_threshold(str(tmp_path), {"colour": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_threshold(str(tmp_path / "nothing")) is None
