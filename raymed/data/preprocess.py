"""From a case on disk to a canonical volume: checked, RAS-oriented, resized, normalised.

The steps are MONAI transforms on MetaTensors, so the affine follows every step and anomaly
maps can be written back in the input's geometry (`to_source_grid`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, ResampleToMatch, Resize, ScaleIntensityRange
from pydantic import BaseModel, ConfigDict, field_validator
from scipy import ndimage

from raymed.data.discovery import Case
from raymed.data.io import Volume, read_volume
from raymed.data.tissue import gmm_tissue
from raymed.errors import DataError

TISSUES = ("csf", "gm", "wm")  # the channels of `tissue`; background is 1 - their sum


class Preprocessing(BaseModel):
    """How volumes are brought to a common grid and intensity range."""

    model_config = ConfigDict(extra="forbid")
    modalities: list[str] | None = None  # None: every modality of the first case (pinned when training starts)
    size: int = 128  # in-plane size of axial slices (voxels)
    slices: int | None = None  # number of axial slices after resizing; None keeps the count
    lower_percentile: float = 1.0
    upper_percentile: float = 99.0
    # CT: a fixed intensity window [low, high] (HU, e.g. a liver window [-100, 200]) mapped to
    # [0, 1] in place of the percentile scaling; with an organ mask file it is the foreground.
    window: tuple[float, float] | None = None
    # Where tissue maps come from for methods that read them: the case's *_{csf,gm,wm} files, or a
    # three-class Gaussian mixture of the first channel inside the foreground (raymed.data.tissue).
    tissue_labels: Literal["files", "gmm"] = "files"

    @field_validator("window")
    @classmethod
    def window_ascends(cls, window):
        if window is not None and window[1] <= window[0]:
            raise ValueError(f"window {list(window)}: the upper bound must be above the lower one")
        return window


@dataclass
class Prepared:
    """A case ready for slicing: image (C, X, Y, Z) in [0, 1], label (X, Y, Z) class numbers
    (0 background), mask (X, Y, Z) boolean;
    tissue (T, X, Y, Z) probabilities in TISSUES order when asked for."""

    subject: str
    image: np.ndarray
    label: np.ndarray | None
    mask: np.ndarray
    affine: np.ndarray
    source: Volume  # the first modality as read, for mapping outputs back onto its grid
    split: str | None = None
    tissue: np.ndarray | None = None


def check_geometry(reference: Volume, other: Volume, ref_name: str, other_name: str) -> None:
    """Refuse image/label/mask pairs that do not share a voxel grid."""
    if reference.array.shape[:3] != other.array.shape[:3]:
        raise DataError(
            f"{other_name}: shape {other.array.shape[:3]} does not match {ref_name} {reference.array.shape[:3]}"
        )
    if not np.allclose(reference.affine, other.affine, atol=1e-3):
        raise DataError(f"{other_name}: affine does not match {ref_name}")


def _as_3d(volume: Volume, name: str) -> np.ndarray:
    array = volume.array
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(f"{name}: expected a 3D volume, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise DataError(f"{name}: voxel type {array.dtype} is not numeric")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise DataError(f"{name}: contains NaN or infinite values")
    return array


def read_case(case: Case, modalities: list[str]) -> tuple[list[np.ndarray], np.ndarray | None, np.ndarray | None, Volume]:
    """Read and cross-check every file of a case; errors name the file and the problem."""
    missing = [m for m in modalities if m not in case.images]
    if missing:
        have = ", ".join(sorted(case.images)) or "none"
        raise DataError(f"subject {case.subject}: no {', '.join(missing)} image (has {have})")
    first_uri = case.images[modalities[0]]
    first = read_volume(first_uri)
    channels = [_as_3d(first, first_uri)]
    for modality in modalities[1:]:
        uri = case.images[modality]
        volume = read_volume(uri)
        check_geometry(first, volume, first_uri, uri)
        channels.append(_as_3d(volume, uri))
    extra = []
    for uri in (case.label, case.mask):
        if uri is None:
            extra.append(None)
            continue
        volume = read_volume(uri)
        check_geometry(first, volume, first_uri, uri)
        extra.append(_as_3d(volume, uri))
    label, mask = extra
    return channels, None if label is None else classes(label, case.label), None if mask is None else mask > 0.5, first


def classes(label: np.ndarray, name: str) -> np.ndarray:
    """A label volume as class numbers (uint8): multi-class files (BraTS 1/2/4) keep their classes,
    a soft [0, 1] mask rounds to lesion where it exceeds one half."""
    if label.min() < 0 or label.max() > 255:
        raise DataError(f"{name}: label values must be class numbers 0-255, found {label.min():g} to {label.max():g}")
    return np.rint(label).astype(np.uint8)


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """Body/brain mask when none is given: voxels above 5% of the robust maximum, holes filled."""
    signal = image.max(axis=0)
    nonzero = signal[signal > 0]
    if nonzero.size == 0:
        return np.zeros(signal.shape, bool)
    mask = signal > 0.05 * np.percentile(nonzero, 99)
    return ndimage.binary_fill_holes(mask)


def normalise(image: np.ndarray, mask: np.ndarray, lower: float, upper: float, name: str) -> np.ndarray:
    """Per-channel percentile scaling to [0, 1] computed inside the mask; zero outside."""
    if not mask.any():
        raise DataError(f"{name}: brain/body mask is empty")
    out = np.empty_like(image)
    for c in range(image.shape[0]):
        lo, hi = np.percentile(image[c][mask], [lower, upper])
        scale = ScaleIntensityRange(a_min=float(lo), a_max=float(max(hi, lo + 1e-6)), b_min=0.0, b_max=1.0, clip=True)
        out[c] = np.asarray(scale(image[c])) * mask
    return out


def apply_window(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """CT windowing: [low, high] (HU) → [0, 1], clipped outside."""
    return np.asarray(ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(image),
                      dtype=np.float32)


def scale_intensities(image: np.ndarray, mask: np.ndarray | None, settings: Preprocessing,
                      name: str) -> tuple[np.ndarray, np.ndarray]:
    """(image in [0, 1], foreground): the CT window or the percentile scaling; the foreground is
    `mask` when given, else found from the (windowed) image."""
    if settings.window is not None:
        image = apply_window(image, *settings.window)
    mask = mask if mask is not None else foreground_mask(image)
    if settings.window is None:
        return normalise(image, mask, settings.lower_percentile, settings.upper_percentile, name), mask
    if not mask.any():
        raise DataError(f"{name}: body/organ mask is empty")
    return image * mask, mask


def read_tissue(case: Case, reference: Volume, reference_name: str) -> np.ndarray:
    """The case's tissue probability maps (T, X, Y, Z), e.g. the demo cohort's gm/wm/csf files."""
    missing = [t for t in TISSUES if t not in case.extras]
    if missing:
        raise DataError(f"subject {case.subject}: no {', '.join(missing)} tissue map "
                        f"(expected files {', '.join(f'{case.subject}_{t}.nii.gz' for t in TISSUES)})")
    maps = []
    for name in TISSUES:
        volume = read_volume(case.extras[name])
        check_geometry(reference, volume, reference_name, case.extras[name])
        maps.append(np.clip(_as_3d(volume, case.extras[name]), 0, 1))
    return np.stack(maps)


def prepare(case: Case, settings: Preprocessing, tissue: bool = False) -> Prepared:
    """Read, orient to RAS, resize in-plane to `settings.size`, mask and normalise one case
    (and bring its tissue maps onto the same grid when `tissue`). A case of a prepared dataset is
    read back from its records (`raymed.data.prepared`)."""
    if case.prepared:
        from raymed.data.prepared import PreparedDataset

        return PreparedDataset.open(case.prepared).volume(case.subject, settings, tissue)
    modalities = settings.modalities or sorted(case.images)
    channels, label, mask, first = read_case(case, modalities)
    first_name = case.images[modalities[0]]
    maps = read_tissue(case, first, first_name) if tissue and settings.tissue_labels == "files" else None
    prepared = prepare_image(np.stack(channels), first, settings, first_name, label, mask,
                             subject=case.subject, split=case.split, tissue=maps)
    if tissue and settings.tissue_labels == "gmm":
        prepared.tissue = gmm_tissue(prepared.image[0], prepared.mask)
    return prepared


def prepare_image(image: np.ndarray, source: Volume, settings: Preprocessing, name: str,
                  label: np.ndarray | None = None, mask: np.ndarray | None = None,
                  subject: str = "", split: str | None = None, tissue: np.ndarray | None = None) -> Prepared:
    """The steps of `prepare` on arrays already in memory (as the HTTP endpoint receives them).

    `image` is (C, X, Y, Z) float32 on the voxel grid of `source`; `label` (class numbers) and
    `mask` (booleans) are (X, Y, Z) on the same grid; without a mask the foreground is found from
    the image.
    """
    affine = torch.as_tensor(source.affine, dtype=torch.float64)
    oriented = onto_grid(image, affine, settings, "trilinear")
    tissue_out = None if tissue is None else np.clip(np.asarray(onto_grid(tissue, affine, settings, "trilinear"),
                                                                dtype=np.float32), 0, 1)
    mask_out = follow(mask, affine, settings)
    array, mask_out = scale_intensities(np.asarray(oriented, dtype=np.float32), None if mask_out is None else mask_out > 0,
                                        settings, name)
    return Prepared(
        subject=subject,
        image=array,
        label=follow(label, affine, settings),
        mask=mask_out,
        affine=np.asarray(oriented.affine, dtype=np.float64),
        source=source,
        split=split,
        tissue=tissue_out,
    )


def prepare_labels(labels: np.ndarray, source: Volume, settings: Preprocessing, classes: int, name: str) -> Prepared:
    """A label map (X, Y, Z) of classes 0…classes−1 on the grid of `source`, on the prepared grid
    and one-hot as the image (classes, X, Y, Z): what a translator from label maps is given."""
    check_labels(labels, classes, name)
    grid = onto_grid(labels[None], torch.as_tensor(source.affine, dtype=torch.float64), settings, "nearest")
    label = np.asarray(grid[0]).astype(np.uint8)
    return Prepared(subject="", image=one_hot_labels(label, classes), label=label, mask=label > 0,
                    affine=np.asarray(grid.affine, dtype=np.float64), source=source)


def check_labels(labels: np.ndarray, classes: int, name: str) -> None:
    """A label map holds whole numbers 0…classes−1; anything else is a DataError naming a value."""
    values = np.unique(labels)
    bad = values[(values != np.rint(values)) | (values < 0) | (values >= classes)]
    if bad.size:
        raise DataError(f"{name}: a label map holds whole numbers 0-{classes - 1}; found {bad[0]:g}")


def one_hot_labels(labels: np.ndarray, classes: int) -> np.ndarray:
    """Class numbers (…) → one-hot float32 (classes, …)."""
    return (np.arange(classes).reshape(-1, *[1] * labels.ndim) == labels).astype(np.float32)


def onto_grid(voxels: np.ndarray, affine: torch.Tensor, settings: Preprocessing, mode: str) -> MetaTensor:
    """(C, X, Y, Z) voxels oriented to RAS and resized to (size, size, slices or their own count)."""
    orient = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))
    meta = orient(MetaTensor(torch.from_numpy(np.asarray(voxels, dtype=np.float32)), affine=affine))
    target = (settings.size, settings.size, settings.slices or meta.shape[3])
    return Resize(target, mode=mode)(meta) if tuple(meta.shape[1:]) != target else meta


def follow(voxels: np.ndarray | None, affine: torch.Tensor, settings: Preprocessing) -> np.ndarray | None:
    """A mask or class-label volume (X, Y, Z) onto the prepared grid (nearest neighbour)."""
    if voxels is None:
        return None
    return np.rint(np.asarray(onto_grid(voxels[None], affine, settings, "nearest")[0])).astype(np.uint8)


def to_source_grid(volume: np.ndarray, prepared: Prepared, mode: str = "bilinear") -> np.ndarray:
    """Resample a (X, Y, Z) map on the prepared grid back onto the input file's voxel grid."""
    moving = MetaTensor(torch.from_numpy(np.asarray(volume, np.float32)[None]), affine=torch.as_tensor(prepared.affine))
    shape = prepared.source.array.shape[:3]
    reference = MetaTensor(torch.zeros((1, *shape)), affine=torch.as_tensor(prepared.source.affine))
    out = ResampleToMatch(mode=mode, padding_mode="zeros")(moving, reference)
    return np.asarray(out[0], dtype=np.float32)
