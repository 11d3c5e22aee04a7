"""Gaussian-mixture VAE baseline (the GMVAE row of the cycle-translation paper's comparison table):
the VAE with a mixture of K Gaussians as the latent prior, so healthy anatomy may occupy several
modes (e.g. slice levels) instead of one.

The prior p(z) = Σ_c π_c N(z; μ_c, diag σ_c²) has learned means and variances and uniform weights.
The loss is the ELBO of VaDE (Jiang et al., IJCAI 2017): reconstruction, plus the KL of the
posterior q(z|x) to each component weighted by the responsibilities γ_c = p(c | z), plus the KL
of γ to the uniform weights. Like the VAE, the anomaly map comes from the reconstruction of the
posterior mean, and samples are decoded from a component's Gaussian.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from raymed.methods.vae import VAEConfig, VariationalAutoEncoderMethod


class GMVAEConfig(VAEConfig):
    components: int = Field(9, ge=1, description="Gaussians in the latent prior (K); 1 is a VAE with a learned prior")


class MixturePrior(nn.Module):
    """K diagonal Gaussians over the latent, equally weighted; means drawn apart at the start so
    the components do not begin identical."""

    def __init__(self, components: int, latent_size: int):
        super().__init__()
        self.mean = nn.Parameter(torch.randn(components, latent_size))
        self.logvar = nn.Parameter(torch.zeros(components, latent_size))

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; μ_c, σ_c²) for every sample and component: (N, K)."""
        diff = z.unsqueeze(1) - self.mean
        return -0.5 * (self.logvar + diff.pow(2) / self.logvar.exp() + math.log(2 * math.pi)).sum(-1)

    def responsibilities(self, z: torch.Tensor) -> torch.Tensor:
        """γ_c = p(c | z) under uniform weights: (N, K), rows sum to 1."""
        return self.log_density(z).softmax(-1)

    def kl(self, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Σ_c γ_c KL(N(μ, σ²) ‖ N(μ_c, σ_c²)) + KL(γ ‖ uniform), averaged over the batch."""
        gamma = self.responsibilities(z)
        var, prior_var = logvar.exp().unsqueeze(1), self.logvar.exp()
        per_component = 0.5 * (self.logvar - logvar.unsqueeze(1)
                               + (var + (mu.unsqueeze(1) - self.mean).pow(2)) / prior_var - 1).sum(-1)
        categorical = (gamma * (gamma.clamp_min(1e-12).log() + math.log(len(self.mean)))).sum(-1)
        return ((gamma * per_component).sum(-1) + categorical).mean()


class GaussianMixtureVAE(VariationalAutoEncoderMethod):
    name = "gmvae"
    kind = ("detector", "generator")
    Config = GMVAEConfig

    def build(self):
        return {**super().build(), "prior": MixturePrior(self.config.components, self.config.latent_size)}

    def training_loss(self, batch):
        x = batch["image"]
        recon, mu, logvar, z = self.nets["autoencoder"](x)
        rec = self.reconstruction_loss(x, recon) * x[0].numel()
        kl = self.nets["prior"].kl(mu, logvar, z)
        loss = (rec + self.config.kl_weight * kl) / x[0].numel()
        return loss, {"loss": loss.item(), "reconstruction": rec.item() / x[0].numel(), "kl": kl.item()}

    @torch.no_grad()
    def sample(self, n, condition=None, generator=None):
        """Decode z ~ N(μ_c, σ_c²) with c drawn uniformly."""
        prior, net = self.nets["prior"], self.nets["autoencoder"]
        c = torch.randint(len(prior.mean), (n,), generator=generator)
        eps = torch.randn(n, self.config.latent_size, generator=generator)
        z = prior.mean.cpu()[c] + (0.5 * prior.logvar.cpu()[c]).exp() * eps
        return net.decode_forward(z.to(prior.mean.device), net.use_sigmoid)
