"""The evaluation protocol of the seed papers, applied the same way to every detector.

1. Operating thresholds come from a labelled validation split (or were stored with the model by
   `raymed tune-threshold`): the pixel threshold with the best validation Dice, the image
   threshold with the best validation F1 of slice flags (or a target flag rate).
2. On the test split, volume by volume: pixel AUROC / AUPRC / [DICE] over the brain voxels
   (streamed through a histogram), Dice / precision / recall per volume at the validation
   threshold, slice- and volume-level detection, and reconstruction fidelity where the method
   reconstructs.
"""

from __future__ import annotations

import heapq
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import Field
from sklearn.metrics import average_precision_score

from raymed.data.discovery import Case
from raymed.data.preprocess import Prepared, prepare
from raymed.engine.inference import map_prepared, segment_prepared
from raymed.errors import ConfigError
from raymed.evaluation.detection import (ImageScore, best_f1_threshold, detection_metrics, flag_rate_threshold,
                                         slice_scores)
from raymed.evaluation.generation import paired_metrics
from raymed.evaluation.metrics import DEFAULT_BINS, ScoreHistogram, class_dice, overlap
from raymed.evaluation.postprocess import PostProcessing, binarise, configure, smooth_map
from raymed.methods.base import Method, Strict

EXAMPLES = 3  # best and worst slices kept for the figure
MIN_LESION_AREA = 0.005  # a slice competes for best/worst when lesion covers this much of it
MAX_RECONSTRUCTION_SLICES = 512


class Settings(Strict):
    """Everything that changes the numbers; written into metrics.json."""

    postprocess: PostProcessing = Field(default_factory=PostProcessing)
    image_score: ImageScore = Field(default_factory=ImageScore)
    bins: int = Field(DEFAULT_BINS, ge=2, multiple_of=2, description="histogram bins of the streamed pixel metrics")
    batch_size: int = Field(32, ge=1)


@dataclass(order=True)
class Example:
    """One slice kept for the figure (ordered by its per-slice average precision)."""

    ap: float
    subject: str = field(compare=False)
    index: int = field(compare=False)
    image: np.ndarray = field(compare=False)
    map: np.ndarray = field(compare=False)
    label: np.ndarray = field(compare=False)
    mask: np.ndarray = field(compare=False)


@dataclass
class SplitPass:
    """What one pass of a detector over the volumes of a split collected."""

    histogram: ScoreHistogram
    slice_scores: list[np.ndarray] = field(default_factory=list)
    slice_labels: list[np.ndarray] = field(default_factory=list)
    volumes: list[dict] = field(default_factory=list)
    best: list[Example] = field(default_factory=list)
    worst: list[Example] = field(default_factory=list)  # keyed by -AP, so the heap keeps the lowest APs
    reconstruction: list[dict] = field(default_factory=list)

    @property
    def scores(self) -> np.ndarray:
        return np.concatenate(self.slice_scores) if self.slice_scores else np.zeros(0)

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate(self.slice_labels) if self.slice_labels else np.zeros(0, bool)

    def examples(self) -> tuple[list[Example], list[Example]]:
        """(best first, worst first)."""
        worst = [Example(-e.ap, e.subject, e.index, e.image, e.map, e.label, e.mask) for e in self.worst]
        return sorted(self.best, reverse=True), sorted(worst)


def run_split(method: Method, cases: list[Case], settings: Settings, pixel_threshold: float | None = None,
              on_volume: Callable[[Prepared, np.ndarray, np.ndarray | None], None] | None = None,
              examples: bool = False, reconstruction: bool = False) -> SplitPass:
    """Map every case and accumulate the metrics; `on_volume(prepared, map, segmentation)` sees
    each post-processed map (e.g. to write it as NIfTI)."""
    configure(method, settings.postprocess)
    data = method.config.data
    passed = SplitPass(ScoreHistogram(settings.bins))
    for case in cases:
        prepared = prepare(case, data)
        mapped = map_prepared(method, prepared, settings.batch_size)
        amap = smooth_map(mapped.map, prepared.mask, settings.postprocess)
        label = prepared.label if prepared.label is not None else np.zeros(prepared.mask.shape, np.uint8)
        mask = prepared.mask
        lesion = (label > 0) & mask  # every class together: the whole lesion
        passed.histogram.add(amap[mask], lesion[mask])
        brain = mask.reshape(-1, mask.shape[-1]).mean(0) >= data.min_brain
        scores = slice_scores(amap, mask, settings.image_score, mapped.slice_scores)
        lesion_slices = lesion.reshape(-1, mask.shape[-1]).any(0)
        passed.slice_scores.append(scores[brain])
        passed.slice_labels.append(lesion_slices[brain])
        segmentation = None
        row = {"subject": case.subject, "lesion_voxels": int(lesion.sum()),
               "volume_score": float(scores[brain].max() if brain.any() else scores.max())}
        if pixel_threshold is not None:
            segmentation = binarise(amap, pixel_threshold, settings.postprocess.min_component) & mask
            row.update(overlap(segmentation, lesion))
        if method.classes:
            segmentation = segment_prepared(method, prepared, settings.batch_size)
            row.update({f"dice_class_{v}": d for v, d in class_dice(segmentation, label * mask, method.classes).items()})
        passed.volumes.append(row)
        if examples:
            _keep_examples(passed, prepared, amap, lesion)
        budget = MAX_RECONSTRUCTION_SLICES - sum(r["slices"] for r in passed.reconstruction)
        if reconstruction and budget > 0:
            fidelity = _reconstruction_fidelity(method, prepared, brain & ~lesion_slices, budget, settings.batch_size)
            if fidelity:
                passed.reconstruction.append(fidelity)
        if on_volume:
            on_volume(prepared, amap, segmentation)
    return passed


def _keep_examples(passed: SplitPass, prepared: Prepared, amap: np.ndarray, label: np.ndarray) -> None:
    """Offer this volume's best and worst lesion slice (per-slice AP inside the brain) to the
    EXAMPLES best and worst kept so far: one slice per volume each, so the figure shows variety."""
    mask = prepared.mask
    area = mask.shape[0] * mask.shape[1]
    scored = []
    for z in range(mask.shape[-1]):
        inside = mask[..., z]
        lesion = label[..., z].astype(bool) & inside
        if lesion.sum() < max(1, MIN_LESION_AREA * area) or lesion.sum() == inside.sum():
            continue
        scored.append((float(average_precision_score(lesion[inside], amap[..., z][inside])), z, lesion))
    if not scored:
        return
    for heap, (ap, z, lesion), sign in ((passed.best, max(scored, key=lambda t: t[0]), 1),
                                        (passed.worst, min(scored, key=lambda t: t[0]), -1)):
        item = Example(sign * ap, prepared.subject, z, prepared.image[..., z], amap[..., z], lesion, mask[..., z])
        if len(heap) < EXAMPLES:
            heapq.heappush(heap, item)
        else:
            heapq.heappushpop(heap, item)


@torch.no_grad()
def _reconstruction_fidelity(method: Method, prepared: Prepared, healthy: np.ndarray, limit: int,
                             batch_size: int) -> dict | None:
    """MAE / PSNR / SSIM of the method's reconstruction of (at most `limit`) healthy slices, inside the brain."""
    index = np.flatnonzero(healthy)[:limit]
    if not len(index):
        return None
    device = method.device
    image = torch.from_numpy(np.ascontiguousarray(np.moveaxis(prepared.image[..., index], -1, 0))).to(device)
    recon = [method.reconstruction(image[i:i + batch_size]) for i in range(0, len(image), batch_size)]
    if recon[0] is None:
        return None
    mask = torch.from_numpy(np.ascontiguousarray(np.moveaxis(prepared.mask[..., index], -1, 0)))
    return {"slices": int(len(index)), **paired_metrics(torch.cat(recon).float().cpu(), image.float().cpu(), mask)}


def choose_thresholds(val: SplitPass, criterion: str = "max_dice", flag_rate: float | None = None) -> dict:
    """Pixel threshold with the best validation Dice; image threshold by `criterion`:
    best F1 of slice flags ("max_dice") or the threshold flagging `flag_rate` of the slices."""
    pixel = val.histogram.metrics()
    chosen = {"pixel": pixel["dice_best_threshold"] if math.isfinite(pixel["dice_best_threshold"]) else None,
              "metrics": {"dice": pixel["dice_best"], "auroc": pixel["auroc"], "auprc": pixel["auprc"],
                          "slices": int(len(val.scores)), "lesion_slices": int(val.labels.sum())}}
    if criterion == "flag_rate":
        if flag_rate is None:
            raise ConfigError("--criterion flag_rate needs --flag-rate (the fraction of slices to flag)")
        image = flag_rate_threshold(val.scores, flag_rate)
    elif criterion == "max_dice":
        image = best_f1_threshold(val.scores, val.labels)
    else:
        raise ConfigError(f"unknown criterion {criterion!r} (use max_dice or flag_rate)")
    chosen["image"] = image if math.isfinite(image) else None
    if chosen["image"] is not None:
        chosen["metrics"]["flag_rate"] = float((val.scores >= image).mean())
    return chosen


def usable_stored(stored: dict | None, settings: Settings, method: Method) -> tuple[dict | None, str | None]:
    """The stored threshold when it was chosen for these settings, else (None, why not)."""
    if not stored:
        return None, None
    post = PostProcessing.model_validate(stored.get("postprocess", {}))
    score = ImageScore.model_validate(stored.get("image_score", {}))
    if post != settings.postprocess:
        steps = ", ".join(post.describe(method)) or "none"
        return None, f"stored threshold was chosen with other post-processing ({steps}); re-chosen on validation"
    if score != settings.image_score:
        return None, (f"stored threshold was chosen with another image score ({score.reduction}, "
                      f"fraction {score.fraction}); re-chosen on validation")
    return stored, None


def summarise(method: Method, test: SplitPass, thresholds: dict, settings: Settings) -> dict:
    """The JSON result of one detector on the test split."""
    pixel = test.histogram.metrics()
    lesion_volumes = [v for v in test.volumes if v["lesion_voxels"] > 0]
    result = {
        "method": method.name,
        "modalities": method.config.data.modalities,
        "postprocess": settings.postprocess.describe(method),
        "thresholds": thresholds,
        "pixel": pixel,
        "detection": {
            "slice": detection_metrics(test.scores, test.labels, thresholds.get("image"), "slice"),
            "volume": detection_metrics([v["volume_score"] for v in test.volumes],
                                        [v["lesion_voxels"] > 0 for v in test.volumes], thresholds.get("image"),
                                        "volume"),
        },
        "volumes": test.volumes,
    }
    if thresholds.get("pixel") is not None:
        result["segmentation"] = {"volumes": len(lesion_volumes)}
        for key in ("dice", "precision", "recall"):
            values = np.array([v[key] for v in lesion_volumes], np.float64)
            finite = values[np.isfinite(values)]
            result["segmentation"][key] = float(finite.mean()) if len(finite) else float("nan")
            result["segmentation"][f"{key}_std"] = float(finite.std()) if len(finite) else float("nan")
        healthy = [v for v in test.volumes if v["lesion_voxels"] == 0]
        if healthy:
            flagged = float(np.mean([v["flagged_voxels"] for v in healthy]))
            result["segmentation"]["healthy_volumes_flagged_voxels"] = flagged
    if method.classes:
        result["classes"] = class_summary(lesion_volumes, method.classes)
    if test.reconstruction:
        weights = np.array([r["slices"] for r in test.reconstruction], np.float64)
        result["reconstruction"] = {"slices": int(weights.sum()), **{
            key: float(np.average([r[key] for r in test.reconstruction], weights=weights))
            for key in ("mae", "psnr", "ssim")}}
    return result


def class_summary(volumes: list[dict], classes: tuple[int, ...]) -> dict:
    """Multi-class Dice as Holzschuh et al. report it: per patient the mean over the lesion
    classes present, then the mean over patients; and each class's mean over patients."""
    table = np.array([[v[f"dice_class_{c}"] for c in classes] for v in volumes], np.float64).reshape(-1, len(classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class no patient has: NaN
        per_patient = np.nanmean(table, axis=1)
        return {"dice": float(np.nanmean(per_patient)), "volumes": len(volumes),
                "per_class": {str(c): float(np.nanmean(table[:, i])) for i, c in enumerate(classes)}}
