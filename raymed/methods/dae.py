"""Denoising autoencoder with coarse noise (Kascenas et al., "The role of noise in denoising models
for anomaly detection in medical images", MedIA 2023) and its fine-tuning as a segmenter with few
labels (Holzschuh et al., "Combining Anomaly Detection and Supervised Learning for Medical Image
Segmentation", MIDL 2023).

task "denoise": a UNet learns to remove coarse Gaussian noise from healthy slices (MSE inside the
foreground). Given a lesion it restores healthy-looking tissue, so the anomaly map is |x − x̂|
averaged over channels, then (the method's own post-processing) zeroed outside an eroded brain
mask and median filtered with k = 5.

task "segment": the same UNet with a fresh two-class head, trained with soft Dice + cross-entropy
on the slices of k labelled subjects, keeping the weights of lowest validation loss. Started from
a denoise run (`train.init_from=RUN`, `train.init_strict=false`: the UNet is shared by name, the
head is not) it is the fine-tuned model; without `init_from`, the from-scratch baseline. Its
anomaly map is the lesion probability.
"""

from __future__ import annotations

from typing import Literal

import torch
from monai.losses import DiceCELoss
from monai.networks.blocks import UnetOutBlock
from monai.networks.nets import DynUNet
from pydantic import Field, model_validator
from torch import nn

from raymed.evaluation.postprocess import PostProcessing
from raymed.methods.base import (EarlyStopping, Method, MethodConfig, OptimizerSpec, Phase, PhaseData,
                                 Schedule, Update, residual)
from raymed.synthesis.coarse_noise import coarse_noise

# One head per task, named apart: fine-tuning never loads the denoiser's output layer, even when
# the image has as many channels as the segmentation has classes.
HEADS = {"denoise": "denoise_head", "segment": "segment_head"}
CLASSES = 2  # background, lesion
DICE_CE = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)


def lesion(batch) -> torch.Tensor:
    """The binary (whole-lesion) target (N, 1, H, W) from the batch's label."""
    return (batch["label"] > 0).unsqueeze(1).to(batch["image"].dtype)


class DenoisingConfig(MethodConfig):
    task: Literal["denoise", "segment"] = Field("denoise", description="denoise: the unsupervised detector "
                                                "(Kascenas); segment: supervised fine-tuning (Holzschuh)")
    noise_std: float = Field(0.2, gt=0, description="std σ of the coarse Gaussian noise samples (Kascenas)")
    noise_res: int = Field(16, ge=1, description="noise grid cells per side (Kascenas: 16 at 128²)")
    channels: list[int] = Field([64, 128, 256, 512], min_length=3,
                                description="UNet channels per level: depth 4, 64 base channels (Kascenas)")
    norm_groups: int = Field(8, ge=1, description="group-norm groups; every level's channels must divide by it")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate, cosine-annealed to 0 over the phase (Kascenas)")
    weight_decay: float = Field(1e-5, ge=0, description="Adam L2 weight decay (Kascenas)")
    amsgrad: bool = Field(True, description="AMSGrad variant of Adam (Kascenas)")
    epochs: int = Field(50, ge=1, description="passes over the phase's slices (Kascenas: ~1M slices seen)")
    labelled_subjects: int | None = Field(5, ge=1, description="segment: train on this many labelled subjects "
                                                               "(Holzschuh's few-label regime); None: all")
    labelled_seed: int = Field(0, description="segment: which labelled subjects are drawn")
    patience: int = Field(10, ge=1, description="segment: validations without a lower val loss "
                                                   "before stopping; the best weights are kept (Holzschuh)")
    postprocess: PostProcessing = Field(default_factory=lambda: PostProcessing(median=5, erode=2),
                                        description="Kascenas: median k=5 and the brain mask eroded by 2 "
                                                    "voxels (their 5×5 window)")

    @model_validator(mode="after")
    def groups_divide_channels(self):
        if any(ch % self.norm_groups for ch in self.channels):
            raise ValueError(f"channels {self.channels} must all be divisible by norm_groups={self.norm_groups}")
        return self


class DenoisingAutoEncoder(Method):
    """`nets`: "unet" (DynUNet without its output block) and the task's 1×1 head.

    MONAI's DynUNet has the paper's blocks: two 3×3 convolutions with group norm and swish per
    level, transposed-convolution upsampling, a 1×1 output convolution (here the head). It
    downsamples by strided convolutions where Kascenas et al. average-pool.
    """

    name = "dae"
    kind = ("detector", "segmenter")
    Config = DenoisingConfig

    @property
    def head(self) -> str:
        return HEADS[self.config.task]

    def build(self):
        c = self.config
        levels = len(c.channels)
        unet = DynUNet(spatial_dims=2, in_channels=self.in_channels, out_channels=c.channels[0],
                       kernel_size=[3] * levels, strides=[1] + [2] * (levels - 1),
                       upsample_kernel_size=[2] * (levels - 1), filters=c.channels,
                       norm_name=("group", {"num_groups": c.norm_groups}), act_name="swish")
        unet.output_block = nn.Identity()  # the output layer is the task's head
        out_channels = self.in_channels if c.task == "denoise" else CLASSES
        return {"unet": unet, self.head: UnetOutBlock(2, c.channels[0], out_channels)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The denoised image (denoise) or the class logits (segment), (N, C_out, H, W)."""
        return self.nets[self.head](self.nets["unet"](x))

    def denoising_loss(self, batch):
        """MSE between UNet(x + coarse noise) and x, over the foreground pixels."""
        x, mask = batch["image"], batch["mask"].to(batch["image"].dtype)
        noisy = x + coarse_noise(x, mask, self.config.noise_std, self.config.noise_res)
        weight = mask.unsqueeze(1).expand_as(x)
        loss = ((self.forward(noisy) - x) ** 2 * weight).sum() / weight.sum().clamp(min=1)
        return loss, {"loss": loss.item()}

    def segmentation_loss(self, batch):
        loss = DICE_CE(self.forward(batch["image"]), lesion(batch))
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def validate(self, batch):
        """Mean val loss, and the global Dice of the predicted lesion inside the brain mask."""
        logits, target = self.forward(batch["image"]), lesion(batch)
        predicted = (logits.argmax(1, keepdim=True) > 0) & (batch["mask"].unsqueeze(1) > 0)
        n = len(target)
        overlap = (predicted & (target > 0)).sum().item()
        return {"loss": (DICE_CE(logits, target).item() * n, n),
                "dice": (2 * overlap, predicted.sum().item() + (target > 0).sum().item())}

    def phases(self):
        c = self.config
        optimizer = {"adam": OptimizerSpec(["unet", self.head], lr=c.lr, weight_decay=c.weight_decay,
                                           amsgrad=c.amsgrad, schedule=Schedule("cosine"))}
        if c.task == "denoise":
            return [Phase("denoise", c.epochs, optimizer, [Update("adam", self.denoising_loss)],
                          data=PhaseData(fields=("image", "mask")))]
        data = PhaseData(slices="all", labelled=c.labelled_subjects, labelled_seed=c.labelled_seed,
                         fields=("image", "mask", "label"))
        return [Phase("segment", c.epochs, optimizer, [Update("adam", self.segmentation_loss)], data=data,
                      validation=self.validate, metric="val/loss", mode="min",
                      early_stopping=EarlyStopping(patience=c.patience))]

    @torch.no_grad()
    def reconstruction(self, x):
        return self.forward(x) if self.config.task == "denoise" else None

    @torch.no_grad()
    def anomaly_map(self, x):
        """denoise: |x − x̂| averaged over channels; segment: the lesion probability."""
        out = self.forward(x)
        amap = residual(x, out, positive_only=False) if self.config.task == "denoise" else out.softmax(1)[:, 1]
        return amap, amap.flatten(1).mean(1)
