"""The built-in demo cohort: synthetic subjects made from real MNI152 anatomy, with no download.

Each subject is the MNI152 (2009a, symmetric) grey/white-matter maps and brain mask that ship inside
the nilearn wheel, moved by a random affine + elastic deformation and rendered in T1-, T2- and
FLAIR-like contrasts with per-subject contrast, bias field and noise. Training subjects are
lesion-free (or, with `train_lesions`, lesioned too: labelled training data for the supervised
baselines of the label-efficiency study); validation and test subjects carry the evaluation lesions
of `raymed.data.lesions`.
The layout is BraTS-like, so the cohort is read by the same dataset code as real data:

    OUT/demo-000/demo-000_{t1,t2,flair}.nii.gz   float32 images (0 outside the brain)
    OUT/demo-000/demo-000_seg.nii.gz             uint8 lesion labels: 1 core, 2 oedema (zero for healthy subjects)
    OUT/demo-000/demo-000_mask.nii.gz            uint8 brain mask
    OUT/demo-000/demo-000_{gm,wm,csf}.nii.gz     float32 tissue maps, summing to the brain mask
    OUT/splits.json                              {"demo-000": "train", ...}
    OUT/cohort.json                              the parameters used
"""

from __future__ import annotations

import functools
import json
import numbers
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Rand3DElastic, RandBiasField, RandRicianNoise
from monai.utils import convert_to_numpy, convert_to_tensor
from nilearn import datasets

from raymed.data import lesions
from raymed.data.io import join, write_bytes_atomic, write_volume
from raymed.data.splits import deal
from raymed.errors import ConfigError

SPLIT_FRACTIONS = {"val": 0.15, "test": 0.25}
MIN_SIZE = 16

# Mean intensity per class: gm, wm, csf, lesion core, oedema. Ratios follow the usual appearance
# (T1: WM > GM > CSF; T2: CSF > GM > WM; FLAIR: CSF suppressed, GM > WM, lesions brightest);
# lesions are dark on T1 and bright on T2/FLAIR.
INTENSITIES = {
    "t1": (0.65, 1.00, 0.20, 0.35, 0.55),
    "t2": (0.65, 0.45, 1.00, 0.90, 0.80),
    "flair": (0.70, 0.50, 0.10, 1.10, 1.30),
}

# Per-subject variation. The deformation runs on a coarse grid (units: voxels of that grid, about
# 7.3 mm); sigma and magnitude give smooth displacements of a few mm, like anatomical variation.
VARIATION = {
    "deformation_grid": 32,
    "rotate_rad": 0.12,
    "scale": 0.08,
    "shear": 0.03,
    "translate_voxels": 0.5,
    "elastic_sigma_voxels": (2.5, 4.0),
    "elastic_magnitude_voxels": (12.0, 24.0),
    "contrast_jitter": 0.08,
    "bias_coeff": 0.1,
    "noise_std": (0.01, 0.03),
}


def build_demo_cohort(out: str | os.PathLike, subjects: int = 16, size: int = 128, seed: int = 0,
                      progress: Callable[[str], None] | None = None, train_lesions: bool = False) -> dict:
    """Write a demo cohort of `subjects` volumes of `size`³ voxels to `out` (a folder or s3:// URI).

    Subject i depends only on (seed, i), so a bigger cohort extends a smaller one's anatomy.
    `progress`, if given, is called with one line per subject. Returns a summary:
    {"out", "subjects": {split: count}, "size", "spacing_mm", "seed", "seconds"}.
    """
    _check(subjects, size)
    subjects, size = int(subjects), int(size)
    started = time.perf_counter()
    out = str(out)
    template, template_affine = mni_tissue()
    affine = cube_affine(template_affine, template.shape[-1], size)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    split_seed, *subject_seeds = np.random.SeedSequence(seed).spawn(subjects + 1)
    ids = [f"demo-{i:03d}" for i in range(subjects)]
    splits = deal(ids, split_seed, **SPLIT_FRACTIONS)
    records, writing = {}, []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for subject, subject_seed in zip(ids, subject_seeds):
            tick = time.perf_counter()
            volumes, records[subject] = build_subject(
                template, size, spacing, splits[subject], np.random.default_rng(subject_seed), train_lesions)
            _wait(writing)
            writing = _write_subject(pool, out, subject, volumes, affine)
            if progress:
                progress(f"{subject} {splits[subject]:<5} {records[subject]['lesion']:<10} "
                         f"{time.perf_counter() - tick:.1f}s")
        _wait(writing)
    _write_json(join(out, "splits.json"), splits)
    _write_json(join(out, "cohort.json"), {
        "subjects": subjects, "size": size, "seed": seed, "spacing_mm": spacing[0], "train_lesions": train_lesions,
        "template": "MNI152 2009a symmetric GM/WM/brain mask from nilearn, 2 mm, padded to a cube",
        "split_fractions": SPLIT_FRACTIONS, "intensities": INTENSITIES, "variation": VARIATION,
        "lesions": {"generator": "raymed.data.lesions (evaluation only)",
                    "parameters": lesions.PARAMETERS,
                    "labels": {"core": lesions.CORE, "oedema": lesions.OEDEMA}, "per_subject": records},
    })
    counts = {name: sum(s == name for s in splits.values()) for name in ("train", "val", "test")}
    return {"out": out, "subjects": counts, "size": size, "spacing_mm": spacing[0], "seed": seed,
            "seconds": round(time.perf_counter() - started, 2)}


def _check(subjects: int, size: int) -> None:
    """Reject counts and sizes the cohort cannot be built with, naming the argument."""
    for name, value, minimum in (("subjects", subjects, 1), ("size", size, MIN_SIZE)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")


@functools.lru_cache(maxsize=1)
def mni_tissue() -> tuple[torch.Tensor, np.ndarray]:
    """GM/WM/CSF maps (3, N, N, N) of MNI152 at 2 mm, padded to a cube, and the cube's affine.

    nilearn's loaders read files inside the installed package (no fetcher, no data directory), so
    the cohort builds offline. CSF is what the brain mask holds beyond GM and WM. The cube lets one
    isotropic spacing serve every output size. Cached: nilearn resamples to 2 mm in ~2-3 s.
    """
    mask_img = nib.as_closest_canonical(datasets.load_mni152_brain_mask(resolution=2))
    mask = mask_img.get_fdata(dtype=np.float32)
    gm, wm = (nib.as_closest_canonical(load(resolution=2)).get_fdata(dtype=np.float32) * mask
              for load in (datasets.load_mni152_gm_template, datasets.load_mni152_wm_template))
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    tissue, _ = lesions.partition_brain(np.stack([gm, wm, csf]))
    n = max(mask.shape)
    before = np.array([(n - s) // 2 for s in mask.shape])
    tissue = np.pad(tissue, [(0, 0)] + [(b, n - s - b) for b, s in zip(before, mask.shape)])
    affine = mask_img.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ before
    return torch.from_numpy(tissue), affine


def cube_affine(affine: np.ndarray, n: int, size: int) -> np.ndarray:
    """Affine of a size³ grid over the same cube as an n³ grid, corner voxel centres aligned.

    Matches `align_corners=True` sampling, so images line up with the template in any viewer.
    """
    scale = (n - 1) / (size - 1)
    return affine @ np.diag([scale, scale, scale, 1.0])


def build_subject(template: torch.Tensor, size: int, spacing: tuple[float, float, float], split: str,
                  rng: np.random.Generator, train_lesions: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """One subject's volumes (name -> array) and a record of its lesions for cohort.json."""
    tissue, mask = lesions.warp_tissue(template, subject_coords(size, rng))
    core = oedema = np.zeros(mask.shape, np.float32)
    seg = np.zeros(mask.shape, np.uint8)
    record = {"split": split, "lesion": "none"}
    if split != "train" or train_lesions:
        found = lesions.simulate_lesions(tissue, spacing, rng)
        tissue, mask, core, oedema, seg = found.tissue, found.mask, found.core, found.oedema, found.label
        record.update(lesion=found.kind, centres=found.centres, voxels=int(np.count_nonzero(seg)))
    images = render(tissue, mask, core, oedema, rng)
    return {**images, "seg": seg, "mask": mask, "gm": tissue[0], "wm": tissue[1], "csf": tissue[2]}, record


def subject_coords(size: int, rng: np.random.Generator) -> torch.Tensor:
    """Where each of the size³ output voxels samples the template: (3, size, size, size) in [-1, 1].

    MONAI's Rand3DElastic (random affine + smooth elastic field) is applied to an identity
    coordinate map, so the transformed map *is* the sampling grid. The field is smooth, so it is
    computed on a 32³ grid and upsampled: milliseconds instead of seconds at 128³, and the same
    subject anatomy at every output size. 'border' padding keeps coordinates outside the field of
    view pointing at the (empty) edge of the template.
    """
    v = VARIATION
    elastic = Rand3DElastic(
        sigma_range=v["elastic_sigma_voxels"], magnitude_range=v["elastic_magnitude_voxels"], prob=1.0,
        rotate_range=(v["rotate_rad"],) * 3, shear_range=(v["shear"],) * 6,
        translate_range=(v["translate_voxels"],) * 3, scale_range=(v["scale"],) * 3,
        mode="bilinear", padding_mode="border")
    elastic.set_random_state(seed=int(rng.integers(2**31)))
    coarse = convert_to_tensor(elastic(lesions.identity_coords((v["deformation_grid"],) * 3)))
    return F.interpolate(coarse[None], size=(size,) * 3, mode="trilinear", align_corners=True)[0]


def render(tissue: np.ndarray, mask: np.ndarray, core: np.ndarray, oedema: np.ndarray,
           rng: np.random.Generator) -> dict[str, np.ndarray]:
    """T1/T2/FLAIR images as intensity-weighted sums of the class fractions, then bias and noise.

    Per-subject jitter of the class means mimics scanner/protocol differences; the multiplicative
    bias field (MONAI RandBiasField) mimics coil inhomogeneity; Rician noise (MONAI RandRicianNoise)
    is the magnitude-image noise of MRI. Outside the brain the images are 0, like skull-stripped
    BraTS data.
    """
    v = VARIATION
    fractions = np.concatenate([tissue * (1.0 - core - oedema), core[None], oedema[None]])
    images = {}
    for name, means in INTENSITIES.items():
        jitter = rng.uniform(1 - v["contrast_jitter"], 1 + v["contrast_jitter"], len(means))
        image = np.tensordot((np.asarray(means) * jitter).astype(np.float32), fractions, axes=1)[None]
        bias = RandBiasField(degree=3, coeff_range=(-v["bias_coeff"], v["bias_coeff"]), prob=1.0)
        noise = RandRicianNoise(prob=1.0, std=rng.uniform(*v["noise_std"]), sample_std=False)
        for transform in (bias, noise):
            transform.set_random_state(seed=int(rng.integers(2**31)))
            image = transform(image)
        images[name] = (convert_to_numpy(image)[0] * mask).astype(np.float32)
    return images


def _write_subject(pool: ThreadPoolExecutor, out: str, subject: str, volumes: dict[str, np.ndarray],
                   affine: np.ndarray) -> list[Future]:
    """Start writing a subject's volumes in the background.

    gzip releases the GIL and is a third of the build time, so it overlaps with computing the
    next subject; the caller waits for them before writing another, bounding memory to two subjects.
    """
    return [pool.submit(write_volume, join(out, subject, f"{subject}_{name}.nii.gz"), array, affine)
            for name, array in volumes.items()]


def _wait(jobs: list[Future]) -> None:
    """Wait for writes to finish, raising the first error."""
    for job in jobs:
        job.result()


def _write_json(uri: str, data: dict) -> None:
    write_bytes_atomic(uri, (json.dumps(data, indent=2) + "\n").encode())
