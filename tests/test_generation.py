"""The GAN evaluation framework: the two-sample CNN, the feature distances, MS-SSIM max-similarity
and template matching in-process; `raymed evaluate-generator` and `raymed compare` on trained GANs."""

import json

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from raymed.cli import main
from raymed.evaluation.structure import diversity, max_similarity, ms_ssim_metric, template_matching
from raymed.evaluation.two_sample import frechet, mahalanobis, two_sample_test
from tests.phantoms import brains


def real_images(n: int, seed: int = 0) -> np.ndarray:
    return brains(n, seed)["image"].numpy()


def blurred(images: np.ndarray) -> np.ndarray:
    return np.stack([gaussian_filter(image, (0, 1.2, 1.2)) for image in images]).astype(np.float32)


def test_the_two_sample_cnn_tells_blurred_from_real_but_not_real_from_real():
    real = real_images(400)
    sets = [real[:100], real[100:200], real[200:300], real[300:]]  # RTr, STr, RTs, STs
    same = two_sample_test(*sets, seed=0, epochs=10)
    # balanced accuracy at chance (a CNN that learns nothing may call every image one class)
    assert abs((same["recall"] + same["specificity"]) / 2 - 0.5) < 0.12, same
    blur = two_sample_test(sets[0], blurred(sets[1]), sets[2], blurred(sets[3]), seed=0, epochs=10)
    assert blur["recall"] > 0.8 and blur["accuracy"] > 0.8, blur
    assert blur["real_features"].shape == (100, 128) and blur["fake_features"].shape == (100, 128)


def test_feature_distances_are_zero_to_itself_and_grow_with_noise():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    assert frechet(features, features) == pytest.approx(0, abs=1e-6)
    noisy = [features + rng.normal(scale=s, size=features.shape) for s in (0.5, 2.0)]
    assert 0.1 < frechet(noisy[0], features) < frechet(noisy[1], features)
    shifted = [features + s for s in (0.5, 2.0)]
    assert mahalanobis(features, features) < mahalanobis(shifted[0], features) < mahalanobis(shifted[1], features)


def test_max_similarity_of_a_set_to_itself_is_one_and_copies_are_found():
    real = real_images(40)
    assert np.allclose(max_similarity(real[:10], real), 1)
    within = max_similarity(real[:10], real[:10], same_set=True)
    assert (within < 1).all() and (within > 0.3).all()  # similar phantoms, never the image itself
    noise = np.random.default_rng(0).random((10, 1, 32, 32)).astype(np.float32)
    assert max_similarity(noise, real).max() < within.min()
    assert diversity(real, 50) > diversity(noise, 50)  # phantoms resemble each other; noise does not
    assert len(ms_ssim_metric(32).weights) == 3 and len(ms_ssim_metric(128).weights) == 5

    found = template_matching(np.concatenate([real[[7, 23]], noise[:1]]), real)
    assert np.allclose(found["ncc"][:2], 1) and list(found["real_index"][:2]) == [7, 23]
    assert found["ncc"][2] < 0.5


def test_evaluate_generator_judges_a_trained_gan_and_compare_prints_the_table(trained_run, demo_cohort, tmp_path,
                                                                             capsys):
    runs = {name: trained_run(name, workers=2) for name in ("dcgan", "acgan")}
    for name, run in runs.items():
        assert main(["evaluate-generator", run, "--data", str(demo_cohort), "--n", "64", "--repeats", "2",
                     "--epochs", "4", "--structural", "16", "--out", str(tmp_path / name)]) == 0
        printed = capsys.readouterr().out
        assert "two-sample CNN 2/2" in printed and f"{name}: recall" in printed
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["sets"]["STr"] == metrics["sets"]["RTr"] and len(metrics["two_sample"]["recall"]["runs"]) == 2
        # a GAN trained for 20 steps on 32² slices is told from real ones
        assert metrics["two_sample"]["accuracy"]["mean"] > 0.7
        assert metrics["structure"]["S_R"]["median"] < metrics["structure"]["R_R"]["median"]
        assert {p.name for p in (tmp_path / name).iterdir()} >= {"report.md", "samples.png", "pca.png",
                                                                 "similarity.png", "matches.png"}
    assert main(["compare", str(tmp_path / "dcgan"), str(tmp_path / "acgan"), "--markdown"]) == 0
    table = capsys.readouterr().out
    assert "| recall | specificity | Mahalanobis | Fréchet |" in table and "| acgan |" in table
    assert main(["evaluate-generator", trained_run("ae"), "--data", str(demo_cohort)]) == 2
    assert "ae is not a generator (kind: detector)" in capsys.readouterr().err
