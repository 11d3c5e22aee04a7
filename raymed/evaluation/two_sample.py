"""The classifier two-sample test of the GAN evaluation framework, and distances in its features.

A CNN learns to tell a GAN's synthetic training set STr from the real images it learned (RTr)
and is tested on the held-out STs ∪ RTs: its recall (synthetic called synthetic) and specificity
(real called real) are the scores; 0.5 each means the two cannot be told apart. The CNN's
128-unit layer is the feature space of the distances, a stand-in for ImageNet Inception
features, which neither fit the domain nor can be had offline.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import FIDMetric
from monai.networks.blocks import Convolution
from sklearn.covariance import LedoitWolf
from torch import nn

LEAKY = ("LEAKYRELU", {"negative_slope": 0.2})


class TwoSampleCNN(nn.Module):
    """The framework's CNN: 4 blocks of two 3×3 convolutions and a max-pool, filters doubling per
    block, LeakyReLU 0.2, a 128-unit dense layer and one logit (sigmoid: synthetic)."""

    def __init__(self, in_channels: int, size: int, base: int = 16, features: int = 128):
        super().__init__()
        if size % 16:
            raise ValueError(f"the two-sample CNN pools four times: image size {size} must be a multiple of 16")
        layers, cin = [], in_channels
        for block in range(4):
            cout = base * 2**block
            layers += [Convolution(2, cin, cout, kernel_size=3, act=LEAKY, norm=None),
                       Convolution(2, cout, cout, kernel_size=3, act=LEAKY, norm=None), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * (size // 16) ** 2, features),
                                      nn.LeakyReLU(0.2))
        self.head = nn.Linear(features, 1)
        for module in self.modules():  # He initialisation for LeakyReLU: eight plain convolutions
            if isinstance(module, (nn.Conv2d, nn.Linear)):  # shrink the signal under PyTorch's default
                nn.init.kaiming_normal_(module.weight, a=0.2)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))[:, 0]


def two_sample_test(real_train: np.ndarray, fake_train: np.ndarray, real_test: np.ndarray, fake_test: np.ndarray,
                    seed: int, epochs: int = 20, lr: float = 1e-3, batch_size: int = 32) -> dict:
    """Train the CNN on STr (label 1) vs RTr (label 0), test it on STs ∪ RTs.

    Images are (N, C, H, W) in [0, 1]. Returns recall, specificity and accuracy on the test sets,
    and the 128-unit features of RTs and STs (for the distances and the PCA plot).
    The framework's BCE, Adam lr 1e-3 and 20 epochs.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.concatenate([fake_train, real_train])).float()
    y = torch.cat([torch.ones(len(fake_train)), torch.zeros(len(real_train))])
    net = TwoSampleCNN(x.shape[1], x.shape[-1])
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    net.train()
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(x)))
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(net(x[idx]), y[idx]).backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        fake_logit, fake_features = _predict(net, fake_test, batch_size)
        real_logit, real_features = _predict(net, real_test, batch_size)
    recall, specificity = float((fake_logit > 0).mean()), float((real_logit <= 0).mean())
    accuracy = (recall * len(fake_test) + specificity * len(real_test)) / (len(fake_test) + len(real_test))
    return {"recall": recall, "specificity": specificity, "accuracy": float(accuracy),
            "real_features": real_features, "fake_features": fake_features}


def _predict(net: TwoSampleCNN, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    logits, features = [], []
    for start in range(0, len(images), 4 * batch_size):
        f = net.features(torch.from_numpy(images[start:start + 4 * batch_size]).float())
        features.append(f.numpy())
        logits.append(net.head(f)[:, 0].numpy())
    return np.concatenate(logits), np.concatenate(features)


def mahalanobis(features: np.ndarray, reference: np.ndarray) -> float:
    """Mean Mahalanobis distance of `features` rows to the Gaussian fitted to `reference` rows
    (Ledoit–Wolf shrunk covariance: 128 dimensions from a few hundred samples)."""
    fit = LedoitWolf().fit(reference)
    return float(np.sqrt(np.maximum(fit.mahalanobis(features), 0)).mean())


def frechet(features: np.ndarray, reference: np.ndarray) -> float:
    """Fréchet distance between the Gaussians of two feature sets (MONAI's FIDMetric)."""
    return float(FIDMetric()(torch.tensor(features), torch.tensor(reference)))
