"""How informative an unlabelled sample is, from a segmentation model's class probabilities
(Chong, Knottenbelt and Bhatia's strategies), or from a detector's anomaly score.

Probabilities are (N, K, ...) with the classes on axis 1; a segmentation model's per-pixel
scores are averaged over each sample's pixels (inside `mask` when given), so every function
returns one score per sample, higher = more worth labelling.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _per_sample(pixel_scores: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    flat = pixel_scores.reshape(len(pixel_scores), -1)
    if mask is None:
        return flat.mean(1)
    keep = mask.reshape(len(mask), -1).astype(bool)
    return np.where(keep.any(1), (flat * keep).sum(1) / np.maximum(keep.sum(1), 1), 0.0)


def least_confidence(probabilities: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """1 − P(y*|x), y* the most probable class."""
    return _per_sample(1 - probabilities.max(1), mask)


def margin(probabilities: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """1 − (P(y0*|x) − P(y1*|x)), the two most probable classes."""
    top = np.sort(probabilities, axis=1)
    return _per_sample(1 - (top[:, -1] - top[:, -2]), mask)


def expected_model_change(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Expected gradient length, approximated (this project's choice) by the gradient norm of
    the loss under the model's own predicted labels, cross-entropy to its argmax, with respect
    to the parameters of `layer` (the output layer: cheap, and where the change shows), one
    sample at a time. `model(x)` gives logits (N, K, ...)."""
    params = [p for p in layer.parameters() if p.requires_grad]
    lengths = []
    for sample in x:
        logits = model(sample[None])
        loss = F.cross_entropy(logits, logits.argmax(1).detach())
        grads = torch.autograd.grad(loss, params)
        lengths.append(float(torch.sqrt(sum(g.pow(2).sum() for g in grads))))
    return np.array(lengths)


def random_scores(n: int, seed: int) -> np.ndarray:
    """The random baseline: uniform scores, so top-N is a random draw."""
    return np.random.default_rng(seed).random(n)
