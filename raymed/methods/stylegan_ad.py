"""StyleGAN-based anomaly detection for active learning ("GAN-Driven Anomaly Detection for Active
Learning in Medical Imaging Segmentation").

Phase "gan": a style-based generator conditioned on the relative slice position
(`raymed.methods.style`) against a projection discriminator (Miyato and Koyama): MONAI's
`Discriminator` trunk φ and head ψ, with logit ψ(φ(x)) + ⟨e(p), φ(x)⟩ for a position embedding e.
Non-saturating logistic loss, lazy R1 regularisation on real images (γ/2·‖∇D(x)‖², every
`r1_every` D steps, scaled by that interval), Adam lr 2e-3, β = (0, 0.99), the mapping network at
0.01× the learning rate: StyleGAN2's defaults. γ defaults to StyleGAN2-ADA's heuristic
0.0002·N²/M for N² images in batches of M: FFHQ's γ = 10 is meant for 1024²; at 64² it left D's
logits for real and generated slices both strongly negative.

Phase "encoder": G and D frozen, an encoder E (MONAI `Regressor`) learns to map images to w, the
generator's intermediate latent space, with f-AnoGAN's izi_f loss; a reconstruction is
G_synthesis(E(x)), so it needs no slice position (w already holds it).

Anomaly score = reconstruction error + κ·feature-matching distance ‖φ(x) − φ(G(E(x)))‖²
(Salimans et al.'s feature matching on D's features); the map is the per-pixel residual. Both come
from f-AnoGAN, which this class extends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import Discriminator, Regressor
from pydantic import Field

from raymed.methods.base import MethodConfig, OptimizerSpec, Phase, PhaseData, Update
from raymed.methods.fanogan import FAnoGAN
from raymed.methods.style import MappingNetwork, PositionEmbedding, SynthesisNetwork


class StyleGANADConfig(MethodConfig):
    latent_size: int = Field(128, ge=1, description="length of z and of w")
    mapping_layers: int = Field(8, ge=1)
    channels: list[int] = Field([64, 128, 256, 512], min_length=1,
                                description="D/encoder channels per stride-2 layer; G mirrors them")
    lr: float = Field(2e-3, gt=0, description="Adam learning rate of G's synthesis network and of D")
    mapping_lr_multiplier: float = Field(0.01, gt=0)
    beta1: float = Field(0.0, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    r1_gamma: float | None = Field(None, ge=0, description="R1 weight γ; 0 disables; none: StyleGAN2-ADA's "
                                                       "heuristic 0.0002·size²/batch")
    r1_every: int = Field(16, ge=1, description="lazy regularisation: R1 every N steps")
    encoder_lr: float = Field(1e-4, gt=0)
    kappa: float = Field(1.0, ge=0, description="λ: weight of the D-feature term in izi_f and in the score")
    gan_epochs: int = Field(50, ge=1)
    encoder_epochs: int = Field(30, ge=1)
    positive_only: bool = False


class StyleGANAD(FAnoGAN):
    """nets: "mapping", "synthesis" (G), "critic" (D's trunk and head), "projection" (D's
    position embedding), "encoder"."""

    name = "stylegan_ad"
    Config = StyleGANADConfig

    def build(self):
        c = self.config
        strides = [2] * len(c.channels)
        trunk = Discriminator(self.image_shape, channels=c.channels, strides=strides, num_res_units=0, norm=None,
                              act=("LEAKYRELU", {"negative_slope": 0.2}), dropout=None, last_act=None)
        features = trunk.final[1].in_features
        return {
            "mapping": MappingNetwork(c.latent_size, c.latent_size, c.mapping_layers),
            "synthesis": SynthesisNetwork(c.latent_size, list(reversed(c.channels)) + [c.channels[0]],
                                          c.data.size // 2 ** len(c.channels), self.in_channels),
            "critic": trunk,
            "projection": PositionEmbedding(features, c.latent_size),
            "encoder": Regressor(self.image_shape, (c.latent_size,), channels=c.channels, strides=strides,
                                 num_res_units=0),
        }

    def phases(self):
        c = self.config
        betas = (c.beta1, c.beta2)
        updates = [Update("discriminator", self.discriminator_loss)]
        if self.r1_gamma > 0:
            updates.append(Update("discriminator", self.r1_loss, every=c.r1_every))
        updates.append(Update("generator", self.generator_loss))
        return [
            Phase("gan", c.gan_epochs,
                  {"discriminator": OptimizerSpec(["critic", "projection"], lr=c.lr, betas=betas),
                   "generator": OptimizerSpec(["mapping", "synthesis"], betas=betas,
                                              lr={"mapping": c.lr * c.mapping_lr_multiplier, "synthesis": c.lr})},
                  updates, data=PhaseData(fields=("image", "position")), validation=None),
            Phase("encoder", c.encoder_epochs, {"encoder": OptimizerSpec(["encoder"], lr=c.encoder_lr)},
                  [Update("encoder", self.encoder_loss)], frozen=["mapping", "synthesis", "critic", "projection"]),
        ]

    @property
    def r1_gamma(self) -> float:
        c = self.config
        return c.r1_gamma if c.r1_gamma is not None else 0.0002 * c.data.size ** 2 / c.train.batch_size

    def generate(self, z: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self.paint(self.nets["mapping"](z, position))

    def paint(self, w: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.nets["synthesis"](w))

    def encode_decode(self, x):
        return self.paint(self.nets["encoder"](x))

    def discriminate(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The projection discriminator's logit (N,)."""
        features = self.features(x)
        head = self.nets["critic"].final[1]
        return head(features)[:, 0] + (self.nets["projection"](position) * features).sum(1) / features.shape[1] ** 0.5

    def fake_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """G's images at the batch's slice positions."""
        position = batch["position"]
        z = torch.randn(len(position), self.config.latent_size, device=position.device)
        return self.generate(z, position), position

    def discriminator_loss(self, batch):
        with torch.no_grad():
            fake, position = self.fake_batch(batch)
        real_logit = self.discriminate(batch["image"], position)
        fake_logit = self.discriminate(fake, position)
        loss = F.softplus(fake_logit).mean() + F.softplus(-real_logit).mean()
        return loss, {"discriminator": loss.item(), "real_logit": real_logit.mean().item(),
                      "fake_logit": fake_logit.mean().item()}

    def r1_loss(self, batch):
        """γ/2·E‖∇ₓD(x)‖² on real images, times the interval it is applied at (lazy R1)."""
        with torch.autocast(batch["image"].device.type, enabled=False):
            x = batch["image"].float().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.discriminate(x, batch["position"]).sum(), x, create_graph=True)
            penalty = grad.pow(2).flatten(1).sum(1).mean()
        return self.r1_gamma / 2 * penalty * self.config.r1_every, {"r1": penalty.item()}

    def generator_loss(self, batch):
        fake, position = self.fake_batch(batch)
        loss = F.softplus(-self.discriminate(fake, position)).mean()
        return loss, {"generator": loss.item()}

    @torch.no_grad()
    def sample(self, n, condition=None, generator=None):
        """n images at relative slice positions `condition` (n,) in [0, 1] (uniform when none)."""
        z = torch.randn(n, self.config.latent_size, generator=generator)
        position = torch.rand(n, generator=generator) if condition is None else condition.float().cpu()
        return self.generate(z.to(self.device), position.to(self.device))
