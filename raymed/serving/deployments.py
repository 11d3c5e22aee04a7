"""The Serve deployments: one `ModelServer` per trained model behind one FastAPI `Gateway`.

The gateway owns HTTP (API key, size limit, routing, JSON errors); each model server loads its
checkpoint once, decodes and validates uploads, preprocesses them like training did, and runs
the network. Per-slice inference goes through `@serve.batch`, so slices of one volume and slices
from concurrent requests share forward passes.
"""

import asyncio
import hmac
import inspect
import json
import logging
import os
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from monai.transforms import Resize
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from raymed import __version__
from raymed.data.io import join, read_bytes
from raymed.data.preprocess import Prepared, foreground_mask, normalise, prepare_image, to_source_grid
from raymed.engine.checkpoint import META_FILE, load_method
from raymed.engine.inference import VolumeMap
from raymed.errors import DataError
from raymed.evaluation.detection import ImageScore, slice_scores
from raymed.evaluation.postprocess import PostProcessing, configure, smooth_map
from raymed.evaluation.thresholds import load_threshold
from raymed.serving.codecs import (MEDIA_TYPES, RequestError, Upload, choose_output, decode_upload, encode_images,
                                   encode_map)

logger = logging.getLogger("ray.serve")

OPERATIONS = {"detect": "detector", "generate": "generator", "translate": "translator"}
DEFAULT_BATCH = {"max_batch_size": 16, "batch_wait_timeout_s": 0.01}
UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


class GenerateRequest(BaseModel):
    """Body of `POST /v1/models/{name}/generate`."""

    model_config = ConfigDict(extra="forbid")
    n: int = Field(1, ge=1, description="number of images")
    seed: int | None = Field(None, description="same seed, same images; omit for fresh noise")
    condition: Any = Field(None, description="for conditional generators only")


def prepare_slice(image: np.ndarray, settings) -> tuple[np.ndarray, np.ndarray]:
    """A (C, H, W) slice resized to the training size, masked and percentile-normalised like a volume."""
    size = (settings.size, settings.size)
    resized = np.asarray(Resize(size, mode="bilinear")(image), dtype=np.float32) if image.shape[1:] != size else image
    mask = foreground_mask(resized)
    return normalise(resized, mask, settings.lower_percentile, settings.upper_percentile, "upload"), mask


@serve.deployment(max_ongoing_requests=64, user_config=DEFAULT_BATCH,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8})
class ModelServer:
    """One trained model: its checkpoint (local or s3://), threshold and training metrics."""

    def __init__(self, name: str, uri: str, max_decoded_mb: float):
        self.name = name
        self.method, state = load_method(uri)
        self.checkpoint = state["uri"]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.method.nets.to(self.device)
        self.threshold = load_threshold(self.checkpoint)
        # Maps and scores are post-processed as they were when the stored threshold was chosen,
        # so `score >= threshold` means what evaluation measured.
        stored = self.threshold or {}
        self.postprocess = PostProcessing.model_validate(stored.get("postprocess", {}))
        self.image_score = ImageScore.model_validate(stored.get("image_score", {}))
        configure(self.method, self.postprocess)
        try:
            self.metrics = json.loads(read_bytes(join(self.checkpoint, META_FILE))).get("metrics", {})
        except DataError:
            self.metrics = {}
        self.max_decoded = int(max_decoded_mb * 2**20)
        self.batch = dict(DEFAULT_BATCH)
        logger.info("model %s: %s from %s on %s", name, self.method.name, self.checkpoint, self.device)

    def reconfigure(self, user_config: dict) -> None:
        """Batch size and wait come from the deployment's `user_config`, changeable without a restart."""
        self.batch = {**DEFAULT_BATCH, **(user_config or {})}
        self.score_slices.set_max_batch_size(int(self.batch["max_batch_size"]))
        self.score_slices.set_batch_wait_timeout_s(float(self.batch["batch_wait_timeout_s"]))

    def info(self) -> dict:
        method, data = self.method, self.method.config.data
        image_threshold = (self.threshold or {}).get("image")
        return {
            "name": self.name, "method": method.name, "kind": list(method.kind),
            "operations": self.operations(),
            "checkpoint": self.checkpoint,
            "input": {"channels": method.in_channels, "modalities": data.modalities, "size": data.size,
                      "slices": data.slices, "formats": ["nifti", "png", "npy"],
                      "normalisation": f"percentiles {data.lower_percentile}-{data.upper_percentile} inside the foreground"},
            "threshold": image_threshold, "threshold_details": self.threshold,
            "postprocess": self.postprocess.describe(self.method), "image_score": self.image_score.model_dump(),
            "metrics": self.metrics, "batch": self.batch, "device": str(self.device),
        }

    def operations(self) -> list[str]:
        """The routes this model answers: by its kind (a translator must also define `translate`)."""
        kinds = self.method.kind
        return [op for op, kind in OPERATIONS.items()
                if kind in kinds and (op != "translate" or hasattr(self.method, "translate"))]

    def _require(self, operation: str) -> None:
        if operation not in self.operations():
            raise RequestError(405, "unsupported_operation",
                               f"model {self.name} ({self.method.name}) cannot {operation}: it is a "
                               f"{', '.join(self.method.kind)} (operations: {', '.join(self.operations()) or 'none'})")

    @serve.batch(max_batch_size=DEFAULT_BATCH["max_batch_size"], batch_wait_timeout_s=DEFAULT_BATCH["batch_wait_timeout_s"])
    async def score_slices(self, slices: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        """Anomaly map and score of each (C, H, W) slice, one forward pass per batch."""
        return await asyncio.to_thread(self._anomaly_maps, slices)

    @torch.inference_mode()
    def _anomaly_maps(self, slices: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        amap, score = self.method.anomaly_map(torch.from_numpy(np.stack(slices)).to(self.device))
        return list(zip(amap.float().cpu().numpy(), score.float().cpu().numpy().tolist()))

    def _prepare(self, upload: Upload) -> tuple[np.ndarray, Prepared | None, np.ndarray]:
        """(slices (N, C, S, S), the prepared volume or None for a slice, foreground mask) as in training."""
        settings = self.method.config.data
        try:
            if upload.is_volume:
                prepared = prepare_image(upload.image, upload.volume, settings, "upload")
                return np.ascontiguousarray(np.moveaxis(prepared.image, -1, 0)), prepared, prepared.mask
            image, mask = prepare_slice(upload.image, settings)
            return image[None], None, mask
        except DataError as err:
            raise RequestError(422, "unusable_input", str(err)) from None

    async def _read(self, data: bytes) -> tuple[Upload, np.ndarray, Prepared | None, np.ndarray]:
        """Decode, validate and preprocess an upload off the event loop, so batching goes on meanwhile."""
        upload = await asyncio.to_thread(decode_upload, data, self.method.in_channels, self.max_decoded)
        return (upload, *await asyncio.to_thread(self._prepare, upload))

    async def detect(self, data: bytes, output: str) -> dict:
        """Score a volume or slice; `output` 'json' gives scores only, 'nifti'/'npy' add the map."""
        self._require("detect")
        upload, slices, prepared, mask = await self._read(data)
        results = await asyncio.gather(*(self.score_slices(s) for s in slices))
        maps, method_scores = np.stack([m for m, _ in results]), np.array([s for _, s in results])
        masked = np.moveaxis(maps, 0, -1) * mask.reshape(*mask.shape[:2], -1)
        amap, scores = await asyncio.to_thread(self._postprocess, masked, mask, method_scores)
        if prepared is None:
            score = float(scores[0])
        else:
            brain = mask.reshape(-1, len(slices)).mean(axis=0) >= self.method.config.data.min_brain
            score = float(scores[brain].max() if brain.any() else scores.max())
        result = self._verdict(score, scores)
        if output != "json":
            result["body"] = await asyncio.to_thread(self._map_file, upload, amap, scores, prepared, output)
        return result

    def _postprocess(self, amap: np.ndarray, mask: np.ndarray, method_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(map, slice scores) of an (X, Y, Z) map, or (X, Y, 1) with an (X, Y) mask for a lone slice,
        post-processed and reduced as evaluation did (median filter, eroded mask, image score)."""
        if mask.ndim == 3:
            smoothed = smooth_map(amap, mask, self.postprocess)
            return smoothed, slice_scores(smoothed, mask, self.image_score, method_scores)
        # A lone slice is repeated along z, so 3D filters and erosion act on it as on a slice inside a volume.
        reach = max(self.postprocess.erode, self.postprocess.median // 2, 1)
        stack = 2 * reach + 1
        smoothed, scores = self._postprocess(np.repeat(amap, stack, axis=-1),
                                             np.repeat(mask[..., None], stack, axis=-1),
                                             np.repeat(method_scores, stack))
        return smoothed[..., reach:reach + 1], scores[reach:reach + 1]

    @staticmethod
    def _map_file(upload: Upload, amap: np.ndarray, scores: np.ndarray, prepared: Prepared | None,
                  output: str) -> bytes:
        """The anomaly map on the input's grid: a volume's with its affine, a slice's at its own size."""
        if prepared is not None:
            return encode_map(VolumeMap(amap, scores, prepared).on_source_grid(), upload.volume.affine, output)
        height, width = upload.image.shape[1:]
        return encode_map(np.asarray(Resize((height, width), mode="bilinear")(np.moveaxis(amap, -1, 0)))[0],
                          None, output)

    def _verdict(self, score: float, scores: np.ndarray) -> dict:
        threshold = (self.threshold or {}).get("image")
        return {"model": self.name, "score": score, "threshold": threshold,
                "flagged": None if threshold is None else bool(score >= threshold),
                "slice_scores": [float(s) for s in scores]}

    async def generate(self, n: int, seed: int | None, condition: Any, output: str) -> bytes:
        """n images from the generator, reproducible with a seed."""
        self._require("generate")
        accepts_condition = "condition" in inspect.signature(self.method.sample).parameters
        if condition is not None and not accepts_condition:
            raise RequestError(422, "unconditional_model",
                               f"model {self.name} ({self.method.name}) is unconditional; omit 'condition'")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        extra = {"condition": condition} if accepts_condition else {}

        @torch.inference_mode()
        def run() -> bytes:
            images = self.method.sample(n, generator=generator, **extra)
            return encode_images(images.float().cpu().numpy(), output)

        return await asyncio.to_thread(run)

    async def translate(self, data: bytes, output: str) -> bytes:
        """Image-to-image: a volume comes back on its own grid with its affine, a slice at the model's size."""
        self._require("translate")
        upload, slices, prepared, _ = await self._read(data)

        @torch.inference_mode()
        def run() -> bytes:
            out = self.method.translate(torch.from_numpy(slices).to(self.device)).float().cpu().numpy()
            if prepared is None:
                return encode_images(out, output)
            channels = [to_source_grid(np.moveaxis(out[:, c], 0, -1), prepared) for c in range(out.shape[1])]
            return encode_map(channels[0] if len(channels) == 1 else np.stack(channels, axis=-1),
                              upload.volume.affine, output)

        return await asyncio.to_thread(run)


api = FastAPI(
    title="raymed",
    version=__version__,
    description="Anomaly detection and generation for medical images. Uploads are raw request bodies "
                "(`Content-Type: application/octet-stream`): NIfTI `.nii`/`.nii.gz`, PNG or NPY. Errors are "
                "JSON `{error, detail}`. When an API key is configured, send it as `X-API-Key`.",
)
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="required when the service has a key")


@api.exception_handler(RequestError)
async def _request_error(request: Request, err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors())
    return JSONResponse({"error": "invalid_request", "detail": problems}, status_code=422)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
    return JSONResponse({"error": code, "detail": str(err.detail)}, status_code=err.status_code)


@serve.deployment(max_ongoing_requests=256,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 64})
@serve.ingress(api)
class Gateway:
    """HTTP front: checks the key and the size, routes to the model's deployment, maps errors to JSON."""

    def __init__(self, models: dict[str, DeploymentHandle], api_key_env: str | None, max_upload_mb: float,
                 max_generate: int):
        self.models = models
        self.api_key = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise RuntimeError(f"api_key_env={api_key_env}: that environment variable is empty or unset "
                                   "on this replica; set it (e.g. from a Kubernetes Secret) or drop api_key_env")
        self.max_upload = int(max_upload_mb * 2**20)
        self.max_generate = max_generate

    def _authorize(self, key: str | None) -> None:
        if self.api_key and not (key and hmac.compare_digest(key.encode(), self.api_key.encode())):
            raise RequestError(401, "unauthorized", "missing or wrong API key (send it as the X-API-Key header)")

    def _handle(self, name: str) -> DeploymentHandle:
        if name not in self.models:
            raise RequestError(404, "unknown_model", f"no model {name!r} (serving: {', '.join(sorted(self.models))})")
        return self.models[name]

    async def _call(self, name: str, operation: str, *args):
        """Call a model deployment; a replica that died mid-request is retried once on another."""
        handle = self._handle(name)
        for attempt in range(2):
            try:
                return await getattr(handle, operation).remote(*args)
            except RequestError as err:
                raise RequestError(err.status, err.error, err.detail) from None
            except BackPressureError:
                raise RequestError(503, "overloaded", f"model {name}: too many queued requests; retry later") from None
            except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as err:
                if attempt:
                    raise RequestError(503, "model_unavailable",
                                       f"model {name}: no replica available ({type(err).__name__}); retry later") from None
                logger.warning("model %s: replica failed during %s (%s); retrying", name, operation, type(err).__name__)

    async def _body(self, request: Request) -> bytes:
        """The request body, refused with 413 as soon as it passes the size limit."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_upload:
            raise RequestError(413, "too_large", f"upload of {int(declared)} bytes exceeds {self.max_upload // 2**20} MiB")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_upload:
                raise RequestError(413, "too_large", f"upload exceeds {self.max_upload // 2**20} MiB")
            chunks.append(chunk)
        return b"".join(chunks)

    @api.get("/healthz", summary="liveness: the gateway answers")
    async def healthz(self) -> dict:
        return {"status": "ok", "models": sorted(self.models)}

    @api.get("/v1/models", summary="every served model: method, kind, input spec, threshold, training metrics")
    async def list_models(self, key: str | None = Security(api_key_header)) -> dict:
        self._authorize(key)
        infos = await asyncio.gather(*(self._call(name, "info") for name in sorted(self.models)))
        return {"models": infos}

    @api.get("/v1/models/{name}", summary="one model's description")
    async def describe(self, name: str, key: str | None = Security(api_key_header)) -> dict:
        self._authorize(key)
        return await self._call(name, "info")

    @api.post("/v1/models/{name}/detect", openapi_extra=UPLOAD_BODY,
              summary="anomaly score (JSON) or anomaly map (NIfTI/NPY) of a volume or a 2D slice")
    async def detect(self, name: str, request: Request,
                     output: str | None = Query(None, description="json (default), nifti or npy; "
                                                                  "or send Accept: application/gzip"),
                     key: str | None = Security(api_key_header)) -> Response:
        """Body: a NIfTI volume (X, Y, Z) or (X, Y, Z, C), or a PNG/NPY slice (H, W) or (C, H, W).

        JSON answer: `{score, flagged, threshold, slice_scores}` (`threshold`/`flagged` are null
        when the model has no stored threshold). A NIfTI answer is the map on the input's grid with
        the input's affine; the score is then in the `X-Anomaly-Score` header.
        """
        self._authorize(key)
        self._handle(name)
        fmt = choose_output(output, request.headers.get("accept"), ("json", "nifti", "npy"), "json")
        result = await self._call(name, "detect", await self._body(request), fmt)
        body = result.pop("body", None)
        if body is None:
            return JSONResponse(result)
        headers = {f"X-Anomaly-{key.title()}": json.dumps(result[key]) for key in ("score", "flagged", "threshold")}
        headers["Content-Disposition"] = f'attachment; filename="{name}-map.{"nii.gz" if fmt == "nifti" else "npy"}"'
        return Response(body, media_type=MEDIA_TYPES[fmt], headers=headers)

    @api.post("/v1/models/{name}/generate", summary="sample images from a generator")
    async def generate(self, name: str, body: GenerateRequest, request: Request,
                       output: str | None = Query(None, description="npy (default, (n, C, H, W)), png (grid: one "
                                                                    "row per image, one column per channel) or nifti"),
                       key: str | None = Security(api_key_header)) -> Response:
        self._authorize(key)
        self._handle(name)
        if body.n > self.max_generate:
            raise RequestError(422, "too_many", f"n={body.n} exceeds the limit of {self.max_generate} images per request")
        fmt = choose_output(output, request.headers.get("accept"), ("npy", "png", "nifti"), "npy")
        data = await self._call(name, "generate", body.n, body.seed, body.condition, fmt)
        return Response(data, media_type=MEDIA_TYPES[fmt])

    @api.post("/v1/models/{name}/translate", openapi_extra=UPLOAD_BODY,
              summary="image-to-image translation (translator models)")
    async def translate(self, name: str, request: Request,
                        output: str | None = Query(None, description="nifti (default) or npy"),
                        key: str | None = Security(api_key_header)) -> Response:
        self._authorize(key)
        self._handle(name)
        fmt = choose_output(output, request.headers.get("accept"), ("nifti", "npy"), "nifti")
        data = await self._call(name, "translate", await self._body(request), fmt)
        return Response(data, media_type=MEDIA_TYPES[fmt])
