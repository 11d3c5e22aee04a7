"""Post-processing of anomaly maps as in the literature; every report states which steps ran.

Order: positive residual only (a setting of the method's anomaly map) → median filter →
zero outside an eroded brain mask → (binarise at the threshold) → remove small connected
components. The last step acts on binary segmentations only, so it changes the Dice,
precision and recall at the operating threshold, not the threshold-swept AUROC/AUPRC/[DICE].
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field
from scipy import ndimage

from raymed.config import Strict

if TYPE_CHECKING:
    from raymed.methods.base import Method


class PostProcessing(Strict):
    """Which post-processing steps to apply (all off by default)."""

    erode: int = Field(0, ge=0, description="erode the brain mask by this many voxels and zero the map outside it")
    median: int = Field(0, ge=0, description="median filter kernel size (e.g. 5); 0 or 1 disables")
    median_dims: Literal[2, 3] = Field(2, description="median filter per axial slice (2) or in 3D (3)")
    min_component: int = Field(0, ge=0, description="drop connected components smaller than this (voxels)")
    positive_only: bool = Field(False, description="keep only x > reconstruction (hyper-intense lesions)")

    def describe(self, method: Method) -> list[str]:
        """Human-readable list of the steps that run for `method` (empty: none)."""
        steps = []
        if self.positive_only:
            steps.append("positive residual only" if applies_positive_only(method)
                         else f"positive residual only: not applicable to {method.name} (no residual)")
        if self.median > 1:
            steps.append(f"median filter k={self.median} ({self.median_dims}D)")
        if self.erode:
            steps.append(f"brain mask eroded by {self.erode} voxel(s)")
        if self.min_component:
            steps.append(f"connected components < {self.min_component} voxels removed (binary maps)")
        return steps


def applies_positive_only(method: Method) -> bool:
    return "positive_only" in type(method.config).model_fields


def configure(method: Method, settings: PostProcessing) -> Method:
    """Switch the method's own positive-residual option on when asked (and it has one)."""
    if settings.positive_only and applies_positive_only(method):
        method.config = method.config.model_copy(update={"positive_only": True})
    return method


def eroded(mask: np.ndarray, voxels: int) -> np.ndarray:
    """The mask shrunk by `voxels` (3D, 6-connected structuring element, borders eroded)."""
    if voxels <= 0:
        return mask.astype(bool)
    return ndimage.binary_erosion(mask, iterations=voxels, border_value=0)


def smooth_map(amap: np.ndarray, mask: np.ndarray, settings: PostProcessing) -> np.ndarray:
    """Median filter and eroded-mask gating of an (X, Y, Z) map; zero outside the mask."""
    out = np.asarray(amap, np.float32)
    if settings.median > 1:
        size = (settings.median,) * 3 if settings.median_dims == 3 else (settings.median, settings.median, 1)
        out = ndimage.median_filter(out, size=size, mode="nearest")
    return (out * eroded(mask, settings.erode)).astype(np.float32)


def binarise(amap: np.ndarray, threshold: float, min_component: int = 0) -> np.ndarray:
    """`map >= threshold`, without 26-connected components smaller than `min_component` voxels."""
    binary = np.asarray(amap) >= threshold
    if min_component > 1 and binary.any():
        labels, count = ndimage.label(binary, structure=np.ones((3,) * binary.ndim))
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        small = sizes < min_component
        small[0] = True
        binary = ~small[labels]
    return binary
