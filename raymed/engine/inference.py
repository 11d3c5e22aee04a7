"""Anomaly maps for whole volumes: slice by slice, batched, back on the input's voxel grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raymed.data.discovery import Case
from raymed.data.preprocess import Prepared, prepare, to_source_grid
from raymed.methods.base import Method


@dataclass
class VolumeMap:
    """Anomaly map on the prepared grid (X, Y, Z), per-slice scores, and the prepared case."""

    map: np.ndarray
    slice_scores: np.ndarray
    prepared: Prepared

    def on_source_grid(self) -> np.ndarray:
        """The map resampled onto the input file's grid (same shape and affine as the input)."""
        return to_source_grid(self.map, self.prepared)


@torch.no_grad()
def map_prepared(method: Method, prepared: Prepared, batch_size: int = 32) -> VolumeMap:
    """Run `method.anomaly_map` over every axial slice; zero outside the mask."""
    device = method.device  # methods without nets run on CPU
    image = np.moveaxis(prepared.image, -1, 0)  # (Z, C, X, Y)
    maps, scores = [], []
    for start in range(0, len(image), batch_size):
        amap, score = method.anomaly_map(torch.from_numpy(np.ascontiguousarray(image[start:start + batch_size])).to(device))
        maps.append(amap.float().cpu().numpy())
        scores.append(score.float().cpu().numpy())
    volume = np.moveaxis(np.concatenate(maps), 0, -1) * prepared.mask
    return VolumeMap(map=volume.astype(np.float32), slice_scores=np.concatenate(scores), prepared=prepared)


def map_case(method: Method, case: Case, batch_size: int = 32) -> VolumeMap:
    """Prepare a case with the preprocessing the method was trained with, then map it."""
    return map_prepared(method, prepare(case, method.config.data), batch_size)
