"""Convolutional autoencoder with a dense bottleneck (Baur et al., "Autoencoders for unsupervised
anomaly segmentation in brain MR images: a comparative study", MedIA 2021).

Trained on healthy slices only; the anomaly map is the reconstruction residual |x - x̂|
(or its positive part, for hyper-intense lesions on T2/FLAIR).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.nets import VarAutoEncoder
from pydantic import Field

from raymed.methods.base import Method, MethodConfig, OptimizerSpec, Phase, Update, residual


class DenseAutoEncoder(VarAutoEncoder):
    """MONAI's VarAutoEncoder encoder/decoder with a deterministic dense bottleneck (no logvar)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        del self.logvar

    def encode_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = self.intermediate(self.encode(x))
        return self.mu(x.view(x.shape[0], -1)), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_forward(self.encode_forward(x)[0], self.use_sigmoid)


class AutoEncoderConfig(MethodConfig):
    latent_size: int = Field(128, ge=1, description="dense bottleneck size")
    channels: list[int] = Field([32, 64, 128, 128], description="encoder channels, one stride-2 conv each")
    kernel_size: int = Field(5, ge=1, description="5x5 convolutions as in Baur et al.")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate")
    epochs: int = Field(50, ge=1)
    loss: Literal["l1", "l2"] = "l1"
    positive_only: bool = Field(False, description="anomaly map keeps only x > x̂ (hyper-intense lesions)")


class AutoEncoderMethod(Method):
    name = "ae"
    kind = ("detector",)
    Config = AutoEncoderConfig
    network = DenseAutoEncoder

    def build(self):
        c = self.config
        return {"autoencoder": self.network(
            spatial_dims=2, in_shape=self.image_shape, out_channels=self.in_channels,
            latent_size=c.latent_size, channels=c.channels, strides=[2] * len(c.channels),
            kernel_size=c.kernel_size, up_kernel_size=c.kernel_size, use_sigmoid=True,
        )}

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.nets["autoencoder"](x)

    def reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)

    def reconstruction_loss(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(recon, x) if self.config.loss == "l1" else F.mse_loss(recon, x)

    def training_loss(self, batch):
        x = batch["image"]
        loss = self.reconstruction_loss(x, self.reconstruct(x))
        return loss, {"loss": loss.item()}

    def phases(self):
        return [Phase(
            name="reconstruct", epochs=self.config.epochs,
            optimizers={"adam": OptimizerSpec(list(self.nets), lr=self.config.lr)},  # subclasses may add nets
            updates=[Update("adam", self.training_loss)],
        )]

    @torch.no_grad()
    def anomaly_map(self, x):
        recon = self.reconstruct(x)
        amap = residual(x, recon, self.config.positive_only)
        return amap, amap.flatten(1).mean(1)
