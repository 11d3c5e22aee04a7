"""f-AnoGAN (Schlegl et al., Medical Image Analysis 2019).

Phase 1 trains a WGAN-GP on healthy slices (gradient-penalty weight 10, n_critic 5, Adam
lr 1e-4, β = (0.5, 0.9)). Phase 2 freezes G and the critic and trains an encoder E with the
izi_f loss  MSE(x, G(E(x))) + κ·MSE(f(x), f(G(E(x))))  where f are the critic's features.
Anomaly map: the residual |x − G(E(x))|; image score: residual + κ·feature distance.
E's output is linear (not tanh-bounded), since G was trained on N(0, 1) latents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import Discriminator, Generator, Regressor
from pydantic import Field

from raymed.methods.adversarial import gradient_penalty
from raymed.methods.base import Method, MethodConfig, OptimizerSpec, Phase, Update, residual


class FAnoGANConfig(MethodConfig):
    latent_size: int = Field(128, ge=1)
    channels: list[int] = Field([64, 128, 256, 512], description="critic/encoder channels (generator mirrors)")
    gp_weight: float = Field(10.0, ge=0, description="WGAN-GP gradient-penalty weight λ")
    n_critic: int = Field(5, ge=1, description="critic steps per generator step")
    lr: float = Field(1e-4, gt=0)
    beta1: float = Field(0.5, ge=0, lt=1)
    beta2: float = Field(0.9, ge=0, lt=1)
    kappa: float = Field(1.0, ge=0, description="weight of the critic-feature term (izi_f) and of the score")
    gan_epochs: int = Field(50, ge=1)
    encoder_epochs: int = Field(50, ge=1)
    positive_only: bool = False


class FAnoGAN(Method):
    name = "fanogan"
    kind = ("detector", "generator")
    Config = FAnoGANConfig

    def build(self):
        c = self.config
        strides = [2] * len(c.channels)
        start = self.config.data.size // 2 ** len(c.channels)
        return {
            "generator": Generator(
                latent_shape=(c.latent_size,), start_shape=(c.channels[-1], start, start),
                channels=list(reversed(c.channels[:-1])) + [self.in_channels], strides=strides,
                num_res_units=0, norm="BATCH"),
            "critic": Discriminator(self.image_shape, channels=c.channels, strides=strides,
                                    num_res_units=0, norm=None, last_act=None),
            "encoder": Regressor(self.image_shape, (c.latent_size,), channels=c.channels,
                                 strides=strides, num_res_units=0),
        }

    def _opt(self, module: str) -> OptimizerSpec:
        c = self.config
        return OptimizerSpec([module], lr=c.lr, betas=(c.beta1, c.beta2))

    def phases(self):
        c = self.config
        return [
            Phase("gan", c.gan_epochs, {"critic": self._opt("critic"), "generator": self._opt("generator")},
                  [Update("critic", self.critic_loss), Update("generator", self.generator_loss, every=c.n_critic)],
                  validation=None),
            Phase("encoder", c.encoder_epochs, {"encoder": self._opt("encoder")},
                  [Update("encoder", self.encoder_loss)], frozen=["generator", "critic"]),
        ]

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.nets["generator"](z))

    def noise(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(n, self.config.latent_size, device=like.device, dtype=like.dtype)

    def critic_loss(self, batch):
        x = batch["image"]
        with torch.no_grad():
            fake = self.generate(self.noise(len(x), x))
        critic = self.nets["critic"]
        wasserstein = critic(fake).mean() - critic(x).mean()
        penalty = gradient_penalty(critic, x, fake)
        loss = wasserstein + self.config.gp_weight * penalty
        return loss, {"critic": loss.item(), "wasserstein": -wasserstein.item(), "gp": penalty.item()}

    def generator_loss(self, batch):
        x = batch["image"]
        loss = -self.nets["critic"](self.generate(self.noise(len(x), x))).mean()
        return loss, {"generator": loss.item()}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Critic features f(x): the output of its last convolutional block, flattened."""
        return self.nets["critic"].net(x).flatten(1)

    def encode_decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.generate(self.nets["encoder"](x))

    def reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_decode(x)

    def encoder_loss(self, batch):
        x = batch["image"]
        recon = self.encode_decode(x)
        image_term = F.mse_loss(recon, x)
        feature_term = F.mse_loss(self.features(recon), self.features(x))
        loss = image_term + self.config.kappa * feature_term
        return loss, {"izi_f": loss.item(), "izi": image_term.item(), "features": feature_term.item()}

    @torch.no_grad()
    def anomaly_map(self, x):
        recon = self.encode_decode(x)
        amap = residual(x, recon, self.config.positive_only)
        feature_distance = (self.features(recon) - self.features(x)).pow(2).mean(1)
        score = (x - recon).pow(2).flatten(1).mean(1) + self.config.kappa * feature_distance
        return amap, score

    @torch.no_grad()
    def sample(self, n, condition=None, generator=None):
        device = next(self.nets["generator"].parameters()).device
        z = torch.randn(n, self.config.latent_size, generator=generator).to(device)
        return self.generate(z)
