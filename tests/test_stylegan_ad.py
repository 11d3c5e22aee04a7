"""stylegan_ad: the style-based generator's parts in-process, and both phases on two Ray Train
workers, after which D tells real from generated and the encoder reconstructs better than G
from a random latent."""

import json
from pathlib import Path

import torch

from raymed.data.discovery import discover
from raymed.data.slices import load_slices
from raymed.engine.checkpoint import load_method
from raymed.methods.style import MappingNetwork, ModulatedConv
from raymed.methods.stylegan_ad import StyleGANAD
from tests.conftest import tiny_config


def test_demodulation_makes_a_convolution_blind_to_the_style_scale():
    torch.manual_seed(0)
    conv = ModulatedConv(4, 6, 3, style_size=8)
    x, w = torch.randn(2, 4, 8, 8), torch.randn(2, 8)
    out = conv(x, w)
    with torch.no_grad():
        conv.affine.weight.mul_(5)
        conv.affine.bias.mul_(5)
    assert torch.allclose(conv(x, w), out, atol=1e-4)
    assert 0.5 < out.std() < 2  # unit-variance input stays near unit variance


def test_the_modulated_convolution_equals_one_with_a_modulated_weight_per_sample():
    """The paper's form: w'_oik = s_i·w_oik, demodulated by 1/‖w'_o‖, convolved per sample."""
    torch.manual_seed(0)
    conv = ModulatedConv(4, 6, 3, style_size=8)
    x, w = torch.randn(3, 4, 8, 8), torch.randn(3, 8)
    with torch.no_grad():
        reference = []
        for xi, si in zip(x, conv.affine(w)):
            weight = conv.weight * conv.scale * si[None, :, None, None]
            weight = weight / weight.pow(2).sum((1, 2, 3), keepdim=True).sqrt()
            reference.append(torch.nn.functional.conv2d(xi[None], weight, padding=1))
        assert torch.allclose(conv(x, w), torch.cat(reference), atol=1e-5)


def test_the_mapping_network_keeps_z_in_w():
    """Eight LeakyReLU layers without StyleGAN2's √2 gain shrink w to a spread of ~0.03: every z
    then gives nearly the same styles, the samples hardly differ, and training collapsed."""
    torch.manual_seed(0)
    w = MappingNetwork(64, 64, 8)(torch.randn(256, 64), torch.rand(256))
    assert w.std(0).mean() > 0.3


def test_r1_weight_follows_the_resolution_heuristic_unless_set():
    assert StyleGANAD(tiny_config("stylegan_ad"), 1).r1_gamma == 0.0002 * 32**2 / 8
    assert StyleGANAD(tiny_config("stylegan_ad", r1_gamma=10.0), 1).r1_gamma == 10.0


def test_the_slice_position_conditions_the_generator_and_eval_mode_is_deterministic():
    method = StyleGANAD(tiny_config("stylegan_ad"), 1)
    method.nets.eval()

    def draw(p):
        return method.sample(4, condition=torch.full((4,), p), generator=torch.Generator().manual_seed(1))

    low, high, again = draw(0.1), draw(0.9), draw(0.1)
    assert torch.equal(low, again) and (low - high).abs().mean() > 1e-3
    assert low.shape == (4, 1, 32, 32) and 0 <= low.min() and low.max() <= 1
    method.nets.train()
    with torch.no_grad():
        for layer in method.nets["synthesis"].layers:
            layer.noise_strength.fill_(0.5)  # learned, from 0
    z = torch.randn(2, 16)
    assert not torch.equal(method.generate(z, torch.zeros(2)), method.generate(z, torch.zeros(2)))  # random noise


def test_r1_is_lazy_and_the_discriminator_sees_the_position():
    method = StyleGANAD(tiny_config("stylegan_ad"), 1)
    gan = method.phases()[0]
    assert [(u.optimizer, u.every) for u in gan.updates] == [("discriminator", 1), ("discriminator", 16),
                                                             ("generator", 1)]
    assert gan.optimizers["generator"].lr == {"mapping": 2e-5, "synthesis": 2e-3}
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        method.nets["projection"][-1].weight.normal_()
        assert not torch.allclose(method.discriminate(x, torch.zeros(3)), method.discriminate(x, torch.ones(3)))
    _, logs = method.r1_loss({"image": x, "position": torch.rand(3)})
    assert logs["r1"] > 0


def test_two_workers_train_both_phases(trained_run, demo_cohort):
    run = Path(trained_run("stylegan_ad", workers=2))
    log = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["phase"] for r in log] == ["gan"] * 10 + ["encoder"] * 2
    assert all(r["sync/param_diff"] == 0 for r in log) and "train/r1" in log[0] and "val/auprc" in log[-1]
    method, _ = load_method(str(run))
    slices = load_slices(discover(str(demo_cohort)), method.config.data, healthy_only=True)
    real, position = torch.from_numpy(slices.image[:64]), torch.from_numpy(slices.position[:64])
    with torch.no_grad():
        fake = method.sample(len(real), condition=position, generator=torch.Generator().manual_seed(0))
        assert method.discriminate(real, position).mean() > method.discriminate(fake, position).mean()
        # E maps into w: G(E(x)) is closer to x than G's image from a random latent at x's position
        assert (method.reconstruction(real) - real).pow(2).mean() < (fake - real).pow(2).mean()
        amap, score = method.anomaly_map(real[:4])
    assert amap.shape == (4, 32, 32) and score.shape == (4,)
