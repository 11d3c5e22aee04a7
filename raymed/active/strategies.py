"""A strategy is a score and a sampler, written `SCORE[:SAMPLER]` (e.g. `margin:top_n`,
`anomaly`, `core_set`): the score says how informative each pool sample is, the sampler picks a
round's budget from the scores (and, for the diversity samplers, the embeddings).

Scores come from the round's segmentation model (`least_confidence`, `margin`,
`expected_model_change`), from a detector run (`anomaly`: its anomaly score, which does not
change between rounds), or are `random`. A segmentation model's embedding of a slice is its
UNet's last feature map averaged over the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raymed.active import sampling, scoring
from raymed.errors import ConfigError
from raymed.methods.base import Method

SCORES = ("random", "least_confidence", "margin", "expected_model_change", "anomaly")
SAMPLERS = ("top_n", "mixture", "k_nearest", "core_set")


@dataclass(frozen=True)
class Strategy:
    score: str
    sampler: str
    random_fraction: float = 0.5  # mixture: the share of the budget drawn at random
    k: int = 5  # k_nearest: group size

    @classmethod
    def parse(cls, text: str) -> Strategy:
        score, _, sampler = text.partition(":")
        if score == "core_set" and not sampler:
            score, sampler = "random", "core_set"
        sampler = sampler or "top_n"
        if score not in SCORES or sampler not in SAMPLERS:
            raise ConfigError(f"strategy {text!r}: expected SCORE[:SAMPLER] with SCORE one of {', '.join(SCORES)} "
                              f"and SAMPLER one of {', '.join(SAMPLERS)} (or just core_set)")
        return cls(score, sampler)

    @property
    def name(self) -> str:
        return "core_set" if self.sampler == "core_set" else (
            self.score if self.sampler == "top_n" else f"{self.score}:{self.sampler}")

    @property
    def needs_embeddings(self) -> bool:
        return self.sampler in ("k_nearest", "core_set")


def batched(fn, image: np.ndarray, batch_size: int = 64) -> list[np.ndarray]:
    """`fn` over (N, C, H, W) images in batches, its outputs concatenated, as numpy."""
    parts = []
    with torch.no_grad():
        for start in range(0, len(image), batch_size):
            out = fn(torch.from_numpy(np.ascontiguousarray(image[start:start + batch_size])))
            parts.append([t.float().numpy() for t in (out if isinstance(out, tuple) else (out,))])
    return [np.concatenate(column) for column in zip(*parts)]


def segmenter_outputs(segmenter: Method, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities (N, K, H, W), embeddings (N, F)) of a `dae` segmentation model."""
    def run(x):
        features = segmenter.nets["unet"](x)
        return segmenter.nets[segmenter.head](features).softmax(1), features.mean((2, 3))

    probabilities, embeddings = batched(run, image)
    return probabilities, embeddings


def scores(strategy: Strategy, image: np.ndarray, mask: np.ndarray, segmenter: Method | None,
           detector: Method | None, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(score per sample, embeddings or None) of a pool under a strategy."""
    embeddings = None
    probabilities = None
    if segmenter is not None and (strategy.needs_embeddings or strategy.score in ("least_confidence", "margin")):
        probabilities, embeddings = segmenter_outputs(segmenter, image)
    if strategy.score == "random":
        values = scoring.random_scores(len(image), seed)
    elif strategy.score == "anomaly":
        if detector is None:
            raise ConfigError("the anomaly score needs a detector run (--detector RUN)")
        (values,) = batched(lambda x: detector.anomaly_map(x)[1], image)
    elif strategy.score == "expected_model_change":
        values = scoring.expected_model_change(segmenter.forward, segmenter.nets[segmenter.head],
                                               torch.from_numpy(image))
    else:
        values = getattr(scoring, strategy.score)(probabilities, mask)
    return values, embeddings


def choose(strategy: Strategy, values: np.ndarray, embeddings: np.ndarray | None, labelled: np.ndarray,
           budget: int, seed: int) -> np.ndarray:
    """Indices into the pool (not in `labelled`) of the next `budget` samples to label."""
    free = np.setdiff1d(np.arange(len(values)), labelled)
    budget = min(budget, len(free))
    if strategy.sampler == "core_set":
        return sampling.core_set(embeddings, labelled, budget)
    if strategy.sampler == "top_n":
        picked = sampling.top_n(values[free], budget)
    elif strategy.sampler == "mixture":
        picked = sampling.mixture(values[free], budget, strategy.random_fraction, seed)
    else:
        picked = sampling.k_nearest(values[free], embeddings[free], budget, strategy.k)
    return free[picked]
