"""The method contract: what every method declares, so one engine can train, tune and serve it.

A method owns its science (networks, losses, phases, anomaly map); the engine owns the
mechanics (devices, DDP, AMP, clipping, checkpoints). Methods never touch Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from raymed.data.preprocess import Preprocessing

Kind = Literal["detector", "generator", "translator"]
Batch = dict[str, torch.Tensor]  # "image" (N, C, H, W), "label" (N, H, W), "mask" (N, H, W)


class Strict(BaseModel):
    """Configs reject unknown keys and wrong types instead of silently ignoring them."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSettings(Preprocessing, Strict):
    """Which slices a method trains on: preprocessing plus the split seed."""

    split_seed: int = 0
    min_brain: float = Field(0.05, ge=0, le=1, description="skip slices with less brain than this fraction")
    skip_bad: bool = Field(False, description="skip unreadable cases (reported) instead of stopping")


class TrainSettings(Strict):
    """Engine settings shared by every method."""

    batch_size: int = Field(32, ge=1)
    val_every: int = Field(1, ge=1, description="validate (and checkpoint) every N epochs")
    grad_clip: float | None = Field(None, gt=0, description="max gradient norm; None disables")
    amp: Literal["bf16", "fp16", "off"] = Field("bf16", description="mixed precision on GPU (CPU runs fp32)")
    seed: int = 0
    max_val_slices: int = Field(256, ge=1, description="validation slices scored per check")


class MethodConfig(Strict):
    """Base of every method's Config; method fields carry the paper's defaults."""

    data: DataSettings = Field(default_factory=DataSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)


@dataclass
class OptimizerSpec:
    """Adam over some modules' parameters."""

    modules: list[str]
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0


@dataclass
class Update:
    """One optimizer step inside a training step: `loss(batch) -> (loss, logs)`, every k-th step."""

    optimizer: str
    loss: Callable[[Batch], tuple[torch.Tensor, dict[str, float]]]
    every: int = 1


@dataclass
class Phase:
    """A training phase: its epochs, optimizers and per-batch updates.

    `frozen` modules are used but not trained (eval mode, no gradients); `validate` says whether
    anomaly maps are meaningful at the end of this phase's epochs.
    """

    name: str
    epochs: int
    optimizers: dict[str, OptimizerSpec]
    updates: list[Update]
    frozen: list[str] = field(default_factory=list)
    validate: bool = True

    @property
    def trained(self) -> list[str]:
        return sorted({m for spec in self.optimizers.values() for m in spec.modules})


class Method:
    """Base class: subclasses set `name`, `kind`, `Config` and implement `build`/`phases`."""

    name: ClassVar[str]
    kind: ClassVar[tuple[Kind, ...]]
    Config: ClassVar[type[MethodConfig]]

    def __init__(self, config: MethodConfig, in_channels: int):
        self.config = config
        self.in_channels = in_channels
        self.nets = nn.ModuleDict(self.build())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.config.data.size, self.config.data.size)

    def build(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    @torch.no_grad()
    def anomaly_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) images in [0, 1] → (map (N, H, W), score (N,)); detectors override."""
        raise TypeError(f"method {self.name} is not a detector")

    @torch.no_grad()
    def reconstruction(self, x: torch.Tensor) -> torch.Tensor | None:
        """The pseudo-healthy image (N, C, H, W) the anomaly map compares x with; None if none."""
        return None

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images (n, C, H, W); generators override."""
        raise TypeError(f"method {self.name} is not a generator")


def residual(x: torch.Tensor, recon: torch.Tensor, positive_only: bool) -> torch.Tensor:
    """Per-pixel anomaly map from a reconstruction, averaged over channels: (N, H, W)."""
    diff = x - recon
    diff = diff.clamp(min=0) if positive_only else diff.abs()
    return diff.mean(dim=1)
