"""The path of one upload: bytes -> decode + preprocess (thread pool) -> batcher -> response schema.

``PredictionPipeline`` is the service object the routes call. It never blocks the event loop: decoding,
preprocessing and PNG encoding run in a bounded thread pool, model work in the batcher's worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from bayesnet import DecodedImage, ModelSpec, decode_image, preprocess
from service.batcher import BatcherError, MicroBatcher
from service.errors import BadRequestParameterError, InferenceFailedError, InferenceTimeoutError
from service.predictor import AUTO, InferenceRequest, InferenceResult, Predictor
from service.schemas import FindingPrediction, Heatmap, ImageInfo, ModelRef, PredictionResponse, Timing

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Job:
    """What the batcher carries: the inference request plus when it was queued."""

    request: InferenceRequest
    enqueued_at: float


@dataclass(frozen=True)
class JobResult:
    result: InferenceResult
    queue_s: float
    inference_s: float
    batch_size: int


def heatmap_png(intensity: np.ndarray) -> bytes:
    """An RGBA PNG of a [0, 1] map: warm colour ramp, alpha = intensity (ready to lay over the film)."""
    v = np.clip(intensity, 0.0, 1.0)
    rgba = np.empty((*v.shape, 4), dtype=np.uint8)
    rgba[..., 0] = np.clip(v * 3.0, 0, 1) * 255
    rgba[..., 1] = np.clip(v * 3.0 - 1.0, 0, 1) * 255
    rgba[..., 2] = np.clip(v * 3.0 - 2.0, 0, 1) * 255
    rgba[..., 3] = v * 255
    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def preview_png(image: DecodedImage) -> bytes:
    """The radiograph as a browser can show it (DICOM included): 8-bit grayscale PNG, long side <= 1024 px."""
    pixels = torch.from_numpy(image.pixels)[None, None]
    scale = min(1.0, 1024 / max(image.width, image.height))
    size = (max(1, round(image.height * scale)), max(1, round(image.width * scale)))
    if size != (image.height, image.width):
        pixels = torch.nn.functional.interpolate(
            pixels, size=size, mode="bilinear", antialias=True, align_corners=False
        )
    gray = (pixels[0, 0].clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def batch_processor(predictor: Predictor) -> Callable[[list[Job]], list[JobResult]]:
    """The function the batcher's worker thread runs on each batch of jobs."""

    def process(jobs: list[Job]) -> list[JobResult]:
        started = time.perf_counter()
        results = predictor.run([job.request for job in jobs])
        inference_s = time.perf_counter() - started
        return [
            JobResult(result, started - job.enqueued_at, inference_s, len(jobs))
            for job, result in zip(jobs, results, strict=True)
        ]

    return process


class PredictionPipeline:
    """Decode, queue, and shape results for one loaded model."""

    def __init__(
        self,
        *,
        spec: ModelSpec,
        model_ref: ModelRef,
        batcher: MicroBatcher[Job, JobResult],
        decode_pool: ThreadPoolExecutor,
        max_pixels: int,
        default_samples: int,
        timeout_s: float,
    ) -> None:
        self.spec = spec
        self.model_ref = model_ref
        self.batcher = batcher
        self.decode_pool = decode_pool
        self.max_pixels = max_pixels
        self.default_samples = default_samples
        self.timeout_s = timeout_s
        self._trained = {label: spec.label_index(label) for label in spec.trained_labels}
        self._decoding = 0  # uploads between arrival and the queue: tells the batcher whether to wait

    def more_coming(self) -> bool:
        """Whether uploads are being decoded right now (the batcher's hint to hold a partial batch)."""
        return self._decoding > 0

    async def _off_loop(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.decode_pool, lambda: fn(*args, **kwargs))

    def parse_cams(self, cams: str) -> str | tuple[int, ...]:
        """``auto`` | ``all`` | ``none`` | comma-separated trained label names -> what the predictor wants."""
        value = cams.strip()
        if value.lower() == AUTO:
            return AUTO
        if value.lower() == "all":
            return tuple(self._trained.values())
        if value.lower() in ("none", ""):
            return ()
        chosen = []
        for name in (part.strip() for part in value.split(",")):
            if name not in self._trained:
                raise BadRequestParameterError(
                    f"cams: {name!r} is not a finding this model was trained on; use auto, all, none or "
                    f"a comma-separated list of: {', '.join(self._trained)}"
                )
            chosen.append(self._trained[name])
        return tuple(dict.fromkeys(chosen))

    async def decode(self, data: bytes) -> tuple[DecodedImage, Tensor]:
        """Decode and preprocess off the event loop: ``(image, model input tensor)``."""

        def work() -> tuple[DecodedImage, Tensor]:
            image = decode_image(data, max_pixels=self.max_pixels)
            return image, preprocess(image, self.spec)

        return await self._off_loop(work)

    async def preview(self, data: bytes) -> bytes:
        def work() -> bytes:
            return preview_png(decode_image(data, max_pixels=self.max_pixels))

        return await self._off_loop(work)

    async def predict(
        self, data: bytes, *, request_id: str, cams: str, mc_samples: int | None, received_at: float
    ) -> tuple[PredictionResponse, int]:
        """One upload -> (response, size of the batch it ran in)."""
        wanted = self.parse_cams(cams)
        n_samples = mc_samples if mc_samples is not None else self.default_samples
        self._decoding += 1
        try:
            image, tensor = await self.decode(data)
        finally:
            self._decoding -= 1
        job = Job(InferenceRequest(tensor, n_samples, wanted), time.perf_counter())
        try:
            done = await asyncio.wait_for(self.batcher.submit(job), timeout=self.timeout_s)
        except TimeoutError as err:
            raise InferenceTimeoutError(f"no result within {self.timeout_s:.0f} s; the service is overloaded") from err
        except BatcherError:
            raise
        except Exception as err:  # the batch this image ran in failed; only its requests see this
            raise InferenceFailedError(
                f"Inference failed for the batch containing this image ({type(err).__name__}); the service keeps "
                "serving. Retry; report the request id if it persists."
            ) from err
        heatmaps = await self._off_loop(self._heatmaps, done.result) if done.result.cams else {}
        return self._response(request_id, n_samples, image, done, heatmaps, received_at), done.batch_size

    def _heatmaps(self, result: InferenceResult) -> dict[str, Heatmap]:
        out = {}
        for k, intensity in result.cams.items():
            png = heatmap_png(intensity)
            out[self.spec.labels[k]] = Heatmap(
                png_base64=base64.b64encode(png).decode("ascii"),
                width=int(intensity.shape[1]),
                height=int(intensity.shape[0]),
            )
        return out

    def _response(
        self,
        request_id: str,
        n_samples: int,
        image: DecodedImage,
        done: JobResult,
        heatmaps: dict[str, Heatmap],
        received_at: float,
    ) -> PredictionResponse:
        r = done.result
        predictions = {}
        for label, k in self._trained.items():
            predictions[label] = FindingPrediction(
                conf=float(r.mean[k]),
                uncertainty=float(r.variance[k]),
                std=float(r.std[k]),
                interval=(float(r.interval[k, 0]), float(r.interval[k, 1])),
                mutual_information=float(r.mutual_information[k]),
                decision=r.decisions[k].value,
                threshold=self.spec.threshold[k],
            )
        return PredictionResponse(
            request_id=request_id,
            model=self.model_ref,
            mc_samples=n_samples,
            predictions=predictions,
            uncertain=any(p.decision == "uncertain" for p in predictions.values()),
            gradcam=heatmaps,
            image=ImageInfo(
                format=image.format,  # type: ignore[arg-type]
                width=image.width,
                height=image.height,
                photometric=image.photometric,
                warnings=list(image.warnings),
            ),
            timing_ms=Timing(
                queue=done.queue_s * 1e3,
                inference=done.inference_s * 1e3,
                total=(time.perf_counter() - received_at) * 1e3,
            ),
        )
