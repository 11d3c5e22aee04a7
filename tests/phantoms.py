"""Synthetic brain-like slices and a bare training loop for in-process tests of a method's science."""

import math

import torch


def brains(n: int, seed: int, blobs: bool = False, size: int = 32, rim: bool = False) -> dict:
    """Discs of smooth, varied 'tissue'; with `blobs`, each carries a bright lesion and its label
    (1); with `rim` too, the lesion's outer ring is dimmer and labelled 2 (core and oedema)."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    mask = (xx**2 + yy**2 < 0.8).expand(n, size, size)
    phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    image = 0.5 + 0.15 * torch.sin(3 * xx + phase) * torch.cos(2 * yy)
    label = torch.zeros(n, size, size, dtype=torch.uint8)
    if blobs:
        centre = (torch.rand(n, 2, 1, 1, generator=g) - 0.5) * 0.8
        distance = (xx - centre[:, 0]) ** 2 + (yy - centre[:, 1]) ** 2
        label = (distance < 0.06).to(torch.uint8) * mask
        image = image + 0.4 * label
        if rim:
            ring = (distance >= 0.025) & (label > 0)
            label, image = torch.where(ring, 2, label).to(torch.uint8), image - 0.2 * ring
    return {"image": (image * mask).unsqueeze(1).clamp(0, 1), "mask": mask.to(torch.uint8), "label": label}


def train(method, loss, batch, steps: int) -> list[float]:
    optimizer = torch.optim.Adam(method.nets.parameters(), lr=method.config.lr, amsgrad=True)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        value, _ = loss(batch)
        value.backward()
        optimizer.step()
        losses.append(value.item())
    return losses
