"""The path of one upload: bytes -> decode + preprocess (thread pool) -> batcher -> response schema.

``PredictionPipeline`` is the service object the routes call. It never blocks the event loop: decoding,
preprocessing and PNG encoding run in a bounded thread pool, model work in the batcher's worker thread.
Decoding (``service.runtime.decoding``) and response building (``service.runtime.responses``) are shared with
the archive scorer.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, ParamSpec, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from bayesnet import DecodedImage, ImageFacts, ModelSpec, TooManyPixelsError, decode_image, decode_memory_bytes
from bayesnet.population import Declared, assess
from service.errors import (
    BadRequestParameterError,
    InferenceFailedError,
    InferenceTimeoutError,
    OutOfDistributionError,
)
from service.runtime.batcher import BatcherError, MicroBatcher
from service.runtime.decoding import decode_for_model
from service.runtime.heatmaps import CamSelection, CamSelectionError, encode_heatmaps, for_population, parse_cams
from service.runtime.operating import OperatingSwitch
from service.runtime.predictor import InferenceRequest, InferenceResult, Predictor
from service.runtime.responses import build_response, ood_result
from service.runtime.signals import LoadSignals
from service.schemas import Heatmap, ModelRef, PredictionResponse

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


#: The long side of a preview, in pixels (the page shows the film at most this large).
PREVIEW_LONG_SIDE = 1024


def preview_png(image: DecodedImage) -> bytes:
    """The radiograph as a browser can show it (DICOM included): 8-bit grayscale PNG, long side at most
    :data:`PREVIEW_LONG_SIDE`."""
    pixels = torch.from_numpy(image.pixels)[None, None]
    scale = min(1.0, PREVIEW_LONG_SIDE / max(image.width, image.height))
    size = (max(1, round(image.height * scale)), max(1, round(image.width * scale)))
    if size != (image.height, image.width):
        pixels = torch.nn.functional.interpolate(
            pixels, size=size, mode="bilinear", antialias=True, align_corners=False
        )
    gray = (pixels[0, 0].clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def batch_processor(
    predictor: Predictor,
    *,
    threads: int | None = None,
    busy_threads: int | None = None,
) -> Callable[[list[Job]], list[JobResult]]:
    """The function the batcher's worker thread runs on each batch of jobs.

    ``threads`` / ``busy_threads`` (CPU): torch's intra-op threads for a single-image batch / for a batch of
    several. Several images in one batch mean requests are arriving faster than one at a time, and their
    decoding, heatmap encoding and HTTP need CPU too; one model thread leaves them the other cores, which raises
    throughput under load (docs/benchmarks.md). A lone image means a quiet moment, and every core goes to its latency.
    ``None``: leave the thread count alone.
    """

    def process(jobs: list[Job]) -> list[JobResult]:
        wanted = threads if len(jobs) == 1 else busy_threads
        if wanted is not None and torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)  # this thread's OpenMP setting only; costs microseconds
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
        preview_pool: ThreadPoolExecutor | None = None,
        default_samples: int,
        timeout_s: float,
        ood_action: Literal["flag", "reject"] = "flag",
        stage: Callable[[Tensor], Tensor] | None = None,
        seed: Callable[[Tensor], int] | None = None,
        max_decode_bytes: int | None = None,
        signals: LoadSignals | None = None,
        operating: OperatingSwitch | None = None,
    ) -> None:
        """``stage``: readies each preprocessed image for the model's device in the decode thread
        (:meth:`Predictor.stage`: page-locked memory on CUDA); None leaves the tensors as they are. ``seed``: the
        image's MC seed (:meth:`Predictor.seed_for`), taken in the decode thread too; None leaves it to the
        predictor, on the inference thread. ``preview_pool``: the threads previews decode in (None: the decode
        pool). ``max_decode_bytes``: refuse an upload whose decode may need more memory than this
        (:func:`bayesnet.decode_memory_bytes`, from its header); None: only ``max_pixels`` bounds it. ``signals``:
        where the pipeline counts uploads being decoded and answers being built, for the batcher and the audit
        writer given the same object (:class:`LoadSignals`); None: counted for nobody. ``operating``: the site's
        deployment mode and guarantee state, applied to each answer's referral (``service.runtime.operating``);
        None: autonomous, never suspended."""
        self.spec = spec
        self.operating = operating or OperatingSwitch()
        self.stage = stage
        self.seed = seed
        self.ood_action = ood_action
        self.model_ref = model_ref
        self.batcher = batcher
        self.decode_pool = decode_pool
        self.preview_pool = preview_pool or decode_pool
        self.max_pixels = max_pixels
        self.max_decode_bytes = max_decode_bytes
        self.default_samples = default_samples
        self.timeout_s = timeout_s
        self.signals = signals if signals is not None else LoadSignals()

    async def _off_loop(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.decode_pool, lambda: fn(*args, **kwargs))

    def parse_cams(self, cams: str) -> CamSelection:
        """``auto`` | ``all`` | ``none`` | comma-separated trained label names -> what the predictor wants."""
        try:
            return parse_cams(cams, self.spec)
        except CamSelectionError as err:
            raise BadRequestParameterError(str(err)) from err

    async def decode(self, data: bytes) -> tuple[ImageFacts, Tensor, int | None]:
        """Decode and preprocess off the event loop: ``(image facts, model input tensor, MC seed)``."""

        def work() -> tuple[ImageFacts, Tensor, int | None]:
            self._check_decode_memory(data, self.spec)
            image, tensor = decode_for_model(data, self.spec, max_pixels=self.max_pixels)
            seed = None if self.seed is None else self.seed(tensor)
            return image, tensor if self.stage is None else self.stage(tensor), seed

        return await self._off_loop(work)

    async def preview(self, data: bytes) -> bytes:
        """The upload as a browser-ready PNG, made in the preview threads (never the ones predictions decode in)."""

        def work() -> bytes:
            self._check_decode_memory(data, None)
            # A JPEG is decoded at a reduced scale when it is at least twice the preview's size (libjpeg's DCT
            # scaling): less memory and time; predictions always decode at full size.
            return preview_png(decode_image(data, max_pixels=self.max_pixels, max_side=PREVIEW_LONG_SIDE))

        return await asyncio.get_running_loop().run_in_executor(self.preview_pool, work)

    def _check_decode_memory(self, data: bytes, spec: ModelSpec | None) -> None:
        """With ``max_decode_bytes`` set, refuse (413) an upload whose decode would need more, before decoding it."""
        if self.max_decode_bytes is None:
            return
        needed = decode_memory_bytes(data, max_pixels=self.max_pixels, spec=spec)
        if needed > self.max_decode_bytes:
            raise TooManyPixelsError(
                f"Decoding this image would take up to {needed / 2**20:.0f} MiB of memory, above this server's "
                f"limit of {self.max_decode_bytes / 2**20:.0f} MiB per image (CXR_MAX_DECODE_BYTES). Send a smaller "
                "export (fewer pixels, grayscale rather than colour)."
            )

    def _check_in_distribution(self, result: InferenceResult, image: ImageFacts, n_samples: int) -> None:
        """In reject mode, refuse an image the out-of-distribution gate flags (never without a gate)."""
        verdict = ood_result(result, self.spec)
        if self.ood_action == "reject" and verdict is not None and not verdict.in_distribution:
            raise OutOfDistributionError(
                f"This does not look like a frontal chest radiograph: its out-of-distribution score "
                f"{verdict.score:.3g} is above this model's threshold {verdict.threshold:.3g}, so no predictions "
                "are returned. Send a frontal (PA or AP) chest radiograph; photos, other body parts, CT or MR "
                "slices and lateral views are outside what the model was trained on.",
                ood=verdict,
                image=image,
                mc_samples=n_samples,
            )

    async def predict(
        self,
        data: bytes,
        *,
        request_id: str,
        cams: str,
        mc_samples: int | None,
        received_at: float,
        declared: Declared | None = None,
    ) -> tuple[PredictionResponse, int]:
        """One upload -> (response, size of the batch it ran in). ``declared``: the client's declared patient age
        and view."""
        wanted = self.parse_cams(cams)
        n_samples = mc_samples if mc_samples is not None else self.default_samples
        # Admission control before any work: uploads being decoded count against the queue bound, so a burst
        # beyond capacity is shed with a 503 at once instead of piling up in the decode pool.
        self.batcher.admit(pending=self.signals.uploads)
        with self.signals.decoding():
            image, tensor, seed = await self.decode(data)
        population = assess(image, declared)
        wanted = for_population(wanted, outside=bool(population.flags))
        job = Job(InferenceRequest(tensor, n_samples, wanted, seed), time.perf_counter())
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
        with self.signals.answering():  # the caller's audit record follows the answer
            self._check_in_distribution(done.result, image, n_samples)

            def respond(maps: dict[str, Heatmap]) -> PredictionResponse:
                return build_response(
                    request_id=request_id,
                    model_ref=self.model_ref,
                    spec=self.spec,
                    n_samples=n_samples,
                    image=image,
                    result=done.result,
                    heatmaps=maps,
                    queue_s=done.queue_s,
                    inference_s=done.inference_s,
                    total_s=time.perf_counter() - received_at,
                    population=population,
                    operating=self.operating.get(),
                )

            # Heatmaps to render: resampling and encoding the maps and building the response in one trip to the
            # pool. Without heatmaps the response is built here, on the loop.
            if done.result.cams:
                response = await self._off_loop(lambda: respond(encode_heatmaps(done.result.cams, self.spec)))
            else:
                response = respond({})
        return response, done.batch_size
