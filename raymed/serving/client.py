"""A small HTTP client for the raymed endpoint (used by `raymed client` and `serve_and_probe`)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import requests

from raymed.data.io import encode_nifti, read_bytes, read_volume
from raymed.data.preprocess import check_geometry
from raymed.errors import DataError, RaymedError


class ServiceError(RaymedError):
    """The endpoint refused a request; carries the HTTP status and the JSON error code."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(f"HTTP {status} {error}: {detail}")
        self.status, self.error = status, error


def upload_body(files: list[str]) -> bytes:
    """The bytes to send for `files`: one file as it is, several NIfTI channels stacked into (X, Y, Z, C)."""
    if len(files) == 1:
        return read_bytes(files[0])
    volumes = [read_volume(f) for f in files]
    for f, volume in zip(files[1:], volumes[1:]):
        check_geometry(volumes[0], volume, files[0], f)
        if volume.array.ndim != 3:
            raise DataError(f"{f}: stacking channels needs 3D volumes, got shape {volume.array.shape}")
    if volumes[0].array.ndim != 3:
        raise DataError(f"{files[0]}: stacking channels needs 3D volumes, got shape {volumes[0].array.shape}")
    stacked = np.stack([v.array.astype(np.float32) for v in volumes], axis=-1)
    return encode_nifti(stacked, volumes[0].affine)


class Client:
    """Talks to `URL/healthz` and `URL/v1/...`; errors raise `ServiceError` with the server's detail."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300):
        self.url = url.rstrip("/")
        self.session = requests.Session()
        if api_key:
            self.session.headers["X-API-Key"] = api_key
        self.timeout = timeout

    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        try:
            response = self.session.request(method, f"{self.url}{path}", timeout=self.timeout, **kwargs)
        except requests.RequestException as err:
            raise RaymedError(f"{self.url}: cannot reach the endpoint ({type(err).__name__})") from None
        if response.status_code >= 400:
            try:
                body = response.json()
                error, detail = body.get("error", "error"), body.get("detail", response.text)
            except ValueError:
                error, detail = "error", response.text.strip()[:200]
            raise ServiceError(response.status_code, error, detail)
        return response

    def health(self) -> dict:
        return self._request("GET", "/healthz").json()

    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models").json()["models"]

    def detect(self, body: bytes, model: str) -> dict:
        """`{score, flagged, threshold, slice_scores}` for a volume or slice."""
        return self._request("POST", f"/v1/models/{model}/detect", data=body,
                             headers={"Content-Type": "application/octet-stream"}).json()

    def detect_map(self, body: bytes, model: str, output: str = "nifti") -> tuple[bytes, dict]:
        """(anomaly map file bytes, `{score, flagged, threshold}` from the response headers)."""
        response = self._request("POST", f"/v1/models/{model}/detect", params={"output": output}, data=body,
                                 headers={"Content-Type": "application/octet-stream"})
        verdict = {key: json.loads(response.headers[f"X-Anomaly-{key.title()}"])
                   for key in ("score", "flagged", "threshold")}
        return response.content, verdict

    def translate(self, body: bytes, model: str, output: str = "nifti") -> bytes:
        """The translated volume (on the input's grid, with its affine) or slice, as file bytes."""
        return self._request("POST", f"/v1/models/{model}/translate", params={"output": output}, data=body,
                             headers={"Content-Type": "application/octet-stream"}).content

    def generate(self, model: str, n: int = 1, seed: int | None = None, output: str = "npy",
                 condition=None) -> bytes:
        return self._request("POST", f"/v1/models/{model}/generate", params={"output": output},
                             json={"n": n, "seed": seed, "condition": condition}).content


def output_format(path: str, choices: dict[str, str]) -> str:
    """The response format for an output path, by its extension (`choices`: suffix -> format)."""
    for suffix, fmt in choices.items():
        if path.lower().endswith(suffix):
            return fmt
    raise DataError(f"{path}: output must end in {', '.join(choices)}")


def save_output(path: str, data: bytes) -> None:
    """Write a response file; a `.nii` path gets the NIfTI uncompressed."""
    from raymed.data.io import write_bytes_atomic

    if path.lower().endswith(".nii") and data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    write_bytes_atomic(path, data)
