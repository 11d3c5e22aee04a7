"""Where runs live: a local folder or s3://bucket/prefix, seen the same way by Ray and fsspec."""

from __future__ import annotations

import os

import pyarrow.fs

from raymed.data.io import filesystem


def ray_storage(storage: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray's RunConfig.

    For S3 the s3fs filesystem (endpoint, credentials and region from the environment, like
    every other read and write in raymed) is handed to Ray through pyarrow's fsspec bridge.
    """
    if storage.startswith("s3://"):
        fs, path = filesystem(storage)
        return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    return os.path.abspath(storage), None


def storage_uri(storage: str, fs_path: str) -> str:
    """Turn a path Ray reports back into a URI raymed can read (s3:// again for S3)."""
    return f"s3://{fs_path.lstrip('/')}" if storage.startswith("s3://") and "://" not in fs_path else fs_path
