"""Pixel-level detection metrics over the voxels inside the brain mask."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def pixel_metrics(scores: np.ndarray, labels: np.ndarray, max_pixels: int = 2_000_000, seed: int = 0) -> dict:
    """AUROC and AUPRC (average precision) of per-pixel scores against binary labels.

    Above `max_pixels` a uniform random subsample is scored (standard error of AUROC on 2e6
    pixels is far below the differences reported between methods). Without positives or
    negatives the metrics are undefined: NaN with a warning.
    """
    scores = np.asarray(scores, np.float32).ravel()
    labels = np.asarray(labels).ravel() > 0
    if scores.size > max_pixels:
        keep = np.random.default_rng(seed).choice(scores.size, max_pixels, replace=False)
        scores, labels = scores[keep], labels[keep]
    if labels.all() or not labels.any():
        warnings.warn("pixel metrics undefined: labels have a single class", RuntimeWarning, stacklevel=2)
        return {"auroc": float("nan"), "auprc": float("nan")}
    return {"auroc": float(roc_auc_score(labels, scores)), "auprc": float(average_precision_score(labels, scores))}
