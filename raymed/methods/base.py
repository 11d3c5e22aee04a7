"""The method contract: what every method declares, so one engine can train, tune and serve it.

A method owns its science (networks, losses, phases, anomaly map); the engine owns the
mechanics (devices, DDP, AMP, clipping, schedulers, checkpoints, validation, early stopping).
Methods see their bare modules in `self.nets` at all times and never touch Ray or DDP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from raymed.config import Strict
from raymed.data.augment import Augmentation
from raymed.data.preprocess import Preprocessing
from raymed.evaluation.postprocess import PostProcessing

Kind = Literal["detector", "generator", "translator", "segmenter"]
# A batch: "image" (N, C, H, W) in [0, 1], "mask" (N, H, W) brain/body, "label" (N, H, W) lesion
# or class labels, "tissue" (N, T, H, W) tissue probabilities (TISSUES order), "position" (N,)
# relative slice position (0 inferior, 1 superior), "slice" (N,) slice index, "subject" list[str].
Batch = dict[str, Any]
FIELDS = ("image", "mask", "label", "tissue", "position", "slice", "subject")


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
    max_val_subjects: int | None = Field(None, ge=1, description="validate on at most this many val subjects "
                                                                  "(spread over the split); None: all")
    augment: Augmentation = Field(default_factory=Augmentation, description="random augmentation of training batches")
    shuffle_buffer: int = Field(512, ge=0, description="prepared datasets: slices a worker holds to shuffle its "
                                                       "stream each epoch (0: the shards' order)")
    init_from: str | None = Field(None, description="start from this run's or checkpoint's weights")
    init_strict: bool = Field(True, description="init_from must fill every module exactly; false loads the "
                                                "tensors whose name and shape match (a new head stays fresh)")


class MethodConfig(Strict):
    """Base of every method's Config; method fields carry the paper's defaults."""

    data: DataSettings = Field(default_factory=DataSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    postprocess: PostProcessing = Field(default_factory=PostProcessing,
                                        description="the method's post-processing, used in validation and evaluation")


@dataclass
class Schedule:
    """A learning-rate schedule stepped once per epoch of its phase.

    cosine: cosine annealing to 0 over the phase; step: × gamma every `step_size` epochs;
    linear: constant for `hold` epochs, then linear decay to 0 (pix2pix).
    """

    kind: Literal["cosine", "step", "linear"]
    step_size: int = 1
    gamma: float = 0.1
    hold: int = 0


@dataclass
class OptimizerSpec:
    """Adam or AdamW over some modules' parameters; `lr` may be a per-module mapping."""

    modules: list[str]
    lr: float | dict[str, float]
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    amsgrad: bool = False
    algorithm: Literal["adam", "adamw"] = "adam"
    schedule: Schedule | None = None


@dataclass
class Update:
    """One optimizer step inside a training step: `loss(batch) -> (loss, logs)`, every k-th step.

    Only the optimizer's modules take gradients during the update (a generator step leaves no
    gradient on the critic).
    """

    optimizer: str
    loss: Callable[[Batch], tuple[torch.Tensor, dict[str, float]]]
    every: int = 1


@dataclass
class PhaseData:
    """What a phase trains on.

    `slices`: healthy (no lesion voxel) or all; `labelled`: only k subjects with a label file,
    drawn by `labelled_seed` (few-label fine-tuning); `slice_list`: a CSV of `subject,slice` rows,
    the exact slices to train on (an active-learning round's labelled set; the split's slices
    otherwise); `fields`: the batch keys the phase reads;
    `batch_size`/`augment`: None takes `train.batch_size`/`train.augment`.
    """

    split: str = "train"
    slices: Literal["healthy", "all"] = "healthy"
    labelled: int | None = None
    labelled_seed: int = 0
    slice_list: str | None = None
    fields: tuple[str, ...] = ("image",)
    batch_size: int | None = None
    augment: Augmentation | None = None


@dataclass
class EarlyStopping:
    """Stop the phase when `Phase.metric` has not improved by `min_delta` for `patience` checks;
    `restore_best` puts the best weights back before the next phase."""

    patience: int
    min_delta: float = 0.0
    restore_best: bool = True


# A validator sees one validation batch (the phase's fields, all val slices) and returns
# name -> (sum, count); the engine adds them up over batches and ranks and reports sum / count
# as `val/name`. A mean loss is (loss * n, n); a global Dice is (2 |A ∩ B|, |A| + |B|).
Validator = Callable[[Batch], dict[str, tuple[float, float]]]


@dataclass
class Phase:
    """A training phase: its data, epochs, optimizers, per-batch updates and validation.

    Modules outside the phase's optimizers are frozen (eval mode, no gradients); `frozen` only
    documents the ones it uses. `validation`: "anomaly" scores val volumes as `raymed evaluate`
    does (pixel AUROC/AUPRC after the run's post-processing); a `Validator`; or None. `metric`
    (with `mode`) ranks its checkpoints and drives `early_stopping`.
    """

    name: str
    epochs: int
    optimizers: dict[str, OptimizerSpec]
    updates: list[Update]
    frozen: list[str] = field(default_factory=list)
    data: PhaseData = field(default_factory=PhaseData)
    validation: Literal["anomaly"] | Validator | None = "anomaly"
    metric: str = "val/auprc"
    mode: Literal["max", "min"] = "max"
    early_stopping: EarlyStopping | None = None

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

    @property
    def device(self) -> torch.device:
        return next(self.nets.parameters(), torch.empty(0)).device

    def build(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    @torch.no_grad()
    def anomaly_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) images in [0, 1] → (map (N, H, W), score (N,)); detectors override."""
        raise TypeError(f"method {self.name} is not a detector")

    @property
    def classes(self) -> tuple[int, ...]:
        """The label values a multi-class segmenter tells apart (its `label_map`); () for the rest,
        whose maps are scored against the whole lesion."""
        return ()

    @torch.no_grad()
    def label_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → class labels (N, H, W) in the label files' numbering, 0 background;
        multi-class segmenters override."""
        raise TypeError(f"method {self.name} has no lesion classes")

    @torch.no_grad()
    def reconstruction(self, x: torch.Tensor) -> torch.Tensor | None:
        """The pseudo-healthy image (N, C, H, W) the anomaly map compares x with; None if none."""
        return None

    @torch.no_grad()
    def sample(self, n: int, condition: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """n images (n, C, H, W); `condition` (n,) is e.g. the relative slice position for
        conditional generators (others ignore it). Generators override."""
        raise TypeError(f"method {self.name} is not a generator")

    @property
    def translation_labels(self) -> int | None:
        """What `translate` takes: None for images preprocessed like training (the model's
        channels); K for label maps of K classes 0…K−1, which it is given one-hot (N, K, H, W)."""
        return None

    @torch.no_grad()
    def translate(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → the translated images (N, C', H, W); translators override."""
        raise TypeError(f"method {self.name} is not a translator")


def residual(x: torch.Tensor, recon: torch.Tensor, positive_only: bool) -> torch.Tensor:
    """Per-pixel anomaly map from a reconstruction, averaged over channels: (N, H, W)."""
    diff = x - recon
    diff = diff.clamp(min=0) if positive_only else diff.abs()
    return diff.mean(dim=1)
