"""Simulated lesions for *evaluating* detectors on the demo cohort.

These lesions exist only to score detectors. They are deliberately kept apart from
`raymed.synthesis` (the training-time corruptions): a detector scored on lesions drawn from the
generator it was trained against would be rewarded for recognising the generator, not anomalies.

Lesions are expressed as per-voxel *fractions* (`core`, `oedema`) on top of the subject's tissue
maps, so a renderer can blend lesion and tissue intensities with partial volume, and the label is
where lesion covers more than half a voxel: `CORE` (1) where core dominates, `OEDEMA` (2) where
oedema does, BraTS's numbering for necrotic core and oedema. Two kinds:

- `tumour`: an irregular core in deep white matter, surrounded by an oedema rim that spreads mainly
  through white matter, and a slight mass effect that pushes the surrounding tissue away.
- `multifocal`: several small irregular foci in white matter (demyelination-like).

Every random choice comes from the `numpy.random.Generator` passed in, so a seed fixes the lesion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

# Everything that shapes a lesion; written to the cohort's cohort.json so a report can say how its
# lesions were made. Sizes are in mm, so a lesion looks the same at every grid size.
PARAMETERS = {
    "kinds": {"tumour": 0.6, "multifocal": 0.4},
    "tumour": {
        "core_radius_mm": (8.0, 16.0),
        "oedema_radius_factor": (1.5, 2.2),
        "core_roughness": 0.3,
        "oedema_roughness": 0.4,
        "mass_effect_peak_mm": (1.5, 4.0),
        "margin_mm": 5.0,
    },
    "multifocal": {
        "count": (3, 8),
        "radius_mm": (2.5, 5.0),
        "roughness": 0.25,
        "margin_mm": 4.0,
    },
    "min_radius_voxels": 1.0,
    "white_matter_threshold": 0.7,
}
CORE, OEDEMA = 1, 2  # label values (BraTS: 1 necrotic/non-enhancing core, 2 oedema)


@dataclass
class Lesions:
    """Lesions placed in one subject, on the subject's voxel grid.

    tissue: (3, X, Y, Z) float32 gm/wm/csf maps after the mass effect; they sum to `mask`.
    mask: (X, Y, Z) uint8 brain mask after the mass effect.
    core, oedema: (X, Y, Z) float32 fraction of each voxel covered by lesion core / oedema;
        core + oedema <= 1, both 0 outside the brain.
    label: (X, Y, Z) uint8 where core + oedema > 0.5 inside the brain: CORE where core ≥ oedema,
        else OEDEMA; 0 elsewhere.
    kind: "tumour" or "multifocal"; centres: the voxel centres of the lesions.
    """

    tissue: np.ndarray
    mask: np.ndarray
    core: np.ndarray
    oedema: np.ndarray
    label: np.ndarray
    kind: str
    centres: list[tuple[int, int, int]]


def identity_coords(shape: tuple[int, ...]) -> torch.Tensor:
    """(3, *shape) normalised voxel coordinates in [-1, 1] along each axis (align_corners=True).

    The common currency of every warp here: a deformation is a map from output voxels to these
    coordinates in the source, whatever the source's size.
    """
    axes = [torch.linspace(-1.0, 1.0, n) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def partition_brain(tissue: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brain mask (tissue sum > 0.5) and the tissue maps rescaled to sum to exactly 1 inside it.

    Tissue maps are probabilities of one partition of the brain: keeping gm + wm + csf == mask
    lets the renderer treat them as mixing weights without a leftover or double-counted class.
    """
    total = tissue.sum(0)
    mask = total > 0.5
    tissue = np.where(mask, tissue / np.maximum(total, 1e-6), 0.0).astype(np.float32)
    return tissue, mask.astype(np.uint8)


def warp_tissue(tissue: np.ndarray | torch.Tensor, coords: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Sample tissue maps (3, ...) at `coords` (3, *out_shape) and restore the brain partition.

    Trilinear interpolation is linear, so the warped maps sum to the warped (fractional) mask;
    thresholding that sum at 0.5 gives a binary mask that moves with the anatomy.
    """
    source = torch.as_tensor(tissue, dtype=torch.float32)[None]
    grid = torch.as_tensor(coords, dtype=torch.float32).flip(0).permute(1, 2, 3, 0)[None]
    warped = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return partition_brain(warped[0].numpy())


def simulate_lesions(tissue: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator,
                     kind: str | None = None) -> Lesions:
    """Lesions of `kind` (drawn from PARAMETERS["kinds"] when None) in one subject's tissue maps."""
    if kind is None:
        kinds = PARAMETERS["kinds"]
        kind = str(rng.choice(list(kinds), p=list(kinds.values())))
    if kind == "tumour":
        return tumour(tissue, spacing, rng)
    if kind == "multifocal":
        return multifocal(tissue, spacing, rng)
    raise ValueError(f"lesion kind must be one of {sorted(PARAMETERS['kinds'])}, got {kind!r}")


def tumour(tissue: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator) -> Lesions:
    """A tumour-like lesion: irregular core, oedema rim, slight mass effect.

    The centre lies in deep white matter, where gliomas typically grow. The mass effect is applied
    before the lesion is drawn, so the lesion sits in the cavity it made. Oedema is weighted by
    white matter (half by grey matter, none in CSF) because vasogenic oedema tracks along fibres.
    """
    p = PARAMETERS["tumour"]
    spacing = np.asarray(spacing, dtype=float)
    core_mm = rng.uniform(*p["core_radius_mm"])
    oedema_mm = core_mm * rng.uniform(*p["oedema_radius_factor"])
    centre = _pick_sites(tissue, spacing, core_mm + p["margin_mm"], 1, rng)[0]
    tissue, mask = _mass_effect(tissue, centre, core_mm, spacing, rng)
    core = _blob(mask.shape, centre, _radius_voxels(core_mm, spacing), p["core_roughness"], rng) * mask
    rim = _blob(mask.shape, centre, _radius_voxels(oedema_mm, spacing), p["oedema_roughness"], rng)
    parenchyma = np.clip(tissue[1] + 0.5 * tissue[0], 0.0, 1.0)
    oedema = (1.0 - core) * rim * parenchyma
    return _lesions(tissue, mask, core, oedema, "tumour", [centre])


def multifocal(tissue: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator) -> Lesions:
    """Several small irregular foci in white matter, without oedema or mass effect.

    They test whether a detector finds small lesions, the case where reconstruction-based methods
    most often fail. Foci are rendered like solid lesion (the `core` fraction).
    """
    p = PARAMETERS["multifocal"]
    spacing = np.asarray(spacing, dtype=float)
    count = int(rng.integers(p["count"][0], p["count"][1] + 1))
    centres = _pick_sites(tissue, spacing, p["margin_mm"], count, rng)
    _, mask = partition_brain(tissue)
    core = np.zeros(mask.shape, np.float32)
    for centre in centres:
        radius = _radius_voxels(rng.uniform(*p["radius_mm"]), spacing)
        core = np.maximum(core, _blob(mask.shape, centre, radius, p["roughness"], rng))
    return _lesions(tissue, mask, core * mask, np.zeros_like(core), "multifocal", centres)


def _lesions(tissue, mask, core, oedema, kind, centres) -> Lesions:
    """Bundle the fractions with their label (more than half a voxel of lesion, inside the brain;
    the larger fraction names the class)."""
    lesion = (core + oedema > 0.5) & (mask > 0)
    label = (lesion * np.where(core >= oedema, CORE, OEDEMA)).astype(np.uint8)
    return Lesions(tissue=tissue, mask=mask, core=core.astype(np.float32), oedema=oedema.astype(np.float32),
                   label=label, kind=kind, centres=[tuple(int(c) for c in centre) for centre in centres])


def _radius_voxels(radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Per-axis radius in voxels, at least PARAMETERS["min_radius_voxels"].

    The floor keeps small lesions visible (and their label non-empty) on coarse test grids.
    """
    return np.maximum(radius_mm / spacing, PARAMETERS["min_radius_voxels"])


def _pick_sites(tissue: np.ndarray, spacing: np.ndarray, margin_mm: float, count: int,
                rng: np.random.Generator) -> np.ndarray:
    """`count` distinct voxels in white matter at least `margin_mm` inside the brain.

    The margin keeps a lesion inside the brain. On tiny grids where no voxel qualifies, the
    voxels that are most white matter and deepest are used instead.
    """
    wm = tissue[1]
    depth = ndimage.distance_transform_edt(tissue.sum(0) > 0.5, sampling=spacing)
    sites = np.argwhere((wm > PARAMETERS["white_matter_threshold"]) & (depth >= margin_mm))
    if len(sites) == 0:
        score = wm * depth
        sites = np.argwhere(score >= 0.9 * score.max())
    chosen = rng.choice(len(sites), size=min(count, len(sites)), replace=False)
    return sites[np.sort(chosen)]


def _blob(shape: tuple[int, ...], centre: np.ndarray, radius: np.ndarray, roughness: float,
          rng: np.random.Generator) -> np.ndarray:
    """Fraction (0..1) of each voxel covered by an irregular blob.

    A sphere whose surface is pushed in and out by smoothed noise gives the lobulated outline of
    real lesions; a one-voxel linear ramp at the surface models partial volume. Only a box around
    the centre is computed, so the cost does not grow with the grid.
    """
    half = np.ceil(radius * (1.0 + 3.0 * roughness)).astype(int) + 1
    box = tuple(slice(max(c - h, 0), min(c + h + 1, n)) for c, h, n in zip(centre, half, shape))
    axes = np.ogrid[box]
    r = np.sqrt(sum(((a - c) / s) ** 2 for a, c, s in zip(axes, centre, radius)))
    noise = ndimage.gaussian_filter(rng.standard_normal(r.shape), sigma=np.maximum(0.4 * radius, 0.7))
    noise /= noise.std() + 1e-6
    out = np.zeros(shape, np.float32)
    out[box] = np.clip(0.5 + (1.0 - r + roughness * noise) * radius.min(), 0.0, 1.0)
    return out


def _mass_effect(tissue: np.ndarray, centre: np.ndarray, radius_mm: float, spacing: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Push tissue radially away from `centre`, as a growing tumour does.

    Tissue at x is taken from x - u(x), u(x) = a (x - c) exp(-|x - c|² / 2s²) with s = 1.5 radius:
    the displacement peaks (at a chosen 1.5-4 mm) at |x - c| = s, vanishes far away, and the map
    cannot fold because a <= 0.5 < 1.
    """
    s = 1.5 * radius_mm
    peak = rng.uniform(*PARAMETERS["tumour"]["mass_effect_peak_mm"])
    a = min(peak / (s * np.exp(-0.5)), 0.5)
    shape = tissue.shape[1:]
    offsets_mm = np.meshgrid(*[(np.arange(n) - c) * d for n, c, d in zip(shape, centre, spacing)],
                             indexing="ij", sparse=True)
    falloff = a * np.exp(-sum(o**2 for o in offsets_mm) / (2 * s**2))
    coords = identity_coords(shape)
    for axis, (offset, n, d) in enumerate(zip(offsets_mm, shape, spacing)):
        shift_normalised = offset * falloff / d * 2.0 / (n - 1)
        coords[axis] -= torch.from_numpy(shift_normalised.astype(np.float32))
    return warp_tissue(tissue, coords)
