"""What a worker trains on in a phase: its share of the phase's slices, epoch after epoch.

Two feeds give the same batches. From a data source the worker reads and preprocesses its
subjects (or every k-th slice when the phase has fewer subjects than workers) and holds them in
memory. From a prepared dataset (`raymed data prepare`) the driver selects the phase's slices
and hands Ray Train one Ray Dataset per phase; each worker streams its equal split of it through
`ray.train.get_dataset_shard`, shuffled locally each epoch, so its memory does not grow with the
cohort. Either way every worker takes the same number of steps per epoch, so DDP's collectives
line up.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from ray.data.collate_fn import NumpyBatchCollateFn

from raymed.data.discovery import Case
from raymed.data.prepared import ARRAYS, PreparedDataset
from raymed.data.slices import SliceSet, load_slices, read_slice_list
from raymed.data.splits import select
from raymed.engine.validation import all_reduce
from raymed.errors import DataError
from raymed.methods.base import MethodConfig, Phase, PhaseData

PREFETCH = 2  # batches a streamed share keeps ready


def phase_fields(data: PhaseData) -> tuple[str, ...]:
    """The batch keys a phase reads: the image, then its own."""
    return tuple(dict.fromkeys(("image", *data.fields)))


def phase_subjects(cases: list[Case], data: PhaseData) -> list[Case]:
    """The subjects a phase trains on: its split, or k of its labelled subjects drawn by seed."""
    subjects = select(cases, data.split)
    if data.labelled is None:
        return subjects
    labelled = [c for c in subjects if c.label]
    if len(labelled) < data.labelled:
        raise DataError(f"a phase needs {data.labelled} labelled subjects in the {data.split} split; "
                        f"it has {len(labelled)}")
    order = np.random.default_rng(data.labelled_seed).permutation(len(labelled))[:data.labelled]
    return [labelled[i] for i in sorted(order)]


def check_listed(data: PhaseData, listed: int, found: int) -> None:
    if found < listed:
        raise DataError(f"{data.slice_list}: {listed - found} of its slices are not training slices "
                        f"of the {data.split} split")


def load_share(cases: list[Case], data: PhaseData, config: MethodConfig, rank: int, world: int) -> SliceSet:
    """This worker's share of a phase's slices, read from the data source: its subjects, or every
    k-th slice when the phase has fewer subjects than workers (or trains on a slice list)."""
    subjects = phase_subjects(cases, data)
    chosen = read_slice_list(data.slice_list) if data.slice_list else None
    if chosen is not None:
        listed = {subject for subject, _ in chosen}
        subjects = [c for c in subjects if c.subject in listed]
    by_slice = len(subjects) < world or chosen is not None
    slices = load_slices(subjects if by_slice else subjects[rank::world], config.data,
                         healthy_only=data.slices == "healthy", min_brain=config.data.min_brain,
                         skip_bad=config.data.skip_bad, tissue="tissue" in data.fields)
    if chosen is not None:
        slices = slices.take(np.flatnonzero([key in chosen for key in slices.keys]))
        check_listed(data, len(chosen), len(slices))
    return slices.take(np.arange(rank, len(slices), world)) if by_slice else slices


def streams(source: str, cases: list[Case], phases: list[Phase], config: MethodConfig, workers: int):
    """Driver side, for a prepared dataset: the Ray Dataset of each phase's slices (named
    `phase{index}`) and the rows each worker's equal split of it holds."""
    prepared = PreparedDataset.open(source)
    datasets, rows = {}, {}
    for index, phase in enumerate(phases):
        data = phase.data
        chosen = read_slice_list(data.slice_list) if data.slice_list else None
        subjects = [c.subject for c in phase_subjects(cases, data)]
        selected = prepared.selected(subjects, data.slices == "healthy", config.data.min_brain, chosen)
        total = sum(len(idx) for idx in selected.values())
        if chosen is not None:
            check_listed(data, len(chosen), total)
        if total < workers:
            raise DataError(f"phase {phase.name}: {total} training slices cannot be shared by {workers} workers")
        datasets[f"phase{index}"] = prepared.stream(selected, phase_fields(data))
        rows[index] = total // workers
    return datasets, rows


def common_batches(n: int, batch_size: int, device) -> int:
    """Batches per epoch that every worker can supply (the smallest share decides)."""
    mine = all_reduce(torch.tensor([n // batch_size if n >= batch_size else min(n, 1)]), dist.ReduceOp.MIN)
    if int(mine.item()) == 0:
        raise DataError("a worker has no training slices in its share; use fewer workers")
    return int(mine.item())


class MemoryShare:
    """A share held in memory: each epoch a seeded permutation, batch by batch."""

    def __init__(self, slices: SliceSet, batch_size: int, device):
        self.slices, self.batch_size, self.device = slices, batch_size, device
        self.batches = common_batches(len(slices), batch_size, device)

    def epoch(self, seed: int, fields: tuple[str, ...]):
        order = np.random.default_rng(seed).permutation(len(self.slices))
        for b in range(self.batches):
            idx = np.sort(order[b * self.batch_size:(b + 1) * self.batch_size])
            yield self.slices.batch(idx, fields, self.device)


class StreamShare:
    """A share streamed from a prepared dataset: `rows` slices each epoch (every worker's split is
    equal), in batches shuffled through a local buffer of `shuffle_buffer` slices; `channels` picks
    the run's modalities from the prepared image."""

    def __init__(self, name: str, rows: int, batch_size: int, shuffle_buffer: int, prepared: PreparedDataset,
                 channels: list[int], device):
        import ray.train

        self.shard = ray.train.get_dataset_shard(name)
        self.batch_size, self.shuffle_buffer, self.device = batch_size, shuffle_buffer, device
        self.shapes, self.channels = prepared.manifest["shapes"], channels
        self.drop_last = rows >= batch_size  # as in memory: whole batches, or one short batch
        self.batches = rows // batch_size if self.drop_last else 1

    def epoch(self, seed: int, fields: tuple[str, ...]):
        batches = self.shard.iter_torch_batches(
            batch_size=self.batch_size, collate_fn=ToBatch(fields, self.shapes, self.channels), drop_last=self.drop_last,
            prefetch_batches=PREFETCH, local_shuffle_buffer_size=self.shuffle_buffer or None,
            local_shuffle_seed=seed if self.shuffle_buffer else None)
        count = 0
        for batch in batches:
            count += 1
            yield {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if count != self.batches:
            raise DataError(f"a streamed share gave {count} batches, {self.batches} were expected")


class ToBatch(NumpyBatchCollateFn):
    """Slice records (a NumPy batch from Ray Data) → the batch a method sees (`Batch`), with the
    dtypes of `SliceSet.batch` and the image's `channels`."""

    def __init__(self, fields: tuple[str, ...], shapes: dict, channels: list[int]):
        self.fields, self.shapes, self.channels = fields, shapes, channels

    def __call__(self, rows: dict[str, np.ndarray]) -> dict:
        out = {}
        for name in self.fields:
            column = rows[name]
            if name == "subject":
                out[name] = [str(s) for s in column]
            elif name in ARRAYS:
                array = np.frombuffer(b"".join(column), ARRAYS[name]).reshape(len(column), *self.shapes[name])
                out[name] = torch.from_numpy(array[:, self.channels] if name == "image" else array.copy())
            else:
                out[name] = torch.from_numpy(np.asarray(column, np.float32 if name == "position" else np.int64))
        return out
