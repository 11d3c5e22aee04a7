"""The HTTP front: one FastAPI `Gateway` in front of the model deployments.

It owns HTTP: the API key, the upload size, routing, a timeout per request and a JSON error
`{error, detail, request_id}` for every failure, unexpected ones included. A request whose
replica dies is answered 503 and not retried: it may be what killed the replica.
"""

import asyncio
import hmac
import json
import logging
import os
from typing import Any

from fastapi import FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from raymed import __version__
from raymed.serving.codecs import MEDIA_TYPES, RequestError, choose_output

logger = logging.getLogger("ray.serve")

REQUEST_ID = "x-request-id"  # set by Serve's proxy on every request, and sent back as X-Request-ID
UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
REPLICA_LOST = (RayActorError, ActorUnavailableError, ReplicaUnavailableError)


class GenerateRequest(BaseModel):
    """Body of `POST /v1/models/{name}/generate`."""

    model_config = ConfigDict(extra="forbid")
    n: int = Field(1, ge=1, description="number of images")
    seed: int | None = Field(None, description="same seed, same images; omit for fresh noise")
    condition: list[float] | None = Field(None, description="one value per image (e.g. relative slice "
                                                            "position) for conditional generators; others ignore it")


def read_api_key(env: str | None, file: str | None) -> str | None:
    """The API key as this node holds it: in environment variable `env` or in `file` (a mounted
    Kubernetes Secret); None when neither is configured. Never part of the Serve config."""
    if file:
        try:
            with open(file) as f:
                key = f.read().strip()
        except OSError as err:
            raise RuntimeError(f"api_key_file={file}: cannot read it on this node ({err.strerror})") from None
        if not key:
            raise RuntimeError(f"api_key_file={file} is empty")
        return key
    if env:
        key = os.environ.get(env, "").strip()
        if not key:
            raise RuntimeError(f"api_key_env={env}: that environment variable is empty or unset on this node; "
                               "set it on every node (e.g. from a Kubernetes Secret) or use api_key_file")
        return key
    return None


def request_id(request: Request) -> str | None:
    return request.headers.get(REQUEST_ID)


def failure(err: BaseException) -> tuple[str, str]:
    """(type name, first line) of the exception behind a failed call."""
    cause = err.cause if isinstance(err, RayTaskError) and err.cause is not None else err
    lines = str(cause).strip().splitlines()
    return type(cause).__name__, lines[0][:300] if lines else ""


class JsonErrors:
    """ASGI middleware: an exception that escapes a route becomes a JSON 500 with the request id."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as err:
            if started:
                raise
            rid = dict(scope.get("headers") or []).get(REQUEST_ID.encode(), b"").decode() or None
            kind, line = failure(err)
            logger.exception("request %s failed", rid)
            await JSONResponse({"error": "internal_error", "detail": f"{kind}: {line}", "request_id": rid},
                               status_code=500)(scope, receive, send)


api = FastAPI(
    title="raymed",
    version=__version__,
    description="Anomaly detection and generation for medical images. Uploads are raw request bodies "
                "(`Content-Type: application/octet-stream`): NIfTI `.nii`/`.nii.gz`, PNG or NPY. Errors are "
                "JSON `{error, detail, request_id}`. When an API key is configured, send it as `X-API-Key`.",
)
api.add_middleware(JsonErrors)
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="required when the service has a key")


@api.exception_handler(RequestError)
async def _request_error(request: Request, err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(request_id(request)), status_code=err.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors())
    return JSONResponse({"error": "invalid_request", "detail": problems, "request_id": request_id(request)},
                        status_code=422)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
    return JSONResponse({"error": code, "detail": str(err.detail), "request_id": request_id(request)},
                        status_code=err.status_code)


@serve.deployment(max_ongoing_requests=256,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 64})
@serve.ingress(api)
class Gateway:
    """HTTP front: checks the key and the size, routes to the model's deployment, maps errors to JSON."""

    def __init__(self, models: dict[str, DeploymentHandle], api_key_env: str | None, api_key_file: str | None,
                 max_upload_mb: float, max_generate: int, request_timeout_s: float):
        self.models = models
        self.api_key = read_api_key(api_key_env, api_key_file)
        self.max_upload = int(max_upload_mb * 2**20)
        self.max_generate = max_generate
        self.timeout = request_timeout_s
        self.limits = {"max_upload_mb": max_upload_mb, "max_generate": max_generate,
                       "request_timeout_s": request_timeout_s}

    def _authorize(self, key: str | None) -> None:
        if self.api_key and not (key and hmac.compare_digest(key.encode(), self.api_key.encode())):
            raise RequestError(401, "unauthorized", "missing or wrong API key (send it as the X-API-Key header)")

    def _handle(self, name: str) -> DeploymentHandle:
        if name not in self.models:
            raise RequestError(404, "unknown_model", f"no model {name!r} (serving: {', '.join(sorted(self.models))})")
        return self.models[name]

    async def _call(self, name: str, operation: str, *args: Any):
        """Call a model deployment within the request timeout; every failure becomes a RequestError."""
        response = getattr(self._handle(name), operation).remote(*args)
        try:
            return await asyncio.wait_for(response, self.timeout)
        except RequestError as err:
            raise RequestError(err.status, err.error, err.detail) from None
        except TimeoutError:
            response.cancel()
            raise RequestError(504, "timeout", f"model {name} did not answer within {self.timeout:g} s") from None
        except BackPressureError:
            raise RequestError(503, "overloaded", f"model {name}: too many queued requests; retry later") from None
        except DeploymentUnavailableError:
            raise RequestError(503, "model_unavailable", f"model {name}: no replica is running; retry later") from None
        except REPLICA_LOST as err:
            logger.warning("model %s: replica lost during %s (%s); not retried", name, operation, type(err).__name__)
            raise RequestError(503, "replica_lost",
                               f"model {name}: the replica handling this request stopped before answering "
                               f"({type(err).__name__}); it was not retried, since the request itself may have "
                               "stopped it: send it again if you know it is sound") from None
        except Exception as err:
            kind, line = failure(err)
            if kind in ("OutOfMemoryError", "MemoryError"):
                raise RequestError(503, "out_of_memory", f"model {name} ran out of memory on this request ({line}); "
                                                         "send a smaller input or retry later") from None
            logger.error("model %s: %s failed: %s: %s", name, operation, kind, line)
            raise RequestError(500, "internal_error", f"model {name} failed on this request: {kind}: {line}") from None

    async def _body(self, request: Request) -> bytes:
        """The request body, refused with 413 as soon as it passes the size limit."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_upload:
            raise RequestError(413, "too_large", f"upload of {int(declared)} bytes exceeds {self.max_upload / 2**20:g} MiB")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_upload:
                raise RequestError(413, "too_large", f"upload exceeds {self.max_upload / 2**20:g} MiB")
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _info(self, name: str) -> dict:
        info = await self._call(name, "info")
        info["limits"] = {**info["limits"], **self.limits}
        return info

    @api.get("/healthz", summary="liveness: the gateway answers")
    async def healthz(self) -> dict:
        return {"status": "ok", "models": sorted(self.models)}

    @api.get("/v1/models", summary="every served model: method, kind, input spec, threshold, training metrics")
    async def list_models(self, key: str | None = Security(api_key_header)) -> dict:
        self._authorize(key)
        infos = await asyncio.gather(*(self._info(name) for name in sorted(self.models)))
        return {"models": infos}

    @api.get("/v1/models/{name}", summary="one model's description")
    async def describe(self, name: str, key: str | None = Security(api_key_header)) -> dict:
        self._authorize(key)
        return await self._info(name)

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
