"""Request bodies in, responses out: sniffing, decoding and validating uploads before any model runs.

Uploads are raw request bodies (no multipart): NIfTI (`.nii`, `.nii.gz`), PNG or NPY, recognised
by their magic bytes. What a request will cost is bounded from the file's header before any voxel
is decoded or resized. Every problem becomes a `RequestError` carrying the HTTP status and a JSON
body `{"error": code, "detail": message, "request_id": id}`.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from raymed.data.io import Volume, decode_slice, encode_nifti
from raymed.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"
NIFTI1_MAGICS = (b"n+1\x00", b"ni1\x00")  # at byte 344
NIFTI2_MAGICS = (b"n+2\x00", b"ni2\x00")  # at byte 4
HEAD_BYTES = 544  # a NIfTI-2 header (540) and its extension flag: enough to sniff and size any upload
MAX_HEADER_BYTES = 2**20  # header plus extensions before the voxels
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # IHDR colour type -> channels once decoded

MEDIA_TYPES = {"json": "application/json", "nifti": "application/gzip", "npy": "application/x-npy",
               "png": "image/png"}


class RequestError(Exception):
    """A request the endpoint refuses: HTTP status, a short error code and a one-line detail."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(status, error, detail)  # all three in args, so it survives pickling across actors
        self.status, self.error, self.detail = status, error, detail

    def __str__(self) -> str:
        return f"{self.status} {self.error}: {self.detail}"

    def body(self, request_id: str | None = None) -> dict:
        return {"error": self.error, "detail": self.detail, "request_id": request_id}


@dataclass(frozen=True)
class Limits:
    """What one request may cost, checked from the file's header before any voxel is decoded.

    `max_voxels`: voxels of the upload (all channels); `max_slices`: axial slices the model runs
    on; `max_float_bytes`: one float32 copy of the upload or of its grid at the model's size
    (a request's peak memory is a small multiple of it).
    """

    max_voxels: int
    max_slices: int
    max_float_bytes: int

    def describe(self) -> dict:
        return {"max_voxels": self.max_voxels, "max_slices": self.max_slices,
                "max_float_mb": self.max_float_bytes / 2**20}


@dataclass(frozen=True)
class Grid:
    """The model's input grid: in-plane `size`, and `slices` (None: a volume keeps its own count)."""

    size: int
    slices: int | None


@dataclass
class Upload:
    """A decoded, validated input: `image` (C, X, Y, Z) for a volume or (C, H, W) for a slice."""

    image: np.ndarray
    volume: Volume | None  # the NIfTI's grid and affine (its array a view of `image`), None for a 2D slice

    @property
    def is_volume(self) -> bool:
        return self.volume is not None


def gunzip_limited(data: bytes, limit: int, truncate: bool = False) -> bytes:
    """Inflate gzip data up to `limit` bytes: beyond it, cut there (`truncate`) or refuse with 413."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as err:
        raise RequestError(400, "undecodable", f"not a readable gzip stream ({err})") from None
    if len(out) <= limit and not inflater.eof and not inflater.unconsumed_tail:
        raise RequestError(400, "undecodable", "gzip stream is truncated")
    if len(out) > limit:
        if truncate:
            return out[:limit]
        raise RequestError(413, "too_large", f"decompressed upload exceeds {limit / 2**20:g} MiB")
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


def decode_upload(data: bytes, channels: int, limits: Limits, grid: Grid) -> Upload:
    """Decode an upload and check it fits a model taking `channels` input channels on `grid`.

    NIfTI: (X, Y, Z) for one channel or (X, Y, Z, C); a 2D NIfTI is a slice. PNG/NPY: (H, W) or
    (C, H, W). Shape, type, geometry and the work it implies are checked from the header first;
    values must be finite numbers.
    """
    if not data:
        raise RequestError(400, "empty_body", "the request body is empty; send the file as the body")
    compressed = data.startswith(GZIP_MAGIC)
    head = gunzip_limited(data, HEAD_BYTES, truncate=True) if compressed else data[:HEAD_BYTES]
    kind = sniff(head)
    if kind == "nifti":
        header = _nifti_header(head)
        size = _check_nifti(header, channels, limits, grid)
        if compressed:
            data = gunzip_limited(data, size, truncate=True)  # inflate no further than the header says
        if len(data) < size:
            raise RequestError(400, "undecodable", f"NIfTI is truncated: {len(data)} of {size} bytes")
        return _from_nifti(data, header)
    if compressed:
        data = gunzip_limited(data, limits.max_float_bytes)
    if kind == "png":
        _check_slice(_png_shape(data), channels, limits, "PNG image")
        try:
            array = decode_slice(data, "upload.png")
        except DataError as err:
            raise RequestError(400, "undecodable", str(err)) from None
    else:
        array = _load_npy(data, channels, limits)
    return Upload(image=_finite(np.asarray(array[None] if array.ndim == 2 else array, dtype=np.float32)), volume=None)


def _nifti_header(head: bytes):
    """The NIfTI-1 or NIfTI-2 header at the start of `head`; 400 when it does not parse."""
    kind = nib.Nifti2Header if head[4:8] in NIFTI2_MAGICS else nib.Nifti1Header
    try:
        return kind.from_fileobj(io.BytesIO(head), check=True)
    except Exception as err:  # nibabel's HeaderDataError and friends
        raise RequestError(400, "undecodable", f"not a readable NIfTI header ({str(err).strip() or type(err).__name__})") from None


def _check_nifti(header, channels: int, limits: Limits, grid: Grid) -> int:
    """Refuse from the header alone whatever the model cannot take; returns the file's byte size."""
    shape, dtype = tuple(int(n) for n in header.get_data_shape()), header.get_data_dtype()
    _check_dtype(dtype, "NIfTI voxel")
    affine = header.get_best_affine()
    if not np.isfinite(affine).all() or np.linalg.matrix_rank(affine[:3, :3]) < 3:
        raise RequestError(422, "no_geometry", "NIfTI affine is singular or not finite: the volume has no usable "
                                               "geometry (check its sform/qform)")
    offset = int(header.get_data_offset())
    if not 0 <= offset <= MAX_HEADER_BYTES:
        raise RequestError(400, "undecodable", f"NIfTI data offset {offset} is not a plausible header size")
    if len(shape) == 2:
        _check_slice((1, *shape), channels, limits, f"2D NIfTI of shape {shape}")
    else:
        if len(shape) not in (3, 4):
            raise RequestError(422, "bad_shape", f"NIfTI has shape {shape}; expected (X, Y, Z) or (X, Y, Z, C)")
        _check_channels(shape[3] if len(shape) == 4 else 1, channels, f"NIfTI of shape {shape}")
        if min(shape[:2]) < 2 or shape[2] < 1:
            raise RequestError(422, "bad_shape", f"NIfTI of shape {shape} is too small in-plane")
        axial = int(np.flatnonzero(nib.orientations.io_orientation(affine)[:, 0] == 2)[0])
        slices = grid.slices or shape[axial]
        if slices > limits.max_slices:
            raise RequestError(413, "too_large", f"NIfTI of shape {shape} has {slices} axial slices; this "
                                                 f"service takes at most {limits.max_slices}")
        _check_work(shape, channels * grid.size**2 * slices, limits, f"NIfTI of shape {shape}")
    return offset + int(np.prod(shape)) * dtype.itemsize


def _check_work(shape: tuple[int, ...], prepared: int, limits: Limits, what: str) -> None:
    voxels = int(np.prod(shape))
    if voxels > limits.max_voxels:
        raise RequestError(413, "too_large", f"{what} has {voxels} voxels; this service takes at most "
                                             f"{limits.max_voxels}")
    need = 4 * max(voxels, prepared)
    if need > limits.max_float_bytes:
        raise RequestError(413, "too_large", f"{what} needs {need / 2**20:.0f} MiB per float copy; this service "
                                             f"allows {limits.max_float_bytes / 2**20:g} MiB")


def _check_slice(shape: tuple[int, ...], channels: int, limits: Limits, what: str) -> None:
    """A 2D input (C, H, W) against the model's channels and the limits."""
    _check_channels(shape[0], channels, what)
    if min(shape[1:]) < 2:
        raise RequestError(422, "bad_shape", f"{what} is too small")
    _check_work(shape, 0, limits, what)


def _from_nifti(data: bytes, header) -> Upload:
    """The voxels as float32 (C, X, Y, Z) or (C, H, W), scaled by the header in float32."""
    try:
        img = (nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image).from_bytes(data)
        array = img.get_fdata(dtype=np.float32)
    except Exception as err:  # nibabel raises its own exception types
        raise RequestError(400, "undecodable", f"not a readable NIfTI file ({str(err).strip() or type(err).__name__})") from None
    if array.ndim == 2:
        return Upload(image=_finite(array[None]), volume=None)
    image = _finite(array[None] if array.ndim == 3 else np.ascontiguousarray(np.moveaxis(array, -1, 0)))
    del array
    grid = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
    return Upload(image=image, volume=Volume(array=grid, affine=np.asarray(img.affine, dtype=np.float64)))


def _check_dtype(dtype: np.dtype, what: str) -> None:
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or dtype == bool):
        raise RequestError(422, "bad_dtype", f"{what} type {dtype} is not a real number type")


def _png_shape(data: bytes) -> tuple[int, int, int]:
    """(channels, height, width) from a PNG's IHDR chunk, before any pixel is inflated."""
    if len(data) < 26:
        raise RequestError(400, "undecodable", "upload.png: truncated PNG header")
    width, height = struct.unpack(">II", data[16:24])
    return PNG_CHANNELS.get(data[25], 1), height, width


def _load_npy(data: bytes, channels: int, limits: Limits) -> np.ndarray:
    """An NPY slice (H, W) or (C, H, W) of real numbers, checked from its header; never unpickles."""
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(buffer)
    except Exception as err:
        raise RequestError(400, "undecodable", f"upload.npy: not a readable NPY file ({type(err).__name__})") from None
    _check_dtype(dtype, "NPY element")
    if len(shape) not in (2, 3):
        raise RequestError(422, "bad_shape", f"NPY of shape {shape}; expected (H, W) or (C, H, W)")
    _check_slice(shape if len(shape) == 3 else (1, *shape), channels, limits, f"NPY image of shape {shape}")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32, copy=False)
    except Exception as err:
        raise RequestError(400, "undecodable", f"upload.npy: not a readable NPY file ({type(err).__name__})") from None


def _check_channels(got: int, expected: int, what: str) -> None:
    if got != expected:
        layout = "(X, Y, Z, C) NIfTI or (C, H, W) NPY/PNG" if expected > 1 else "(X, Y, Z) NIfTI or (H, W) NPY/PNG"
        raise RequestError(422, "wrong_channels",
                           f"model expects {expected} channel{'s' * (expected > 1)}, got {got} ({what}); "
                           f"send a {layout}")


def _finite(image: np.ndarray) -> np.ndarray:
    if not np.isfinite(image).all():
        raise RequestError(422, "non_finite", "input contains NaN or infinite values")
    return image


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
