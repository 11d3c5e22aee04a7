"""Subject-level train/val/test splits: never by slice, reproducible by seed."""

from __future__ import annotations

import numpy as np

from raymed.data.discovery import Case
from raymed.errors import DataError

SPLITS = ("train", "val", "test")


def assign_splits(cases: list[Case], seed: int = 0, val: float = 0.15, test: float = 0.25) -> list[Case]:
    """Give every case without a fixed split one, by a seeded shuffle of the subject ids.

    Subjects keep the split a manifest or `splits.json` gave them; the rest are dealt so that
    val and test each get at least one subject when there are three or more.
    """
    for case in cases:
        if case.split is not None and case.split not in SPLITS:
            raise DataError(f"subject {case.subject}: unknown split {case.split!r} (use {', '.join(SPLITS)})")
    free = sorted(c.subject for c in cases if c.split is None)
    order = np.random.default_rng(seed).permutation(len(free))
    n_test = int(round(test * len(free)))
    n_val = int(round(val * len(free)))
    if len(free) >= 3:
        n_test, n_val = max(n_test, 1) if test > 0 else 0, max(n_val, 1) if val > 0 else 0
    names = {}
    for rank, index in enumerate(order):
        names[free[index]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    for case in cases:
        if case.split is None:
            case.split = names[case.subject]
    return cases


def select(cases: list[Case], split: str) -> list[Case]:
    """Cases of one split ('all' keeps every case)."""
    if split == "all":
        return list(cases)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (use {', '.join(SPLITS)} or all)")
    return [c for c in cases if c.split == split]
