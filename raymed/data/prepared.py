"""Prepared datasets: every case preprocessed once, by a Ray Data pipeline, into slice records that
training streams into its workers and that validation, evaluation and inference read back whole.

A prepared dataset `PREFIX` (a local folder or an s3:// prefix) holds:
- `slices/SUBJECT.parquet`: one shard per case, one row per axial slice of the prepared volume:
  `subject`, `slice`, `position`, `brain` (mask voxels in the slice), `lesion` (any label voxel),
  and `image`, `mask`, `label`, `tissue` as raw arrays (dtypes and shapes in the manifest). Its
  Parquet metadata holds the case's record, so an interrupted prepare keeps the shards it wrote.
- `prepare.json`: the settings the prepare started with; a rerun with other settings is refused.
- `prepared.json`: the manifest, written last: those settings, the modalities and array shapes,
  and per case its split, shard, source geometry, and per-slice brain counts and lesion flags, so
  a phase counts its slices without opening a shard.

Every slice is kept: `data.min_brain` and the healthy-only filter apply when a phase reads, with
the arithmetic of `raymed.data.slices.axial_slices`, and a volume read back is the array
`prepare` made. The recorded settings are the preprocessing keys and `split_seed`; a run whose
config differs in any of them is refused, naming the key; a run may take some of the prepared
modalities (their channels are picked from the records; the brain mask stays the prepared one).
"""

from __future__ import annotations

import functools
import io
import json
import time
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymed.data.discovery import Case, discover
from raymed.data.io import Volume, exists, filesystem, join, read_bytes, write_bytes_atomic
from raymed.data.preprocess import TISSUES, Prepared, Preprocessing, prepare
from raymed.data.shards import read_shard, read_shards, shard_uri
from raymed.data.splits import assign_splits
from raymed.errors import ConfigError, DataError

MANIFEST, STARTED = "prepared.json", "prepare.json"
FORMAT = 1
RECORD_KEY = b"raymed.case"
READERS = 4  # shard-reading tasks a streamed phase runs at a time
ARRAYS = {"image": np.float32, "mask": np.bool_, "label": np.uint8, "tissue": np.float32}


def recorded_settings(data) -> dict:
    """The keys a prepared dataset fixes: preprocessing and the split seed (JSON values)."""
    dumped = data.model_dump(mode="json")
    return {key: dumped[key] for key in (*Preprocessing.model_fields, "split_seed") if key in dumped}


def is_prepared(source: str) -> bool:
    source = str(source).rstrip("/")
    return not source.lower().endswith((".csv", ".json")) and exists(join(source, MANIFEST))


def check_settings(recorded: dict, data, where: str, exact: bool = False) -> None:
    """Refuse a config whose preprocessing differs from what `where` was prepared with; unless
    `exact`, some of the prepared modalities (or none given) are no difference."""
    current = recorded_settings(data)
    for key, value in recorded.items():
        if key not in current or (not exact and key == "modalities" and set(current[key] or ()) <= set(value)):
            continue
        if current[key] != value:
            raise ConfigError(f"{where} was prepared with data.{key}={json.dumps(value)}, this run has "
                              f"data.{key}={json.dumps(current[key])}: run with the recorded value or prepare "
                              "the data again with this one")


def shard_table(prepared: Prepared, record: dict) -> pa.Table:
    """Every axial slice of a prepared volume as a row; the case's record in the metadata."""
    z = prepared.image.shape[-1]
    label = prepared.label if prepared.label is not None else np.zeros(prepared.mask.shape, np.uint8)
    columns = {
        "subject": pa.array([prepared.subject] * z, pa.string()),
        "slice": pa.array(np.arange(z, dtype=np.int64)),
        "position": pa.array((np.arange(z) / max(z - 1, 1)).astype(np.float32)),
        "brain": pa.array(prepared.mask.reshape(-1, z).sum(axis=0).astype(np.int64)),
        "lesion": pa.array(label.reshape(-1, z).any(axis=0)),
    }
    arrays = {"image": prepared.image, "mask": prepared.mask, "label": label, "tissue": prepared.tissue}
    for name, volume in arrays.items():
        if volume is not None:
            stacked = np.ascontiguousarray(np.moveaxis(volume.astype(ARRAYS[name], copy=False), -1, 0))
            columns[name] = pa.array([s.tobytes() for s in stacked], pa.binary())
    return pa.table(columns).replace_schema_metadata({RECORD_KEY: json.dumps(record)})


def case_record(case: Case, prepared: Prepared) -> dict:
    z = prepared.mask.shape[-1]
    label = prepared.label if prepared.label is not None else np.zeros(prepared.mask.shape, np.uint8)
    return {
        "subject": case.subject, "split": case.split, "images": case.images, "label": case.label,
        "mask": case.mask, "slices": z,
        "source": {"shape": list(prepared.source.array.shape[:3]), "affine": prepared.source.affine.tolist()},
        "affine": prepared.affine.tolist(),
        "brain": prepared.mask.reshape(-1, z).sum(axis=0).astype(int).tolist(),
        "lesion": label.reshape(-1, z).any(axis=0).astype(int).tolist(),
    }


def prepare_case(row: dict, prefix: str, settings: dict, tissue: bool) -> dict:
    """Ray Data task: one case → its shard (kept if a previous run wrote it) and its record,
    or the error that makes it unusable."""
    case = Case(**json.loads(row["case"]))
    uri = shard_uri(prefix, case.subject)
    if exists(uri):
        fs, path = filesystem(uri)
        with fs.open(path, "rb") as f:
            metadata = pq.read_schema(f).metadata  # the footer only
        return {"subject": case.subject, "record": metadata[RECORD_KEY].decode(), "error": "", "kept": True}
    try:
        prepared = prepare(case, Preprocessing.model_validate(settings_only(settings)), tissue=tissue)
    except DataError as err:
        return {"subject": case.subject, "record": "", "error": str(err), "kept": False}
    record = case_record(case, prepared)
    sink = io.BytesIO()
    pq.write_table(shard_table(prepared, record), sink, compression="zstd")
    write_bytes_atomic(uri, sink.getvalue())
    return {"subject": case.subject, "record": json.dumps(record), "error": "", "kept": False}


def settings_only(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k in Preprocessing.model_fields}


def prepare_dataset(source: str, out: str, data, pattern: str | None = None, report=print) -> dict:
    """Preprocess every case of `source` once into `out` with a Ray Data pipeline (one task per
    case, as many at a time as the cluster has CPUs); returns the manifest.

    Bad cases stop it unless `data.skip_bad` (then they are listed in the manifest); either way
    every good case's shard is written first, and a rerun with the same settings keeps them.
    """
    import ray.data

    from raymed.console import quiet_data, start_ray

    out = str(out).rstrip("/")
    if exists(join(out, MANIFEST)):
        raise ConfigError(f"{out} is already a prepared dataset: choose another --out")
    cases = assign_splits(discover(source, pattern), seed=data.split_seed)
    if not data.modalities:
        data.modalities = sorted(cases[0].images)
    tissue = data.tissue_labels == "gmm" or all(all(t in c.extras for t in TISSUES) for c in cases)
    settings = recorded_settings(data)
    started = {"source": source, "settings": settings, "tissue": tissue}
    if exists(join(out, STARTED)):
        before = json.loads(read_bytes(join(out, STARTED)))
        check_settings(before["settings"], data, f"{out} (an unfinished prepare)", exact=True)
        if before["tissue"] != tissue:
            raise ConfigError(f"{out}: an unfinished prepare {'had' if before['tissue'] else 'had no'} tissue maps; "
                              "this one differs: use another --out")
    else:
        write_bytes_atomic(join(out, STARTED), json.dumps(started, indent=1).encode())

    start_ray()
    quiet_data()
    tic = time.perf_counter()
    items = [{"case": json.dumps(asdict(case))} for case in cases]
    pipeline = ray.data.from_items(items, override_num_blocks=len(items)).map(
        prepare_case, fn_kwargs={"prefix": out, "settings": settings, "tissue": tissue})
    records, bad = [], []
    for done, row in enumerate(pipeline.iter_rows(), start=1):
        if row["error"]:
            bad.append({"subject": row["subject"], "error": row["error"]})
            report(f"[{done}/{len(cases)}] {row['subject']}: BAD {row['error']}")
            continue
        record = json.loads(row["record"])
        records.append(record)
        how = "kept from the unfinished run" if row["kept"] else f"{time.perf_counter() - tic:.0f}s"
        report(f"[{done}/{len(cases)}] {record['subject']} {record['split']}: {record['slices']} slices ({how})")
    if bad and not data.skip_bad:
        raise DataError(f"{len(bad)} of {len(cases)} cases cannot be prepared ({bad[0]['subject']}: {bad[0]['error']}"
                        f"{'; …' if len(bad) > 1 else ''}); the good cases' shards are kept in {out}: fix the data or "
                        "pass --set data.skip_bad=true, then run the same command again")
    if not records:
        raise DataError(f"{source}: no case could be prepared")
    size, channels = data.size, len(data.modalities)
    manifest = {
        "format": FORMAT, "source": source, "settings": settings, "tissue": tissue,
        "shapes": {"image": [channels, size, size], "mask": [size, size], "label": [size, size],
                   **({"tissue": [len(TISSUES), size, size]} if tissue else {})},
        "cases": sorted(records, key=lambda r: r["subject"]), "skipped": bad,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_bytes_atomic(join(out, MANIFEST), json.dumps(manifest).encode())
    return manifest


class PreparedDataset:
    """A prepared dataset's manifest, and the ways of reading its records."""

    def __init__(self, prefix: str, manifest: dict):
        self.prefix, self.manifest = prefix, manifest
        self.records = {r["subject"]: r for r in manifest["cases"]}

    @staticmethod
    @functools.lru_cache(maxsize=8)
    def open(prefix: str) -> PreparedDataset:
        """The dataset at `prefix` (manifests never change once written, so they are cached)."""
        manifest = json.loads(read_bytes(join(prefix, MANIFEST)))
        if manifest.get("format") != FORMAT:
            raise DataError(f"{prefix}: prepared with format {manifest.get('format')}; this raymed reads {FORMAT}")
        return PreparedDataset(prefix, manifest)

    @property
    def modalities(self) -> list[str]:
        return self.manifest["settings"]["modalities"]

    def cases(self) -> list[Case]:
        """The prepared cases, as discovery gives cases (their split fixed, `prepared` set)."""
        return [Case(subject=r["subject"], images=r["images"], label=r["label"], mask=r["mask"], split=r["split"],
                     prepared=self.prefix) for r in self.manifest["cases"]]

    def adopt(self, data) -> None:
        """Check a run's data settings against the recorded ones; pin its modalities to them."""
        check_settings(self.manifest["settings"], data, self.prefix)
        if not data.modalities:
            data.modalities = list(self.modalities)

    def volume(self, subject: str, data, tissue: bool = False) -> Prepared:
        """A case's prepared volume, read back from its shard: what `prepare` gave when it was made."""
        check_settings(self.manifest["settings"], data, self.prefix)
        if tissue and not self.manifest["tissue"]:
            raise DataError(f"{self.prefix} was prepared without tissue maps: prepare it from cases with "
                            f"*_{{{','.join(TISSUES)}}} maps or with data.tissue_labels=gmm")
        record, names = self.records[subject], ["image", "mask", "label", *(["tissue"] if tissue else [])]
        shard = read_shard(shard_uri(self.prefix, subject), ["slice", *names])
        shard = shard.sort_by("slice")
        arrays = {name: self.stack(shard, name) for name in names}
        source = record["source"]
        return Prepared(
            subject=subject, image=arrays["image"][self.channels(data.modalities)],
            label=arrays["label"] if record["label"] else None, mask=arrays["mask"], affine=np.asarray(record["affine"]),
            split=record["split"], tissue=arrays.get("tissue"),
            # the source grid is all that maps go back onto: its shape and affine, no voxels
            source=Volume(np.broadcast_to(np.float32(0), tuple(source["shape"])), np.asarray(source["affine"])),
        )

    def channels(self, modalities: list[str] | None) -> list[int]:
        """Where a run's modalities (all prepared ones when unset) sit among the prepared channels."""
        return [self.modalities.index(m) for m in modalities or self.modalities]

    def stack(self, table: pa.Table, name: str) -> np.ndarray:
        """A binary column of slices → the volume (…, Z)."""
        shape = self.manifest["shapes"][name]
        rows = table.column(name).to_pylist()
        stacked = np.frombuffer(b"".join(rows), ARRAYS[name]).reshape(len(rows), *shape)
        return np.moveaxis(stacked, 0, -1).copy()

    def selected(self, subjects: list[str], healthy: bool, min_brain: float,
                 chosen: set[tuple[str, int]] | None = None) -> dict[str, list[int]]:
        """Subject → the slice indices a phase trains on, by the rule of `axial_slices`."""
        pixels = self.manifest["shapes"]["mask"][0] * self.manifest["shapes"]["mask"][1]
        out = {}
        for subject in subjects:
            record = self.records[subject]
            keep = np.asarray(record["brain"]) / pixels >= min_brain
            if healthy:
                keep &= ~np.asarray(record["lesion"], bool)
            idx = [int(i) for i in np.flatnonzero(keep) if chosen is None or (subject, int(i)) in chosen]
            if idx:
                out[subject] = idx
        return out

    def stream(self, rows: dict[str, list[int]], fields: tuple[str, ...]):
        """A Ray Dataset of exactly these rows (subject → slice indices), reading only `fields`:
        one task per shard, the shards in a new order each epoch, streamed without a barrier.

        The read tasks reserve no CPU and run at most `READERS` at a time: they decompress shards
        in the gaps between training steps, and a cluster whose CPUs the workers hold (Train and
        Tune trials reserve them) would otherwise never schedule them and training would wait
        for ever.
        """
        import ray.data

        columns = ["subject", "slice", *[f for f in fields if f not in ("subject", "slice")]]
        if "tissue" in columns and not self.manifest["tissue"]:
            raise DataError(f"{self.prefix} was prepared without tissue maps")
        shards = [{"uri": shard_uri(self.prefix, s), "slices": rows[s]} for s in sorted(rows)]
        return (ray.data.from_items(shards, override_num_blocks=len(shards)).randomize_block_order()
                .map_batches(read_shards, fn_kwargs={"columns": columns}, batch_size=1, batch_format="numpy",
                             num_cpus=0, compute=ray.data.TaskPoolStrategy(size=READERS)))

