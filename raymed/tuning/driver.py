"""One Tune trial = one Ray Train run of the method with the trial's sampled config.

The trial's Train run is named after the trial id and lives in the sweep folder, so a trial
that a restored sweep starts again resumes from its own Train checkpoints.
"""

from __future__ import annotations

import json

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from raymed.data.io import exists, join, read_bytes
from raymed.engine.trainer import TrainRequest, build_trainer, record_result, run_exists
from raymed.errors import ConfigError
from raymed.methods.registry import build_config

# What Tune's scheduler counts: epochs trained across all phases (reported by the engine loop).
TIME_ATTR = "epochs_done"


class MetricReportCallback(TuneReportCallback):
    """Forwards to Tune the reports that carry the sweep's metric, except the run's last epoch.

    Validation metrics exist only on validation epochs (every `train.val_every` epochs, and not
    in phases without a meaningful anomaly map); OptunaSearch needs the metric in every result.
    The last epoch's report is handed over by `run_trial` itself once the run has ended: passed
    through this callback's queue it was sometimes lost when the run ended right after it, and
    Tune and Optuna kept the epoch before as the trial's final result.
    """

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and self.metric in metrics[0] and not last_epoch(metrics[0]):
            super().after_report(run_context, metrics, checkpoint)


def last_epoch(report: dict) -> bool:
    return report.get("epochs_left") == 0


def trial_request(params: dict, job: dict, trial_id: str, callbacks: tuple = ()) -> TrainRequest:
    """The Train request of one trial: the sweep's base config overridden by the sampled keys."""
    runs = job["runs"]
    return TrainRequest(
        method=job["method"], source=job["source"], pattern=job["pattern"],
        config=build_config(job["method"], job["base"], params), name=trial_id, storage=runs,
        workers=job["workers"], cpus_per_worker=job["cpus_per_worker"], gpus_per_worker=job["gpus_per_worker"],
        max_failures=job["max_failures"], resume=run_exists(join(runs, trial_id)), callbacks=callbacks,
    )


def run_trial(params: dict, job: dict) -> None:
    """Tune function trainable: train, record the run's result, insist the metric was reported.

    A trial whose Train run had already finished when the sweep was interrupted is not trained
    again: its last result is handed to Tune once more. A run that trained all its epochs hands
    over its last report here (see `MetricReportCallback`).
    """
    request = trial_request(params, job, tune.get_context().get_trial_id(),
                            callbacks=(MetricReportCallback(job["metric"]),))
    finished = exists(join(request.run_uri, "result.json"))
    if not finished:
        record_result(request, build_trainer(request).fit())
    log_uri = join(request.run_uri, "metrics.jsonl")
    reports = [json.loads(line) for line in read_bytes(log_uri).splitlines()] if exists(log_uri) else []
    scored = [r for r in reports if job["metric"] in r]
    if not scored:
        seen = sorted({k for r in reports for k in r if "/" in k})
        raise ConfigError(f"metric {job['metric']!r} was never reported by {request.run_uri} "
                          f"(reported: {', '.join(seen) or 'nothing'}; val/* metrics need lesions in the validation split)")
    if finished or last_epoch(scored[-1]):
        tune.report({**scored[-1], "checkpoint_path": scored[-1].get("checkpoint")})
