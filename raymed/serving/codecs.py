"""Request bodies in, responses out: sniffing, decoding and validating uploads before any model runs.

Uploads are raw request bodies (no multipart): NIfTI (`.nii`, `.nii.gz`), PNG or NPY, recognised
by their magic bytes. Every problem becomes a `RequestError` carrying the HTTP status and a JSON
body `{"error": code, "detail": message}`.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np

from raymed.data.io import Volume, decode_nifti, decode_slice, encode_nifti
from raymed.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"
NIFTI1_MAGICS = (b"n+1\x00", b"ni1\x00")  # at byte 344
NIFTI2_MAGICS = (b"n+2\x00", b"ni2\x00")  # at byte 4

MEDIA_TYPES = {"json": "application/json", "nifti": "application/gzip", "npy": "application/x-npy",
               "png": "image/png"}


class RequestError(Exception):
    """A request the endpoint refuses: HTTP status, a short error code and a one-line detail."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(status, error, detail)  # all three in args, so it survives pickling across actors
        self.status, self.error, self.detail = status, error, detail

    def __str__(self) -> str:
        return f"{self.status} {self.error}: {self.detail}"

    def body(self) -> dict:
        return {"error": self.error, "detail": self.detail}


@dataclass
class Upload:
    """A decoded, validated input: `image` (C, X, Y, Z) for a volume or (C, H, W) for a slice."""

    image: np.ndarray
    volume: Volume | None  # the NIfTI as sent (its affine and grid), None for a 2D slice

    @property
    def is_volume(self) -> bool:
        return self.volume is not None


def gunzip_limited(data: bytes, limit: int) -> bytes:
    """Decompress gzip data, refusing to inflate past `limit` bytes (a gzip bomb stops early)."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as err:
        raise RequestError(400, "undecodable", f"not a readable gzip stream ({err})") from None
    if len(out) > limit:
        raise RequestError(413, "too_large", f"decompressed upload exceeds {limit // 2**20} MiB")
    return out


def sniff(data: bytes) -> str:
    """'nifti', 'png' or 'npy' from the first bytes of an (uncompressed) upload."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(NPY_MAGIC):
        return "npy"
    if data[344:348] in NIFTI1_MAGICS or data[4:8] in NIFTI2_MAGICS:
        return "nifti"
    raise RequestError(415, "unsupported_format", "body is not a NIfTI (.nii/.nii.gz), PNG or NPY file")


def decode_upload(data: bytes, channels: int, max_decoded: int) -> Upload:
    """Decode an upload and check it fits a model taking `channels` input channels.

    NIfTI: (X, Y, Z) for one channel or (X, Y, Z, C); a 2D NIfTI is a slice. PNG/NPY: (H, W) or
    (C, H, W). Values must be finite numbers.
    """
    if not data:
        raise RequestError(400, "empty_body", "the request body is empty; send the file as the body")
    if data.startswith(GZIP_MAGIC):
        data = gunzip_limited(data, max_decoded)
    kind = sniff(data)
    try:
        if kind == "nifti":
            return _from_nifti(decode_nifti(data, "upload"), channels)
        array = decode_slice(data, "upload.png") if kind == "png" else _load_npy(data)
    except DataError as err:
        raise RequestError(400, "undecodable", str(err)) from None
    return _slice(array, channels, f"{kind.upper()} image of shape {array.shape}")


def _slice(array: np.ndarray, channels: int, what: str) -> Upload:
    """A 2D input (H, W) or (C, H, W) as float32 (C, H, W), checked against the model's channels."""
    image = np.asarray(array[None] if array.ndim == 2 else array, dtype=np.float32)
    _check_channels(image.shape[0], channels, what)
    if min(image.shape[1:]) < 2:
        raise RequestError(422, "bad_shape", f"{what} is too small")
    _check_values(image)
    return Upload(image=image, volume=None)


def _check_dtype(array: np.ndarray, what: str) -> None:
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating) or array.dtype == bool):
        raise RequestError(422, "bad_dtype", f"{what} type {array.dtype} is not a real number type")


def _load_npy(data: bytes) -> np.ndarray:
    """An NPY slice (H, W) or (C, H, W) of real numbers, as float32; never unpickles."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:
        raise DataError(f"upload.npy: not a readable NPY file ({type(err).__name__})") from None
    _check_dtype(array, "NPY element")
    if array.ndim not in (2, 3):
        raise RequestError(422, "bad_shape", f"NPY of shape {array.shape}; expected (H, W) or (C, H, W)")
    return array.astype(np.float32)


def _from_nifti(volume: Volume, channels: int) -> Upload:
    array = volume.array
    _check_dtype(array, "NIfTI voxel")
    if array.ndim == 2:
        return _slice(array, channels, f"2D NIfTI of shape {array.shape}")
    if array.ndim == 3:
        image = array[None]
    elif array.ndim == 4:
        image = np.moveaxis(array, -1, 0)
    else:
        raise RequestError(422, "bad_shape", f"NIfTI has shape {array.shape}; expected (X, Y, Z) or (X, Y, Z, C)")
    _check_channels(image.shape[0], channels, f"NIfTI of shape {array.shape}")
    if min(image.shape[1:3]) < 2:
        raise RequestError(422, "bad_shape", f"NIfTI of shape {array.shape} is too small in-plane")
    image = np.ascontiguousarray(image, dtype=np.float32)
    _check_values(image)
    return Upload(image=image, volume=volume)


def _check_channels(got: int, expected: int, what: str) -> None:
    if got != expected:
        layout = "(X, Y, Z, C) NIfTI or (C, H, W) NPY/PNG" if expected > 1 else "(X, Y, Z) NIfTI or (H, W) NPY/PNG"
        raise RequestError(422, "wrong_channels",
                           f"model expects {expected} channel{'s' * (expected > 1)}, got {got} ({what}); "
                           f"send a {layout}")


def _check_values(image: np.ndarray) -> None:
    if not np.isfinite(image).all():
        raise RequestError(422, "non_finite", "input contains NaN or infinite values")


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_map(amap: np.ndarray, affine: np.ndarray | None, output: str) -> bytes:
    """An anomaly map as gzipped NIfTI (with the input's affine; identity for a slice) or NPY."""
    if output == "nifti":
        return encode_nifti(amap.astype(np.float32), np.eye(4) if affine is None else affine)
    return encode_npy(amap.astype(np.float32))


def encode_images(images: np.ndarray, output: str) -> bytes:
    """Generated images (N, C, H, W) in [0, 1] as NPY, NIfTI (H, W, N[, C]) or one PNG grid.

    The PNG has one row per image and one column per channel, as 8-bit grey.
    """
    if output == "npy":
        return encode_npy(images.astype(np.float32))
    if output == "nifti":
        stack = np.moveaxis(images, (0, 1), (-1, -2))  # (H, W, C, N)
        stack = stack[..., 0, :] if stack.shape[2] == 1 else np.moveaxis(stack, 2, 3)
        return encode_nifti(stack.astype(np.float32), np.eye(4))
    from PIL import Image

    n, c, h, w = images.shape
    grid = images.transpose(0, 2, 1, 3).reshape(n * h, c * w)
    buffer = io.BytesIO()
    Image.fromarray((np.clip(grid, 0, 1) * 255).round().astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def choose_output(requested: str | None, accept: str | None, allowed: tuple[str, ...], default: str) -> str:
    """The response format from `?output=` or the Accept header; unknown values are a 406."""
    if requested:
        if requested not in allowed:
            raise RequestError(406, "unsupported_output", f"output={requested!r}; choose one of: {', '.join(allowed)}")
        return requested
    for part in (accept or "").split(","):
        media = part.split(";")[0].strip().lower()
        for name in allowed:
            if MEDIA_TYPES[name] == media:
                return name
    return default
