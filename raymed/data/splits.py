"""Subject-level train/val/test splits: never by slice, reproducible by seed."""

from __future__ import annotations

import numpy as np

from raymed.data.discovery import Case
from raymed.errors import DataError

SPLITS = ("train", "val", "test")


def deal(subjects: list[str], seed: int | np.random.SeedSequence = 0, val: float = 0.15, test: float = 0.25) -> dict[str, str]:
    """Subject → split by a seeded shuffle; val and test get at least one subject each when
    there are three or more subjects, so a threshold can be chosen on val and reported on test."""
    n = len(subjects)
    n_test, n_val = int(round(test * n)), int(round(val * n))
    if n >= 3:
        n_test, n_val = max(n_test, 1) if test > 0 else 0, max(n_val, 1) if val > 0 else 0
    names = ["test"] * n_test + ["val"] * n_val
    names += ["train"] * (n - len(names))
    order = np.random.default_rng(seed).permutation(n)
    dealt = {subjects[i]: names[rank] for rank, i in enumerate(order)}
    return {subject: dealt[subject] for subject in subjects}


def assign_splits(cases: list[Case], seed: int = 0, val: float = 0.15, test: float = 0.25) -> list[Case]:
    """Give every case without a fixed split one (see `deal`); subjects keep the split a
    manifest or `splits.json` gave them."""
    for case in cases:
        if case.split is not None and case.split not in SPLITS:
            raise DataError(f"subject {case.subject}: unknown split {case.split!r} (use {', '.join(SPLITS)})")
    names = deal(sorted(c.subject for c in cases if c.split is None), seed, val, test)
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
