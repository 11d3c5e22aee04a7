"""A style-based generator (Karras et al., StyleGAN/StyleGAN2) conditioned on the slice's position.

- `MappingNetwork`: z (normalised) ⊕ an embedding of the relative slice position → w, through an
  MLP of equalised-learning-rate layers with LeakyReLU 0.2 and StyleGAN2's √2 activation gain
  (StyleGAN2-ADA's conditioning: the class embedding joins z before mapping). A position is a number in [0, 1], so it is embedded by
  a small MLP rather than a class table.
- `SynthesisNetwork`: a learned constant, then per resolution a bilinear ×2 upsample and two
  modulated/demodulated 3×3 convolutions with per-pixel noise, and a 1×1 modulated to-image
  convolution at the end (StyleGAN2's plain architecture, without skip or residual branches).
  Every convolution takes its own affine style from the same w (no style mixing).
- Noise is random in training; in eval mode each layer uses a fixed noise image drawn at build
  time (StyleGAN's "const" noise), so reconstructions and anomaly maps are deterministic.
- `PositionEmbedding` is also the projection discriminator's condition embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class EqualLinear(nn.Module):
    """A linear layer with weights N(0, 1) scaled at run time by 1/√fan_in (equalised learning
    rate), so Adam's per-parameter steps are alike for every layer."""

    def __init__(self, fan_in: int, fan_out: int, bias_init: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in))
        self.bias = nn.Parameter(torch.full((fan_out,), bias_init))
        self.scale = 1 / math.sqrt(fan_in)

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias)


class ScaledLeakyReLU(nn.LeakyReLU):
    """LeakyReLU 0.2 times √2 (StyleGAN2's activation gain): it keeps a unit-variance signal at
    unit variance, so w does not shrink through the eight mapping layers (without the gain it does,
    to ~0.03 after eight, and z then hardly changes the styles)."""

    def __init__(self):
        super().__init__(0.2)

    def forward(self, x):
        return super().forward(x) * math.sqrt(2)


class PositionEmbedding(nn.Sequential):
    """Relative slice position (N,) in [0, 1] → an embedding (N, size): an MLP with `hidden` units
    over the cosine basis cos(πkp), k = 0…7 (a plain linear map of p would be scaled away by the
    normalisation that follows it)."""

    frequencies = 8

    def __init__(self, size: int, hidden: int):
        super().__init__(EqualLinear(self.frequencies, hidden), ScaledLeakyReLU(), EqualLinear(hidden, size))

    def forward(self, position):
        k = torch.arange(self.frequencies, device=position.device)
        basis = torch.cos(math.pi * k * position.reshape(-1, 1).float())
        return super().forward(basis.to(self[0].weight.dtype))


def normalise(v: torch.Tensor) -> torch.Tensor:
    """Unit second moment per sample (StyleGAN's pixel norm of z)."""
    return v * torch.rsqrt(v.pow(2).mean(1, keepdim=True) + 1e-8)


class MappingNetwork(nn.Module):
    def __init__(self, latent_size: int, style_size: int, layers: int):
        super().__init__()
        self.embed = PositionEmbedding(latent_size, latent_size)
        mlp: list[nn.Module] = []
        for i in range(layers):
            mlp += [EqualLinear(2 * latent_size if i == 0 else style_size, style_size), ScaledLeakyReLU()]
        self.mlp = nn.Sequential(*mlp)

    def forward(self, z, position):
        return self.mlp(torch.cat([normalise(z), normalise(self.embed(position))], 1))


class ModulatedConv(nn.Module):
    """A convolution whose input channels are scaled by a style from w (modulation) and whose
    output is renormalised to unit variance (demodulation). Run as StyleGAN2's non-fused form:
    scale the activations, convolve with the shared weight, scale the output; equal to the
    per-sample weight of the paper, and a plain convolution, which is fast on CPUs too."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, style_size: int, demodulate: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.affine = EqualLinear(style_size, in_channels, bias_init=1.0)
        self.scale = 1 / math.sqrt(in_channels * kernel * kernel)
        self.demodulate = demodulate
        self.padding = kernel // 2

    def forward(self, x, w):
        style = self.affine(w)
        weight = self.weight * self.scale
        out = F.conv2d(x * style[:, :, None, None], weight, padding=self.padding)
        if self.demodulate:
            # ‖w'_o‖² = Σ_i,k (w_oik·s_i)² = (Σ_k w_oik²) · s²
            out = out * torch.rsqrt(style.pow(2) @ weight.pow(2).sum((2, 3)).T + 1e-8)[:, :, None, None]
        return out


class StyleLayer(nn.Module):
    """Modulated 3×3 convolution + scaled per-pixel noise + bias + LeakyReLU 0.2."""

    def __init__(self, in_channels: int, out_channels: int, style_size: int, resolution: int, seed: int):
        super().__init__()
        self.conv = ModulatedConv(in_channels, out_channels, 3, style_size)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        fixed = torch.randn(1, 1, resolution, resolution, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("fixed_noise", fixed)

    def forward(self, x, w):
        x = self.conv(x, w)
        noise = torch.randn_like(x[:, :1]) if self.training else self.fixed_noise.to(x.dtype)
        return F.leaky_relu(x + self.noise_strength * noise + self.bias[None, :, None, None], 0.2) * math.sqrt(2)


class SynthesisNetwork(nn.Module):
    """w → image logits (N, out_channels, size, size); `channels` from the constant (start×start)
    to the last resolution, one upsampling per later entry."""

    def __init__(self, style_size: int, channels: list[int], start: int, out_channels: int):
        super().__init__()
        self.constant = nn.Parameter(torch.randn(1, channels[0], start, start))
        layers = [StyleLayer(channels[0], channels[0], style_size, start, seed=0)]
        resolution = start
        for i, (cin, cout) in enumerate(zip(channels[:-1], channels[1:])):
            resolution *= 2
            layers += [StyleLayer(cin, cout, style_size, resolution, seed=2 * i + 1),
                       StyleLayer(cout, cout, style_size, resolution, seed=2 * i + 2)]
        self.layers = nn.ModuleList(layers)
        self.to_image = ModulatedConv(channels[-1], out_channels, 1, style_size, demodulate=False)
        self.to_image_bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, w):
        x = self.constant.expand(len(w), -1, -1, -1)
        for layer in self.layers:
            if layer.fixed_noise.shape[-1] != x.shape[-1]:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = layer(x, w)
        return self.to_image(x, w) + self.to_image_bias[None, :, None, None]
