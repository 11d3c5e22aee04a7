"""Image-semantic cycle translation: tissue labels from a Gaussian mixture, S as a tissue
distribution, the two representations, r = |x − G(S(x))|, and both phases on two Ray Train workers."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raymed.data.discovery import discover
from raymed.data.preprocess import Preprocessing, prepare
from raymed.data.tissue import gmm_tissue
from raymed.errors import DataError
from raymed.methods.cycle import SEMANTICS, CycleTranslation, one_hot, semantic_target
from tests.conftest import changed_since_phase_two, tiny_config
from tests.phantoms import train


def cycle(**overrides) -> CycleTranslation:
    return CycleTranslation(tiny_config("cycle", lr=1e-3, **overrides), 1)


def rings(n: int, seed: int, size: int = 32) -> dict:
    """Discs of three concentric tissues (outer CSF 0.3, GM 0.6, inner WM 0.9) with noise."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    radius = (xx**2 + yy**2).sqrt() * (0.9 + 0.2 * torch.rand(n, 1, 1, generator=g))
    tissue = torch.stack([(radius < 0.9) & (radius >= 0.6), (radius < 0.6) & (radius >= 0.3), radius < 0.3], 1).float()
    image = (tissue * torch.tensor([0.3, 0.6, 0.9]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    image = (image + 0.05 * torch.randn(image.shape, generator=g)) * tissue.sum(1, keepdim=True)
    return {"image": image.clamp(0, 1), "mask": tissue.sum(1) > 0, "tissue": tissue}


def test_gmm_tissue_finds_the_intensity_classes_in_order():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, (20, 20, 10))
    image = np.array([0.2, 0.5, 0.8])[truth] + 0.03 * rng.standard_normal(truth.shape)
    mask = np.ones(truth.shape, bool)
    mask[:2] = False
    maps = gmm_tissue(image, mask)
    assert maps.shape == (3, 20, 20, 10) and (maps[:, ~mask] == 0).all()
    np.testing.assert_allclose(maps[:, mask].sum(0), 1, atol=1e-5)
    assert (maps.argmax(0)[mask] == truth[mask]).mean() > 0.99  # darkest class first
    with pytest.raises(DataError, match="too few"):
        gmm_tissue(image, np.zeros(truth.shape, bool))


def test_scans_without_tissue_files_get_gmm_tissue(brats_folder):
    case = discover(str(brats_folder))[0]
    with pytest.raises(DataError, match="no csf, gm, wm tissue map"):
        prepare(case, Preprocessing(size=24), tissue=True)
    prepared = prepare(case, Preprocessing(size=24, tissue_labels="gmm"), tissue=True)
    assert prepared.tissue.shape == (3, 24, 24, 12)
    np.testing.assert_allclose(prepared.tissue[:, prepared.mask].sum(0), 1, atol=1e-5)


def test_segmentor_is_a_tissue_distribution_and_learns_the_tissues():
    torch.manual_seed(0)
    method = cycle()
    held_out = rings(8, 1)
    probabilities = method.segment(held_out["image"])
    assert probabilities.shape == (8, SEMANTICS, 32, 32)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(8, 32, 32))
    losses = train(method, method.segmentation_loss, rings(16, 0), steps=60)
    assert losses[-1] < 0.5 * losses[0]
    truth = semantic_target(held_out).argmax(1)
    accuracy = (method.segment(held_out["image"]).argmax(1) == truth).float().mean()
    assert accuracy > 0.9, float(accuracy)  # four classes: chance is far below


def test_the_representation_decides_what_g_sees():
    batch = rings(4, 0)
    torch.manual_seed(0)
    continuous = cycle()
    discrete = cycle(representation="discrete")
    discrete.nets.load_state_dict(continuous.nets.state_dict())  # the same S and G
    soft, hard = continuous.semantics(batch["image"]), discrete.semantics(batch["image"])
    assert set(hard.unique().tolist()) == {0.0, 1.0} and torch.equal(hard, one_hot(soft))
    assert not torch.equal(soft, hard)
    # training input: the tissue probability maps, or their one-hot argmax
    target = semantic_target({"tissue": batch["tissue"] * 0.8})  # partial volume: 0.2 background
    assert torch.allclose(continuous.generator_input({"tissue": batch["tissue"] * 0.8}), target)
    assert torch.equal(discrete.generator_input({"tissue": batch["tissue"] * 0.8}), one_hot(target))
    assert not torch.equal(continuous.anomaly_map(batch["image"])[0], discrete.anomaly_map(batch["image"])[0])


def test_anomaly_map_is_the_cycle_residual():
    torch.manual_seed(0)
    method, x = cycle(), rings(4, 2)["image"]
    amap, score = method.anomaly_map(x)
    with torch.no_grad():
        by_hand = (x - method.nets["generator"](method.nets["segmentor"](x).softmax(1))).abs().mean(1)
    torch.testing.assert_close(amap, by_hand)
    assert score.shape == (4,)
    assert method.translate(torch.rand(2, SEMANTICS, 32, 32)).shape == (2, 1, 32, 32)


def test_two_phases_on_two_workers_freeze_the_segmentor(trained_run):
    run = Path(trained_run("cycle", workers=2, keep_checkpoints=10))
    log = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["phase"] for r in log] == ["segment"] * 2 + ["synthesize"] * 2
    assert log[1]["train/segmentation"] < log[0]["train/segmentation"]
    assert "val/auprc" in log[-1] and "train/l1" in log[-1]
    assert all(r["sync/param_diff"] == 0 for r in log if "sync/param_diff" in r)
    assert not changed_since_phase_two(run, "segmentor")
    assert changed_since_phase_two(run, "generator")
