"""Pseudo-anomaly synthesis: masks of both kinds, the synthesis, the two phases, the anomaly map."""

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from raymed.engine.trainer import TrainRequest, train as train_run
from raymed.errors import ConfigError
from raymed.evaluation.metrics import pixel_metrics
from raymed.methods.pas import PseudoAnomalySynthesis
from raymed.methods.registry import build_config
from raymed.synthesis.pseudo_anomaly import ellipse, intensity_shift, perlin_mask, perlin_noise, random_shape_mask, synthesize
from tests.conftest import changed_since_phase_two, tiny_config
from tests.phantoms import brains, train


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pas(**overrides) -> PseudoAnomalySynthesis:
    return PseudoAnomalySynthesis(tiny_config("pas", **overrides), 1)


# -- masks and synthesis ----------------------------------------------------------------------

@pytest.mark.parametrize("make,smallest", [
    (lambda g: random_shape_mask((96, 128), generator=g), ellipse(5).sum()),  # kept by the 5 × 5 opening
    (lambda g: perlin_mask((96, 128), generator=g), 8),  # the finest lattice: 8-pixel cells
], ids=["random-shape", "perlin"])
def test_masks_are_boolean_blobs_reproducible_by_seed(make, smallest):
    masks = [make(seeded(s)) for s in range(40)]
    assert all(m.shape == (96, 128) and m.dtype == torch.bool for m in masks)
    assert torch.equal(make(seeded(7)), make(seeded(7)))
    assert not torch.equal(masks[0], masks[1])
    filled = [m for m in masks if m.any()]
    assert len(filled) > 20
    # blobs, not salt: connected regions of many pixels on average
    for m in filled:
        regions, _ = ndimage.label(m.numpy())
        assert np.bincount(regions.ravel())[1:].mean() >= smallest


def test_random_shapes_follow_the_threshold_and_opening():
    areas = {t: torch.stack([random_shape_mask((128, 128), threshold=t, generator=seeded(s)).float().mean()
                             for s in range(20)]) for t in (150, 200)}
    assert (areas[150] > areas[200]).all()  # same noise, lower threshold: a superset
    # a threshold near the maximum leaves specks that opening removes: empty masks (label 0)
    assert not any(random_shape_mask((128, 128), threshold=254.5, morph_kernel=9, generator=seeded(s)).any()
                   for s in range(10))


def test_perlin_noise_is_smooth_at_its_lattice_scale():
    coarse = perlin_noise((64, 64), (2, 2), seeded(0))
    fine = perlin_noise((64, 64), (32, 32), seeded(0))
    assert coarse.abs().max() < 1.5 and perlin_noise((64, 64), (4, 4), seeded(1)).std() > 0.1

    def roughness(f):
        return (f[:, 1:] - f[:, :-1]).abs().mean() / f.std()
    assert roughness(coarse) < 0.3 * roughness(fine)


def test_synthesis_changes_pixels_only_inside_the_mask():
    image = torch.full((6, 2, 32, 32), 0.5)
    region = torch.stack([random_shape_mask((32, 32), threshold=150, blur_kernel=7, generator=seeded(s))
                          for s in range(6)])
    shift = intensity_shift(6, 2, c_min=0.1, c_max=0.4, c_std=0.3, generator=seeded(0))
    assert ((shift.abs() > 0.1) & (shift.abs() < 0.4)).all() and (shift > 0).any() and (shift < 0).any()
    out = synthesize(image, region, shift)
    changed = (out != image).any(1)
    assert torch.equal(changed, region) and region.any()
    assert torch.allclose(out[:, :, region[0]][0], (0.5 + shift[0])[:, None].expand(2, int(region[0].sum())))


def test_pseudo_anomalies_stay_in_the_foreground_and_can_be_absent():
    batch = brains(8, 0)
    torch.manual_seed(0)
    corrupted, region = pas(threshold=120.0, anomaly_prob=1.0).corrupt(batch)
    assert region.any() and not (region & (batch["mask"] == 0)).any()
    assert torch.equal((corrupted != batch["image"]).any(1), region & (corrupted != batch["image"]).any(1))
    corrupted, region = pas(anomaly_prob=0.0).corrupt(batch)
    assert not region.any() and torch.equal(corrupted, batch["image"])  # label 0: a normal sample


# -- the method -------------------------------------------------------------------------------

def test_config_keys_and_phases():
    c = build_config("pas")
    assert (c.schedule, c.synthesis, c.focal_gamma, c.lr) == ("two-phase", "random", 2.0, 1e-4)
    reconstruct, segment = pas().phases()
    assert (reconstruct.name, reconstruct.trained, reconstruct.validation) == ("reconstruct", ["reconstruction"], None)
    assert (segment.name, segment.trained, segment.frozen) == ("segment", ["segmentation"], ["reconstruction"])
    assert segment.early_stopping.patience == c.patience and segment.metric == "val/auprc"
    (joint,) = pas(schedule="joint", reconstruction_epochs=4, segmentation_epochs=3).phases()
    assert joint.trained == ["reconstruction", "segmentation"] and joint.epochs == 7 and joint.early_stopping is None
    assert {"l2", "ssim", "focal"} <= set(pas(schedule="joint").joint_loss(brains(4, 0))[1])
    with pytest.raises(ConfigError, match="c_min=0.6 must be below c_max=0.5"):
        pas(c_min=0.6)


@pytest.mark.parametrize("synthesis", ["random", "perlin"])
def test_trained_on_pseudo_anomalies_it_finds_real_lesions(synthesis):
    """Two phases on healthy phantoms only; then bright blob lesions it never saw are found."""
    torch.manual_seed(0)
    method = pas(synthesis=synthesis, lr=2e-3, anomaly_prob=1.0, threshold=170.0)
    healthy = brains(16, 0)
    first = train(method, method.reconstruction_loss, healthy, steps=30)
    assert sum(first[-5:]) < sum(first[:5])
    before = {k: v.clone() for k, v in method.nets["reconstruction"].state_dict().items()}
    method.nets["reconstruction"].eval()  # frozen, as the engine leaves it in phase 2
    train(method, method.segmentation_loss, healthy, steps=60)
    after = method.nets["reconstruction"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    method.nets.eval()
    lesioned = brains(16, 5, blobs=True)
    amap, score = method.anomaly_map(lesioned["image"])
    assert amap.shape == (16, 32, 32) and score.shape == (16,) and 0 <= amap.min() and amap.max() <= 1
    k = method.config.kernel(method.config.score_pool)
    pooled = torch.nn.functional.avg_pool2d(amap[:, None], k, stride=1, padding=k // 2)
    assert torch.allclose(score, pooled.flatten(1).amax(1))
    brain = lesioned["mask"].bool()
    assert pixel_metrics(amap[brain].numpy(), lesioned["label"][brain].numpy())["auroc"] > 0.8  # chance: 0.5


# -- on Ray Train -----------------------------------------------------------------------------

def test_two_phases_on_two_workers_freeze_the_reconstruction(ray_session, demo_cohort, tmp_path):
    config = tiny_config("pas", reconstruction_epochs=3, segmentation_epochs=2, lr=1e-3)
    result = train_run(TrainRequest(method="pas", source=str(demo_cohort), config=config, name="run",
                                    storage=str(tmp_path), workers=2, keep_checkpoints=10))
    assert result.error is None
    log = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["phase"] for r in log] == ["reconstruct"] * 3 + ["segment"] * 2
    assert log[2]["train/l1"] < log[0]["train/l1"] and "val/auprc" in log[-1] and "val/auprc" not in log[0]
    assert all(r["sync/param_diff"] == 0 for r in log if "sync/param_diff" in r)
    assert not changed_since_phase_two(tmp_path / "run", "reconstruction")
    assert changed_since_phase_two(tmp_path / "run", "segmentation")
