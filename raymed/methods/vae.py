"""Variational autoencoder baseline (Baur et al., MedIA 2021): the AE's encoder/decoder with a
Gaussian latent, trained on the ELBO with a configurable KL weight. The anomaly map comes from
the reconstruction of the posterior mean, so inference is deterministic.
"""

from __future__ import annotations

import torch
from monai.networks.nets import VarAutoEncoder
from pydantic import Field

from raymed.methods.ae import AutoEncoderConfig, AutoEncoderMethod


class VAEConfig(AutoEncoderConfig):
    kl_weight: float = Field(1.0, ge=0, description="weight of the KL term of the ELBO")


class VariationalAutoEncoderMethod(AutoEncoderMethod):
    name = "vae"
    kind = ("detector", "generator")
    Config = VAEConfig
    network = VarAutoEncoder

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder of the posterior mean."""
        net = self.nets["autoencoder"]
        mu, _ = net.encode_forward(x)
        return net.decode_forward(mu, net.use_sigmoid)

    def training_loss(self, batch):
        x = batch["image"]
        recon, mu, logvar, _ = self.nets["autoencoder"](x)
        rec = self.reconstruction_loss(x, recon) * x[0].numel()
        kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))
        loss = (rec + self.config.kl_weight * kl) / x[0].numel()
        return loss, {"loss": loss.item(), "reconstruction": rec.item() / x[0].numel(), "kl": kl.item()}

    @torch.no_grad()
    def sample(self, n, condition=None, generator=None):
        net = self.nets["autoencoder"]
        device = next(net.parameters()).device
        z = torch.randn(n, self.config.latent_size, generator=generator).to(device)
        return net.decode_forward(z, net.use_sigmoid)
