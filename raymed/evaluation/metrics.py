"""Pixel-level detection metrics over the voxels inside the brain mask, streamed volume by volume.

A test set holds 10^7-10^8 voxels, too many to sort in memory. `ScoreHistogram` keeps counts of
positive and negative scores in fixed-width bins instead (a few hundred kB whatever the data
size) and derives every threshold-swept metric from the cumulative counts:

- AUROC: trapezoidal area under the binned ROC curve. Pairs of a positive and a negative voxel
  in the same bin count as ties (1/2), so the error against the exact AUROC is at most
  `auroc_error_bound` = 1/2 * sum_b pos_b * neg_b / (P * N), reported with the result.
- AUPRC: average precision as scikit-learn defines it, sum_n (R_n - R_(n-1)) P_n, with one
  threshold per bin. Exact when no bin mixes different scores.
- [DICE]: best Dice over all thresholds (bin edges). It looks at the labels of the very voxels
  it scores, so it is an upper bound on what any threshold chosen beforehand achieves.

With 2^16 bins, AUROC and AUPRC agree with scikit-learn to about 1e-4 on random data
(tests/test_evaluation_metrics.py). The range grows by doubling as new scores arrive, so no
pass over the data is needed to find it.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.metrics import compute_confusion_matrix_metric, compute_dice
from sklearn.metrics import average_precision_score, roc_auc_score

from raymed.errors import DataError

DEFAULT_BINS = 2**16


class ScoreHistogram:
    """Counts of positive and negative scores in `bins` equal bins over a range that grows.

    The range starts at the first scores seen; scores beyond it double its width (merging bin
    pairs) until they fit, so earlier counts stay exact and the resolution stays within a factor
    two of span / bins.
    """

    def __init__(self, bins: int = DEFAULT_BINS):
        if bins < 2 or bins % 2:
            raise ValueError(f"bins must be an even number >= 2, got {bins}")
        self.bins = bins
        self.lo: float | None = None
        self.width = 0.0
        self.pos = np.zeros(bins, np.int64)
        self.neg = np.zeros(bins, np.int64)
        self.min = np.inf
        self.max = -np.inf

    @classmethod
    def spanning(cls, low: float, high: float, bins: int = DEFAULT_BINS) -> ScoreHistogram:
        """A histogram whose range is fixed to [low, high] up front, so histograms filled apart
        (e.g. on several workers) share their bins and add up by their counts."""
        hist = cls(bins)
        span = high - low
        hist.lo = low
        hist.width = (span if span > 0 else max(abs(low), 1.0) * 1e-6) / bins * (1 + 1e-9)
        return hist

    @property
    def hi(self) -> float:
        return self.lo + self.width * self.bins

    @property
    def edges(self) -> np.ndarray:
        """Lower edge of every bin: the threshold `score >= edge` that starts at that bin."""
        return self.lo + self.width * np.arange(self.bins)

    @property
    def positives(self) -> int:
        return int(self.pos.sum())

    @property
    def negatives(self) -> int:
        return int(self.neg.sum())

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        """Count scores with their binary labels (any shape, same size)."""
        scores = np.asarray(scores, np.float64).ravel()
        labels = np.asarray(labels).ravel() > 0
        if scores.size != labels.size:
            raise ValueError(f"{scores.size} scores but {labels.size} labels")
        if scores.size == 0:
            return
        low, high = float(scores.min()), float(scores.max())
        if not (np.isfinite(low) and np.isfinite(high)):
            raise DataError("anomaly map contains NaN or infinite values")
        self.min, self.max = min(self.min, low), max(self.max, high)
        if self.lo is None:
            span = high - low
            self.lo = low
            self.width = (span if span > 0 else max(abs(low), 1.0) * 1e-6) / self.bins * (1 + 1e-9)
        while low < self.lo:
            self._double(keep_high=True)
        while high >= self.hi:
            self._double(keep_high=False)
        index = np.clip(((scores - self.lo) / self.width).astype(np.int64), 0, self.bins - 1)
        self.pos += np.bincount(index[labels], minlength=self.bins)
        self.neg += np.bincount(index[~labels], minlength=self.bins)

    def _double(self, keep_high: bool) -> None:
        empty = np.zeros(self.bins // 2, np.int64)
        merged = [counts.reshape(-1, 2).sum(1) for counts in (self.pos, self.neg)]
        if keep_high:
            self.lo -= self.width * self.bins
            self.pos, self.neg = (np.concatenate([empty, m]) for m in merged)
        else:
            self.pos, self.neg = (np.concatenate([m, empty]) for m in merged)
        self.width *= 2

    def cumulative(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(thresholds, TP, FP) for `score >= threshold` at every bin edge, highest first,
        starting with "nothing flagged" (threshold +inf)."""
        tp = np.concatenate([[0], np.cumsum(self.pos[::-1])])
        fp = np.concatenate([[0], np.cumsum(self.neg[::-1])])
        thresholds = np.concatenate([[np.inf], self.edges[::-1]])
        return thresholds, tp, fp

    def metrics(self) -> dict:
        """AUROC, AUPRC, best Dice and its threshold; degenerate inputs warn and give the
        values scikit-learn gives (AUROC NaN without both classes, AP 0 without positives)."""
        n_pos, n_neg = self.positives, self.negatives
        out = {"auroc": float("nan"), "auprc": float("nan"), "dice_best": float("nan"),
               "dice_best_threshold": float("nan"), "auroc_error_bound": 0.0,
               "positives": n_pos, "negatives": n_neg}
        if n_pos + n_neg == 0:
            warnings.warn("pixel metrics undefined: no voxels were scored", RuntimeWarning, stacklevel=2)
            return out
        if self.min == self.max:
            warnings.warn(f"anomaly map is constant ({self.min:g}): AUROC is 0.5 and AP the lesion "
                          "prevalence, as for a random detector", RuntimeWarning, stacklevel=2)
        thresholds, tp, fp = self.cumulative()
        if n_pos == 0:
            warnings.warn("pixel metrics undefined: no lesion voxels; AUROC and [DICE] are NaN, AP is 0",
                          RuntimeWarning, stacklevel=2)
            out["auprc"] = 0.0
            return out
        gained = np.diff(tp)
        flagged = tp[1:] + fp[1:]
        precision = np.divide(tp[1:], flagged, out=np.zeros(len(flagged)), where=flagged > 0)
        out["auprc"] = float((gained * precision).sum() / n_pos)
        dice = dice_from_counts(tp, fp, n_pos)
        best = int(np.argmax(dice))
        out["dice_best"], out["dice_best_threshold"] = float(dice[best]), float(thresholds[best])
        if n_neg == 0:
            warnings.warn("AUROC undefined: every scored voxel is lesion", RuntimeWarning, stacklevel=2)
            return out
        out["auroc"] = float(np.trapezoid(tp / n_pos, fp / n_neg))
        out["auroc_error_bound"] = float(0.5 * (self.pos * self.neg).sum() / (n_pos * n_neg))
        return out

    def curves(self, points: int = 2000) -> dict:
        """ROC and PR curves (at most `points` each, for plotting) from the non-empty bins."""
        thresholds, tp, fp = self.cumulative()
        n_pos, n_neg = max(self.positives, 1), max(self.negatives, 1)
        keep = np.concatenate([[True], (self.pos + self.neg)[::-1] > 0])
        tp, fp, thresholds = tp[keep], fp[keep], thresholds[keep]
        if len(tp) > points:
            pick = np.unique(np.linspace(0, len(tp) - 1, points).round().astype(int))
            tp, fp, thresholds = tp[pick], fp[pick], thresholds[pick]
        flagged = tp + fp
        precision = np.divide(tp, flagged, out=np.ones(len(tp)), where=flagged > 0)
        return {"fpr": fp / n_neg, "tpr": tp / n_pos, "recall": tp / n_pos, "precision": precision,
                "thresholds": thresholds}

    def densities(self, bins: int = 100) -> dict:
        """Coarse histograms of negative and positive scores (each normalised to sum 1)."""
        if self.lo is None:
            return {"edges": np.zeros(bins + 1), "negative": np.zeros(bins), "positive": np.zeros(bins)}
        lo, hi = self.min, max(self.max, self.min + self.width)
        edges = np.linspace(lo, hi, bins + 1)
        centres = self.edges + self.width / 2
        out = {"edges": edges}
        for name, counts in (("negative", self.neg), ("positive", self.pos)):
            hist, _ = np.histogram(centres, bins=edges, weights=counts)
            out[name] = hist / max(hist.sum(), 1)
        return out


def dice_from_counts(tp: np.ndarray, fp: np.ndarray, positives: int) -> np.ndarray:
    """Dice = 2TP / (2TP + FP + FN) with FN = positives - TP, via MONAI's F1 ("f1 score").

    0/0 (nothing flagged, nothing to find) counts as 0 for threshold sweeps.
    """
    tp, fp = np.asarray(tp, np.float64), np.asarray(fp, np.float64)
    matrix = torch.from_numpy(np.stack([tp, fp, np.zeros_like(tp), positives - tp], axis=-1))
    return np.nan_to_num(compute_confusion_matrix_metric("f1 score", matrix).numpy(), nan=0.0)


def overlap(prediction: np.ndarray, label: np.ndarray) -> dict:
    """Dice, precision and recall of a binary segmentation (MONAI's confusion-matrix metrics).

    Undefined ratios (no lesion and nothing flagged) are NaN, so means over volumes skip them.
    """
    prediction, label = np.asarray(prediction).ravel() > 0, np.asarray(label).ravel() > 0
    tp = int(np.count_nonzero(prediction & label))
    fp = int(np.count_nonzero(prediction & ~label))
    fn = int(np.count_nonzero(~prediction & label))
    matrix = torch.tensor([[tp, fp, prediction.size - tp - fp - fn, fn]], dtype=torch.float64)
    names = {"dice": "f1 score", "precision": "precision", "recall": "recall"}
    out = {key: float(compute_confusion_matrix_metric(name, matrix)[0]) for key, name in names.items()}
    return {**out, "flagged_voxels": tp + fp, "lesion_voxels": tp + fn}


def class_dice(prediction: np.ndarray, label: np.ndarray, classes: tuple[int, ...]) -> dict[str, float]:
    """Dice of each lesion class (label value → Dice) of one volume's class labels (MONAI's
    `compute_dice`); NaN for a class absent from the label, so means over patients skip it."""
    index = np.zeros(256, np.int64)
    index[list(classes)] = np.arange(1, len(classes) + 1)  # values outside `classes` are background
    as_index = [torch.from_numpy(index[np.asarray(a, np.uint8)])[None, None] for a in (prediction, label)]
    dice = compute_dice(*as_index, include_background=False, num_classes=len(classes) + 1)[0]
    return {str(value): float(d) for value, d in zip(classes, dice)}


def pixel_metrics(scores: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS) -> dict:
    """AUROC, AUPRC and best Dice ([DICE]) of per-pixel scores against binary labels."""
    histogram = ScoreHistogram(bins)
    histogram.add(scores, labels)
    metrics = histogram.metrics()
    return {k: metrics[k] for k in ("auroc", "auprc", "dice_best")}


def ranking_metrics(scores: np.ndarray, labels: np.ndarray, what: str) -> dict:
    """Exact AUROC and AP (scikit-learn) for a few thousand image scores; NaN with a warning
    when `labels` hold a single class."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    if labels.all() or not labels.any():
        kind = "lesion" if labels.all() else "healthy"
        warnings.warn(f"{what} AUROC/AP undefined: every {what} is {kind}", RuntimeWarning, stacklevel=2)
        return {"auroc": float("nan"), "ap": float("nan")}
    return {"auroc": float(roc_auc_score(labels, scores)), "ap": float(average_precision_score(labels, scores))}
