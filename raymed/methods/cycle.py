"""Image → semantic → image cycle translation (Li, Zhang, Li, Huang and Ding, "Unsupervised Anomaly
Segmentation using Image-Semantic Cycle Translation").

A segmentation module S learns the tissues of healthy slices (cross-entropy to one-hot tissue
labels: background, CSF, GM, WM), then a pix2pix generator G learns to paint the image back from
the tissue layout. A lesion is not a tissue S knows, so S maps it to healthy tissue, G paints
healthy tissue there, and r = |x − G(S(x))| lights up.

- `representation=continuous` (the paper's model): G is trained on the tissue probability maps
  and fed S's softmax at inference; `discrete` (their baseline): one-hot maps both times.
- G is Johnson et al.'s generator (two stride-2 convolutions, residual blocks, two transposed
  convolutions; instance norm), D the pix2pix PatchGAN on (semantics, image) pairs (MONAI's
  `PatchDiscriminator`, instance norm), `min_G max_D L_GAN + λ·L1` with λ = 10.
- Tissue labels: the cases' tissue maps (the demo cohort's), or `data.tissue_labels=gmm` for
  scans without them (a Gaussian-mixture fit of the intensities; `raymed.data.tissue`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.nets import PatchDiscriminator, UNet
from pydantic import Field
from torch import nn

from raymed.data.preprocess import TISSUES
from raymed.methods.base import Method, MethodConfig, OptimizerSpec, Phase, PhaseData, Update, residual

SEMANTICS = 1 + len(TISSUES)  # background + tissues
ADVERSARIAL = PatchAdversarialLoss(criterion="bce")


class CycleConfig(MethodConfig):
    representation: Literal["continuous", "discrete"] = Field(
        "continuous", description="G's input: tissue probabilities (the paper's model) or one-hot maps (baseline)")
    l1_weight: float = Field(10.0, ge=0, description="λ of the pix2pix L1 term")
    lr: float = Field(2e-4, gt=0, description="Adam learning rate of S, G and D")
    beta1: float = Field(0.5, ge=0, lt=1, description="Adam β1")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam β2")
    segmentation_epochs: int = Field(30, ge=1, description="epochs of S")
    synthesis_epochs: int = Field(15, ge=1, description="epochs of G and D")
    unet_channels: list[int] = Field([32, 64, 128, 256], min_length=2, description="S: UNet channels per level")
    generator_features: int = Field(64, ge=1, description="G: channels of its first convolution")
    residual_blocks: int = Field(6, ge=1, description="G: residual blocks (Johnson et al.: 6 at 128²)")
    discriminator_features: int = Field(64, ge=1, description="D: channels of its first convolution")
    discriminator_layers: int = Field(3, ge=1, description="D: stride-2 layers (the 70×70 PatchGAN: 3)")
    positive_only: bool = Field(False, description="anomaly map keeps only x > G(S(x)) (hyper-intense lesions)")


class ResnetGenerator(nn.Sequential):
    """Johnson et al.'s image transformation network from MONAI blocks: c7s1-f, two stride-2
    convolutions, residual blocks, two stride-2 transposed convolutions, c7s1-out, sigmoid."""

    def __init__(self, in_channels: int, out_channels: int, features: int, blocks: int):
        def conv(cin, cout, kernel, stride=1, transposed=False):
            return Convolution(2, cin, cout, strides=stride, kernel_size=kernel, act="relu", norm="instance",
                               is_transposed=transposed)

        layers = [conv(in_channels, features, 7), conv(features, 2 * features, 3, 2), conv(2 * features, 4 * features, 3, 2)]
        layers += [ResidualUnit(2, 4 * features, 4 * features, act="relu", norm="instance", last_conv_only=True)
                   for _ in range(blocks)]
        layers += [conv(4 * features, 2 * features, 3, 2, True), conv(2 * features, features, 3, 2, True),
                   Convolution(2, features, out_channels, kernel_size=7, conv_only=True), nn.Sigmoid()]
        super().__init__(*layers)


def semantic_target(batch) -> torch.Tensor:
    """Tissue probabilities with background, (N, SEMANTICS, H, W): background = 1 − Σ tissues."""
    tissue = batch["tissue"].clamp(0, 1)
    background = (1 - tissue.sum(1, keepdim=True)).clamp(0, 1)
    return torch.cat([background, tissue], 1)


def one_hot(probabilities: torch.Tensor) -> torch.Tensor:
    return F.one_hot(probabilities.argmax(1), probabilities.shape[1]).movedim(-1, 1).to(probabilities.dtype)


class CycleTranslation(Method):
    """nets: "segmentor" S (image → tissue logits), "generator" G (semantics → image),
    "discriminator" D (semantics ⊕ image → patch logits)."""

    name = "cycle"
    kind = ("detector", "translator")
    Config = CycleConfig

    def build(self):
        c = self.config
        return {
            "segmentor": UNet(2, self.in_channels, SEMANTICS, channels=c.unet_channels,
                              strides=[2] * (len(c.unet_channels) - 1), num_res_units=2),
            "generator": ResnetGenerator(SEMANTICS, self.in_channels, c.generator_features, c.residual_blocks),
            "discriminator": PatchDiscriminator(2, c.discriminator_features, SEMANTICS + self.in_channels,
                                                num_layers_d=c.discriminator_layers, norm="INSTANCE"),
        }

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """S(x): tissue probabilities (N, SEMANTICS, H, W)."""
        return self.nets["segmentor"](x).softmax(1)

    def semantics(self, x: torch.Tensor) -> torch.Tensor:
        """What G is given at inference: S's probabilities, or their one-hot argmax."""
        probabilities = self.segment(x)
        return probabilities if self.config.representation == "continuous" else one_hot(probabilities)

    def generator_input(self, batch) -> torch.Tensor:
        """What G is trained on: the tissue probability maps, or their one-hot argmax."""
        target = semantic_target(batch)
        return target if self.config.representation == "continuous" else one_hot(target)

    def segmentation_loss(self, batch):
        """L_SEG = CE(S(x), y), y the one-hot (argmax) tissue label."""
        loss = F.cross_entropy(self.nets["segmentor"](batch["image"]), semantic_target(batch).argmax(1))
        return loss, {"segmentation": loss.item()}

    def critique(self, semantics: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.nets["discriminator"](torch.cat([semantics, image], 1))[-1]

    def discriminator_loss(self, batch):
        semantics, x = self.generator_input(batch), batch["image"]
        with torch.no_grad():
            fake = self.nets["generator"](semantics)
        loss = 0.5 * (ADVERSARIAL(self.critique(semantics, x), True, True)
                      + ADVERSARIAL(self.critique(semantics, fake), False, True))
        return loss, {"discriminator": loss.item()}

    def generator_loss(self, batch):
        semantics, x = self.generator_input(batch), batch["image"]
        fake = self.nets["generator"](semantics)
        adversarial = ADVERSARIAL(self.critique(semantics, fake), True, False)
        l1 = F.l1_loss(fake, x)
        loss = adversarial + self.config.l1_weight * l1
        return loss, {"generator": loss.item(), "l1": l1.item()}

    def phases(self):
        c = self.config

        def adam(module):
            return OptimizerSpec([module], lr=c.lr, betas=(c.beta1, c.beta2))

        data = PhaseData(fields=("image", "mask", "tissue"))
        return [
            Phase("segment", c.segmentation_epochs, {"s": adam("segmentor")}, [Update("s", self.segmentation_loss)],
                  data=data, validation=None),
            Phase("synthesize", c.synthesis_epochs, {"d": adam("discriminator"), "g": adam("generator")},
                  [Update("d", self.discriminator_loss), Update("g", self.generator_loss)], data=data),
        ]

    @property
    def translation_labels(self) -> int:
        """G paints images from tissue label maps: 0 background, 1 CSF, 2 GM, 3 WM."""
        return SEMANTICS

    @torch.no_grad()
    def translate(self, x: torch.Tensor) -> torch.Tensor:
        """G: semantic maps (N, SEMANTICS, H, W) — background, CSF, GM, WM, one-hot or
        probabilities — to images."""
        return self.nets["generator"](x)

    @torch.no_grad()
    def reconstruction(self, x):
        return self.nets["generator"](self.semantics(x))

    @torch.no_grad()
    def anomaly_map(self, x):
        """r = |x − G(S(x))|, averaged over channels."""
        amap = residual(x, self.reconstruction(x), self.config.positive_only)
        return amap, amap.flatten(1).mean(1)
