"""Judging generated images.

- Paired metrics (MONAI): MAE, PSNR and SSIM of a generated image against its target, for paired
  translation and for the reconstruction fidelity of detectors. With a mask, MAE and PSNR count
  brain pixels only, while SSIM (a windowed statistic) is computed on images zeroed outside it.
- The GAN evaluation framework (DGM4MICCAI 2021, "An Explainable Framework for GAN Evaluation in
  Medical Imaging") for unpaired generators: real images split into RTr (what the generator
  learned) and RTs (held out), synthetic STr/STs of the same sizes; the classifier two-sample
  test and the distances in its features (`two_sample`), the structural layer (`structure`),
  batch-wise MMD² (the 3D-StyleGAN paper's), and the PCA / MS-SSIM / sample figures.

Images are (N, C, H, W) in [0, 1].
"""

from __future__ import annotations

import json

import numpy as np
import torch
from monai.metrics import MAEMetric, MMDMetric, PSNRMetric, SSIMMetric
from pydantic import Field

from raymed.config import Strict
from raymed.data.discovery import Case, discover
from raymed.data.io import join, write_bytes_atomic
from raymed.data.slices import SliceSet, load_slices
from raymed.data.splits import assign_splits, select
from raymed.errors import DataError
from raymed.evaluation.structure import diversity, max_similarity, template_matching
from raymed.evaluation.two_sample import frechet, mahalanobis, two_sample_test
from raymed.methods.base import Method


def paired_metrics(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """Mean MAE, PSNR (dB, data range 1) and SSIM over the batch; identical images give PSNR inf."""
    if prediction.shape != target.shape or prediction.ndim != 4:
        raise ValueError(f"expected two (N, C, H, W) batches of one shape, got {tuple(prediction.shape)} "
                         f"and {tuple(target.shape)}")
    prediction, target = prediction.float(), target.float()
    if mask is not None:
        keep = mask.bool().unsqueeze(1).expand_as(target)
        prediction, target = prediction * keep, target * keep
        error = (prediction - target).abs().flatten(1).sum(1) / keep.flatten(1).sum(1).clamp(min=1)
        mse = (prediction - target).pow(2).flatten(1).sum(1) / keep.flatten(1).sum(1).clamp(min=1)
        mae = float(error.mean())
        psnr = float((10 * torch.log10(1.0 / mse)).mean())
    else:
        mae = float(MAEMetric()(prediction, target).mean())
        psnr = float(PSNRMetric(max_val=1.0)(prediction, target).mean())
    ssim = float(SSIMMetric(spatial_dims=2, data_range=1.0)(prediction, target).mean())
    return {"mae": mae, "psnr": psnr, "ssim": ssim}


class GeneratorEvaluation(Strict):
    """How `raymed evaluate-generator` runs the framework."""

    n: int = Field(2000, ge=16, description="images per set: real sets are capped at n, synthetic sets match them")
    repeats: int = Field(5, ge=1, description="two-sample CNNs trained (the framework: 50)")
    epochs: int = Field(20, ge=1, description="epochs of each two-sample CNN")
    structural: int = Field(200, ge=8, description="images per set in the MS-SSIM and template-matching comparisons")
    seed: int = 0


def real_sets(cases: list[Case], data, n: int, seed: int) -> dict[str, SliceSet]:
    """RTr: the training split's healthy slices (what the generator learned); RTs: the held-out
    (val and test) subjects' healthy slices; each at most n, drawn by seed, in random order."""
    rng = np.random.default_rng(seed)
    sets = {}
    for name, subjects in (("RTr", select(cases, "train")), ("RTs", select(cases, "val") + select(cases, "test"))):
        slices = load_slices(subjects, data, healthy_only=True, min_brain=data.min_brain, skip_bad=data.skip_bad)
        if len(slices) < 8:
            raise DataError(f"{name}: {len(slices)} healthy slices in {len(subjects)} subjects; the framework needs "
                            "a few hundred (check the data's splits)")
        sets[name] = slices.take(rng.permutation(len(slices))[:n])
    return sets


@torch.no_grad()
def synthesise(method: Method, positions: np.ndarray, seed: int, batch: int = 256) -> np.ndarray:
    """One synthetic image per real one, conditioned on its slice position (conditional
    generators; the others ignore it), (N, C, H, W) float32."""
    method.nets.eval()
    generator = torch.Generator().manual_seed(seed)
    out = [method.sample(len(chunk), condition=torch.from_numpy(chunk), generator=generator).float().cpu().numpy()
           for chunk in np.array_split(positions.astype(np.float32), max(1, int(np.ceil(len(positions) / batch))))]
    return np.concatenate(out).clip(0, 1)


def two_sample_runs(images: dict[str, np.ndarray], settings: GeneratorEvaluation, progress) -> list[dict]:
    """The repeated two-sample tests as Ray tasks side by side; distances from each one's features."""
    import ray

    from raymed.console import start_ray

    start_ray()
    task = ray.remote(num_cpus=1)(two_sample_test)
    refs = [ray.put(images[k]) for k in ("RTr", "STr", "RTs", "STs")]
    pending = [task.remote(*refs, seed=settings.seed + r, epochs=settings.epochs) for r in range(settings.repeats)]
    order, runs = list(pending), {}
    while pending:
        done, pending = ray.wait(pending)
        for ref in done:
            run = ray.get(ref)
            run["mahalanobis"] = mahalanobis(run["fake_features"], run["real_features"])
            run["frechet"] = frechet(run["fake_features"], run["real_features"])
            runs[ref] = run
            progress(f"two-sample CNN {len(runs)}/{settings.repeats}: recall {run['recall']:.3f}, specificity "
                     f"{run['specificity']:.3f}, Mahalanobis {run['mahalanobis']:.2f}, Fréchet {run['frechet']:.2f}")
    return [runs[ref] for ref in order]


def batch_mmd(real: np.ndarray, synthetic: np.ndarray, batch: int = 64) -> float:
    """Mean MMD² (MONAI's MMDMetric) over batches of real and synthetic images."""
    metric, values = MMDMetric(), []
    for start in range(0, min(len(real), len(synthetic)) - 1, batch):
        stop = min(start + batch, len(real), len(synthetic))
        if stop - start >= 2:
            values.append(float(metric(torch.from_numpy(real[start:stop]), torch.from_numpy(synthetic[start:stop]))))
    return float(np.mean(values))


def summary(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "sd": float(np.std(values)), "runs": [float(v) for v in values]}


def evaluate_generator(run: str, source: str, out: str, settings: GeneratorEvaluation,
                       pattern: str | None = None, progress=print) -> dict:
    """The GAN evaluation framework on a generator run: metrics.json, report.md and figures in `out`."""
    from raymed.engine.checkpoint import load_method
    from raymed.evaluation import figures
    from raymed.evaluation.report import METRICS_FILE, REPORT_FILE, clean

    method, state = load_method(run)
    if "generator" not in method.kind:
        raise DataError(f"{run}: {method.name} is not a generator (kind: {', '.join(method.kind)})")
    cases = assign_splits(discover(source, pattern), seed=method.config.data.split_seed)
    real = real_sets(cases, method.config.data, settings.n, settings.seed)
    progress(f"real sets: RTr {len(real['RTr'])} training slices, RTs {len(real['RTs'])} held-out slices")
    images = {k: v.image for k, v in real.items()}
    images["STr"] = synthesise(method, real["RTr"].position, settings.seed + 1)
    images["STs"] = synthesise(method, real["RTs"].position, settings.seed + 2)
    runs = two_sample_runs(images, settings, progress)

    q = min(settings.structural, len(images["STs"]), len(images["RTr"]))
    synthetic, learned = images["STs"][:q], images["RTr"][:q]
    similarity = {"S_S": max_similarity(synthetic, synthetic, same_set=True),
                  "S_R": max_similarity(synthetic, learned), "R_R": max_similarity(learned, learned, same_set=True)}
    matching = template_matching(synthetic, learned)
    progress(f"structure: median max-MS-SSIM S_S {np.median(similarity['S_S']):.3f}, S_R "
             f"{np.median(similarity['S_R']):.3f}, R_R {np.median(similarity['R_R']):.3f}")
    metrics = {
        "generator": {"method": method.name, "checkpoint": state["uri"], "data": source},
        "settings": settings.model_dump(),
        "sets": {k: len(v) for k, v in images.items()},
        "two_sample": {k: summary([r[k] for r in runs]) for k in ("recall", "specificity", "accuracy")},
        "distances": {k: summary([r[k] for r in runs]) for k in ("mahalanobis", "frechet")},
        "mmd": batch_mmd(images["RTs"], images["STs"]),
        "structure": {
            **{k: {"median": float(np.median(v)), "mean": float(v.mean())} for k, v in similarity.items()},
            "diversity": {"synthetic": diversity(images["STs"], 4 * q, settings.seed),
                          "real": diversity(images["RTs"], 4 * q, settings.seed)},
            "template_matching": {"ncc_mean": float(matching["ncc"].mean()), "ncc_max": float(matching["ncc"].max())},
        },
    }
    files = {
        "samples.png": sample_grid(method, settings.seed),
        "similarity.png": figures.similarity_distributions(similarity),
        "pca.png": figures.feature_pca(runs[0]["real_features"], runs[0]["fake_features"]),
        "matches.png": figures.template_matches(synthetic, matching["mosaic"], matching["corner"], matching["ncc"]),
    }
    for name, data in files.items():
        write_bytes_atomic(join(out, name), data)
    write_bytes_atomic(join(out, METRICS_FILE), json.dumps(clean(metrics), indent=2).encode())
    write_bytes_atomic(join(out, REPORT_FILE), generator_report(metrics, list(files)).encode())
    return metrics


def sample_grid(method: Method, seed: int, rows: int = 4, cols: int = 8) -> bytes:
    """A grid of samples; each row at one relative slice position (conditional generators vary by row)."""
    from raymed.evaluation import figures

    positions = np.repeat(np.linspace(0.1, 0.9, rows), cols)
    images = synthesise(method, positions, seed)
    return figures.image_grid(images, rows, f"{method.name} samples", [f"position {p:.2f}" for p in positions[::cols]])


GENERATOR_COLUMNS = [
    ("recall", ("two_sample", "recall", "mean"), ".3f"),
    ("specificity", ("two_sample", "specificity", "mean"), ".3f"),
    ("Mahalanobis", ("distances", "mahalanobis", "mean"), ".2f"),
    ("Fréchet", ("distances", "frechet", "mean"), ".2f"),
    ("MMD²", ("mmd",), ".3g"),
    ("S_S", ("structure", "S_S", "median"), ".3f"),
    ("S_R", ("structure", "S_R", "median"), ".3f"),
    ("R_R", ("structure", "R_R", "median"), ".3f"),
    ("MS-SSIM diversity", ("structure", "diversity", "synthetic"), ".3f"),
    ("NCC max", ("structure", "template_matching", "ncc_max"), ".3f"),
]


def generator_report(metrics: dict, figures: list[str]) -> str:
    from raymed.evaluation.report import fmt, lookup, markdown_table

    g, runs = metrics["generator"], metrics["settings"]["repeats"]
    row = [g["method"]] + [fmt(lookup(metrics, path), spec) for _, path, spec in GENERATOR_COLUMNS]
    sd = {k: metrics[group][k]["sd"] for group, k in (("two_sample", "recall"), ("two_sample", "specificity"),
                                                     ("distances", "mahalanobis"), ("distances", "frechet"))}
    lines = [
        f"# Generator evaluation: {g['method']}", "",
        f"Checkpoint `{g['checkpoint']}`, data `{g['data']}`; sets {metrics['sets']}.", "",
        markdown_table(["method"] + [name for name, _, _ in GENERATOR_COLUMNS], [row]), "",
        f"- Two-sample CNN ({runs} runs), SD over runs: recall {sd['recall']:.3f}, specificity {sd['specificity']:.3f}. "
        "0.5 each is a generator the CNN cannot tell from real; lower distances are better.",
        f"- SD over runs: Mahalanobis {sd['mahalanobis']:.2f}, Fréchet {sd['frechet']:.2f} (in the CNN's 128-unit features).",
        f"- MS-SSIM diversity of real held-out pairs: {metrics['structure']['diversity']['real']:.3f} "
        "(synthetic above it: less diverse than real).",
        "", *[f"![{name}]({name})" for name in figures], "",
    ]
    return "\n".join(lines)
