"""Active-learning scoring and sampling on hand-made probabilities and points."""

import numpy as np
import pytest
import torch

from raymed.active.sampling import core_set, k_nearest, mixture, top_n
from raymed.active.scoring import expected_model_change, least_confidence, margin, random_scores


def test_least_confidence_and_margin_on_hand_made_probabilities():
    p = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    assert least_confidence(p) == pytest.approx([0.1, 0.6, 2 / 3])
    assert margin(p) == pytest.approx([1 - 0.85, 1 - 0.05, 1.0])
    # per-pixel maps (N, K, H, W) are averaged inside the mask
    maps = np.stack([np.full((2, 2), 0.9), np.full((2, 2), 0.1)])[None]  # one sample, two classes
    maps[0, :, 0, 0] = [0.5, 0.5]
    mask = np.array([[[True, False], [False, False]]])
    assert least_confidence(maps, mask) == pytest.approx([0.5])
    assert least_confidence(maps) == pytest.approx([(0.5 + 3 * 0.1) / 4])


def test_expected_model_change_is_zero_for_a_certain_model_and_grows_with_doubt():
    layer = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[20.0, 0.0], [0.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0], [0.05, 0.0]])  # confidently class 0; nearly a tie
    lengths = expected_model_change(layer, layer, x)
    assert lengths[0] < 1e-6 < lengths[1]


def test_top_n_and_mixture_sizes():
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.2, 0.3])
    assert top_n(scores, 2).tolist() == [1, 3]
    mixed = mixture(scores, 4, random_fraction=0.5, seed=0)
    assert len(mixed) == 4 == len(set(mixed.tolist())) and set(mixed[:2].tolist()) == {1, 3}
    assert len(random_scores(10, 0)) == 10 and not np.array_equal(random_scores(10, 0), random_scores(10, 1))


def test_core_set_picks_the_farthest_point_and_k_nearest_takes_neighbours():
    points = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 4.0], [10.5, 0.0]])
    assert core_set(points, np.array([0]), 1).tolist() == [4]
    assert core_set(points, np.array([0]), 3).tolist() == [4, 3, 1]
    scores = np.array([0.0, 0.1, 0.9, 0.2, 0.0])
    assert k_nearest(scores, points, budget=2, k=2).tolist() == [2, 4]
    assert sorted(k_nearest(scores, points, budget=4, k=2).tolist()) == [0, 2, 3, 4]
