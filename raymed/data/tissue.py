"""Tissue probability maps for scans that come without them: a three-class Gaussian mixture of
the foreground intensities, in place of the SPM segmentation the cycle-translation paper used.

The classes are ordered by mean intensity and take the TISSUES channels in that order (darkest
first). On T1 and FLAIR that is CSF, then grey/white matter in the contrast's order; what a
translation model needs is that a class means the same intensity band in every subject, which the
ordering gives. On scans that are not skull-stripped the foreground is the head, so the classes
mix scalp and skull with brain tissue.
"""

from __future__ import annotations

import numpy as np
from sklearn.mixture import GaussianMixture

from raymed.errors import DataError

CLASSES = 3
FIT_VOXELS = 200_000  # the fit sees at most this many foreground voxels (evenly spaced)


def gmm_tissue(image: np.ndarray, mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """(CLASSES, X, Y, Z) posterior probabilities of a Gaussian mixture fitted to `image` inside
    `mask`, classes by ascending mean; zero outside the mask."""
    values = image[mask].astype(np.float64).reshape(-1, 1)
    if len(values) < 10 * CLASSES:
        raise DataError(f"tissue_labels=gmm: {len(values)} foreground voxels are too few for a {CLASSES}-class fit")
    step = max(1, len(values) // FIT_VOXELS)
    mixture = GaussianMixture(CLASSES, random_state=seed).fit(values[::step])
    order = np.argsort(mixture.means_[:, 0])
    maps = np.zeros((CLASSES, *image.shape), np.float32)
    maps[:, mask] = mixture.predict_proba(values)[:, order].T
    return maps
