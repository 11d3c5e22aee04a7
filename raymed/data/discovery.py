"""Finding the cases of a dataset: BraTS-style folders, a filename pattern, or a manifest.

Every layout yields the same `Case` records, so nothing downstream cares where data came from.
A `splits.json` (subject → train/val/test) at the dataset root fixes the split of each subject;
without one, splits are drawn by seed (see `raymed.data.splits`).
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import re
from dataclasses import dataclass, field

from raymed.data.io import exists, filesystem, join, read_bytes
from raymed.errors import DataError

MODALITIES = ("t1", "t1ce", "t2", "flair")
LABEL_KEY = "seg"
MASK_KEY = "mask"


@dataclass
class Case:
    """One subject: image URIs per modality, optional lesion label and brain/body mask."""

    subject: str
    images: dict[str, str]
    label: str | None = None
    mask: str | None = None
    split: str | None = None
    extras: dict[str, str] = field(default_factory=dict)
    prepared: str | None = None  # the prepared dataset (`raymed data prepare`) its volume is read from


def discover(source: str, pattern: str | None = None) -> list[Case]:
    """Cases in `source`: a prepared dataset, a manifest file (.csv/.json), or a folder in BraTS
    layout or `pattern`."""
    from raymed.data.prepared import PreparedDataset, is_prepared

    source = str(source).rstrip("/")
    if is_prepared(source):
        if pattern:
            raise DataError(f"{source} is a prepared dataset: it takes no --pattern")
        return PreparedDataset.open(source).cases()
    lower = source.lower()
    if lower.endswith((".csv", ".json")):
        cases = from_manifest(source)
    elif pattern:
        cases = from_pattern(source, pattern)
    else:
        cases = from_brats_folder(source)
    if not cases:
        raise DataError(f"{source}: no cases found" + (f" matching {pattern!r}" if pattern else ""))
    apply_split_file(cases, source)
    return sorted(cases, key=lambda c: c.subject)


def _listdir(source: str) -> list[dict]:
    fs, path = filesystem(source)
    if not fs.exists(path):
        raise DataError(f"{source}: no such folder")
    if not fs.isdir(path):
        raise DataError(f"{source}: not a folder, .csv or .json manifest")
    return fs.ls(path, detail=True)


def _uri(source: str, name: str) -> str:
    return join(source, name.rsplit("/", 1)[-1])


def from_brats_folder(source: str) -> list[Case]:
    """`CASE/CASE_{t1,t1ce,t2,flair,seg,mask}.nii.gz`; other suffixes are kept as extras."""
    cases = []
    for entry in _listdir(source):
        if entry["type"] != "directory":
            continue
        subject = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        folder = join(source, subject)
        case = Case(subject=subject, images={})
        for item in _listdir(folder):
            fname = item["name"].rsplit("/", 1)[-1]
            match = re.fullmatch(re.escape(subject) + r"_([A-Za-z0-9]+)\.nii(\.gz)?", fname)
            if not match:
                continue
            key, uri = match.group(1).lower(), join(folder, fname)
            if key in MODALITIES:
                case.images[key] = uri
            elif key == LABEL_KEY:
                case.label = uri
            elif key == MASK_KEY:
                case.mask = uri
            else:
                case.extras[key] = uri
        if case.images:
            cases.append(case)
    return cases


def from_pattern(source: str, pattern: str) -> list[Case]:
    """Files in `source` matching a glob with `{subject}` and optionally `{modality}`.

    Example: `{subject}_{modality}.nii.gz`; files whose modality is `seg`/`mask` become the
    label/mask. Without `{modality}` every match is one single-image case (modality `image`).
    """
    if "{subject}" not in pattern:
        raise DataError(f"pattern {pattern!r} must contain {{subject}}")
    regex = re.escape(pattern).replace(r"\{subject\}", r"(?P<subject>.+?)")
    regex = regex.replace(r"\{modality\}", r"(?P<modality>[A-Za-z0-9]+)")
    glob = pattern.replace("{subject}", "*").replace("{modality}", "*")
    cases: dict[str, Case] = {}
    for entry in _listdir(source):
        fname = entry["name"].rsplit("/", 1)[-1]
        if entry["type"] == "directory" or not fnmatch.fnmatch(fname, glob):
            continue
        match = re.fullmatch(regex, fname)
        if not match:
            continue
        subject = match.group("subject")
        modality = (match.groupdict().get("modality") or "image").lower()
        case = cases.setdefault(subject, Case(subject=subject, images={}))
        uri = join(source, fname)
        if modality == LABEL_KEY:
            case.label = uri
        elif modality == MASK_KEY:
            case.mask = uri
        else:
            case.images[modality] = uri
    return [c for c in cases.values() if c.images]


def from_manifest(source: str) -> list[Case]:
    """CSV with columns `image`, optional `label`, `mask`, `subject`, `split`; or a JSON list.

    Relative paths are taken relative to the manifest's folder. Extra `image_<modality>` columns
    add modalities (the plain `image` column is modality `image`).
    """
    text = read_bytes(source).decode("utf-8", errors="replace")
    try:
        if source.lower().endswith(".json"):
            rows = json.loads(text)
            if isinstance(rows, dict):
                rows = rows.get("cases", [])
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
    except (json.JSONDecodeError, csv.Error) as err:
        raise DataError(f"{source}: manifest cannot be parsed ({err})") from None
    if not isinstance(rows, list):
        raise DataError(f"{source}: manifest must be a list of cases")
    root = source.rsplit("/", 1)[0] if "/" in source else "."
    cases = []
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{source}: entry {n} is not an object with an 'image' field")
        row = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}
        images = {}
        for key, value in row.items():
            if value and (key == "image" or key.startswith("image_")):
                images[key.removeprefix("image_")] = _resolve(root, value)
        if not images:
            raise DataError(f"{source}: entry {n} has no 'image'")
        subject = row.get("subject") or _stem(next(iter(images.values())))
        cases.append(
            Case(
                subject=str(subject),
                images=images,
                label=_resolve(root, row["label"]) if row.get("label") else None,
                mask=_resolve(root, row["mask"]) if row.get("mask") else None,
                split=row.get("split") or None,
            )
        )
    subjects = [c.subject for c in cases]
    dupes = sorted({s for s in subjects if subjects.count(s) > 1})
    if dupes:
        raise DataError(f"{source}: subject(s) listed more than once: {', '.join(dupes[:5])}")
    return cases


def _resolve(root: str, value: str) -> str:
    if "://" in value or value.startswith("/"):
        return value
    return join(root, value)


def _stem(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1]
    for suffix in (".nii.gz", ".nii", ".png", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def apply_split_file(cases: list[Case], source: str) -> None:
    """Take each subject's split from `splits.json` beside the data, when there is one."""
    root = source if not source.lower().endswith((".csv", ".json")) else source.rsplit("/", 1)[0]
    uri = join(root, "splits.json")
    if not exists(uri):
        return
    try:
        splits = json.loads(read_bytes(uri))
    except json.JSONDecodeError as err:
        raise DataError(f"{uri}: not valid JSON ({err})") from None
    for case in cases:
        if case.subject in splits:
            case.split = splits[case.subject]
