"""Denoising autoencoder with coarse noise (Kascenas et al., "The role of noise in denoising models
for anomaly detection in medical images", MedIA 2023) and its fine-tuning as a segmenter with few
labels (Holzschuh et al., "Combining Anomaly Detection and Supervised Learning for Medical Image
Segmentation", MIDL 2023).

task "denoise": a UNet learns to remove coarse Gaussian noise from healthy slices (MSE inside the
foreground). Given a lesion it restores healthy-looking tissue, so the anomaly map is |x − x̂|
averaged over channels, then (the method's own post-processing) zeroed outside an eroded brain
mask and median filtered with k = 5.

task "segment": the same UNet with a fresh head, trained with soft Dice + cross-entropy on the
slices of k labelled subjects, keeping the weights of lowest validation loss. The head has two
classes (background, whole lesion) or, with `classes`, background plus one per listed label value
(Holzschuh's multi-class variant, e.g. BraTS 1/2/4). Started from a denoise run
(`train.init_from=RUN`, `train.init_strict=false`: the UNet is shared by name, the head is not) it
is the fine-tuned model; without `init_from`, the from-scratch baseline. Its anomaly map is the
lesion probability, 1 − p(background).
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
DICE_CE = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)


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
    labelled_slices: str | None = Field(None, description="segment: a CSV of subject,slice rows, the exact "
                                        "training slices to learn from (an active-learning round); "
                                        "labelled_subjects is then ignored")
    classes: list[int] | None = Field(None, min_length=1, description="segment: the label values to tell "
                                      "apart (e.g. BraTS [1, 2, 4]), other values are background; None: "
                                      "the whole lesion as one class")
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

    @model_validator(mode="after")
    def classes_are_label_values(self):
        if self.classes is not None and (len(set(self.classes)) != len(self.classes)
                                         or not all(0 < c < 256 for c in self.classes)):
            raise ValueError(f"classes {self.classes}: distinct label values from 1 to 255 (0 is background)")
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

    @property
    def classes(self) -> tuple[int, ...]:
        return tuple(self.config.classes or ()) if self.config.task == "segment" else ()

    def target(self, batch) -> torch.Tensor:
        """The class-index target (N, 1, H, W): 1 for any lesion, or 1..n for the listed classes."""
        label = batch["label"].round().long()
        if not self.classes:
            return (label > 0).long().unsqueeze(1)
        index = torch.zeros(256, dtype=torch.long, device=label.device)
        index[list(self.classes)] = torch.arange(1, len(self.classes) + 1, device=label.device)
        return index[label.clamp(0, 255)].unsqueeze(1)

    def build(self):
        c = self.config
        levels = len(c.channels)
        unet = DynUNet(spatial_dims=2, in_channels=self.in_channels, out_channels=c.channels[0],
                       kernel_size=[3] * levels, strides=[1] + [2] * (levels - 1),
                       upsample_kernel_size=[2] * (levels - 1), filters=c.channels,
                       norm_name=("group", {"num_groups": c.norm_groups}), act_name="swish")
        unet.output_block = nn.Identity()  # the output layer is the task's head
        out_channels = self.in_channels if c.task == "denoise" else 1 + len(c.classes or [1])
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
        loss = DICE_CE(self.forward(batch["image"]), self.target(batch))
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def validate(self, batch):
        """Mean val loss, and the global Dice inside the brain mask of the whole lesion (`dice`)
        and, with classes, of each class (`dice_VALUE`)."""
        logits, target = self.forward(batch["image"]), self.target(batch)
        predicted = logits.argmax(1, keepdim=True) * (batch["mask"].unsqueeze(1) > 0)
        n = len(target)

        def dice(p, t):
            return 2 * (p & t).sum().item(), p.sum().item() + t.sum().item()

        out = {"loss": (DICE_CE(logits, target).item() * n, n), "dice": dice(predicted > 0, target > 0)}
        for i, value in enumerate(self.classes, start=1):
            out[f"dice_{value}"] = dice(predicted == i, target == i)
        return out

    def phases(self):
        c = self.config
        optimizer = {"adam": OptimizerSpec(["unet", self.head], lr=c.lr, weight_decay=c.weight_decay,
                                           amsgrad=c.amsgrad, schedule=Schedule("cosine"))}
        if c.task == "denoise":
            return [Phase("denoise", c.epochs, optimizer, [Update("adam", self.denoising_loss)],
                          data=PhaseData(fields=("image", "mask")))]
        data = PhaseData(slices="all", labelled=None if c.labelled_slices else c.labelled_subjects,
                         labelled_seed=c.labelled_seed, slice_list=c.labelled_slices, fields=("image", "mask", "label"))
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
        amap = residual(x, out, positive_only=False) if self.config.task == "denoise" else 1 - out.softmax(1)[:, 0]
        return amap, amap.flatten(1).mean(1)

    @torch.no_grad()
    def label_map(self, x):
        """segment with classes: the most probable class of each pixel, as its label value."""
        if not self.classes:
            return super().label_map(x)
        values = torch.tensor((0, *self.classes), dtype=torch.uint8, device=x.device)
        return values[self.forward(x).argmax(1)]
