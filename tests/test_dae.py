"""The DAE's science at tiny size: coarse noise, denoising, few-label segmentation, head swap."""

import json

import pytest
import torch

from raymed.cli import main
from raymed.engine import checkpoint
from raymed.errors import ConfigError, DataError
from raymed.methods.dae import DenoisingAutoEncoder
from raymed.methods.registry import build_config
from raymed.synthesis.coarse_noise import coarse_noise
from tests.conftest import TINY
from tests.phantoms import brains, train

TINY_DAE = {**TINY, "channels": [8, 16, 32], "norm_groups": 4, "lr": 1e-3}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dae(in_channels=1, **overrides) -> DenoisingAutoEncoder:
    return DenoisingAutoEncoder(build_config("dae", overrides={**TINY_DAE, **overrides}), in_channels)


# -- coarse noise -----------------------------------------------------------------------------

def noise(n=32, size=64, resolution=8, seed=0, **kw):
    return coarse_noise(torch.zeros(n, 1, size, size), resolution=resolution,
                        generator=torch.Generator().manual_seed(seed), **kw)


def test_noise_only_on_the_foreground():
    mask = brains(4, 0)["mask"]
    field = coarse_noise(torch.zeros(4, 2, 32, 32), mask, generator=torch.Generator().manual_seed(0))
    assert field.shape == (4, 2, 32, 32)
    assert (field[mask.unsqueeze(1).expand_as(field) == 0] == 0).all()
    assert (field[mask.unsqueeze(1).expand_as(field) > 0] != 0).float().mean() > 0.99


def test_noise_std_is_that_of_the_coarse_samples():
    # one cell per pixel: no interpolation, the pixels are the N(0, σ) samples themselves
    assert noise(size=32, resolution=32, std=0.3).std().item() == pytest.approx(0.3, rel=0.05)
    # bilinear interpolation between independent samples keeps about 2/3 of the std
    assert noise(std=0.3).std().item() == pytest.approx(0.2, rel=0.1)


def test_noise_is_coarse():
    field, white = noise()[:, 0], torch.randn(32, 64, 64)

    def neighbour_correlation(f):
        return torch.corrcoef(torch.stack([f[..., :-1].flatten(), f[..., 1:].flatten()]))[0, 1].item()

    def power_below_grid_nyquist(f, resolution=8):  # the highest frequency a grid of 8 samples holds
        power = torch.fft.fft2(f).abs().pow(2).mean(0)
        k = torch.fft.fftfreq(f.shape[-1]).abs() * f.shape[-1]
        low = (k[:, None] <= resolution / 2) & (k[None, :] <= resolution / 2)
        return (power[low].sum() / power.sum()).item()

    assert neighbour_correlation(field) > 0.9 and abs(neighbour_correlation(white)) < 0.05
    assert power_below_grid_nyquist(field) > 0.85 and power_below_grid_nyquist(white) < 0.05


def test_noise_is_reproducible_and_differs_by_seed():
    assert torch.equal(noise(seed=1), noise(seed=1))
    assert not torch.allclose(noise(seed=1), noise(seed=2))


def test_noise_grid_is_shifted_per_image():
    """Bilinear noise is piecewise linear: its kinks mark the coarse grid, whose phase must vary."""
    field, cell = noise(n=64)[:, 0], 64 // 8
    kinks = (field[..., 2:] - 2 * field[..., 1:-1] + field[..., :-2]).abs().mean(1)  # (N, W - 2)
    kinks = torch.nn.functional.pad(kinks, (1, 1)).view(64, -1, cell).sum(1)  # (N, cell): by column mod cell
    phases = kinks.argmax(1)
    assert (kinks.max(1).values > 20 * kinks.median(1).values).all()  # every image has one sharp grid phase
    assert len(set(phases.tolist())) >= cell // 2


# -- the method -------------------------------------------------------------------------------

def test_paper_defaults_and_phases():
    c = build_config("dae")
    assert (c.task, c.noise_std, c.noise_res, c.channels) == ("denoise", 0.2, 16, [64, 128, 256, 512])
    assert (c.lr, c.weight_decay, c.amsgrad, c.labelled_subjects) == (1e-4, 1e-5, True, 5)
    assert (c.postprocess.median, c.postprocess.erode) == (5, 2)
    (denoise,) = dae().phases()
    spec = denoise.optimizers["adam"]
    assert (denoise.name, denoise.data.slices, denoise.data.fields) == ("denoise", "healthy", ("image", "mask"))
    assert (denoise.validation, denoise.metric, denoise.trained) == ("anomaly", "val/auprc", ["denoise_head", "unet"])
    assert (spec.amsgrad, spec.weight_decay, spec.schedule.kind) == (True, 1e-5, "cosine")
    (segment,) = dae(task="segment", labelled_subjects=2).phases()
    assert (segment.name, segment.data.slices, segment.data.labelled) == ("segment", "all", 2)
    assert "label" in segment.data.fields and (segment.metric, segment.mode) == ("val/loss", "min")
    assert segment.early_stopping.patience == c.patience and segment.trained == ["segment_head", "unet"]
    with pytest.raises(ConfigError, match="norm_groups"):
        build_config("dae", overrides={"channels": [8, 12, 16], "norm_groups": 8})


def test_denoiser_removes_coarse_noise_and_detects_lesions():
    torch.manual_seed(0)
    method, batch = dae(), brains(8, 0)
    losses = train(method, method.denoising_loss, batch, steps=50)
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    x, mask = batch["image"], batch["mask"]
    noisy = x + coarse_noise(x, mask, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        restored = method.forward(noisy)
    inside = mask.unsqueeze(1).bool()
    assert (restored - x)[inside].pow(2).mean() < 0.75 * (noisy - x)[inside].pow(2).mean()
    assert method.reconstruction(x).shape == x.shape
    # a lesion is corruption the denoiser undoes, so it stands out in |x − x̂|
    lesioned = brains(8, 3, blobs=True)
    amap, score = method.anomaly_map(lesioned["image"])
    assert amap.shape == (8, 32, 32) and score.shape == (8,) and (amap >= 0).all()
    lesion, brain = lesioned["label"].bool(), lesioned["mask"].bool()
    assert amap[lesion].mean() > 2 * amap[brain & ~lesion].mean()


def test_segmenter_outputs_probabilities_and_finds_blobs():
    torch.manual_seed(0)
    method = dae(task="segment")
    losses = train(method, method.segmentation_loss, brains(16, 0, blobs=True), steps=40)
    assert losses[-1] < losses[0]
    held_out = brains(16, 1, blobs=True)
    amap, score = method.anomaly_map(held_out["image"])
    assert amap.shape == (16, 32, 32) and 0 <= amap.min() and amap.max() <= 1 and score.shape == (16,)
    assert method.reconstruction(held_out["image"]) is None
    metrics = method.validate(held_out)
    overlap, total = metrics["dice"]
    lesion_fraction = held_out["label"].float().mean().item()
    assert overlap / total > 0.6 > 4 * lesion_fraction  # well above a lesion-sized random guess
    assert metrics["loss"][1] == 16 and metrics["loss"][0] > 0


def test_multi_class_segmenter_tells_core_from_rim():
    """classes=[1, 2]: a three-class head, per-class validation Dice, label maps in the files'
    numbering; a class left out of `classes` is background."""
    torch.manual_seed(0)
    method = dae(task="segment", classes=[1, 2])
    assert method.classes == (1, 2) and method.nets["segment_head"].conv.conv.out_channels == 3
    train(method, method.segmentation_loss, brains(16, 0, blobs=True, rim=True), steps=60)
    held_out = brains(16, 1, blobs=True, rim=True)
    labels = method.label_map(held_out["image"])
    assert labels.shape == (16, 32, 32) and set(labels.unique().tolist()) <= {0, 1, 2}
    metrics = method.validate(held_out)
    for value in (1, 2):
        overlap, total = metrics[f"dice_{value}"]
        share = (held_out["label"] == value).float().mean().item()
        assert overlap / total > 0.5 > 4 * share, (value, overlap / total)
    amap, _ = method.anomaly_map(held_out["image"])  # 1 − p(background): any class is lesion
    lesion = held_out["label"] > 0
    assert amap[lesion].mean() > 0.5 > amap[~lesion].mean()
    only_rim = dae(task="segment", classes=[2])
    assert only_rim.target(held_out).unique().tolist() == [0, 1]
    assert torch.equal(only_rim.target(held_out)[:, 0] == 1, held_out["label"] == 2)
    assert set(only_rim.label_map(held_out["image"]).unique().tolist()) <= {0, 2}
    with pytest.raises(ConfigError, match="distinct label values"):
        build_config("dae", overrides={"classes": [0, 1]})


def test_fine_tuning_loads_the_unet_and_keeps_a_fresh_head(tmp_path):
    # two channels: as many as the segmentation's classes, so only the head's name keeps it apart
    torch.manual_seed(0)
    pretrained = dae(in_channels=2)
    checkpoint.save(tmp_path, pretrained, optimizers={}, scaler=None, position={}, metrics={})
    torch.manual_seed(1)
    finetuned, scratch = dae(in_channels=2, task="segment"), dae(in_channels=2, task="segment")
    fresh_head = {k: v.clone() for k, v in finetuned.nets["segment_head"].state_dict().items()}
    with pytest.raises(DataError, match="segment_head"):
        checkpoint.init_from(finetuned, str(tmp_path), strict=True)
    summary = checkpoint.init_from(finetuned, str(tmp_path), strict=False)
    assert "fresh: segment_head" in summary
    for key, value in finetuned.nets["unet"].state_dict().items():
        assert torch.equal(value, pretrained.nets["unet"].state_dict()[key])
    for key, value in finetuned.nets["segment_head"].state_dict().items():
        assert torch.equal(value, fresh_head[key])
    first = "input_block.conv1.conv.weight"
    assert not torch.equal(scratch.nets["unet"].state_dict()[first], pretrained.nets["unet"].state_dict()[first])


def unet_moved(model, detector) -> float:
    first = next(iter(detector.nets["unet"].state_dict()))
    return float((model.nets["unet"].state_dict()[first] - detector.nets["unet"].state_dict()[first]).abs().max())


def test_finetune_starts_from_the_pretrained_weights(trained_run, demo_cohort, tmp_path):
    """`raymed finetune --classes` with a vanishing lr: the UNet still holds the detector's weights
    after training, under a fresh three-class head; the run is an ordinary run folder."""
    pretrained = trained_run("dae")
    detector, _ = checkpoint.load_method(pretrained)
    assert main(["finetune", pretrained, "--data", str(demo_cohort), "--labelled", "1", "--classes", "1", "2",
                 "--storage", str(tmp_path), "--name", "tuned", "--set", "epochs=1", "--set", "lr=1e-9"]) == 0
    model, _ = checkpoint.load_method(str(tmp_path / "tuned"))
    assert model.config.task == "segment" and model.classes == (1, 2)
    assert model.nets["segment_head"].conv.conv.out_channels == 3 and unet_moved(model, detector) < 1e-6
    probability, _ = model.anomaly_map(torch.rand(2, detector.in_channels, 32, 32))
    assert float(probability.min()) >= 0 and float(probability.max()) <= 1


def test_label_efficiency_study_runs_the_grid_and_plots(trained_run, demo_cohort, tmp_path):
    """K × {fine-tuned, scratch} as Tune trials, each evaluated on test, with the detector's line;
    multi-class, so with the per-class Dice too. With a vanishing lr, only the scratch run's UNet
    differs from the detector's."""
    from raymed.tuning.study import run_study, study_request

    pretrained = trained_run("dae")
    request = study_request(pretrained, str(demo_cohort), [1], [0], str(tmp_path), "study",
                            {"epochs": 1, "lr": 1e-9}, classes=[1, 2])
    table, detector = run_study(request, pretrained, progress=lambda line: None)
    model, _ = checkpoint.load_method(pretrained)
    moved = {init: unet_moved(checkpoint.load_method(run)[0], model) for init, run in zip(table["init"], table["run"])}
    assert moved["fine-tuned"] < 1e-6 < moved["scratch"], moved
    assert sorted(table["init"]) == ["fine-tuned", "scratch"] and set(table["k"]) == {1}
    assert all(0 <= v <= 1 for v in table["ap"]) and 0 <= detector["ap"] <= 1
    assert table["class_dice"].between(0, 1).all() and "class_dice" not in detector
    for name in ("label_efficiency.csv", "label_efficiency.md", "label_efficiency.png"):
        assert (tmp_path / "study" / name).stat().st_size > 0
    table_md = (tmp_path / "study" / "label_efficiency.md").read_text()
    assert "| test Dice, mean over classes |" in table_md.splitlines()[0] and "| 1 | fine-tuned | 1 |" in table_md
    # each run's evaluation has the per-patient Dice of each class
    run = table["run"][0]
    result = json.loads(open(f"{run}/evaluation/test/metrics.json").read())["results"]["dae"]
    assert set(result["classes"]["per_class"]) == {"1", "2"}
    assert all("dice_class_2" in v for v in result["volumes"] if v["lesion_voxels"])
    assert "| mean Dice over classes | Dice class 1 | Dice class 2 |" in open(f"{run}/evaluation/test/report.md").read()
