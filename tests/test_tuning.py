"""Search spaces and sweep settings, without Ray: parsing, validation against Configs, grids."""

import os
from types import SimpleNamespace

import optuna
import pytest
import yaml
from ray import tune

from raymed.cli import main
from raymed.errors import ConfigError, DataError
from raymed.methods.registry import METHODS, build_config
from raymed.tuning.space import TUNING_FREE, grid_points, load_space, param_space, parse_space
from raymed.tuning.sweep import SweepRequest, epoch_budget, make_searcher, run_sweep, study_file, trial_status

SPACES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tune_spaces")


def test_each_distribution_becomes_its_tune_domain():
    space = parse_space("vae", {
        "kl_weight": {"uniform": [0.1, 2.0]},
        "lr": {"loguniform": ["1e-5", 1.0e-3]},  # YAML 1.1 reads 1e-5 as text: taken as a number
        "latent_size": {"int": [16, 64]},
        "loss": {"choice": ["l1", "l2"]},
        "train.batch_size": {"grid": [4, 8]},
    })
    domains = param_space(space)
    assert isinstance(domains["kl_weight"], tune.search.sample.Float)
    assert (domains["kl_weight"].lower, domains["kl_weight"].upper) == (0.1, 2.0)
    assert isinstance(domains["lr"].get_sampler(), tune.search.sample.LogUniform)
    assert (domains["lr"].lower, domains["lr"].upper) == (1e-5, 1e-3)
    # int bounds are both included (Tune's randint excludes the upper one)
    assert isinstance(domains["latent_size"], tune.search.sample.Integer)
    assert (domains["latent_size"].lower, domains["latent_size"].upper) == (16, 65)
    assert domains["loss"].categories == ["l1", "l2"] and domains["train.batch_size"].categories == [4, 8]
    samples = [{k: d.sample() for k, d in domains.items()} for _ in range(50)]
    for sample in samples:
        build_config("vae", {}, sample)  # every sample is a valid config
    assert {s["latent_size"] for s in samples} <= set(range(16, 65))
    assert grid_points(space) == [{"train.batch_size": 4}, {"train.batch_size": 8}]
    assert grid_points({k: v for k, v in space.items() if k != "train.batch_size"}) == []


@pytest.mark.parametrize("tree,message", [
    ({"lr": {"uniform": [0.0, 1.0]}, "latnet_size": {"int": [8, 64]}}, "latnet_size: not a key of the ae config"),
    ({"data.sise": {"choice": [32, 64]}}, "data.sise: not a key of the ae config"),
    ({"lr": {"normal": [0, 1]}}, "lr: unknown distribution 'normal'"),
    ({"lr": 1e-4}, "lr: expected one of {uniform, loguniform, int, choice, grid"),
    ({"lr": {"uniform": [1e-3]}}, r"lr: uniform needs \[low, high\]"),
    ({"lr": {"uniform": [1e-3, 1e-4]}}, "lr: uniform needs low < high"),
    ({"lr": {"loguniform": [0, 1e-3]}}, "lr: loguniform needs low > 0"),
    ({"lr": {"uniform": [-1.0, 1.0]}}, "lr: value -1.0 is not valid .*greater than 0"),
    ({"latent_size": {"uniform": [8, 64]}}, r"latent_size is an integer: use \{int: \[low, high\]\}"),
    ({"latent_size": {"int": [8.5, 64]}}, r"latent_size: int needs \[low, high\] as integers"),
    ({"loss": {"choice": ["l1", "huber"]}}, "loss: value 'huber' is not valid"),
    ({"loss": {"grid": []}}, "loss: grid needs a non-empty list"),
    ({"channels": {"choice": [[8, 16], [16, 32]]}}, "channels: choice values must be numbers, strings"),
    ({"kernel_size": {"choice": [3, 3]}}, "kernel_size: choice values repeat"),
    ({}, "expected a mapping of config keys"),
])
def test_bad_spaces_fail_at_load_time_naming_the_key(tmp_path, tree, message):
    path = tmp_path / "ae.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=f"^{path}: .*{message}"):
        load_space(str(path), "ae")


def test_every_registered_method_has_a_space_that_loads_or_is_tuning_free():
    for method in METHODS:
        path = os.path.join(SPACES, f"{method}.yaml")
        if method in TUNING_FREE:
            assert not os.path.exists(path)
            with pytest.raises(ConfigError, match=f"method {method} has nothing to tune"):
                parse_space(method, {"data.size": {"choice": [32, 64]}})
        else:
            assert load_space(path, method), f"{path} is empty"
    assert {f.removesuffix(".yaml") for f in os.listdir(SPACES)} <= set(METHODS)


def sweep(tmp_path, method="ae", **overrides):
    settings = {"method": method, "source": str(tmp_path / "data"), "space": {"lr": {"loguniform": [1e-5, 1e-3]}},
                "trials": 4, "name": "s", "storage": str(tmp_path / "sweeps")}
    return SweepRequest(**{**settings, **overrides})


def test_asha_budget_is_the_longest_trial_the_space_allows(tmp_path):
    assert epoch_budget(sweep(tmp_path, base={"epochs": 7})) == 7
    assert epoch_budget(sweep(tmp_path, base={"epochs": 7}, space={"epochs": {"int": [2, 12]}})) == 12
    fanogan = sweep(tmp_path, method="fanogan", base={"gan_epochs": 3, "encoder_epochs": 4, "channels": [8, 16]},
                    space={"gan_epochs": {"choice": [2, 5]}, "kappa": {"uniform": [0.0, 2.0]}})
    assert epoch_budget(fanogan) == 9


def test_grid_combinations_are_queued_first_in_the_persisted_study(tmp_path):
    request = sweep(tmp_path, space={"lr": {"loguniform": [1e-5, 1e-3]}, "loss": {"grid": ["l1", "l2"]},
                                     "kernel_size": {"grid": [3, 5]}})
    make_searcher(request)
    make_searcher(request)  # a second look at the same sweep does not queue them twice
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{study_file(request.uri)}")
    assert study_file(request.uri) == str(tmp_path / "sweeps" / "s" / "optuna.db")
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 4
    distributions = {"lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True),
                     "loss": optuna.distributions.CategoricalDistribution(["l1", "l2"]),
                     "kernel_size": optuna.distributions.CategoricalDistribution([3, 5])}
    asked = [study.ask(distributions).params for _ in range(5)]
    assert [(p["loss"], p["kernel_size"]) for p in asked[:4]] == [("l1", 3), ("l1", 5), ("l2", 3), ("l2", 5)]
    assert all(1e-5 <= p["lr"] <= 1e-3 for p in asked)
    with pytest.raises(ConfigError, match="4 combinations: --trials must be at least that"):
        sweep(tmp_path, trials=3, space=request.space).check()


@pytest.mark.parametrize("overrides,message", [
    ({"trials": 0}, "--trials must be at least 1"),
    ({"mode": "maximum"}, "--mode must be min or max"),
    ({"metric": "auprc"}, "expected a reported val/… or train/… metric"),
    ({"max_concurrent": 0}, "--max-concurrent must be at least 1"),
    ({"base": {"lr": "fast"}}, "invalid ae config: lr"),
])
def test_bad_sweep_settings_fail_before_ray(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        sweep(tmp_path, **overrides).check()


def test_a_sweep_that_cannot_run_fails_before_ray_starts(tmp_path):
    request = sweep(tmp_path, source=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="nowhere: no such folder"):
        run_sweep(request)
    assert not (tmp_path / "sweeps").exists()


def test_cli_mistakes_are_one_line_errors(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {loguniform: [1.0e-5, 1.0e-3]}\n")
    storage = str(tmp_path / "sweeps")
    cases = [
        (["tune", "ae", "--space", str(space)], "a new sweep needs --data, --trials"),
        (["tune", "ae", "--resume"], "--resume needs the --name of the sweep to continue"),
        (["tune", "ae", "--resume", "--name", "s", "--trials", "3", "--set", "lr=1e-3"],
         "--resume continues the sweep with its saved settings: drop --trials, --set"),
        (["tune", "ae", "--resume", "--name", "nope", "--storage", storage], f"--resume: no sweep at {storage}/nope"),
        (["tune", "threshold", "--data", str(tmp_path), "--space", str(space), "--trials", "2"],
         "method threshold has nothing to tune"),
        (["tune", "vae", "--data", str(tmp_path), "--space", str(space), "--trials", "2", "--set", "kl_weight=-1"],
         "invalid vae config: kl_weight"),
    ]
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("raymed: error: ") and message in err and err.count("\n") == 1, err


def test_a_trial_its_own_early_stopping_ended_is_completed_not_stopped():
    """Tune's view of a trial: ASHA's stop and a run's own early stop both end before the last
    epoch; only the run that finished (wrote result.json) counts as completed."""
    ended_early = SimpleNamespace(status="TERMINATED", last_result={"epochs_left": 4})
    assert trial_status(ended_early, finished=True) == "completed"
    assert trial_status(ended_early, finished=False) == "stopped"
    assert trial_status(SimpleNamespace(status="TERMINATED", last_result={"epochs_left": 0}), False) == "completed"
    assert trial_status(SimpleNamespace(status="ERROR", last_result={}), True) == "error"
