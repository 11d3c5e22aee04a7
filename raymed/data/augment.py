"""Training-time random augmentation of slice batches with MONAI's dictionary transforms.

Spatial transforms move the image and every per-pixel field of the batch (mask, label, tissue)
together; intensity transforms touch the image only and keep it in [0, 1]. All off by default.
"""

from __future__ import annotations

import math

import torch
from monai.transforms import Compose, RandAffined, RandFlipd, RandScaleIntensityd, RandShiftIntensityd
from pydantic import Field

from raymed.config import Strict

SPATIAL = ("image", "mask", "label", "tissue")


class Augmentation(Strict):
    """Probabilities and ranges of each random transform (0 disables it)."""

    flip: float = Field(0.0, ge=0, le=1, description="probability of a left-right flip")
    rotate: float = Field(0.0, ge=0, le=180, description="max in-plane rotation (degrees)")
    scale: float = Field(0.0, ge=0, lt=1, description="max relative zoom in or out")
    translate: float = Field(0.0, ge=0, lt=1, description="max shift as a fraction of the slice size")
    affine_prob: float = Field(0.5, ge=0, le=1, description="probability of the affine when one is set")
    intensity_scale: float = Field(0.0, ge=0, lt=1, description="max relative intensity scaling")
    intensity_shift: float = Field(0.0, ge=0, lt=1, description="max intensity offset")
    intensity_prob: float = Field(0.5, ge=0, le=1, description="probability of each intensity transform")

    @property
    def active(self) -> bool:
        return any((self.flip, self.rotate, self.scale, self.translate, self.intensity_scale, self.intensity_shift))


def transforms(settings: Augmentation, keys: tuple[str, ...], size: int, seed: int) -> Compose | None:
    """The MONAI pipeline for one sample dict with `keys` (None when nothing is switched on)."""
    if not settings.active:
        return None
    spatial = [k for k in SPATIAL if k in keys]
    modes = ["bilinear" if k in ("image", "tissue") else "nearest" for k in spatial]
    steps = []
    if settings.flip:
        steps.append(RandFlipd(spatial, prob=settings.flip, spatial_axis=0))
    if settings.rotate or settings.scale or settings.translate:
        steps.append(RandAffined(spatial, prob=settings.affine_prob, mode=modes, padding_mode="zeros",
                                 rotate_range=math.radians(settings.rotate),
                                 scale_range=(settings.scale, settings.scale),
                                 translate_range=(settings.translate * size, settings.translate * size)))
    if settings.intensity_scale:
        steps.append(RandScaleIntensityd("image", factors=settings.intensity_scale, prob=settings.intensity_prob))
    if settings.intensity_shift:
        steps.append(RandShiftIntensityd("image", offsets=settings.intensity_shift, prob=settings.intensity_prob))
    pipeline = Compose(steps)
    pipeline.set_random_state(seed=seed % 2**32)
    return pipeline


def augment(batch: dict, pipeline: Compose | None) -> dict:
    """Apply `pipeline` sample by sample to the per-pixel fields of a batch (tensors)."""
    if pipeline is None:
        return batch
    keys = [k for k in SPATIAL if k in batch]
    samples = []
    for i in range(len(batch["image"])):
        sample = {k: batch[k][i] if k in ("image", "tissue") else batch[k][i][None].float() for k in keys}
        samples.append(pipeline(sample))
    out = dict(batch)
    for k in keys:
        stacked = torch.stack([torch.as_tensor(s[k]).as_subclass(torch.Tensor) for s in samples])
        if k in ("image", "tissue"):
            out[k] = stacked.clamp(0, 1).to(batch[k].dtype)
        else:
            out[k] = (stacked[:, 0] > 0.5).to(batch[k].dtype)
    return out
