"""`evaluate` and `tune_threshold` as library calls: what the CLI and `raymed demo` run.

A target is a trained run or checkpoint (local or s3://), or the name of a method that learns
nothing (`threshold`), which is built from its config on the spot.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raymed import __version__
from raymed.data.discovery import Case, discover
from raymed.data.io import join, write_bytes_atomic, write_volume
from raymed.data.preprocess import Prepared, to_source_grid
from raymed.data.splits import assign_splits, select
from raymed.engine import checkpoint as ckpt
from raymed.errors import ConfigError, DataError
from raymed.evaluation import figures
from raymed.evaluation.protocol import (Settings, SplitPass, choose_thresholds, run_split, summarise,
                                        usable_stored)
from raymed.evaluation.report import REPORT_FILE, render_markdown, write_metrics
from raymed.evaluation.thresholds import load_threshold, save_threshold
from raymed.methods.base import Method
from raymed.methods.registry import METHODS, build_config, method_class
from raymed.methods.threshold import resolve_modality

REFERENCE = "threshold"


@dataclass
class Target:
    """A detector ready to evaluate, where it came from, and its dataset's cases with splits."""

    method: Method
    uri: str  # what the user named: run, checkpoint or method name
    checkpoint: str | None
    stored: dict | None
    cases: list[Case]


def is_method_name(target: str) -> bool:
    """A registered method name that is not also a local path."""
    return target in METHODS and "://" not in target and not os.path.exists(target)


def untrained(name: str, config, cases: list[Case]) -> Method:
    """A method without trainable weights, its modality resolved against the data."""
    probe = method_class(name)(config, 1)
    if probe.phases():
        raise ConfigError(f"{name} learns its weights: pass the run folder or checkpoint of a trained "
                          f"{name} (see `raymed train {name}`)")
    config = resolve_modality(config, cases)
    return method_class(name)(config, len(config.data.modalities))


def open_target(target: str, source: str, pattern: str | None = None, config_file: str | None = None,
                sets: list[str] | None = None) -> Target:
    """Load a run/checkpoint (and its stored threshold) or build an untrained method by name
    (configured by `config_file`/`sets`); discover the data with the method's split seed."""
    if is_method_name(target):
        from raymed.engine.commands import resolve_config

        config = resolve_config(target, config_file, list(sets or []))
        cases = assign_splits(discover(source, pattern), seed=config.data.split_seed)
        return Target(untrained(target, config, cases), target, None, None, cases)
    if config_file or sets:
        raise ConfigError("--config/--set configure a method given by name (e.g. threshold), not a trained run")
    method, state = ckpt.load_method(target)
    cases = assign_splits(discover(source, pattern), seed=method.config.data.split_seed)
    return Target(method, target, state["uri"], load_threshold(state["uri"]), cases)


def reference_method(method: Method, cases: list[Case]) -> Method:
    """The `threshold` reference on the same slices (size, normalisation) as `method`."""
    data = method.config.data.model_dump(mode="json")
    data["modalities"] = None
    return untrained(REFERENCE, build_config(REFERENCE, {"data": data}), cases)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _volume_writer(out: str, progress: Callable[[str], None]):
    """Write each test volume's anomaly map (and segmentation) on the input's voxel grid."""
    def write(prepared: Prepared, amap: np.ndarray, segmentation: np.ndarray | None) -> None:
        affine = prepared.source.affine
        write_volume(join(out, "maps", f"{prepared.subject}_anomaly.nii.gz"), to_source_grid(amap, prepared), affine)
        if segmentation is not None:
            labels = np.rint(to_source_grid(segmentation.astype(np.float32), prepared, mode="nearest"))
            write_volume(join(out, "maps", f"{prepared.subject}_segmentation.nii.gz"), labels.astype(np.uint8), affine)
        progress(f"  {prepared.subject}: map written")
    return write


def operating_point(method: Method, stored: dict | None, val_cases: list[Case], settings: Settings,
                    split: str, val_split: str, notes: list[str]) -> dict:
    """Thresholds stored with the model when they fit these settings; the rest chosen on validation."""
    usable, why = usable_stored(stored, settings, method)
    if why:
        notes.append(f"{method.name}: {why}")
    thresholds = {key: (usable or {}).get(key) for key in ("pixel", "image")}
    origins = []
    if usable and any(v is not None for v in thresholds.values()):
        origins.append(f"stored with the model (chosen on {usable.get('split')} by {usable.get('criterion')})")
        if usable.get("split") == split:
            notes.append(f"{method.name}: the stored threshold was chosen on the evaluated split ({split}): optimistic")
    missing = [key for key, value in thresholds.items() if value is None]
    if missing and val_cases:
        chosen = choose_thresholds(run_split(method, val_cases, settings))
        thresholds.update({key: chosen[key] for key in missing})
        origins.append(f"{' and '.join(missing)} chosen on the {val_split} split by this evaluation")
        if chosen["pixel"] is None and "pixel" in missing:
            notes.append(f"{method.name}: the {val_split} split has no lesion voxels: no pixel threshold")
    elif missing:
        notes.append(f"{method.name}: no {val_split!r} split to choose thresholds on; Dice at a threshold "
                     "and flag rates are not reported")
    return {**thresholds, "origin": "; ".join(origins) or "none"}


def evaluate(target: Target, source: str, out: str, split: str = "test", val_split: str = "val",
             settings: Settings | None = None, reference: bool = True, maps: bool = True,
             pattern: str | None = None, progress: Callable[[str], None] = print) -> dict:
    """Evaluate a detector (and the `threshold` reference) on `split`; write the report to `out`.
    Without `settings`, the method's own post-processing applies (the one its validation used)."""
    settings = settings or Settings(postprocess=target.method.config.postprocess)
    started = time.perf_counter()
    test_cases, val_cases = select(target.cases, split), select(target.cases, val_split)
    if not test_cases:
        raise DataError(f"{source}: no cases in the {split!r} split")
    methods = {target.method.name: (target.method, target.stored)}
    if reference and target.method.name != REFERENCE:
        methods[REFERENCE] = (reference_method(target.method, target.cases), None)
    notes: list[str] = []
    results, panels, histograms, grids = {}, {}, {}, {}
    for index, (name, (method, stored)) in enumerate(methods.items()):
        method.nets.to(_device())
        with noted(notes, name):
            progress(f"{name}: thresholds")
            thresholds = operating_point(method, stored, val_cases, settings, split, val_split, notes)
            progress(f"{name}: {len(test_cases)} {split} volumes")
            writer = _volume_writer(out, progress) if maps and index == 0 else None
            test = run_split(method, test_cases, settings, thresholds["pixel"], on_volume=writer, examples=True,
                             reconstruction=True)
            results[name] = summarise(method, test, thresholds, settings)
        histograms[name] = test.histogram
        panels[name] = _panel(test, thresholds)
        best, worst = test.examples()
        channel, channel_name = _display_channel(method, test_cases[0])
        grids[f"slices_{name}.png"] = (
            figures.slice_grid(method, best, worst, thresholds["pixel"], channel, channel_name),
            f"{name}: input, reconstruction, anomaly map and ground truth of the best and worst test slices")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # undefined metrics are in the notes already
        files = {**grids,
                 "curves.png": (figures.curves(histograms), "ROC and precision-recall curves of the pixel scores"),
                 "histograms.png": (figures.score_histograms(panels),
                                    "score histograms: healthy vs lesion voxels and slices")}
    for name, (png, _) in files.items():
        write_bytes_atomic(join(out, name), png)
    lesion_volumes = sum(v["lesion_voxels"] > 0 for v in results[target.method.name]["volumes"])
    metrics = {
        "raymed": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "target": target.uri, "checkpoint": target.checkpoint, "primary": target.method.name,
        "data": {"source": source, "pattern": pattern, "split": split, "val_split": val_split,
                 "volumes": len(test_cases), "lesion_volumes": int(lesion_volumes), "val_volumes": len(val_cases)},
        "settings": settings.model_dump(mode="json"),
        "results": results,
        "notes": notes,
        "files": {"figures": {name: caption for name, (_, caption) in files.items()},
                  "maps": "maps/" if maps else None},
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_metrics(out, metrics)
    write_bytes_atomic(join(out, REPORT_FILE), render_markdown(metrics).encode())
    return metrics


@contextlib.contextmanager
def noted(notes: list[str], prefix: str):
    """Turn raymed's RuntimeWarnings (undefined metrics and the like) into report notes, once each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        if issubclass(warning.category, RuntimeWarning) and f"{os.sep}raymed{os.sep}" in warning.filename:
            text = f"{prefix}: {warning.message}"
            if text not in notes:
                notes.append(text)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _panel(test: SplitPass, thresholds: dict) -> dict:
    return {"histogram": test.histogram, "slice_scores": test.scores, "slice_labels": test.labels,
            "pixel_threshold": thresholds["pixel"], "image_threshold": thresholds["image"]}


def _display_channel(method: Method, case: Case) -> tuple[int, str]:
    """The input channel the figure shows (FLAIR when there is one) and its modality."""
    modalities = method.config.data.modalities or sorted(case.images)
    channel = modalities.index("flair") if "flair" in modalities else 0
    return channel, modalities[channel]


def tune_threshold(target: Target, split: str = "val", criterion: str = "max_dice", flag_rate: float | None = None,
                   settings: Settings | None = None, out: str | None = None,
                   source: str | None = None) -> tuple[dict, str]:
    """Choose the operating thresholds on `split` and store them with the model.

    A method name has no checkpoint yet: `out` names the folder to create one in (a checkpoint
    with no weights, loadable by `raymed evaluate` and serving like any other).
    """
    settings = settings or Settings(postprocess=target.method.config.postprocess)
    cases = select(target.cases, split)
    if not cases:
        raise DataError(f"no cases in the {split!r} split to choose a threshold on")
    method = target.method
    method.nets.to(_device())
    chosen = choose_thresholds(run_split(method, cases, settings), criterion, flag_rate)
    if chosen["pixel"] is None and chosen["image"] is None:
        raise DataError(f"the {split} split has no lesion voxels: nothing to choose a threshold by "
                        "(use --criterion flag_rate for an image threshold)")
    checkpoint = target.checkpoint
    if checkpoint is None:
        if not out:
            raise ConfigError(f"{target.uri} has no checkpoint to store the threshold in: pass --out FOLDER")
        checkpoint = save_untrained(method, out)
    threshold = {"pixel": chosen["pixel"], "image": chosen["image"], "split": split, "criterion": criterion,
                 "flag_rate": flag_rate if criterion == "flag_rate" else None, "metrics": chosen["metrics"],
                 "postprocess": settings.postprocess.model_dump(), "image_score": settings.image_score.model_dump(),
                 "source": source}
    return threshold, save_threshold(checkpoint, threshold)


def save_untrained(method: Method, out: str) -> str:
    """Write a weightless method as a checkpoint folder (state.pt + meta.json) at `out`."""
    with tempfile.TemporaryDirectory() as folder:
        ckpt.save(folder, method, {}, None, {"phase": 0, "epoch": 0, "step": 0}, {})
        for path in Path(folder).iterdir():
            write_bytes_atomic(join(out, path.name), path.read_bytes())
    return str(out).rstrip("/")
