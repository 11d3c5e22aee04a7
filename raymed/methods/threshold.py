"""Intensity thresholding: the reference every learned detector is compared against.

No learning: the anomaly map is the normalised intensity itself, since lesions are hyper-intense
on T2/FLAIR. With a threshold chosen on validation data it is a strong baseline for brain MRI
(Saase et al., "Simple statistical methods for unsupervised brain anomaly detection on MRI are
competitive to deep learning methods", 2020; Meissen et al., "Challenging current
semi-supervised anomaly segmentation methods for brain MRI", BrainLes 2021). The modality is
`data.modalities`; left unset, it is FLAIR when the data has it, else the first modality
(`resolve_modality`). Several modalities are averaged. A slice's score is the mean of its
brightest 1 % of pixels: how bright its brightest spot is, not how much brain it shows.
"""

from __future__ import annotations

import torch

from raymed.data.discovery import Case
from raymed.errors import DataError
from raymed.methods.base import Method, MethodConfig


TOP_FRACTION = 0.01


class ThresholdConfig(MethodConfig):
    """Only the data settings: which modality, slice size and intensity normalisation."""


class IntensityThreshold(Method):
    name = "threshold"
    kind = ("detector",)
    Config = ThresholdConfig

    def build(self):
        return {}

    def phases(self):
        return []

    @torch.no_grad()
    def anomaly_map(self, x):
        amap = x.mean(dim=1)
        flat = amap.flatten(1)
        return amap, flat.topk(max(1, int(flat.shape[1] * TOP_FRACTION)), dim=1).values.mean(1)


def resolve_modality(config: ThresholdConfig, cases: list[Case]) -> ThresholdConfig:
    """Fill in `data.modalities` when unset: FLAIR if every case has it, else the first shared one."""
    if config.data.modalities:
        return config
    shared = set.intersection(*(set(case.images) for case in cases)) if cases else set()
    if not shared:
        raise DataError("threshold: the cases share no modality; set data.modalities")
    choice = "flair" if "flair" in shared else sorted(shared)[0]
    return config.model_copy(update={"data": config.data.model_copy(update={"modalities": [choice]})})
