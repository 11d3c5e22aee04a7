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
def over_slices(fn, prepared: Prepared, device, batch_size: int) -> list[np.ndarray]:
    """`fn` over the axial slices of a prepared case, batched; each of its outputs concatenated
    over the slices (slice axis first)."""
    image = np.moveaxis(prepared.image, -1, 0)  # (Z, C, X, Y)
    parts = []
    for start in range(0, len(image), batch_size):
        out = fn(torch.from_numpy(np.ascontiguousarray(image[start:start + batch_size])).to(device))
        parts.append([(t.float() if t.is_floating_point() else t).cpu().numpy()  # numpy has no bfloat16
                      for t in (out if isinstance(out, tuple) else (out,))])
    return [np.concatenate(column) for column in zip(*parts)]


def map_prepared(method: Method, prepared: Prepared, batch_size: int = 32) -> VolumeMap:
    """Run `method.anomaly_map` over every axial slice; zero outside the mask."""
    maps, scores = over_slices(method.anomaly_map, prepared, method.device, batch_size)  # nets-free methods: CPU
    volume = np.moveaxis(maps, 0, -1) * prepared.mask
    return VolumeMap(map=volume.astype(np.float32), slice_scores=scores.astype(np.float32), prepared=prepared)


def segment_prepared(method: Method, prepared: Prepared, batch_size: int = 32) -> np.ndarray:
    """A multi-class segmenter's class labels (X, Y, Z), in the label files' numbering; 0 outside the mask."""
    (labels,) = over_slices(method.label_map, prepared, method.device, batch_size)
    return (np.moveaxis(labels, 0, -1) * prepared.mask).astype(np.uint8)


def map_case(method: Method, case: Case, batch_size: int = 32) -> VolumeMap:
    """Prepare a case with the preprocessing the method was trained with, then map it."""
    return map_prepared(method, prepare(case, method.config.data), batch_size)
