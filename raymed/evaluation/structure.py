"""Structural evaluation of generated images: MS-SSIM max-similarity, diversity, template matching.

- `max_similarity(S, S)` (S_S) near 1 for many images means mode collapse; `max_similarity(S, R)`
  (S_R) near 1 means memorised training images; `max_similarity(R, R)` (R_R) is the baseline a
  real set shows. Within one set an image is not compared with itself.
- `diversity`: mean MS-SSIM of random pairs within a set (the 3D-StyleGAN paper's measure; lower
  is more diverse), next to the real set's.
- `template_matching`: each synthetic image slid over a lattice of real images (normalised
  cross-correlation at every offset): a high peak is a synthetic image that copies a real one.

Images are (N, C, H, W) in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al.'s five scales
KERNEL = 7


def ms_ssim_metric(size: int) -> MultiScaleSSIMMetric:
    """MONAI's MS-SSIM with as many of Wang et al.'s scales as the image size allows for a 7-pixel
    window (the coarsest scale must still exceed it): 5 from 128 px, 4 at 64, 3 at 32; the
    weights of the scales kept are renormalised."""
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and (KERNEL - 1) * 2 ** scales < size:
        scales += 1
    weights = np.array(MS_SSIM_WEIGHTS[:scales])
    return MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=KERNEL,
                                weights=tuple(weights / weights.sum()))


def max_similarity(queries: np.ndarray, references: np.ndarray, same_set: bool = False) -> np.ndarray:
    """For each query, its highest MS-SSIM to any reference (`same_set`: the two are one set, and
    an image is not its own match)."""
    metric = ms_ssim_metric(queries.shape[-1])
    refs = torch.from_numpy(references).float()
    best = np.empty(len(queries))
    for i, query in enumerate(torch.from_numpy(queries).float()):
        scores = metric(query.expand_as(refs), refs)[:, 0].numpy()
        if same_set:
            scores[i] = -np.inf
        best[i] = scores.max()
    return best


def diversity(images: np.ndarray, pairs: int, seed: int = 0) -> float:
    """Mean MS-SSIM of `pairs` random pairs of distinct images of one set."""
    rng = np.random.default_rng(seed)
    first = rng.integers(0, len(images), pairs)
    second = (first + rng.integers(1, len(images), pairs)) % len(images)
    x = torch.from_numpy(images).float()
    return float(ms_ssim_metric(images.shape[-1])(x[first], x[second]).mean())


def lattice(images: np.ndarray) -> tuple[np.ndarray, int]:
    """The first channel of (N, C, H, W) images tiled row by row into a near-square mosaic; (mosaic, columns)."""
    n, _, h, w = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    mosaic = np.zeros((rows * h, cols * w), np.float64)
    for i, image in enumerate(images[:, 0]):
        r, c = divmod(i, cols)
        mosaic[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    return mosaic, cols


def template_matching(synthetic: np.ndarray, real: np.ndarray) -> dict:
    """Normalised cross-correlation of each synthetic image (first channel) at every offset of
    the real lattice, by FFT. Returns per synthetic image the peak NCC, the real image the
    peak's window mostly covers, and the window's top-left corner in the lattice."""
    mosaic, cols = lattice(real)
    h, w = synthetic.shape[-2:]
    big = torch.from_numpy(mosaic)
    shape = big.shape
    spectrum = torch.fft.rfft2(big)
    ones = torch.fft.rfft2(torch.ones(h, w, dtype=torch.float64), s=shape)
    # local sums over every h×w window (index = window's bottom-right corner, circular part dropped)
    local_sum = torch.fft.irfft2(spectrum * ones, s=shape)[h - 1:, w - 1:]
    local_sq = torch.fft.irfft2(torch.fft.rfft2(big**2) * ones, s=shape)[h - 1:, w - 1:]
    window_norm = (local_sq - local_sum**2 / (h * w)).clamp(min=0).sqrt()
    peaks, tiles, corners = [], [], []
    for image in synthetic[:, 0]:
        t = torch.from_numpy(image.astype(np.float64))
        t = t - t.mean()
        flipped = torch.flip(t, (0, 1))
        corr = torch.fft.irfft2(spectrum * torch.fft.rfft2(flipped, s=shape), s=shape)[h - 1:, w - 1:]
        ncc = corr / (t.norm() * window_norm).clamp(min=1e-8)
        flat = int(ncc.argmax())
        y, x = divmod(flat, ncc.shape[1])
        row, col = (y + h // 2) // h, (x + w // 2) // w
        peaks.append(float(ncc.flatten()[flat]))
        tiles.append(min(row * cols + col, len(real) - 1))
        corners.append((y, x))
    return {"ncc": np.array(peaks), "real_index": np.array(tiles), "corner": np.array(corners), "mosaic": mosaic}
