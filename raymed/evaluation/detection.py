"""Detection level: one score per axial slice and per volume, used to flag scans for annotation.

A slice's score is the detector's own score (`method`, the default: what `raymed serve` returns
and compares the stored image threshold with), or a summary of its post-processed anomaly map
inside the brain mask: the maximum, or the mean of the top k voxels with k a fraction of the
slice's brain voxels (robust to single hot pixels). A volume's score is the maximum of its
brain slices' scores, so one image threshold flags a volume exactly when it flags one of them.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field

from raymed.errors import ConfigError
from raymed.evaluation.metrics import ranking_metrics
from raymed.config import Strict


class ImageScore(Strict):
    """How a slice's anomaly map becomes one score."""

    reduction: Literal["method", "max", "topk"] = "method"
    fraction: float = Field(0.01, gt=0, le=1, description="top-k: k = ceil(fraction x brain voxels)")


def slice_scores(amap: np.ndarray, mask: np.ndarray, spec: ImageScore,
                 method_scores: np.ndarray | None = None) -> np.ndarray:
    """Score of every axial slice of an (X, Y, Z) map; with "max"/"topk", slices without brain score 0."""
    if spec.reduction == "method":
        if method_scores is None:
            raise ValueError("image score 'method' needs the detector's slice scores")
        return np.asarray(method_scores, np.float64)
    z = amap.shape[-1]
    values = np.moveaxis(np.where(mask, amap, -np.inf), -1, 0).reshape(z, -1)
    brain = np.moveaxis(mask, -1, 0).reshape(z, -1).sum(1)
    if spec.reduction == "max":
        scores = values.max(1)
    else:
        k_max = max(1, math.ceil(spec.fraction * int(brain.max(initial=0))))
        top = -np.sort(-values, axis=1)[:, :k_max]
        k = np.maximum(1, np.ceil(spec.fraction * brain)).astype(int)
        scores = np.array([row[:n].mean() for row, n in zip(top, k)])
    return np.where(brain > 0, scores, 0.0).astype(np.float64)


def flag_rate_threshold(scores: np.ndarray, rate: float) -> float:
    """The lowest threshold that flags (score >= threshold) at most `rate` of the scores."""
    if not 0 < rate <= 1:
        raise ConfigError(f"--flag-rate must be in (0, 1], got {rate}")
    ordered = np.sort(np.asarray(scores, np.float64))[::-1]
    if not len(ordered):
        raise ConfigError("no image scores to choose a flag-rate threshold from")
    n = int(math.floor(rate * len(ordered) + 1e-9))
    if n == 0:
        return float(np.nextafter(ordered[0], np.inf))
    # ties at the cut would flag more than asked: move above them
    cut = ordered[n - 1]
    return float(cut if n == len(ordered) or ordered[n] < cut else np.nextafter(cut, np.inf))


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """Image threshold with the best F1 (Dice of the flags) on labelled scores; NaN without lesions."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    if not labels.any():
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[s[1:] != s[:-1], True]  # one candidate per distinct score
    tp, flagged = np.cumsum(y)[last], np.arange(1, len(s) + 1)[last]
    f1 = 2 * tp / (flagged + labels.sum())
    return float(s[last][int(np.argmax(f1))])


def detection_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float | None, what: str) -> dict:
    """AUROC, AP, and (given a threshold) the flag rate, precision and recall of the flags."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    out = {"count": int(len(scores)), "lesion": int(labels.sum()), **ranking_metrics(scores, labels, what)}
    if threshold is not None and math.isfinite(threshold) and len(scores):
        flags = scores >= threshold
        out["flag_rate"] = float(flags.mean())
        out["flag_precision"] = float((flags & labels).sum() / flags.sum()) if flags.any() else float("nan")
        out["flag_recall"] = float((flags & labels).sum() / labels.sum()) if labels.any() else float("nan")
    return out
