"""Report figures as PNG bytes (matplotlib, Agg backend: no display needed).

Axial slices of the RAS grid are drawn in neurological convention: the subject's right on the
viewer's right, anterior up.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from raymed.evaluation.metrics import ScoreHistogram  # noqa: E402
from raymed.evaluation.protocol import Example  # noqa: E402
from raymed.methods.base import Method  # noqa: E402

COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
LESION = ListedColormap(["lime"])


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _show(ax, image: np.ndarray, **kwargs):
    """Draw an (X, Y) slice with x to the right and anterior (y) up."""
    handle = ax.imshow(image.T, origin="lower", interpolation="nearest", **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])
    return handle


@torch.no_grad()
def slice_grid(method: Method, best: list[Example], worst: list[Example], threshold: float | None,
               channel: int = 0, channel_name: str = "input") -> bytes:
    """Rows: the best and worst lesion slices by per-slice AP. Columns: input, reconstruction
    (when the method has one), anomaly map, ground truth with the thresholded map outlined."""
    rows = [("best", e) for e in best] + [("worst", e) for e in worst]
    if not rows:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.text(0.5, 0.5, "no lesion slices in this split", ha="center", va="center")
        ax.axis("off")
        return _png(fig)
    device = method.device
    batch = torch.from_numpy(np.stack([e.image for _, e in rows])).to(device)
    recon = method.reconstruction(batch)
    recon = recon.float().cpu().numpy() if recon is not None else None
    columns = [channel_name] + (["reconstruction"] if recon is not None else []) + ["anomaly map", "ground truth"]
    vmax = max(float(np.percentile(e.map[e.mask], 99.5)) if e.mask.any() else 0.0 for _, e in rows) or 1.0
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.2 * len(columns), 2.2 * len(rows) + 0.9),
                             squeeze=False, layout="constrained")
    for r, (kind, example) in enumerate(rows):
        image = example.image[channel]
        panels = [image] + ([recon[r][channel]] if recon is not None else [])
        for c, panel in enumerate(panels):
            _show(axes[r, c], panel, cmap="gray", vmin=0, vmax=1)
        heat = _show(axes[r, len(panels)], np.where(example.mask, example.map, np.nan), cmap="inferno",
                     vmin=0, vmax=vmax)
        truth = axes[r, len(panels) + 1]
        _show(truth, image, cmap="gray", vmin=0, vmax=1)
        _show(truth, np.where(example.label, 1.0, np.nan), cmap=LESION, vmin=0, vmax=1, alpha=0.5)
        if threshold is not None:
            predicted = (example.map >= threshold) & example.mask
            if predicted.any():
                truth.contour(predicted.T.astype(float), levels=[0.5], colors="red", linewidths=1.0, origin="lower")
        axes[r, 0].set_ylabel(f"{kind}: {example.subject}\nz={example.index}  AP {example.ap:.2f}", fontsize=8)
    for c, name in enumerate(columns):
        axes[0, c].set_title(name if name != "ground truth" else "lesion (green)\nmap ≥ threshold (red)",
                             fontsize=9)
    fig.colorbar(heat, ax=axes[-1, len(columns) - 2], location="bottom", label="anomaly score")
    fig.suptitle(f"{method.name}: best and worst test slices by per-slice average precision", fontsize=10)
    return _png(fig)


def curves(histograms: dict[str, ScoreHistogram]) -> bytes:
    """ROC and precision-recall curves of the pixel scores, one line per method."""
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(10, 4.4))
    prevalence = None
    for colour, (name, histogram) in zip(COLOURS, histograms.items()):
        metrics, curve = histogram.metrics(), histogram.curves()
        roc.plot(curve["fpr"], curve["tpr"], color=colour, label=f"{name} (AUROC {metrics['auroc']:.3f})")
        pr.plot(curve["recall"], curve["precision"], color=colour, label=f"{name} (AP {metrics['auprc']:.3f})")
        prevalence = histogram.positives / max(histogram.positives + histogram.negatives, 1)
    roc.plot([0, 1], [0, 1], "k:", lw=0.8, label="chance")
    if prevalence is not None:
        pr.axhline(prevalence, color="k", ls=":", lw=0.8, label=f"chance (prevalence {prevalence:.3f})")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (brain voxels, test)",
            xlim=(0, 1), ylim=(0, 1.01))
    pr.set(xlabel="recall", ylabel="precision", title="Precision-recall (brain voxels, test)",
           xlim=(0, 1), ylim=(0, 1.01))
    for ax in (roc, pr):
        ax.legend(loc="lower right" if ax is roc else "upper right", fontsize=8)
        ax.grid(alpha=0.3)
    return _png(fig)


def score_histograms(panels: dict[str, dict]) -> bytes:
    """Per method: pixel scores of healthy vs lesion voxels, and slice scores of healthy vs
    lesion slices, with the operating thresholds. `panels[name]` holds "histogram",
    "slice_scores", "slice_labels", "pixel_threshold", "image_threshold"."""
    fig, axes = plt.subplots(len(panels), 2, figsize=(10, 3.2 * len(panels)), squeeze=False)
    for row, (name, panel) in enumerate(panels.items()):
        pixel, image = axes[row]
        density = panel["histogram"].densities()
        centres = (density["edges"][1:] + density["edges"][:-1]) / 2
        pixel.step(centres, density["negative"], where="mid", color="tab:blue", label="healthy voxels")
        pixel.step(centres, density["positive"], where="mid", color="tab:red", label="lesion voxels")
        pixel.set_yscale("log")
        pixel.set(xlabel="pixel anomaly score", ylabel="fraction of voxels", title=f"{name}: pixel scores")
        scores, labels = panel["slice_scores"], panel["slice_labels"]
        low, high = (float(scores.min()), float(scores.max())) if len(scores) else (0.0, 1.0)
        edges = np.linspace(low, max(high, low + 1e-6), 31)
        image.hist(scores[~labels], bins=edges, color="tab:blue", alpha=0.6, label="healthy slices")
        image.hist(scores[labels], bins=edges, color="tab:red", alpha=0.6, label="lesion slices")
        image.set(xlabel="slice score", ylabel="slices", title=f"{name}: slice scores")
        for ax, key in ((pixel, "pixel_threshold"), (image, "image_threshold")):
            if panel.get(key) is not None:
                ax.axvline(panel[key], color="k", ls="--", lw=1, label="threshold (val)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def image_grid(images: np.ndarray, rows: int, title: str, row_labels: list[str] | None = None) -> bytes:
    """(N, C, H, W) images in [0, 1], first channel, `rows` rows filled left to right."""
    cols = int(np.ceil(len(images) / rows))
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(images):
            _show(ax, images[i, 0], cmap="gray", vmin=0, vmax=1)
        else:
            ax.axis("off")
    for r, label in enumerate(row_labels or []):
        axes[r, 0].set_ylabel(label, fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _png(fig)


def similarity_distributions(distributions: dict[str, np.ndarray]) -> bytes:
    """Histograms of max-MS-SSIM values, one per set pairing (S_S, S_R, R_R)."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    edges = np.linspace(0, 1, 41)
    for colour, (name, values) in zip(COLOURS, distributions.items()):
        ax.hist(values, bins=edges, histtype="step", lw=1.5, color=colour, density=True,
                label=f"{name} (median {np.median(values):.3f})")
    ax.set(xlabel="highest MS-SSIM to another image", ylabel="density",
           title="Max-similarity: S_S mode collapse, S_R memorisation, R_R real baseline")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def feature_pca(real: np.ndarray, synthetic: np.ndarray) -> bytes:
    """The two-sample CNN's features of real and synthetic test images on their first two
    principal components, each set with its one-standard-deviation ellipse."""
    from matplotlib.patches import Ellipse
    from sklearn.decomposition import PCA

    pca = PCA(2).fit(np.concatenate([real, synthetic]))
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for colour, (name, features) in zip(("tab:blue", "tab:orange"), (("real", real), ("synthetic", synthetic))):
        points = pca.transform(features)
        ax.scatter(points[:, 0], points[:, 1], s=4, alpha=0.35, color=colour, label=name)
        values, vectors = np.linalg.eigh(np.cov(points.T))
        angle = float(np.degrees(np.arctan2(vectors[1, -1], vectors[0, -1])))
        ax.add_patch(Ellipse(points.mean(0), 2 * np.sqrt(values[-1]), 2 * np.sqrt(values[0]), angle=angle,
                             fill=False, color=colour, lw=2))
    explained = pca.explained_variance_ratio_
    ax.set(xlabel=f"PC 1 ({explained[0]:.0%})", ylabel=f"PC 2 ({explained[1]:.0%})",
           title="Two-sample CNN features (test sets), 1 SD ellipses")
    ax.legend(fontsize=8, markerscale=3)
    return _png(fig)


def template_matches(synthetic: np.ndarray, mosaic: np.ndarray, corners: np.ndarray, ncc: np.ndarray,
                     count: int = 6) -> bytes:
    """The synthetic images with the highest template-matching peaks next to the lattice window they match."""
    h, w = synthetic.shape[-2:]
    order = np.argsort(-ncc)[:count]
    fig, axes = plt.subplots(2, len(order), figsize=(1.5 * len(order), 3.4), squeeze=False)
    for col, i in enumerate(order):
        y, x = corners[i]
        _show(axes[0, col], synthetic[i, 0], cmap="gray", vmin=0, vmax=1)
        _show(axes[1, col], mosaic[y:y + h, x:x + w], cmap="gray", vmin=0, vmax=1)
        axes[0, col].set_title(f"NCC {ncc[i]:.2f}", fontsize=8)
    axes[0, 0].set_ylabel("synthetic", fontsize=8)
    axes[1, 0].set_ylabel("best real match", fontsize=8)
    return _png(fig)
