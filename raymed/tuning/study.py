"""The label-efficiency study of Holzschuh et al. (MIDL 2023): a segmenter fine-tuned from a
pre-trained detector against the same network trained from scratch, over K labelled subjects.

The K × {fine-tuned, scratch} × seed grid is a Ray Tune sweep (every cell a Ray Train run, run
side by side as the cluster's resources allow). Each run's best checkpoint is then evaluated on
the test split, and so is the unsupervised detector, for the paper's figure: Dice and AP
against K on a log axis, the detector as a horizontal line.

    STUDY = STORAGE/NAME: the sweep folder (trials.csv, train/TRIAL/ …) plus
      label_efficiency.csv  one row per run: K, init, seed, test Dice / AP / AUROC (and, for a
                            multi-class study, the mean Dice over classes, `class_dice`)
      label_efficiency.md   the table of means ± std per K and init
      label_efficiency.png  the figure
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from raymed.data.io import join, write_bytes_atomic
from raymed.engine.checkpoint import resolve
from raymed.engine.finetune import finetune_config
from raymed.errors import RaymedError
from raymed.evaluation.evaluate import evaluate, open_target
from raymed.tuning.sweep import SweepRequest, run_sweep

LABELS = (1, 2, 5, 10, None)  # None: every labelled subject of the train split


def study_request(run: str, source: str, labels: list[int | None], seeds: list[int], storage: str, name: str,
                  overrides: dict | None = None, workers: int = 1, pattern: str | None = None,
                  classes: list[int] | None = None) -> SweepRequest:
    """The sweep: the fine-tuning config of `run`, with K, seed and init (weights or none) on a grid."""
    method, config = finetune_config(run, labels[0], overrides=overrides, classes=classes)
    base = config.model_dump(mode="json")
    space = {"labelled_subjects": {"grid": list(labels)}, "labelled_seed": {"grid": list(seeds)},
             "train.init_from": {"grid": [resolve(run), None]}}
    trials = len(labels) * len(seeds) * 2
    return SweepRequest(method=method, source=source, space=space, trials=trials, name=name, base=base,
                        metric="val/dice", mode="max", storage=storage, pattern=pattern, workers_per_trial=workers,
                        search="random", scheduler="fifo")


def test_metrics(target: str, source: str, out: str) -> dict:
    """Test-split Dice (at the threshold chosen on validation), AP and AUROC of one model, and a
    multi-class segmenter's mean Dice over classes."""
    result = evaluate(open_target(target, source), source, out, reference=False, maps=False,
                      progress=lambda line: None)["results"]
    (only,) = result.values()
    classes = {"class_dice": only["classes"]["dice"]} if "classes" in only else {}
    return {"dice": only.get("segmentation", {}).get("dice", float("nan")),
            "ap": only["pixel"]["auprc"], "auroc": only["pixel"]["auroc"], **classes}


def run_study(request: SweepRequest, pretrained: str, progress=print) -> tuple[pd.DataFrame, dict]:
    """Run the grid, evaluate every run and the detector, write table and figure; returns the
    per-run table and the detector's test metrics."""
    report = run_sweep(request)
    rows = []
    for _, trial in report.table.iterrows():
        if trial["status"] != "completed":
            progress(f"{trial['trial']}: {trial['status']}, left out of the study")
            continue
        run = join(request.uri, "train", trial["trial"])
        progress(f"evaluating {trial['trial']} on the test split")
        init = "fine-tuned" if isinstance(trial["train.init_from"], str) else "scratch"
        labelled = trial["labelled_subjects"]
        k = "all" if labelled is None or (isinstance(labelled, float) and np.isnan(labelled)) else int(labelled)
        rows.append({"k": k, "init": init, "seed": int(trial["labelled_seed"]), "run": run,
                     **test_metrics(run, request.source, join(run, "evaluation", "test"))})
    if not rows:
        raise RaymedError(f"study {request.uri}: no run finished (see trials.csv)")
    table = pd.DataFrame(rows)
    detector = test_metrics(pretrained, request.source, join(request.uri, "detector-test"))
    write_bytes_atomic(join(request.uri, "label_efficiency.csv"), table.to_csv(index=False).encode())
    write_bytes_atomic(join(request.uri, "label_efficiency.md"), markdown(table, detector).encode())
    write_bytes_atomic(join(request.uri, "label_efficiency.png"), figure(table, detector))
    return table, detector


def metrics(table: pd.DataFrame) -> list[str]:
    return [m for m in ("dice", "ap", "class_dice") if m in table]


NAMES = {"dice": "test Dice", "ap": "test AP", "class_dice": "test Dice, mean over classes"}


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and std of each metric per K and init (K ordered, 'all' last)."""
    grouped = table.groupby(["k", "init"])[metrics(table)].agg(["mean", "std", "count"])
    order = sorted(grouped.index, key=lambda key: (key[0] == "all", key[0] if key[0] != "all" else 0, key[1]))
    return grouped.loc[order]


def markdown(table: pd.DataFrame, detector: dict) -> str:
    columns = metrics(table)
    lines = ["| K labelled | init | runs | " + " | ".join(NAMES[m] for m in columns) + " |",
             "| --- | --- | --- |" + " --- |" * len(columns)]
    for (k, init), row in summary(table).iterrows():
        cells = [f"{row[(m, 'mean')]:.3f} ± {np.nan_to_num(row[(m, 'std')]):.3f}" for m in columns]
        lines.append(f"| {k} | {init} | {int(row[('dice', 'count')])} | " + " | ".join(cells) + " |")
    cells = [f"{detector[m]:.3f}" if m in detector else "–" for m in columns]
    lines.append("| – | unsupervised detector | 1 | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(table: pd.DataFrame, detector: dict) -> bytes:
    """Each metric against K (log axis), the detector as a line where it has the metric; 'all'
    is drawn at the largest K seen × 2."""
    stats = summary(table)
    numeric = [k for k, _ in stats.index if k != "all"]
    at_all = 2 * max(numeric, default=1)
    columns = metrics(table)
    fig = Figure(figsize=(4.5 * len(columns), 3.6))
    for ax, metric in zip(fig.subplots(1, len(columns), squeeze=False)[0], columns):
        for init, marker in (("fine-tuned", "o-"), ("scratch", "s--")):
            rows = [(at_all if k == "all" else k, row) for (k, i), row in stats.iterrows() if i == init]
            if not rows:
                continue
            rows.sort(key=lambda item: item[0])
            xs = [x for x, _ in rows]
            ax.errorbar(xs, [r[(metric, "mean")] for _, r in rows],
                        yerr=[np.nan_to_num(r[(metric, "std")]) for _, r in rows], fmt=marker, label=init, capsize=3)
        if metric in detector:
            ax.axhline(detector[metric], color="grey", linestyle=":", label="unsupervised detector")
        ax.set_xscale("log")
        ax.set_xlabel("labelled training subjects K ('all' at the right)")
        ax.set_ylabel(NAMES[metric])
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
