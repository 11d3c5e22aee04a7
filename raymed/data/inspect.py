"""`raymed data inspect`: what a data source holds, and which cases are broken and why."""

from __future__ import annotations

from collections import Counter

import numpy as np

from raymed.data.discovery import Case, discover
from raymed.data.io import read_volume
from raymed.data.preprocess import check_geometry
from raymed.data.splits import assign_splits
from raymed.errors import DataError


def inspect_case(case: Case) -> dict:
    """Shape, spacing and label statistics of one case; raises DataError on a bad file."""
    info: dict = {"subject": case.subject, "split": case.split, "modalities": sorted(case.images)}
    first_uri = next(iter(case.images.values()))
    first = read_volume(first_uri)
    info["shape"] = list(first.array.shape)
    info["spacing"] = [round(s, 3) for s in first.spacing[:3]]
    info["dtype"] = str(first.array.dtype)
    if not np.isfinite(first.array.astype(np.float64)).all():
        raise DataError(f"{first_uri}: contains NaN or infinite values")
    for uri in list(case.images.values())[1:]:
        check_geometry(first, read_volume(uri), first_uri, uri)
    if case.mask:
        check_geometry(first, read_volume(case.mask), first_uri, case.mask)
    if case.label:
        label = read_volume(case.label)
        check_geometry(first, label, first_uri, case.label)
        lesion = label.array > 0
        info["lesion_voxels"] = int(lesion.sum())
        info["lesion_slices"] = int(lesion.reshape(-1, lesion.shape[-1]).any(axis=0).sum()) if lesion.ndim == 3 else int(lesion.any())
    return info


def inspect_source(source: str, pattern: str | None = None, seed: int = 0) -> dict:
    """Inspect every case; bad cases are collected with their error instead of stopping."""
    cases = assign_splits(discover(source, pattern), seed=seed)
    good, bad = [], []
    for case in cases:
        try:
            good.append(inspect_case(case))
        except DataError as err:
            bad.append({"subject": case.subject, "error": str(err)})
    return {
        "source": source,
        "cases": good,
        "bad": bad,
        "splits": dict(Counter(c.split for c in cases)),
        "modalities": dict(Counter(m for c in cases for m in c.images)),
        "labelled": sum(1 for c in cases if c.label),
    }


def format_report(report: dict) -> str:
    """Human-readable table of an `inspect_source` result."""
    lines = [f"source: {report['source']}",
             f"cases: {len(report['cases']) + len(report['bad'])} ({len(report['bad'])} bad), "
             f"labelled: {report['labelled']}, splits: {report['splits']}",
             f"modalities: {report['modalities']}", ""]
    header = f"{'subject':<28} {'split':<6} {'modalities':<22} {'shape':<18} {'spacing':<20} {'lesion vox':>10} {'slices':>6}"
    lines.append(header)
    for c in report["cases"]:
        lines.append(
            f"{c['subject']:<28} {str(c['split']):<6} {','.join(c['modalities']):<22} "
            f"{'x'.join(map(str, c['shape'])):<18} {'x'.join(map(str, c['spacing'])):<20} "
            f"{c.get('lesion_voxels', '-'):>10} {c.get('lesion_slices', '-'):>6}"
        )
    for b in report["bad"]:
        lines.append(f"BAD {b['subject']}: {b['error']}")
    return "\n".join(lines)
