"""The label-efficiency study of Holzschuh et al. (MIDL 2023): a segmenter fine-tuned from a
pre-trained detector against the same network trained from scratch, over K labelled subjects.

The K × {fine-tuned, scratch} × seed grid is a Ray Tune sweep (every cell a Ray Train run, run
side by side as the cluster's resources allow). Each run's best checkpoint is then evaluated on
the test split, and so is the unsupervised detector, for the paper's figure: Dice and AP
against K on a log axis, the detector as a horizontal line.

    STUDY = STORAGE/NAME: the sweep folder (trials.csv, train/TRIAL/ …) plus
      label_efficiency.csv  one row per run: K, init, seed, test Dice / AP / AUROC
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
                  overrides: dict | None = None, workers: int = 1, pattern: str | None = None) -> SweepRequest:
    """The sweep: the fine-tuning config of `run`, with K, seed and init (weights or none) on a grid."""
    method, config = finetune_config(run, labels[0], overrides=overrides)
    base = config.model_dump(mode="json")
    space = {"labelled_subjects": {"grid": list(labels)}, "labelled_seed": {"grid": list(seeds)},
             "train.init_from": {"grid": [resolve(run), None]}}
    trials = len(labels) * len(seeds) * 2
    return SweepRequest(method=method, source=source, space=space, trials=trials, name=name, base=base,
                        metric="val/dice", mode="max", storage=storage, pattern=pattern, workers_per_trial=workers,
                        search="random", scheduler="fifo")


def test_metrics(target: str, source: str, out: str) -> dict:
    """Test-split Dice (at the threshold chosen on validation), AP and AUROC of one model."""
    result = evaluate(open_target(target, source), source, out, reference=False, maps=False,
                      progress=lambda line: None)["results"]
    (only,) = result.values()
    return {"dice": only.get("segmentation", {}).get("dice", float("nan")),
            "ap": only["pixel"]["auprc"], "auroc": only["pixel"]["auroc"]}


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


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and std of Dice and AP per K and init (K ordered, 'all' last)."""
    grouped = table.groupby(["k", "init"])[["dice", "ap"]].agg(["mean", "std", "count"])
    order = sorted(grouped.index, key=lambda key: (key[0] == "all", key[0] if key[0] != "all" else 0, key[1]))
    return grouped.loc[order]


def markdown(table: pd.DataFrame, detector: dict) -> str:
    lines = ["| K labelled | init | runs | test Dice | test AP |", "| --- | --- | --- | --- | --- |"]
    for (k, init), row in summary(table).iterrows():
        lines.append(f"| {k} | {init} | {int(row[('dice', 'count')])} | "
                     f"{row[('dice', 'mean')]:.3f} ± {np.nan_to_num(row[('dice', 'std')]):.3f} | "
                     f"{row[('ap', 'mean')]:.3f} ± {np.nan_to_num(row[('ap', 'std')]):.3f} |")
    lines.append(f"| – | unsupervised detector | 1 | {detector['dice']:.3f} | {detector['ap']:.3f} |")
    return "\n".join(lines) + "\n"


def figure(table: pd.DataFrame, detector: dict) -> bytes:
    """Dice and AP against K (log axis); 'all' is drawn at the largest K seen × 2."""
    stats = summary(table)
    numeric = [k for k, _ in stats.index if k != "all"]
    at_all = 2 * max(numeric, default=1)
    fig = Figure(figsize=(9, 3.6))
    for ax, metric, label in zip(fig.subplots(1, 2), ("dice", "ap"), ("test Dice", "test AP")):
        for init, marker in (("fine-tuned", "o-"), ("scratch", "s--")):
            rows = [(at_all if k == "all" else k, row) for (k, i), row in stats.iterrows() if i == init]
            if not rows:
                continue
            rows.sort(key=lambda item: item[0])
            xs = [x for x, _ in rows]
            ax.errorbar(xs, [r[(metric, "mean")] for _, r in rows],
                        yerr=[np.nan_to_num(r[(metric, "std")]) for _, r in rows], fmt=marker, label=init, capsize=3)
        ax.axhline(detector[metric], color="grey", linestyle=":", label="unsupervised detector")
        ax.set_xscale("log")
        ax.set_xlabel("labelled training subjects K ('all' at the right)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
