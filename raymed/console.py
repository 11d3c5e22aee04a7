"""What a user sees on the console: progress lines, warnings that concern them and errors.

By default the driver prints training progress itself (from the run's `metrics.jsonl`) and Ray
does not forward its processes' output: worker-group start-up, per-report records and actor
internals stay in Ray's log files. `raymed --verbose` forwards all of it.
"""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "RAYMED_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def start_ray(**options) -> None:
    """Connect to the cluster in RAY_ADDRESS or start a local one, quietly unless verbose."""
    import ray

    if ray.is_initialized():
        return
    if verbose():
        ray.init(**options)
    else:
        ray.init(logging_level=logging.ERROR, log_to_driver=False, **options)


def train_logging():
    """Ray Train's logging level for a run (its per-report INFO lines only when verbose)."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if verbose() else "WARNING")


def quiet_data() -> None:
    """Ray Data's progress bars and per-dataset log lines on the driver only when verbose: the
    commands print their own progress."""
    import ray.data

    if not verbose():
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
