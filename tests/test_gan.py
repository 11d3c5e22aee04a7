"""DCGAN, LSGAN, WGAN-GP and AC-GAN: one phase on two Ray Train workers each, the discriminator
learns to tell real from generated, and AC-GAN's samples follow their slice-position class."""

import json
from pathlib import Path

import pytest
import torch

from raymed.data.discovery import discover
from raymed.data.slices import load_slices
from raymed.engine.checkpoint import load_method
from raymed.methods.gan import ACGAN, WGANGP
from tests.conftest import tiny_config

GANS = ("dcgan", "lsgan", "wgangp", "acgan")


@pytest.mark.parametrize("name", GANS)
def test_two_workers_train_a_discriminator_that_tells_real_from_generated(trained_run, demo_cohort, name):
    run = Path(trained_run(name, workers=2))
    log = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["phase"] for r in log] == ["gan"] * 10 and all(r["sync/param_diff"] == 0 for r in log)
    assert "train/generator" in log[-1] and ("train/classes" in log[-1]) == (name == "acgan")
    method, _ = load_method(str(run))
    real = torch.from_numpy(load_slices(discover(str(demo_cohort)), method.config.data, healthy_only=True).image[:64])
    with torch.no_grad():
        fake = method.sample(len(real), generator=torch.Generator().manual_seed(0))
        real_logit, fake_logit = method.discriminate(real)[0], method.discriminate(fake)[0]
    assert fake.shape == real.shape and 0 <= fake.min() and fake.max() <= 1
    assert real_logit.mean() > fake_logit.mean(), (real_logit.mean(), fake_logit.mean())


def test_acgan_is_conditioned_on_the_slice_position_class():
    method = ACGAN(tiny_config("acgan"), 1)
    method.nets.eval()
    assert method.bins(torch.tensor([0.0, 0.24, 0.26, 0.99, 1.0])).tolist() == [0, 0, 1, 3, 3]
    low, high, again = (method.sample(4, condition=torch.full((4,), p), generator=torch.Generator().manual_seed(1))
                        for p in (0.1, 0.9, 0.1))
    assert torch.equal(low, again) and not torch.allclose(low, high)
    batch = {"image": torch.rand(4, 1, 32, 32), "position": torch.tensor([0.1, 0.4, 0.6, 0.9])}
    _, logs = method.discriminator_loss(batch)
    assert logs["classes"] > 0 and method.nets["discriminator"](batch["image"]).shape == (4, 1 + 4)


def test_the_wgangp_critic_has_no_batch_norm_and_a_two_to_one_schedule():
    method = WGANGP(tiny_config("wgangp"), 1)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in method.nets["discriminator"].modules())
    phase = method.phases()[0]
    assert [u.every for u in phase.updates] == [1, 2] and method.config.latent_size == 16
    _, logs = method.discriminator_loss({"image": torch.rand(4, 1, 32, 32)})
    assert logs["gp"] >= 0 and "wasserstein" in logs
