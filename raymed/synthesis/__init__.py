"""Training-time corruptions of healthy images (coarse noise, pseudo-anomalies), one module each."""
