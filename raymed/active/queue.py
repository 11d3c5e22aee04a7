"""`raymed active rank`: a ranked queue of scans (or slices) for annotators.

Every scan of the pool is scored slice by slice with the strategy's score and the model's
preprocessing; a scan's score is its highest slice score (a scan is as informative, or as
anomalous, as its worst slice) and its embedding the mean of its slices'. The sampler then orders
the budget. A row is flagged when its score reaches `threshold`, or, without one, when the
sampler chose it; `reason` says which.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np

from raymed.active.strategies import Strategy, choose, scores
from raymed.data.discovery import discover
from raymed.data.io import write_bytes_atomic
from raymed.data.slices import load_slices
from raymed.engine.checkpoint import load_method
from raymed.errors import ConfigError, DataError

COLUMNS = ("rank", "case", "score", "flagged", "reason")


def rank(model: str, pool: str, budget: int, strategy: Strategy, threshold: float | None = None,
         unit: str = "scan", pattern: str | None = None, seed: int = 0) -> list[dict]:
    """The queue: `budget` rows, most worth labelling first."""
    method, _ = load_method(model)
    if strategy.score == "anomaly":
        if "detector" not in method.kind:
            raise ConfigError(f"the anomaly score needs a detector; {model} is {method.name}")
        detector, segmenter = method, None
    elif strategy.score == "random" and not strategy.needs_embeddings:
        detector = segmenter = None
    elif getattr(method.config, "task", None) == "segment":
        detector, segmenter = None, method
    else:
        raise ConfigError(f"strategy {strategy.name} needs a segmentation run (raymed finetune, or dae with "
                          f"task=segment); {model} is {method.name}")
    slices = load_slices(discover(pool, pattern), method.config.data, min_brain=method.config.data.min_brain)
    if not len(slices):
        raise DataError(f"{pool}: no slices with brain to rank")
    values, embeddings = scores(strategy, slices.image, slices.mask, segmenter, detector, seed)
    names = [f"{s}:{i}" for s, i in slices.keys]
    if unit == "scan":
        names, groups = np.unique(slices.subject, return_inverse=True)
        names = list(names)
        values = np.array([values[groups == g].max() for g in range(len(names))])
        if embeddings is not None:
            embeddings = np.stack([embeddings[groups == g].mean(0) for g in range(len(names))])
    order = choose(strategy, values, embeddings, np.array([], dtype=int), budget, seed)
    rows = []
    for position, i in enumerate(order, start=1):
        if threshold is None:
            flagged, reason = True, f"chosen by {strategy.name} ({position} of {budget})"
        else:
            flagged = bool(values[i] >= threshold)
            reason = f"score {'≥' if flagged else '<'} threshold {threshold:g}"
        rows.append({"rank": position, "case": names[i], "score": float(values[i]), "flagged": flagged,
                     "reason": reason})
    return rows


def write_queue(uri: str, rows: list[dict]) -> None:
    """CSV (COLUMNS) or, for a .json name, a JSON list of the same records."""
    if uri.endswith(".json"):
        data = json.dumps(rows, indent=2)
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({**r, "score": f"{r['score']:.6g}", "flagged": str(r["flagged"]).lower()} for r in rows)
        data = buffer.getvalue()
    write_bytes_atomic(uri, data.encode())
