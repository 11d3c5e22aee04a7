"""Paired image metrics (MONAI): MAE, PSNR and SSIM of a generated image against its target.

Used for paired translation (e.g. T1 → T2) and for reconstruction fidelity of detectors that
reconstruct. Images are (N, C, H, W) in [0, 1]; with a mask, MAE and PSNR count brain pixels
only, while SSIM (a windowed statistic) is computed on images zeroed outside the mask.
"""

from __future__ import annotations

import torch
from monai.metrics import MAEMetric, PSNRMetric, SSIMMetric


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
