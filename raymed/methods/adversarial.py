"""What adversarially trained methods share: the WGAN-GP gradient penalty."""

from __future__ import annotations

from typing import Callable

import torch


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """(‖∇ D(x̂)‖ − 1)² on random interpolates x̂ of real and fake (Gulrajani et al.), computed in
    fp32 outside autocast: the gradient of a half-precision critic underflows, and a loss scaler
    would scale it."""
    with torch.autocast(x.device.type, enabled=False):
        alpha = torch.rand(len(x), 1, 1, 1, device=x.device)
        mixed = (alpha * x.float() + (1 - alpha) * fake.float()).requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
        return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
