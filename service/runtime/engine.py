"""The running model: a loaded checkpoint, its predictor, the micro-batcher, the thread pools and the pipeline.

:meth:`InferenceEngine.start` builds them in order (the batcher's worker thread owns the model's OpenMP team;
loading, decoding and preprocessing run single-threaded beside it, ``bayesnet/runtime.py``), warms the model up
on that worker thread, and returns the engine ready to take predictions; :meth:`InferenceEngine.stop` lets the
batcher finish everything it accepted and releases the pools. No HTTP here: the app's lifespan calls these.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bayesnet import model_thread, single_threaded_torch, tune_allocator
from service.runtime.batcher import BatchStats, MicroBatcher
from service.runtime.loading import LoadedModel, build_predictor, load_model
from service.runtime.operating import OperatingSwitch
from service.runtime.pipeline import Job, JobResult, PredictionPipeline, batch_processor
from service.runtime.predictor import Predictor, resolve_device
from service.runtime.signals import LoadSignals
from service.settings import Settings

__all__ = ["InferenceEngine", "load_single_threaded"]


async def load_single_threaded(settings: Settings) -> LoadedModel:
    """Load the checkpoint ``settings`` name in a helper thread that never starts an OpenMP team of its own; first,
    with ``settings.tune_allocator``, tune glibc's allocator (``bayesnet.tune_allocator``) for the process."""
    if settings.tune_allocator:
        tune_allocator()

    def load() -> LoadedModel:
        single_threaded_torch()
        return load_model(settings)

    return await asyncio.to_thread(load)


@dataclass(frozen=True)
class InferenceEngine:
    loaded: LoadedModel
    predictor: Predictor
    batcher: MicroBatcher[Job, JobResult]
    pipeline: PredictionPipeline
    pools: tuple[ThreadPoolExecutor, ...]

    @classmethod
    async def start(
        cls,
        loaded: LoadedModel,
        settings: Settings,
        *,
        intraop_threads: int,
        signals: LoadSignals,
        operating: OperatingSwitch | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> InferenceEngine:
        """Build, start and (``settings.warmup``) warm up the engine for ``loaded``.

        ``intraop_threads``: the model thread's torch threads for a lone image (CPU); ``signals``: the load
        signals the pipeline counts and the batcher reads; ``operating``: the deployment mode and guarantee state
        every answer's referral is subject to (None: autonomous, never suspended); ``on_batch``: called with each
        batch's statistics."""
        predictor = build_predictor(
            loaded, settings, device=resolve_device(settings.device), max_batch=settings.max_batch_images
        )
        on_cpu = predictor.device.type == "cpu"
        batcher: MicroBatcher[Job, JobResult] = MicroBatcher(
            batch_processor(
                predictor,
                threads=intraop_threads if on_cpu else None,
                busy_threads=settings.busy_torch_threads if on_cpu else None,
            ),
            max_batch_size=settings.max_batch_images,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            name="inference",
            on_batch=on_batch,
            more_coming=signals.uploads_coming,
            thread_initializer=functools.partial(model_thread, intraop_threads),
        )
        decode_pool = ThreadPoolExecutor(
            settings.decode_workers, thread_name_prefix="decode", initializer=single_threaded_torch
        )
        # Previews decode in threads of their own: a flood of them cannot hold the threads predictions need.
        preview_pool = ThreadPoolExecutor(
            settings.preview_workers, thread_name_prefix="preview", initializer=single_threaded_torch
        )
        pools = (decode_pool, preview_pool)
        await batcher.start()
        try:
            if settings.warmup:  # on the inference thread itself: its thread team and kernel caches get warm
                await batcher.run_in_worker(predictor.warmup)
        except BaseException:
            await batcher.stop(drain=False)
            for pool in pools:
                pool.shutdown(wait=False)
            raise
        pipeline = PredictionPipeline(
            spec=loaded.spec,
            model_ref=loaded.ref,
            batcher=batcher,
            decode_pool=decode_pool,
            preview_pool=preview_pool,
            max_decode_bytes=settings.max_decode_bytes,
            max_pixels=settings.max_pixels,
            default_samples=settings.mc_samples or loaded.spec.mc_samples,
            timeout_s=settings.request_timeout_s,
            ood_action=settings.ood_action,
            stage=predictor.stage,
            seed=predictor.seed_for,
            signals=signals,
            operating=operating,
        )
        return cls(loaded, predictor, batcher, pipeline, pools)

    async def stop(self) -> None:
        """Finish every request the batcher accepted, then release the thread pools."""
        await self.batcher.stop(drain=True)
        for pool in self.pools:
            pool.shutdown(wait=True)
