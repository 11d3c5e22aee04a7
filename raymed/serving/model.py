"""A model deployment: one trained model's checkpoint, its threshold, preprocessing and network.

It decodes and validates uploads (their cost bounded from the header), preprocesses them like
training did, and runs the network. Per-slice inference goes through `@serve.batch`, so slices
of one volume and slices from concurrent requests share forward passes. The routes a model
answers follow from its declared `kind`.
"""

import asyncio
import json
import logging

import numpy as np
import torch
from monai.transforms import Resize
from ray import serve

from raymed.data.io import join, read_bytes
from raymed.data.preprocess import (Prepared, check_labels, one_hot_labels, prepare_image, prepare_labels,
                                    scale_intensities, to_source_grid)
from raymed.engine.checkpoint import META_FILE, load_method
from raymed.engine.inference import VolumeMap
from raymed.errors import DataError
from raymed.evaluation.detection import ImageScore, slice_scores
from raymed.evaluation.postprocess import PostProcessing, configure, smooth_map
from raymed.evaluation.thresholds import load_threshold
from raymed.serving.codecs import Grid, Limits, RequestError, Upload, decode_upload, encode_images, encode_map

logger = logging.getLogger("ray.serve")

OPERATIONS = {"detect": "detector", "generate": "generator", "translate": "translator"}
DEFAULT_BATCH = {"max_batch_size": 16, "batch_wait_timeout_s": 0.01}
VOLUMES_AT_ONCE = 2  # uploads decoded and preprocessed at the same time on one replica


def prepare_slice(image: np.ndarray, settings) -> tuple[np.ndarray, np.ndarray]:
    """A (C, H, W) slice resized to the training size, masked and scaled (window or percentiles) like a volume."""
    size = (settings.size, settings.size)
    resized = np.asarray(Resize(size, mode="bilinear")(image), dtype=np.float32) if image.shape[1:] != size else image
    return scale_intensities(resized, None, settings, "upload")


def prepare_label_slice(labels: np.ndarray, settings, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A (1, H, W) label map resized (nearest) to the training size, one-hot (classes, S, S), and its foreground."""
    check_labels(labels, classes, "upload")
    size = (settings.size, settings.size)
    resized = np.asarray(Resize(size, mode="nearest")(labels), dtype=np.float32) if labels.shape[1:] != size else labels
    label = resized[0].astype(np.uint8)
    return one_hot_labels(label, classes), label > 0


@serve.deployment(max_ongoing_requests=64, user_config=DEFAULT_BATCH,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8})
class ModelServer:
    """One trained model: its checkpoint (local or s3://), threshold and training metrics."""

    def __init__(self, name: str, checkpoint: str, limits: Limits):
        self.name = name
        self.method, state = load_method(checkpoint)
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
        self.limits = limits
        self.volumes = asyncio.Semaphore(VOLUMES_AT_ONCE)
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
            # translate's upload: None, an image like `input`; K, a label map of classes 0…K−1 (one channel)
            "translation_labels": method.translation_labels,
            "threshold": image_threshold, "threshold_details": self.threshold,
            "postprocess": self.postprocess.describe(self.method), "image_score": self.image_score.model_dump(),
            "limits": self.limits.describe(),
            "metrics": self.metrics, "batch": self.batch, "device": str(self.device),
        }

    def operations(self) -> list[str]:
        """The routes this model answers, from its declared kind."""
        return [op for op, kind in OPERATIONS.items() if kind in self.method.kind]

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

    def _prepare(self, upload: Upload, labels: int | None) -> tuple[np.ndarray, Prepared | None, np.ndarray]:
        """(slices (N, C, S, S), the prepared volume or None for a slice, foreground mask) as in
        training; a label map of `labels` classes comes one-hot instead (N, labels, S, S)."""
        settings = self.method.config.data
        try:
            if upload.is_volume:
                prepared = (prepare_image(upload.image, upload.volume, settings, "upload") if labels is None
                            else prepare_labels(upload.image[0], upload.volume, settings, labels, "upload"))
                return np.ascontiguousarray(np.moveaxis(prepared.image, -1, 0)), prepared, prepared.mask
            image, mask = (prepare_slice(upload.image, settings) if labels is None
                           else prepare_label_slice(upload.image, settings, labels))
            return image[None], None, mask
        except DataError as err:
            raise RequestError(422, "unusable_input", str(err)) from None

    async def _read(self, data: bytes, labels: int | None = None) -> tuple[Upload, np.ndarray, Prepared | None, np.ndarray]:
        """Decode, validate and preprocess an upload off the event loop, so batching goes on meanwhile.

        Volumes are decoded a few at a time, so the replica's memory stays a small multiple of
        the per-request limit however many requests are queued.
        """
        async with self.volumes:
            return await asyncio.to_thread(self._decode_and_prepare, data, labels)

    def _decode_and_prepare(self, data: bytes, labels: int | None) -> tuple[Upload, np.ndarray, Prepared | None, np.ndarray]:
        settings = self.method.config.data
        channels = self.method.in_channels if labels is None else 1
        upload = decode_upload(data, channels, self.limits, Grid(settings.size, settings.slices))
        return (upload, *self._prepare(upload, labels))

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

    async def generate(self, n: int, seed: int | None, condition: list[float] | None, output: str) -> bytes:
        """n images from the generator, reproducible with a seed; `condition` one value per image."""
        self._require("generate")
        if condition is not None and len(condition) != n:
            raise RequestError(422, "bad_condition", f"condition has {len(condition)} values; give one per image (n={n})")
        cond = None if condition is None else torch.tensor(condition, dtype=torch.float32, device=self.device)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None

        @torch.inference_mode()
        def run() -> bytes:
            images = self.method.sample(n, condition=cond, generator=generator)
            return encode_images(images.float().cpu().numpy(), output)

        return await asyncio.to_thread(run)

    async def translate(self, data: bytes, output: str) -> bytes:
        """Image-to-image, or label map to image (`translation_labels`): a volume comes back on its
        own grid with its affine, a slice at the model's size."""
        self._require("translate")
        upload, slices, prepared, _ = await self._read(data, self.method.translation_labels)

        @torch.inference_mode()
        def run() -> bytes:
            out = self.method.translate(torch.from_numpy(slices).to(self.device)).float().cpu().numpy()
            if prepared is None:
                return encode_images(out, output)
            channels = [to_source_grid(np.moveaxis(out[:, c], 0, -1), prepared) for c in range(out.shape[1])]
            return encode_map(channels[0] if len(channels) == 1 else np.stack(channels, axis=-1),
                              upload.volume.affine, output)

        return await asyncio.to_thread(run)
