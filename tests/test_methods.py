"""Method contract: configs reject bad keys/types, every method's losses train on tiny data."""

import pytest
import torch

from raymed.cli import main
from raymed.errors import ConfigError
from raymed.methods.registry import build_config, config_keys, method_class
from tests.conftest import tiny_config


def test_paper_defaults():
    f = build_config("fanogan")
    assert (f.gp_weight, f.n_critic, f.lr, f.beta1, f.beta2, f.kappa) == (10.0, 5, 1e-4, 0.5, 0.9, 1.0)
    assert build_config("vae").kl_weight == 1.0
    assert build_config("ae").data.size == 128


def test_unknown_key_wrong_type_and_unknown_method():
    with pytest.raises(ConfigError, match="lr_typo: unknown key"):
        build_config("ae", overrides={"lr_typo": 1})
    with pytest.raises(ConfigError, match="data.sise: unknown key"):
        build_config("ae", overrides={"data.sise": 64})
    with pytest.raises(ConfigError, match="epochs: .*integer.*'many'"):
        build_config("ae", overrides={"epochs": "many"})
    with pytest.raises(ConfigError, match="unknown method 'resnet'"):
        method_class("resnet")
    assert "data.size" in config_keys(method_class("vae").Config) and "kl_weight" in config_keys(method_class("vae").Config)


def test_cli_rejects_bad_config_before_any_worker(capsys, tmp_path):
    assert main(["train", "ae", "--data", str(tmp_path), "--set", "bogus=1"]) == 2
    assert "bogus: unknown key" in capsys.readouterr().err
    assert main(["train", "nope", "--data", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["ae", "vae", "gmvae", "fanogan"])
def test_each_method_learns_on_a_fixed_batch(name):
    torch.manual_seed(0)
    method = method_class(name)(tiny_config(name, lr=1e-3), in_channels=1)
    x = torch.rand(8, 1, 32, 32) * 0.2 + torch.linspace(0, 0.6, 32).view(1, 1, 1, 32)
    for phase in method.phases():
        params = {n: torch.optim.Adam([p for m in s.modules for p in method.nets[m].parameters()], lr=s.lr, betas=s.betas)
                  for n, s in phase.optimizers.items()}
        first = last = None
        for step in range(30):
            for update in phase.updates:
                if step % update.every:
                    continue
                params[update.optimizer].zero_grad()
                loss, logs = update.loss({"image": x})
                loss.backward()
                params[update.optimizer].step()
                if update is phase.updates[-1]:
                    first = loss.item() if first is None else first
                    last = loss.item()
        if phase.name != "gan":  # adversarial losses need not fall monotonically
            assert last < first, f"{name}/{phase.name}: {first} -> {last}"
    amap, score = method.anomaly_map(x)
    assert amap.shape == (8, 32, 32) and score.shape == (8,) and torch.isfinite(amap).all()
    if "generator" in method.kind:
        assert method.sample(3).shape == (3, 1, 32, 32)


def test_gmvae_prior_is_a_mixture_and_reduces_to_the_vae_kl():
    from raymed.methods.gmvae import MixturePrior

    torch.manual_seed(0)
    prior = MixturePrior(components=4, latent_size=6)
    mu, logvar = torch.randn(5, 6), torch.randn(5, 6) * 0.3
    z = mu + (0.5 * logvar).exp() * torch.randn(5, 6)
    gamma = prior.responsibilities(z)
    torch.testing.assert_close(gamma.sum(1), torch.ones(5))
    # a sample at a component's mean belongs to that component
    assert (prior.responsibilities(prior.mean.detach()).argmax(1) == torch.arange(4)).all()
    # one standard-normal component: exactly the VAE's KL to N(0, I)
    single = MixturePrior(components=1, latent_size=6)
    with torch.no_grad():
        single.mean.zero_()
    vae_kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1))
    torch.testing.assert_close(single.kl(mu, logvar, z), vae_kl)
    samples = method_class("gmvae")(tiny_config("gmvae"), in_channels=1).sample(3, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 1, 32, 32) and 0 <= samples.min() and samples.max() <= 1
