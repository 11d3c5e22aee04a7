"""The four GANs the GAN evaluation framework compares (DGM4MICCAI 2021, "An Explainable Framework
for GAN Evaluation in Medical Imaging"): DCGAN, LSGAN, WGAN-GP and AC-GAN.

One network pair and one training phase serve all four; they differ in the adversarial loss and
their defaults:
- `dcgan` (Radford et al.): non-saturating BCE loss; the framework's Table 3: Adam 1e-4 for G
  and D, β = (0.5, 0.99), z of 100, LeakyReLU 0.2 in D.
- `lsgan` (Mao et al.): least-squares loss (targets 1 real, 0 fake); Mao et al.'s Adam 2e-4, β1 0.5.
- `wgangp` (Gulrajani et al.): Wasserstein critic with gradient penalty λ = 10, no normalisation
  in the critic; the framework's D:G 2:1 and z of 128; Adam 1e-4, β = (0.5, 0.9).
- `acgan` (Odena et al.): non-saturating loss plus an auxiliary classifier in D over a class
  G is conditioned on. Brain slices have no class of their own here (the GAN learns healthy
  slices), so the class is the slice's relative position in its volume, cut into `position_bins`
  bins: `sample(n, condition=positions)`. Odena et al.'s Adam 2e-4, β1 0.5.

G is MONAI's `Generator` (z → transposed convolutions, batch norm, ReLU; sigmoid output in
[0, 1]); D is MONAI's `Classifier` (strided convolutions, LeakyReLU 0.2) with one real/fake logit
and, for AC-GAN, one logit per class. The adversarial losses are MONAI's `PatchAdversarialLoss`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import Classifier, Generator
from pydantic import Field

from raymed.methods.adversarial import gradient_penalty
from raymed.methods.base import Method, MethodConfig, OptimizerSpec, Phase, PhaseData, Update

LOSSES = {"bce": PatchAdversarialLoss(criterion="bce"),
          "least_squares": PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)}


class GANConfig(MethodConfig):
    epochs: int = Field(50, ge=1)
    latent_size: int = Field(100, ge=1, description="length of z")
    channels: list[int] = Field([64, 128, 256, 512], min_length=1,
                                description="D's channels per stride-2 layer; G mirrors them")
    lr_generator: float = Field(1e-4, gt=0)
    lr_discriminator: float = Field(1e-4, gt=0)
    beta1: float = Field(0.5, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    discriminator_steps: int = Field(1, ge=1, description="D steps per G step")
    discriminator_norm: Literal["batch", "instance", "none"] = "batch"


class LSGANConfig(GANConfig):
    lr_generator: float = Field(2e-4, gt=0)
    lr_discriminator: float = Field(2e-4, gt=0)
    beta2: float = Field(0.999, ge=0, lt=1)


class WGANGPConfig(GANConfig):
    latent_size: int = Field(128, ge=1, description="length of z")
    beta2: float = Field(0.9, ge=0, lt=1)
    discriminator_steps: int = Field(2, ge=1, description="critic steps per G step")
    discriminator_norm: Literal["batch", "instance", "none"] = Field(
        "none", description="the gradient penalty is per sample: no batch norm in the critic")
    gp_weight: float = Field(10.0, ge=0, description="gradient-penalty weight λ")


class ACGANConfig(GANConfig):
    lr_generator: float = Field(2e-4, gt=0)
    lr_discriminator: float = Field(2e-4, gt=0)
    beta2: float = Field(0.999, ge=0, lt=1)
    position_bins: int = Field(4, ge=2, description="classes: bins of the relative slice position")


class GAN(Method):
    """nets: "generator" G (z ⊕ one-hot class → image), "discriminator" D (image → real/fake logit ⊕ class logits)."""

    kind = ("generator",)
    Config = GANConfig
    loss: ClassVar[Literal["bce", "least_squares", "wasserstein"]]
    conditional: ClassVar[bool] = False

    @property
    def condition_classes(self) -> int:
        return self.config.position_bins if self.conditional else 0

    def build(self):
        c, k = self.config, self.condition_classes
        strides = [2] * len(c.channels)
        start = c.data.size // 2 ** len(c.channels)
        norm = None if c.discriminator_norm == "none" else c.discriminator_norm.upper()
        return {
            "generator": Generator(latent_shape=(c.latent_size + k,), start_shape=(c.channels[-1], start, start),
                                   channels=list(reversed(c.channels[:-1])) + [self.in_channels], strides=strides,
                                   num_res_units=0, act="RELU", norm="BATCH"),
            "discriminator": Classifier(self.image_shape, 1 + k, channels=c.channels, strides=strides, num_res_units=0,
                                        act=("LEAKYRELU", {"negative_slope": 0.2}), norm=norm, last_act=None),
        }

    def phases(self):
        c = self.config

        def adam(module, lr):
            return OptimizerSpec([module], lr=lr, betas=(c.beta1, c.beta2))

        fields = ("image", "position") if self.conditional else ("image",)
        return [Phase("gan", c.epochs, {"discriminator": adam("discriminator", c.lr_discriminator),
                                        "generator": adam("generator", c.lr_generator)},
                      [Update("discriminator", self.discriminator_loss),
                       Update("generator", self.generator_loss, every=c.discriminator_steps)],
                      data=PhaseData(fields=fields), validation=None)]

    def bins(self, position: torch.Tensor) -> torch.Tensor:
        """The class of a relative slice position in [0, 1]."""
        k = self.condition_classes
        return (position * k).long().clamp(0, k - 1)

    def generate(self, z: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        if classes is not None:
            z = torch.cat([z, F.one_hot(classes, self.condition_classes).to(z.dtype)], 1)
        return torch.sigmoid(self.nets["generator"](z))

    def discriminate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(real/fake logit (N,), class logits (N, K))."""
        out = self.nets["discriminator"](x)
        return out[:, 0], out[:, 1:]

    def fake_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """G's images for a batch: same size, the batch's classes for a conditional GAN."""
        x = batch["image"]
        classes = self.bins(batch["position"]) if self.conditional else None
        z = torch.randn(len(x), self.config.latent_size, device=x.device, dtype=x.dtype)
        return self.generate(z, classes), classes

    def discriminator_loss(self, batch):
        x = batch["image"]
        with torch.no_grad():
            fake, classes = self.fake_batch(batch)
        real_logit, real_classes = self.discriminate(x)
        fake_logit, fake_classes = self.discriminate(fake)
        logs = {}
        if self.loss == "wasserstein":
            distance = fake_logit.mean() - real_logit.mean()
            penalty = gradient_penalty(lambda v: self.discriminate(v)[0], x, fake)
            loss = distance + self.config.gp_weight * penalty
            logs.update(wasserstein=-distance.item(), gp=penalty.item())
        else:
            adversarial = LOSSES[self.loss]
            loss = 0.5 * (adversarial(real_logit, True, True) + adversarial(fake_logit, False, True))
        if classes is not None:
            auxiliary = F.cross_entropy(real_classes, classes) + F.cross_entropy(fake_classes, classes)
            loss = loss + auxiliary
            logs["classes"] = auxiliary.item()
        return loss, {"discriminator": loss.item(), **logs}

    def generator_loss(self, batch):
        fake, classes = self.fake_batch(batch)
        logit, fake_classes = self.discriminate(fake)
        loss = -logit.mean() if self.loss == "wasserstein" else LOSSES[self.loss](logit, True, False)
        if classes is not None:
            loss = loss + F.cross_entropy(fake_classes, classes)
        return loss, {"generator": loss.item()}

    @torch.no_grad()
    def sample(self, n, condition=None, generator=None):
        """n images; a conditional GAN takes relative slice positions (n,) in [0, 1] (drawn
        uniformly when none are given)."""
        device = self.device
        z = torch.randn(n, self.config.latent_size, generator=generator).to(device)
        classes = None
        if self.conditional:
            position = torch.rand(n, generator=generator) if condition is None else condition.float().cpu()
            classes = self.bins(position).to(device)
        return self.generate(z, classes)


class DCGAN(GAN):
    name = "dcgan"
    loss = "bce"


class LSGAN(GAN):
    name = "lsgan"
    Config = LSGANConfig
    loss = "least_squares"


class WGANGP(GAN):
    name = "wgangp"
    Config = WGANGPConfig
    loss = "wasserstein"


class ACGAN(GAN):
    name = "acgan"
    Config = ACGANConfig
    loss = "bce"
    conditional = True
