"""A sweep: Ray Tune runs one Ray Train run per trial, OptunaSearch proposes the configs and
ASHA stops the trials whose validation metric falls behind.

    SWEEP = STORAGE/NAME
      sweep.yaml            what was asked (method, data, base config, space, budget); --resume reads it
      optuna.db             the Optuna study (SQLite): `optuna-dashboard sqlite:///SWEEP/optuna.db`
      train/TRIAL_ID/       each trial's Train run (config.yaml, metrics.jsonl, checkpoints)
      TRIAL_ID/             Tune's record of the trial; tuner.pkl, experiment_state-*.json
      trials.csv            one row per trial: status, epochs run, metric, sampled values
      best_config.yaml      the best trial's full config (`raymed train --config best_config.yaml`)
      best.json             best trial, metric, checkpoint
      metric_by_trial.png, param_importance.png
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass, field

import optuna
import pandas as pd
import ray
import yaml
from matplotlib.figure import Figure
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from raymed.console import start_ray, verbose
from raymed.data.io import exists, join, read_bytes, write_bytes_atomic
from raymed.engine.storage import ray_storage, storage_uri
from raymed.engine.trainer import TrainRequest, absolute, preflight
from raymed.errors import ConfigError
from raymed.methods.registry import build_config, method_class
from raymed.tuning.driver import TIME_ATTR, run_trial
from raymed.tuning.space import Param, corner_values, grid_points, param_space, parse_space


SEARCHERS = ("tpe", "random")
SCHEDULERS = ("asha", "fifo")
# The trial function only waits on its Train run (whose workers hold the CPUs/GPUs); Tune needs a
# non-empty bundle for it, so it asks for a little memory instead of a share of a CPU.
DRIVER_RESOURCES = {"memory": 64 * 2**20}
STUDY_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "raymed", "sweeps")


@dataclass
class SweepRequest:
    method: str
    source: str
    space: dict  # dotted key → {distribution: values}, as in tune_spaces/METHOD.yaml
    trials: int
    name: str
    base: dict = field(default_factory=dict)  # config tree every trial starts from
    metric: str = "val/auprc"
    mode: str = "max"
    storage: str = "sweeps"
    pattern: str | None = None
    workers_per_trial: int = 1
    cpus_per_worker: float = 1
    gpus_per_trial: float = 0
    max_concurrent: int | None = None
    search: str = "tpe"
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 3
    max_failures: int = 0
    seed: int = 0

    def __post_init__(self):
        # Trials run with Tune's trial folder as working directory: local paths must be absolute.
        self.source, self.storage = absolute(self.source), absolute(self.storage)

    @property
    def uri(self) -> str:
        return join(self.storage, self.name)

    def params(self) -> dict[str, Param]:
        return parse_space(self.method, self.space, where=f"sweep {self.name} space")

    def check(self) -> None:
        """Everything that can be wrong before Ray is asked for anything."""
        if self.trials < 1:
            raise ConfigError(f"--trials must be at least 1, got {self.trials}")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"--mode must be min or max, got {self.mode!r}")
        if not self.metric.startswith(("val/", "train/")):
            raise ConfigError(f"--metric {self.metric!r}: expected a reported val/… or train/… metric, e.g. val/auprc")
        if self.search not in SEARCHERS or self.scheduler not in SCHEDULERS:
            raise ConfigError(f"search must be one of {SEARCHERS} and scheduler one of {SCHEDULERS}")
        if self.workers_per_trial < 1 or self.cpus_per_worker <= 0 or self.gpus_per_trial < 0:
            raise ConfigError("--workers-per-trial and --cpus-per-worker must be positive, --gpus-per-trial ≥ 0")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(f"--max-concurrent must be at least 1, got {self.max_concurrent}")
        if self.grace_period < 1 or self.reduction_factor <= 1:
            raise ConfigError("--grace-period must be ≥ 1 epoch and --reduction-factor > 1")
        combos = len(grid_points(self.params()))
        if combos > self.trials:
            raise ConfigError(f"the grid keys of the space have {combos} combinations: --trials must be at least that")
        build_config(self.method, self.base)


def total_epochs(method: str, config) -> int:
    """Epochs of every phase of a config (what a trial runs when nobody stops it)."""
    return sum(phase.epochs for phase in method_class(method)(config, in_channels=1).phases())


def epoch_budget(request: SweepRequest) -> int:
    """ASHA's max_t: the longest trial the space allows."""
    return max(total_epochs(request.method, build_config(request.method, request.base, corner))
               for corner in [{}, *corner_values(request.params())])


def default_concurrency(request: SweepRequest) -> int:
    """As many trials at once as the cluster's CPUs (and GPUs) hold, at least 1."""
    available = ray.cluster_resources()
    fits = [available.get("CPU", 0) // (request.workers_per_trial * request.cpus_per_worker)]
    if request.gpus_per_trial:
        fits.append(available.get("GPU", 0) // request.gpus_per_trial)
    return int(max(1, min(request.trials, *fits)))


def study_file(sweep_uri: str) -> str:
    """SQLite needs a local file: the sweep folder itself, or a local mirror of an s3:// sweep."""
    if sweep_uri.startswith("s3://"):
        return os.path.join(STUDY_CACHE, sweep_uri.removeprefix("s3://"), "optuna.db")
    return os.path.join(os.path.abspath(sweep_uri), "optuna.db")


def local_study(request: SweepRequest) -> str:
    """The study's local SQLite file (fetched from an s3:// sweep folder when it is not here yet)."""
    path = study_file(request.uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remote = join(request.uri, "optuna.db")
    if request.uri.startswith("s3://") and not os.path.exists(path) and exists(remote):
        with open(path, "wb") as f:
            f.write(read_bytes(remote))
    return path


def save_study(request: SweepRequest) -> None:
    if request.uri.startswith("s3://") and os.path.exists(study_file(request.uri)):
        with open(study_file(request.uri), "rb") as f:
            write_bytes_atomic(join(request.uri, "optuna.db"), f.read())


def make_searcher(request: SweepRequest) -> OptunaSearch:
    """OptunaSearch over a persisted study; every grid combination is queued first."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{local_study(request)}")
    if request.search == "tpe":
        # Optuna's default of 10 random start-up trials would leave nothing to TPE in a small sweep.
        sampler = optuna.samplers.TPESampler(seed=request.seed, n_startup_trials=min(10, max(2, request.trials // 4)),
                                             constant_liar=True)
    else:
        sampler = optuna.samplers.RandomSampler(seed=request.seed)
    study = optuna.create_study(storage=storage, study_name=request.name, load_if_exists=True,
                                direction="maximize" if request.mode == "max" else "minimize")
    for point in grid_points(request.params()):
        study.enqueue_trial(point, skip_if_exists=True)
    return OptunaSearch(sampler=sampler, storage=storage, study_name=request.name)


def make_scheduler(request: SweepRequest):
    if request.scheduler == "fifo":
        return FIFOScheduler()
    # stop_last_trials=False: a trial that reaches max_t ends by itself (and records its result)
    return ASHAScheduler(time_attr=TIME_ATTR, max_t=epoch_budget(request), grace_period=request.grace_period,
                         reduction_factor=request.reduction_factor, stop_last_trials=False)


def trial_dirname(trial) -> str:
    return trial.trial_id


def trainable(request: SweepRequest):
    job = {"method": request.method, "source": request.source, "pattern": request.pattern, "base": request.base,
           "runs": join(request.uri, "train"), "workers": request.workers_per_trial,
           "cpus_per_worker": request.cpus_per_worker, "gpus_per_worker": request.gpus_per_trial / request.workers_per_trial,
           "max_failures": request.max_failures, "metric": request.metric}
    return tune.with_resources(tune.with_parameters(run_trial, job=job), DRIVER_RESOURCES)


def save_request(request: SweepRequest) -> None:
    write_bytes_atomic(join(request.uri, "sweep.yaml"), yaml.safe_dump(asdict(request), sort_keys=False).encode())


def load_request(storage: str, name: str) -> SweepRequest:
    uri = join(storage, name)
    if not exists(join(uri, "sweep.yaml")):
        raise ConfigError(f"--resume: no sweep at {uri}")
    saved = yaml.safe_load(read_bytes(join(uri, "sweep.yaml")))
    return SweepRequest(**{**saved, "storage": storage, "name": name})


def run_sweep(request: SweepRequest, resume: bool = False) -> "SweepReport":
    """Run (or continue) the sweep; returns the report written into the sweep folder.

    A new sweep checks its data and base config once on the driver (as `raymed train` does)
    before Ray is asked for anything.
    """
    request.check()
    if not resume:
        if exists(join(request.uri, "sweep.yaml")):
            raise ConfigError(f"sweep {request.uri} already exists: pass --resume to continue it or choose another --name")
        preflight(TrainRequest(method=request.method, source=request.source, pattern=request.pattern,
                               config=build_config(request.method, request.base), name=request.name,
                               workers=request.workers_per_trial))
    # The dashboard hosts Ray's State API, which Ray Train's placement-group cleaner needs to
    # release the workers of a trial that ASHA stopped.
    start_ray(include_dashboard=True)
    storage_path, storage_fs = ray_storage(request.storage)
    path = join(storage_path, request.name)
    if resume:
        if not tune.Tuner.can_restore(path, storage_filesystem=storage_fs):
            raise ConfigError(f"--resume: {request.uri} has no Tune state to continue from")
        local_study(request)  # the restored searcher reopens it
        tuner = tune.Tuner.restore(path, trainable=trainable(request), resume_unfinished=True, resume_errored=False,
                                   storage_filesystem=storage_fs)
    else:
        if request.uri.startswith("s3://") and os.path.exists(study_file(request.uri)):
            os.remove(study_file(request.uri))  # the local copy of an earlier sweep of that name
        save_request(request)
        tuner = tune.Tuner(
            trainable(request),
            param_space=param_space(request.params()),
            tune_config=tune.TuneConfig(
                metric=request.metric, mode=request.mode, search_alg=make_searcher(request),
                scheduler=make_scheduler(request), num_samples=request.trials,
                max_concurrent_trials=request.max_concurrent or default_concurrency(request),
                trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name=request.name, storage_path=storage_path, storage_filesystem=storage_fs,
                                      **sweep_output(request)),
        )
    try:
        tuner.fit()
    finally:
        save_study(request)
    return report(request)


@dataclass
class SweepReport:
    table: pd.DataFrame  # one row per trial, in the order Tune created them
    best: dict | None  # best.json
    interrupted: bool  # some trials have not finished (continue with --resume)


def sweep_output(request: SweepRequest) -> dict:
    """RunConfig settings for the console: one line per trial event, or Tune's own tables with
    --verbose; Optuna's per-trial log lines only with --verbose too."""
    if verbose():
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return {"verbose": 0, "callbacks": [TrialProgress(request.metric)]}


class TrialProgress(tune.Callback):
    """One line per trial start, reported epoch and end, in place of Tune's periodic status and
    per-trial tables (which --verbose brings back; its experiment header and error notices stay)."""

    def __init__(self, metric: str):
        self.metric = metric  # the callback is pickled with the sweep's state: it holds no function

    def on_trial_start(self, iteration, trials, trial, **info):
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items())
        print(f"trial {trial.trial_id} started: {params}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else "not reported"
        print(f"trial {trial.trial_id} epoch {result.get(TIME_ATTR)}: {self.metric} {shown}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        print(f"trial {trial.trial_id} ended")

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"trial {trial.trial_id} failed (see trials.csv)")


def trial_status(trial, finished: bool) -> str:
    """completed (its Train run `finished`, after its last epoch or stopped early by its own
    rule) / stopped (by ASHA) / error / unfinished."""
    if trial.status == "ERROR":
        return "error"
    if trial.status != "TERMINATED":
        return "unfinished"
    return "completed" if finished or (trial.last_result or {}).get("epochs_left") == 0 else "stopped"


def trial_error(request: SweepRequest, trial_id: str) -> str:
    path = join(request.uri, trial_id, "error.txt")
    lines = read_bytes(path).decode(errors="replace").strip().splitlines() if exists(path) else []
    return lines[-1] if lines else ""


def trials_table(request: SweepRequest) -> pd.DataFrame:
    storage_path, storage_fs = ray_storage(request.storage)
    analysis = tune.ExperimentAnalysis(join(storage_path, request.name), storage_filesystem=storage_fs)
    rows = []
    for trial in sorted(analysis.trials, key=lambda t: int(t.experiment_tag.split("_")[0])):
        last = trial.last_result or {}
        status = trial_status(trial, exists(join(request.uri, "train", trial.trial_id, "result.json")))
        rows.append({
            "trial": trial.trial_id, "status": status, "epochs": last.get(TIME_ATTR, 0),
            request.metric: last.get(request.metric, math.nan),
            **{key: trial.config.get(key) for key in request.space},
            "checkpoint": storage_uri(request.storage, last["checkpoint_path"]) if last.get("checkpoint_path") else "",
            "error": trial_error(request, trial.trial_id) if status == "error" else "",
        })
    return pd.DataFrame(rows)


def pick_best(table: pd.DataFrame, request: SweepRequest) -> pd.Series | None:
    """The best final metric among trials that ran all their epochs (else among all trials).

    A trial that ASHA stopped reports its metric after fewer epochs than `raymed train` would
    run with its config, so it wins only when no trial finished.
    """
    scored = table[table[request.metric].notna() & table["status"].isin(["completed", "stopped"])]
    if scored.empty:
        return None
    completed = scored[scored["status"] == "completed"]
    pool = completed if not completed.empty else scored
    index = pool[request.metric].idxmax() if request.mode == "max" else pool[request.metric].idxmin()
    return pool.loc[index]


def importances(request: SweepRequest) -> dict[str, float]:
    """Optuna's fANOVA importance of each tuned key for the metric (empty if it cannot be told yet)."""
    path = local_study(request)
    if not os.path.exists(path):
        return {}
    study = optuna.load_study(study_name=request.name, storage=f"sqlite:///{path}")
    try:
        found = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=request.seed))
    except (ValueError, RuntimeError):  # fewer than two finished trials, or nothing varied
        return {}
    return {key: float(value) for key, value in found.items()}


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def plot_metric(table: pd.DataFrame, request: SweepRequest) -> bytes:
    """Final metric of each trial in order, by status, with the best so far among completed trials."""
    figure = Figure(figsize=(7, 4))
    ax = figure.subplots()
    order = range(1, len(table) + 1)
    values = table[request.metric].to_numpy(dtype=float)
    for status, marker in (("completed", "o"), ("stopped", "x"), ("unfinished", ".")):
        chosen = (table["status"] == status).to_numpy()
        if chosen.any():
            ax.scatter([o for o, c in zip(order, chosen) if c], values[chosen], marker=marker,
                       label=f"{status} ({chosen.sum()})")
    completed = pd.Series(values).where((table["status"] == "completed").to_numpy())
    best = completed.cummax() if request.mode == "max" else completed.cummin()
    if best.notna().any():
        ax.step(list(order), best.ffill(), where="post", color="black", linewidth=1, label="best completed so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{request.metric} (last reported)")
    ax.set_title(f"{request.method} sweep {request.name}: {request.search} + {request.scheduler}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _png(figure)


def plot_importance(found: dict[str, float], request: SweepRequest) -> bytes:
    keys = list(reversed(found))
    figure = Figure(figsize=(6, 0.5 * len(keys) + 1.2))
    ax = figure.subplots()
    ax.barh(keys, [found[k] for k in keys])
    ax.set_xlabel(f"fANOVA importance for {request.metric}")
    ax.set_title(f"{request.method} sweep {request.name}")
    return _png(figure)


def report(request: SweepRequest) -> SweepReport:
    """Write trials.csv, best.json, best_config.yaml and the plots into the sweep folder."""
    table = trials_table(request)
    write_bytes_atomic(join(request.uri, "trials.csv"), table.to_csv(index=False).encode())
    write_bytes_atomic(join(request.uri, "metric_by_trial.png"), plot_metric(table, request))
    found = importances(request)
    if found:
        write_bytes_atomic(join(request.uri, "param_importance.png"), plot_importance(found, request))
    row = pick_best(table, request)
    best = None
    if row is not None:
        params = {key: _plain(row[key]) for key in request.space}
        trained = join(request.uri, "train", row["trial"], "config.yaml")
        # the config the trial trained with (modalities pinned); the sampled keys on the base otherwise
        config = (build_config(request.method, yaml.safe_load(read_bytes(trained))["config"]) if exists(trained)
                  else build_config(request.method, request.base, params))
        write_bytes_atomic(join(request.uri, "best_config.yaml"),
                           yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).encode())
        best = {"trial": row["trial"], "status": row["status"], "metric": request.metric, "value": float(row[request.metric]),
                "epochs": int(row["epochs"]), "params": params, "checkpoint": row["checkpoint"],
                "run": join(request.uri, "train", row["trial"]), "config": join(request.uri, "best_config.yaml"),
                "importance": found}
        write_bytes_atomic(join(request.uri, "best.json"), json.dumps(best, indent=2, default=_plain).encode())
    return SweepReport(table=table, best=best, interrupted=bool((table["status"] == "unfinished").any()))


def _plain(value):
    """numpy scalars from pandas rows → plain Python values."""
    return value.item() if hasattr(value, "item") else value
