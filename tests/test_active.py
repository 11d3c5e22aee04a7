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


def test_strategies_parse_and_name_themselves():
    from raymed.active.strategies import Strategy
    from raymed.errors import ConfigError

    assert Strategy.parse("margin") == Strategy("margin", "top_n")
    assert Strategy.parse("core_set").name == "core_set" and Strategy.parse("core_set").needs_embeddings
    assert Strategy.parse("margin:mixture").name == "margin:mixture"
    with pytest.raises(ConfigError, match="SCORE one of"):
        Strategy.parse("entropy")


def test_choose_never_repeats_a_labelled_sample():
    from raymed.active.strategies import Strategy, choose

    values = np.array([0.9, 0.8, 0.1, 0.7, 0.2])
    points = np.array([[0.0], [0.1], [5.0], [0.2], [9.0]])
    labelled = np.array([0])
    assert choose(Strategy("margin", "top_n"), values, None, labelled, 2, 0).tolist() == [1, 3]
    assert choose(Strategy("random", "core_set"), values, points, labelled, 2, 0).tolist() == [4, 2]
    assert len(set(choose(Strategy("margin", "mixture"), values, None, labelled, 4, 0)) - {0}) == 4


def test_a_slice_list_makes_a_phase_train_on_exactly_those_slices(demo_cohort, tmp_path):
    from raymed.data.discovery import discover
    from raymed.data.slices import load_slices, write_slice_list
    from raymed.data.splits import assign_splits, select
    from raymed.engine.feed import load_share
    from raymed.errors import DataError
    from raymed.methods.base import PhaseData
    from tests.conftest import tiny_config

    config = tiny_config("dae", task="segment")
    cases = assign_splits(discover(str(demo_cohort)))
    keys = load_slices(select(cases, "train"), config.data).keys
    chosen = keys[::5]
    write_slice_list(str(tmp_path / "round.csv"), chosen)
    data = PhaseData(slices="all", slice_list=str(tmp_path / "round.csv"))
    shares = [load_share(cases, data, config, rank, 2).keys for rank in (0, 1)]
    assert sorted(shares[0] + shares[1]) == sorted(chosen) and abs(len(shares[0]) - len(shares[1])) <= 1
    write_slice_list(str(tmp_path / "bad.csv"), chosen + [("case99", 3)])
    with pytest.raises(DataError, match="1 of its slices are not training slices"):
        load_share(cases, PhaseData(slices="all", slice_list=str(tmp_path / "bad.csv")), config, 0, 1)


def test_the_queue_ranks_scans_by_anomaly_score_as_csv_and_json(trained_run, demo_cohort, tmp_path):
    import csv
    import json

    from raymed.cli import main

    run = trained_run("ae")
    out = tmp_path / "queue.csv"
    assert main(["active", "rank", "--model", run, "--pool", str(demo_cohort), "--budget", "4",
                 "--threshold", "0.0", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == ["rank", "case", "score", "flagged", "reason"] and len(rows) == 4
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(r["flagged"] == "true" for r in rows)
    assert main(["active", "rank", "--model", run, "--pool", str(demo_cohort), "--budget", "3", "--unit", "slice",
                 "--out", str(tmp_path / "queue.json")]) == 0
    records = json.load(open(tmp_path / "queue.json"))
    assert [r["rank"] for r in records] == [1, 2, 3] and ":" in records[0]["case"]
    assert main(["active", "rank", "--model", run, "--pool", str(demo_cohort), "--budget", "3",
                 "--strategy", "margin", "--out", str(tmp_path / "q.csv")]) == 2  # ae is no segmenter


def test_simulate_runs_the_labelling_loop_and_a_rerun_repeats_nothing(ray_session, trained_run, tmp_path_factory):
    import json
    import os

    from raymed.active.simulate import Simulation, simulate
    from raymed.active.strategies import Strategy
    from raymed.data.demo import build_demo_cohort
    from tests.conftest import TINY, TINY_NETS

    cohort = tmp_path_factory.mktemp("lesions") / "cohort"
    build_demo_cohort(str(cohort), subjects=6, size=32, seed=0, train_lesions=True)
    out = tmp_path_factory.mktemp("active") / "sim"
    sim = Simulation(str(cohort), str(out), [Strategy.parse("random"), Strategy.parse("margin")], trained_run("ae"),
                     rounds=1, start=0.2, step=0.2, repeats=1, workers=1,
                     overrides={**TINY, **TINY_NETS["dae"], "epochs": 2})
    summary = simulate(sim)
    rows = [json.loads(line) for line in open(out / "rounds.jsonl")]
    assert [(r["strategy"], r["round"]) for r in rows] == [("initial", 0), ("random", 1), ("margin", 1)]
    first, picked = set(rows[0]["indices"]), [set(r["indices"]) for r in rows[1:]]
    step = round(0.2 * summary["pool"])
    assert all(first < p and len(p) == len(first) + step for p in picked) and picked[0] != picked[1]
    lists = sorted(os.listdir(out / "slices"))
    assert len(lists) == 3 and sum(1 for _ in open(out / "slices" / lists[0])) == len(rows[0]["indices"]) + 1
    assert summary["rounds"]["margin"][1]["fraction"] > summary["rounds"]["margin"][0]["fraction"]
    assert "| margin |" in (out / "report.md").read_text()
    assert (out / "dice_per_round.png").read_bytes()[:4] == b"\x89PNG"
    failure = summary["failure_prediction"]
    assert failure["slices"] == summary["test_slices"] and (failure["auroc"] is None or 0 <= failure["auroc"] <= 1)
    runs = sorted(os.listdir(out / "runs"))
    assert simulate(sim)["rounds"] == summary["rounds"] and sorted(os.listdir(out / "runs")) == runs
    assert len(open(out / "rounds.jsonl").readlines()) == 3
