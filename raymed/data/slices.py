"""2D axial slices and 3D patches from prepared volumes, with the healthy-only filter.

Unsupervised detectors learn normal anatomy, so their training sets keep only slices/patches
with no lesion voxel. A case without a label file counts as lesion-free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from raymed.data.discovery import Case
from raymed.data.preprocess import Prepared, Preprocessing, prepare
from raymed.errors import DataError


@dataclass
class SliceSet:
    """Stacked 2D samples: image (N, C, H, W) float32; label/mask (N, H, W); where each came from;
    tissue (N, T, H, W) when loaded; position (N,) the slice's relative height in its volume."""

    image: np.ndarray
    label: np.ndarray
    mask: np.ndarray
    subject: list[str]
    index: np.ndarray  # axial slice index (or patch start) in the prepared volume
    position: np.ndarray | None = None
    tissue: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.image)

    def take(self, idx: np.ndarray) -> SliceSet:
        """The samples at `idx`, in that order."""
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return SliceSet(self.image[idx], self.label[idx], self.mask[idx], [self.subject[i] for i in idx],
                        self.index[idx], pick(self.position), pick(self.tissue))

    def batch(self, idx: np.ndarray, fields: tuple[str, ...], device) -> dict:
        """The batch dict a method sees (see `raymed.methods.base.Batch`) for samples `idx`."""
        out = {}
        for name in fields:
            if name == "subject":
                out[name] = [self.subject[i] for i in idx]
                continue
            array = {"image": self.image, "mask": self.mask, "label": self.label, "tissue": self.tissue,
                     "position": self.position, "slice": self.index}[name]
            if array is None:
                raise DataError(f"batch field {name!r} was not loaded")
            tensor = torch.from_numpy(np.ascontiguousarray(array[idx]))
            out[name] = tensor.float().to(device) if name == "position" else tensor.to(device, non_blocking=True)
        return out

    @property
    def keys(self) -> list[tuple[str, int]]:
        """(subject, slice index) of each sample: what a slice list names."""
        return [(subject, int(i)) for subject, i in zip(self.subject, self.index)]

    @property
    def lesion(self) -> np.ndarray:
        """Per-sample flag: does it contain any lesion voxel."""
        return self.label.reshape(len(self), -1).any(axis=1)


def axial_slices(prepared: Prepared, min_brain: float = 0.05, healthy_only: bool = False) -> SliceSet:
    """Axial slices whose brain fraction is at least `min_brain` (optionally lesion-free only)."""
    z = prepared.image.shape[-1]
    label = prepared.label if prepared.label is not None else np.zeros(prepared.mask.shape, np.uint8)
    brain = prepared.mask.reshape(-1, z).mean(axis=0)
    keep = brain >= min_brain
    if healthy_only:
        keep &= ~label.reshape(-1, z).any(axis=0)
    idx = np.flatnonzero(keep)
    tissue = prepared.tissue
    return SliceSet(
        image=np.ascontiguousarray(np.moveaxis(prepared.image[..., idx], -1, 0)),
        label=np.ascontiguousarray(np.moveaxis(label[..., idx], -1, 0)),
        mask=np.ascontiguousarray(np.moveaxis(prepared.mask[..., idx], -1, 0)),
        subject=[prepared.subject] * len(idx),
        index=idx,
        position=(idx / max(z - 1, 1)).astype(np.float32),
        tissue=None if tissue is None else np.ascontiguousarray(np.moveaxis(tissue[..., idx], -1, 0)),
    )


def patches3d(prepared: Prepared, size: int, stride: int | None = None, min_brain: float = 0.05,
              healthy_only: bool = False) -> list[dict]:
    """Cubic 3D patches on a regular grid (image (C, s, s, s), label, mask, start corner)."""
    stride = stride or size
    label = prepared.label if prepared.label is not None else np.zeros(prepared.mask.shape, np.uint8)
    shape = prepared.mask.shape
    if any(s < size for s in shape):
        raise DataError(f"subject {prepared.subject}: volume {shape} is smaller than patch size {size}")
    out = []
    for x in range(0, shape[0] - size + 1, stride):
        for y in range(0, shape[1] - size + 1, stride):
            for zz in range(0, shape[2] - size + 1, stride):
                box = (slice(x, x + size), slice(y, y + size), slice(zz, zz + size))
                mask = prepared.mask[box]
                if mask.mean() < min_brain or (healthy_only and label[box].any()):
                    continue
                out.append({"image": prepared.image[(slice(None), *box)], "label": label[box],
                            "mask": mask, "start": (x, y, zz)})
    return out


def concat(sets: Iterable[SliceSet]) -> SliceSet:
    sets = [s for s in sets if len(s)]
    if not sets:
        return SliceSet(np.zeros((0, 1, 1, 1), np.float32), np.zeros((0, 1, 1), np.uint8),
                        np.zeros((0, 1, 1), bool), [], np.zeros(0, int), np.zeros(0, np.float32))
    joined = lambda name: None if getattr(sets[0], name) is None else np.concatenate([getattr(s, name) for s in sets])  # noqa: E731
    return SliceSet(
        image=joined("image"), label=joined("label"), mask=joined("mask"),
        subject=[name for s in sets for name in s.subject],
        index=joined("index"), position=joined("position"), tissue=joined("tissue"),
    )


def load_slices(cases: list[Case], settings: Preprocessing, healthy_only: bool = False,
                min_brain: float = 0.05, skip_bad: bool = False,
                report: Callable[[str], None] | None = None, tissue: bool = False) -> SliceSet:
    """Prepare each case and stack its slices; a bad case stops the load unless `skip_bad`."""
    sets = []
    for case in cases:
        try:
            sets.append(axial_slices(prepare(case, settings, tissue=tissue), min_brain, healthy_only))
        except DataError as err:
            if not skip_bad:
                raise
            if report:
                report(f"skipped: {err}")
    return concat(sets)


def write_slice_list(uri: str, keys: Iterable[tuple[str, int]]) -> None:
    """A CSV of `subject,slice` rows: the slices a phase trains on (`PhaseData.slice_list`)."""
    from raymed.data.io import write_bytes_atomic

    rows = ["subject,slice"] + [f"{subject},{index}" for subject, index in keys]
    write_bytes_atomic(uri, ("\n".join(rows) + "\n").encode())


def read_slice_list(uri: str) -> set[tuple[str, int]]:
    from raymed.data.io import read_bytes

    lines = read_bytes(uri).decode().splitlines()
    if not lines or lines[0].strip() != "subject,slice":
        raise DataError(f"{uri}: a slice list is a CSV with the header 'subject,slice'")
    keys = set()
    for number, line in enumerate(lines[1:], start=2):
        subject, _, index = line.rpartition(",")
        if not subject or not index.strip().isdigit():
            raise DataError(f"{uri}, line {number}: expected 'subject,slice', got {line!r}")
        keys.add((subject, int(index)))
    if not keys:
        raise DataError(f"{uri}: the slice list is empty")
    return keys


class SliceDataset(Dataset):
    """Torch view of a SliceSet: yields (image, label, mask) tensors."""

    def __init__(self, slices: SliceSet):
        self.slices = slices

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int):
        s = self.slices
        return torch.from_numpy(s.image[i]), torch.from_numpy(s.label[i].astype(np.float32)), torch.from_numpy(s.mask[i].astype(np.float32))
