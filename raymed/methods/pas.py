"""Pseudo-anomaly synthesis with two-phase training (Zhang, Deng and Li, "Unsupervised Liver Tumor
Segmentation with Pseudo Anomaly Synthesis"), a DRAEM-style detector (Zavrtanik et al., ICCV 2021).

Healthy slices get synthetic anomalies I_s = M ⊙ (I + C) + (1 − M) ⊙ I inside the foreground,
with random-shape masks M (or DRAEM's Perlin masks). A reconstruction UNet learns to restore I
from I_s; a discriminative UNet reads (I_s, Ĩ_s) and segments M. The paper trains them in two
phases, reconstruction first (L1), then the segmentation net alone with focal loss and early
stopping, because it overfits to the synthetic anomalies soon after it starts. `schedule=joint`
is DRAEM's single phase (L2 + SSIM + focal) for the ablation.

Anomaly map: the softmax probability of the anomaly class; image score: the maximum of the
average-pooled map (DRAEM).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from monai.losses import FocalLoss, SSIMLoss
from monai.networks.nets import UNet
from pydantic import Field, model_validator

from raymed.methods.base import EarlyStopping, Method, MethodConfig, OptimizerSpec, Phase, PhaseData, Update
from raymed.synthesis.pseudo_anomaly import (intensity_shift, odd, perlin_mask, random_shape_mask,
                                             synthesize)

REFERENCE_SIZE = 128  # kernel sizes are given at 128² and scale with the slice size
SSIM = SSIMLoss(spatial_dims=2, data_range=1.0)  # images in [0, 1]


class PseudoAnomalyConfig(MethodConfig):
    schedule: Literal["two-phase", "joint"] = Field("two-phase", description="two-phase: reconstruction, then "
                                                    "segmentation with early stopping (the paper); joint: DRAEM")
    synthesis: Literal["random", "perlin"] = Field("random", description="random-shape masks (the paper's "
                                                   "Algorithm 1) or DRAEM's Perlin masks")
    anomaly_prob: float = Field(0.5, ge=0, le=1, description="chance that a training slice gets an anomaly")
    threshold: float = Field(200.0, gt=0, lt=255, description="random shape: binarisation threshold on (0, 255)")
    blur_kernel: int = Field(25, ge=1, description="random shape: Gaussian blur kernel at 128² (scaled)")
    morph_kernel: int = Field(5, ge=1, description="random shape: elliptical open/close kernel at 128² (scaled)")
    perlin_threshold: float = Field(0.5, description="perlin: binarisation threshold (DRAEM)")
    perlin_scale: int = Field(6, ge=1, description="perlin: 2^a lattice cells per 256 px, a < this (DRAEM)")
    c_min: float = Field(0.1, ge=0, description="smallest |C|, intensity change inside M (images in [0, 1])")
    c_max: float = Field(0.5, gt=0, description="largest |C|")
    c_std: float = Field(0.3, gt=0, description="std of the Gaussian C is drawn from")
    channels: list[int] = Field([32, 64, 128, 256], min_length=2, description="UNet channels per level (both nets)")
    res_units: int = Field(2, ge=0, description="residual units per UNet level")
    focal_alpha: float = Field(0.75, gt=0, lt=1, description="focal-loss class weight α of the anomaly "
                                                             "class; the normal class gets 1 − α")
    focal_gamma: float = Field(2.0, ge=0, description="focal-loss γ (the paper: 2)")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate (DRAEM)")
    reconstruction_epochs: int = Field(50, ge=1, description="two-phase: epochs of phase 1")
    segmentation_epochs: int = Field(20, ge=1, description="two-phase: most epochs of phase 2 "
                                     "(joint: its one phase has the epochs of both)")
    patience: int = Field(3, ge=1, description="validations without a better val AUPRC before the segmentation "
                                               "phase stops; its best weights are kept")
    score_pool: int = Field(11, ge=1, description="average-pool kernel at 128² for the image score (DRAEM: 21 at 256²)")

    @model_validator(mode="after")
    def intensity_range_ascends(self):
        if self.c_min >= self.c_max:
            raise ValueError(f"c_min={self.c_min} must be below c_max={self.c_max}")
        return self

    def kernel(self, k: int) -> int:
        return odd(k * self.data.size / REFERENCE_SIZE)


class PseudoAnomalySynthesis(Method):
    """`nets`: "reconstruction" (image → image) and "segmentation" ((I_s, Ĩ_s) → 2 classes), MONAI UNets."""

    name = "pas"
    kind = ("detector",)
    Config = PseudoAnomalyConfig

    def build(self):
        c = self.config
        shared = dict(spatial_dims=2, channels=c.channels, strides=[2] * (len(c.channels) - 1),
                      num_res_units=c.res_units, norm="batch")
        return {"reconstruction": UNet(in_channels=self.in_channels, out_channels=self.in_channels, **shared),
                "segmentation": UNet(in_channels=2 * self.in_channels, out_channels=2, **shared)}

    @property
    def focal(self) -> FocalLoss:
        c = self.config
        return FocalLoss(to_onehot_y=True, use_softmax=True, gamma=c.focal_gamma,
                         alpha=[1 - c.focal_alpha, c.focal_alpha])

    def masks(self, batch) -> torch.Tensor:
        """One pseudo-anomaly mask M (N, H, W) per slice, inside its foreground; with probability
        1 − anomaly_prob (or when the shape comes out empty) it is empty: a normal sample."""
        c, image = self.config, batch["image"]
        n, _, h, w = image.shape
        masks = torch.zeros(n, h, w, dtype=torch.bool, device=image.device)
        for i in torch.nonzero(torch.rand(n) < c.anomaly_prob).flatten().tolist():
            if c.synthesis == "random":
                masks[i] = random_shape_mask((h, w), c.threshold, c.kernel(c.blur_kernel), c.kernel(c.morph_kernel),
                                             device=image.device)
            else:
                masks[i] = perlin_mask((h, w), c.perlin_threshold, c.perlin_scale, device=image.device)
        return masks & (batch["mask"] > 0)

    def corrupt(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(I_s, M): the batch's images with pseudo-anomalies, and their masks."""
        c, image = self.config, batch["image"]
        region = self.masks(batch)
        shift = intensity_shift(len(image), image.shape[1], c.c_min, c.c_max, c.c_std, device=image.device)
        return synthesize(image, region, shift), region

    def segment(self, image: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
        """Anomaly logits (N, 2, H, W) from an image and its reconstruction."""
        return self.nets["segmentation"](torch.cat([image, restored], 1))

    def reconstruction_loss(self, batch):
        """Phase 1: L1 between the restored I_s and the clean image."""
        corrupted, _ = self.corrupt(batch)
        loss = F.l1_loss(self.nets["reconstruction"](corrupted), batch["image"])
        return loss, {"l1": loss.item()}

    def segmentation_loss(self, batch):
        """Phase 2: focal loss of the segmentation of M, the reconstruction net frozen."""
        corrupted, region = self.corrupt(batch)
        with torch.no_grad():
            restored = self.nets["reconstruction"](corrupted)
        loss = self.focal(self.segment(corrupted, restored), region.unsqueeze(1).float())
        return loss, {"focal": loss.item()}

    def joint_loss(self, batch):
        """DRAEM: L2 + SSIM for the reconstruction, focal for the segmentation, one step."""
        image = batch["image"]
        corrupted, region = self.corrupt(batch)
        restored = self.nets["reconstruction"](corrupted)
        l2 = F.mse_loss(restored, image)
        ssim = SSIM(restored, image)
        focal = self.focal(self.segment(corrupted, restored), region.unsqueeze(1).float())
        loss = l2 + ssim + focal
        return loss, {"l2": l2.item(), "ssim": ssim.item(), "focal": focal.item()}

    def phases(self):
        c = self.config
        data = PhaseData(fields=("image", "mask"))
        if c.schedule == "joint":
            both = {"adam": OptimizerSpec(["reconstruction", "segmentation"], lr=c.lr)}
            return [Phase("joint", c.reconstruction_epochs + c.segmentation_epochs, both,
                          [Update("adam", self.joint_loss)], data=data)]  # DRAEM: no early stopping
        return [
            Phase("reconstruct", c.reconstruction_epochs, {"adam": OptimizerSpec(["reconstruction"], lr=c.lr)},
                  [Update("adam", self.reconstruction_loss)], data=data, validation=None),
            Phase("segment", c.segmentation_epochs, {"adam": OptimizerSpec(["segmentation"], lr=c.lr)},
                  [Update("adam", self.segmentation_loss)], frozen=["reconstruction"], data=data,
                  early_stopping=EarlyStopping(patience=c.patience)),
        ]

    @torch.no_grad()
    def reconstruction(self, x):
        return self.nets["reconstruction"](x)

    @torch.no_grad()
    def anomaly_map(self, x):
        amap = self.segment(x, self.nets["reconstruction"](x)).softmax(1)[:, 1]
        k = self.config.kernel(self.config.score_pool)
        pooled = F.avg_pool2d(amap.unsqueeze(1), k, stride=1, padding=k // 2)
        return amap, pooled.flatten(1).amax(1)
