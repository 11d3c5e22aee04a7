"""Reading a prepared dataset's slice shards, apart from the rest of `raymed.data.prepared` so that
Ray Data's read tasks import neither MONAI nor torch: a reader process that imported them spent
seconds on it before its first shard, and training waited for it."""

from __future__ import annotations

import io
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymed.data.io import join, read_bytes

SHARDS = "slices"


def shard_uri(prefix: str, subject: str) -> str:
    return join(prefix, SHARDS, quote(subject, safe="") + ".parquet")


def read_shard(uri: str, columns: list[str]) -> pa.Table:
    return pq.read_table(io.BytesIO(read_bytes(uri)), columns=columns)


def read_shards(shards: dict[str, np.ndarray], columns: list[str]) -> pa.Table:
    """Ray Data task: shards → the rows of theirs a phase selected, with only its columns."""
    tables = []
    for uri, slices in zip(shards["uri"], shards["slices"]):
        table = read_shard(str(uri), columns)
        tables.append(table.filter(pa.array(np.isin(table.column("slice").to_numpy(), slices))))
    return pa.concat_tables(tables)
