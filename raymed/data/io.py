"""Reading and writing volumes and slices through fsspec, so local paths and s3:// look alike.

S3 settings come from the usual environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, AWS_REGION (or AWS_DEFAULT_REGION) and AWS_ENDPOINT_URL (or
AWS_ENDPOINT_URL_S3) for MinIO, moto or any other S3-compatible store.
"""

from __future__ import annotations

import gzip
import io
import os
import uuid
from dataclasses import dataclass

import fsspec
import nibabel as nib
import numpy as np

from raymed.errors import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SLICE_SUFFIXES = (".png", ".npy")


@dataclass
class Volume:
    """A 3D (or 4D) array with the affine that places it in scanner space."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def storage_options(uri: str) -> dict:
    """fsspec options for a URI: S3 endpoint and region from the environment."""
    if not str(uri).startswith("s3://"):
        return {}
    client_kwargs = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    return {"client_kwargs": client_kwargs} if client_kwargs else {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding `uri` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(str(uri), **storage_options(uri))
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme of `base`."""
    return "/".join([str(base).rstrip("/"), *[p.strip("/") for p in parts]])


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise DataError(f"{uri}: file not found") from None


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write to a temporary name and rename, so readers never see half a file.

    On S3 a single PUT is already atomic, so the object is written directly.
    """
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if str(uri).startswith("s3://"):
        fs.pipe_file(path, data)
        return
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def is_nifti(uri: str) -> bool:
    return str(uri).lower().endswith(NIFTI_SUFFIXES)


def decode_nifti(data: bytes, name: str) -> Volume:
    """Decode NIfTI bytes (gzipped or not); `name` is only used in error messages."""
    try:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        img = nib.Nifti1Image.from_bytes(data)
        array = np.asarray(img.dataobj)
    except (EOFError, OSError, ValueError, gzip.BadGzipFile) as err:
        raise DataError(f"{name}: not a readable NIfTI file ({_reason(err)})") from None
    except Exception as err:  # nibabel raises its own exception types for bad headers
        raise DataError(f"{name}: not a readable NIfTI file ({_reason(err)})") from None
    if array.ndim < 2:
        raise DataError(f"{name}: NIfTI holds a {array.ndim}-dimensional array; expected 2D or 3D")
    return Volume(array=array, affine=np.asarray(img.affine, dtype=np.float64))


def _reason(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def read_volume(uri: str) -> Volume:
    """Read a NIfTI volume from a local path or s3:// URI, keeping its affine."""
    if not is_nifti(uri):
        raise DataError(f"{uri}: not a NIfTI file (expected {', '.join(NIFTI_SUFFIXES)})")
    return decode_nifti(read_bytes(uri), str(uri))


def encode_nifti(array: np.ndarray, affine: np.ndarray, compress: bool = True) -> bytes:
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=4) if compress else raw


def write_volume(uri: str, array: np.ndarray, affine: np.ndarray) -> None:
    """Write a NIfTI volume atomically with the given geometry (.nii.gz is compressed)."""
    if not is_nifti(uri):
        raise DataError(f"{uri}: output must end in .nii or .nii.gz")
    write_bytes_atomic(uri, encode_nifti(array, affine, compress=str(uri).endswith(".gz")))


def decode_slice(data: bytes, name: str) -> np.ndarray:
    """Decode a 2D PNG or NPY image to a float32 array (H, W) or (C, H, W)."""
    lower = name.lower()
    try:
        if lower.endswith(".npy") or data[:6] == b"\x93NUMPY":
            array = np.load(io.BytesIO(data), allow_pickle=False)
        elif lower.endswith(".png") or data[:8] == b"\x89PNG\r\n\x1a\n":
            from PIL import Image

            with Image.open(io.BytesIO(data)) as img:
                img.load()
                array = np.asarray(img)
            if array.ndim == 3:
                array = np.moveaxis(array, -1, 0)
        else:
            raise DataError(f"{name}: not a PNG or NPY image")
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{name}: not a readable image ({_reason(err)})") from None
    if array.ndim not in (2, 3):
        raise DataError(f"{name}: image has shape {array.shape}; expected (H, W) or (C, H, W)")
    return array.astype(np.float32)


def read_slice(uri: str) -> np.ndarray:
    """Read a 2D slice saved as PNG or NPY."""
    if not str(uri).lower().endswith(SLICE_SUFFIXES):
        raise DataError(f"{uri}: not a PNG or NPY image")
    return decode_slice(read_bytes(uri), str(uri))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)
