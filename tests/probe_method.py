"""A method outside raymed that exercises the whole engine contract: every batch field, a
labelled-subset phase sharded by slice, a step LR schedule, early stopping on its own validator,
and a head whose width is a config key (so `init_from` can load everything else)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from raymed.data.preprocess import TISSUES
from raymed.methods.base import (EarlyStopping, Method, MethodConfig, OptimizerSpec, Phase, PhaseData, Schedule,
                                 Update)

FIELDS = ("image", "mask", "label", "tissue", "position", "slice", "subject")


class ProbeConfig(MethodConfig):
    lr: float = Field(1e-2, ge=0)
    epochs: int = 6
    head: int = Field(2, ge=1, description="output channels of the head")
    patience: int = 1


class Probe(Method):
    name = "tests.probe_method:Probe"
    kind = ("segmenter",)
    Config = ProbeConfig

    def build(self):
        inputs = self.in_channels + len(TISSUES) + 1
        return {"body": nn.Conv2d(inputs, 4, 3, padding=1), "head": nn.Conv2d(4, self.config.head, 1)}

    def forward(self, batch) -> torch.Tensor:
        x, tissue = batch["image"], batch["tissue"]
        n, _, h, w = x.shape
        check(batch, n, self.in_channels, h)
        height = batch["position"].view(n, 1, 1, 1).expand(n, 1, h, w)
        return self.nets["head"](torch.relu(self.nets["body"](torch.cat([x, tissue, height], 1))))

    def loss(self, batch):
        logits = self.forward(batch)
        loss = F.cross_entropy(logits, batch["label"].long().clamp(max=self.config.head - 1), reduction="none")
        loss = (loss * batch["mask"]).sum() / batch["mask"].sum().clamp(min=1)
        return loss, {"loss": loss.item()}

    def validate(self, batch):
        """Its val loss, and a metric that never improves (so early stopping must end the phase)."""
        loss, _ = self.loss(batch)
        n = len(batch["image"])
        return {"loss": (loss.item() * n, n), "constant": (0.0, 1.0)}

    def phases(self):
        c = self.config
        return [Phase(
            name="fit", epochs=c.epochs,
            optimizers={"adam": OptimizerSpec(["body", "head"], lr={"body": c.lr, "head": 2 * c.lr},
                                              algorithm="adamw", amsgrad=True, weight_decay=1e-4,
                                              schedule=Schedule("step", step_size=1, gamma=0.5))},
            updates=[Update("adam", self.loss)],
            data=PhaseData(slices="all", labelled=1, fields=FIELDS, batch_size=4),
            validation=self.validate, metric="val/constant", mode="max",
            early_stopping=EarlyStopping(patience=c.patience),
        )]


def check(batch, n: int, channels: int, size: int) -> None:
    """Every field in the shape and type the contract promises (a broken loader fails the run)."""
    shapes = {"image": (n, channels, size, size), "mask": (n, size, size), "label": (n, size, size),
              "tissue": (n, len(TISSUES), size, size), "position": (n,), "slice": (n,)}
    for key, shape in shapes.items():
        if tuple(batch[key].shape) != shape:
            raise AssertionError(f"batch[{key!r}] has shape {tuple(batch[key].shape)}, expected {shape}")
    if not (0 <= float(batch["position"].min()) and float(batch["position"].max()) <= 1):
        raise AssertionError("position outside [0, 1]")
    if len(batch["subject"]) != n or not all(isinstance(s, str) for s in batch["subject"]):
        raise AssertionError("subject ids missing")
    tissue_sum = batch["tissue"].sum(1)
    if float(tissue_sum.max()) > 1.01:
        raise AssertionError("tissue probabilities sum above 1")
