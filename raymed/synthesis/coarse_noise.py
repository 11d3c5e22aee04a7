"""Coarse Gaussian noise (Kascenas et al., "The role of noise in denoising models for anomaly
detection in medical images", Medical Image Analysis 2023).

Pixel-wise white noise is easy to remove without learning what healthy anatomy looks like; noise
drawn on a coarse grid and upsampled corrupts blob-sized regions, as lesions do, so a denoiser
trained to undo it learns to replace such regions with plausible tissue.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def coarse_noise(x: torch.Tensor, mask: torch.Tensor | None = None, std: float = 0.2, resolution: int = 16,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise shaped like `x` (N, C, H, W), zero outside `mask` (N, H, W); add it to `x`.

    N(0, `std`) is drawn per channel on a `resolution`² grid and bilinearly upsampled, so `std`
    is the std of the coarse samples (as in the paper); interpolation between them lowers the
    per-pixel std to about 2/3 of it. The grid is drawn one cell larger and each image is cropped
    at its own random offset within a cell, so the cell boundaries fall anywhere. Random numbers
    come from `generator` (drawn on its device, then moved) for reproducible corruption.
    """
    n, c, h, w = x.shape
    cell = (math.ceil(h / resolution), math.ceil(w / resolution))
    source = generator.device if generator is not None else x.device
    # resolution + 1 cells (one spare for the shift), i.e. resolution + 2 knots, `cell` pixels apart
    coarse = std * torch.randn(n, c, resolution + 2, resolution + 2, generator=generator, device=source)
    coarse = coarse.to(device=x.device, dtype=x.dtype)
    size = ((resolution + 1) * cell[0] + 1, (resolution + 1) * cell[1] + 1)
    fine = F.interpolate(coarse, size=size, mode="bilinear", align_corners=True)
    dy = torch.randint(cell[0], (n,), generator=generator, device=source).tolist()
    dx = torch.randint(cell[1], (n,), generator=generator, device=source).tolist()
    noise = torch.stack([fine[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    return noise if mask is None else noise * mask.unsqueeze(1).to(noise.dtype)
