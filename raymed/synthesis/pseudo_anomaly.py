"""Pseudo-anomalies for self-supervised detectors: where (a mask M) and what (an intensity change).

Random-shape masks follow Algorithm 1 of Zhang, Deng and Li ("Unsupervised Liver Tumor
Segmentation with Pseudo Anomaly Synthesis"): blurred white noise, rescaled to (0, 255),
thresholded, then opened and closed with an elliptical kernel, so blobs of any shape and number
appear and some masks come out empty. Perlin masks are DRAEM's (Zavrtanik et al., ICCV 2021):
thresholded Perlin noise at a random lattice scale. The synthesis is theirs too:
I_s = M ⊙ (I + C) + (1 − M) ⊙ I with |C| drawn from a Gaussian restricted to (c_min, c_max).

All functions are pure: shapes in, tensors out, random numbers from an optional generator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def odd(k: float) -> int:
    """The nearest odd kernel size ≥ 1."""
    return max(1, 2 * round((k - 1) / 2) + 1)


def gaussian_kernel(size: int) -> torch.Tensor:
    """1D Gaussian of `size` taps with OpenCV's default σ for that size (blur with σ = 0)."""
    sigma = 0.3 * ((size - 1) / 2 - 1) + 0.8
    taps = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    return kernel / kernel.sum()


def blur(image: torch.Tensor, size: int) -> torch.Tensor:
    """Separable Gaussian blur of an (H, W) image, reflecting at the borders."""
    k = gaussian_kernel(size).to(image)
    pad = size // 2
    x = image[None, None]
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect" if pad < x.shape[-1] else "replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect" if pad < x.shape[-2] else "replicate"), k.view(1, 1, -1, 1))
    return x[0, 0]


def ellipse(size: int) -> torch.Tensor:
    """A size × size elliptical (here circular) structuring element."""
    r = (size - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(size) - r, torch.arange(size) - r, indexing="ij")
    return ((yy / (r + 0.5)) ** 2 + (xx / (r + 0.5)) ** 2 <= 1).float()


# Erosion and dilation by convolution with the element: the algorithm asks for an elliptical
# element, and MONAI's morphological ops (utils_morphological_ops) take square filters only.
def _hits(mask: torch.Tensor, element: torch.Tensor) -> torch.Tensor:
    pad = element.shape[0] // 2
    return F.conv2d(mask.float()[None, None], element[None, None].to(mask.device), padding=pad)[0, 0]


def dilate(mask: torch.Tensor, element: torch.Tensor) -> torch.Tensor:
    return _hits(mask, element) > 0.5


def erode(mask: torch.Tensor, element: torch.Tensor) -> torch.Tensor:
    return _hits(mask, element) > element.sum() - 0.5


def random_shape_mask(shape: tuple[int, int], threshold: float = 200.0, blur_kernel: int = 25,
                      morph_kernel: int = 5, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Algorithm 1: noise → Gaussian blur (k = `blur_kernel`) → rescale to (0, 255) → > `threshold`
    → open, then close, with an elliptical `morph_kernel` element. A boolean (H, W) mask; it is
    empty when opening removes every blob (then the sample is normal, label 0)."""
    noise = torch.randn(shape, generator=generator, device=generator.device if generator is not None else device)
    smooth = blur(noise.to(device), odd(blur_kernel))
    lo, hi = smooth.min(), smooth.max()
    scaled = 255 * (smooth - lo) / (hi - lo).clamp(min=1e-12)
    element = ellipse(odd(morph_kernel))
    opened = dilate(erode(scaled > threshold, element), element)
    return erode(dilate(opened, element), element)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """2D gradient (Perlin) noise with `res` lattice cells along (H, W), values in about (−1, 1)."""
    h, w = shape
    source = generator.device if generator is not None else device
    angles = 2 * math.pi * torch.rand(res[0] + 1, res[1] + 1, generator=generator, device=source).to(device)
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], -1)
    ys = torch.arange(h, device=device) * res[0] / h
    xs = torch.arange(w, device=device) * res[1] / w
    yi, xi = ys.long(), xs.long()
    fy, fx = (ys - yi)[:, None], (xs - xi)[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = grads[yi + dy][:, xi + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t):
        return t ** 3 * (t * (6 * t - 15) + 10)

    uy, ux = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return math.sqrt(2) * (top * (1 - uy) + bottom * uy)


def perlin_mask(shape: tuple[int, int], threshold: float = 0.5, max_scale: int = 6, reference: int = 256,
                generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """DRAEM's mask: Perlin noise with 2^a × 2^b lattice cells per `reference` pixels (DRAEM's
    256² images), a, b uniform in [0, max_scale), thresholded at `threshold`; a boolean (H, W)
    mask, possibly empty."""
    source = generator.device if generator is not None else device
    a, b = torch.randint(max_scale, (2,), generator=generator, device=source).tolist()
    cells = tuple(max(1, round(2 ** e * n / reference)) for e, n in zip((a, b), shape))
    return perlin_noise(shape, cells, generator, device) > threshold


def intensity_shift(n: int, channels: int, c_min: float, c_max: float, c_std: float,
                    generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """C (n, channels): Gaussian N(0, c_std) conditioned on c_min < |C| < c_max (inverse-CDF
    sampling of the truncated half-normal), with a random sign."""
    source = generator.device if generator is not None else device
    lo, hi = (torch.special.ndtr(torch.tensor(v / c_std)) for v in (c_min, c_max))
    u = lo + (hi - lo) * torch.rand(n, channels, generator=generator, device=source).cpu()
    magnitude = c_std * torch.special.ndtri(u)
    sign = torch.randint(2, (n, channels), generator=generator, device=source).cpu() * 2 - 1
    return (sign * magnitude).to(device)


def synthesize(image: torch.Tensor, region: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """I_s = M ⊙ (I + C) + (1 − M) ⊙ I for images (N, C, H, W), masks M (N, H, W) and shifts
    C (N, C), clipped to the images' [0, 1] range."""
    m = region.unsqueeze(1).to(image.dtype)
    shifted = (image + shift[:, :, None, None].to(image.dtype)).clamp(0, 1)
    return m * shifted + (1 - m) * image
