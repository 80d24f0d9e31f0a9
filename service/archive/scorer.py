"""The archive scorer: the server's batch inference over a list of files, with no HTTP and no FastAPI import.

The same decoding and preprocessing (``service.runtime.decoding``), batched model work (``Predictor.run``:
trunk once, B x T stochastic rows, Grad-CAM) and response shape (``service.runtime.responses``,
``PredictionResponse``) as the server, so a film scored here gets the numbers the service would give it.

Three stages overlap, so on a GPU the model waits only when decoding is slower than inference:
  1. decode (``ArchiveScorer._decode``, a thread pool): bytes -> image facts and a staged tensor, a window of
     images ahead of the model;
  2. infer (``ArchiveScorer._infer``, the calling thread): one full batch through the predictor; a failure
     fails only that batch's files, as in the server;
  3. write (``ArchiveScorer._lines``, one writer thread): results -> response lines (heatmap PNGs, JSON),
     appended and flushed once per batch. At most one batch waits for the writer, so memory stays bounded.
``_ScoreRun`` holds what moves between the stages during one ``ArchiveScorer.score`` call.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO

from torch import Tensor

from bayesnet import ImageFacts, ModelSpec, single_threaded_torch
from bayesnet.population import Population, assess
from service.archive.dicomweb import PacsUnavailableError
from service.archive.forward import ResultForwarder
from service.archive.inputs import ScoreItem, request_id_for
from service.archive.progress import Progress
from service.archive.results import error_line, result_line
from service.errors import OutOfDistributionError
from service.runtime.decoding import decode_for_model
from service.runtime.heatmaps import encode_heatmaps, for_population
from service.runtime.predictor import InferenceRequest, InferenceResult, Predictor
from service.runtime.responses import build_response, ood_result
from service.schemas import ModelRef

__all__ = ["ArchiveScorer", "ScoreSummary"]

log = logging.getLogger("service.archive")  # the command's one logger name, whichever module writes the line


@dataclass(frozen=True)
class ScoreSummary:
    """What one ``ArchiveScorer.score`` call did: files scored, files failed, and its wall-clock seconds."""

    scored: int
    failed: int
    seconds: float


@dataclass(frozen=True)
class _Decoded:
    """One file after stage 1, with when it was submitted and when its decoding was collected."""

    item: ScoreItem
    image: ImageFacts
    tensor: Tensor
    submitted_at: float
    ready_at: float
    #: The population verdict from the film's header and what the input declares (``bayesnet.population``).
    population: Population
    #: The file's bytes, kept only when its result objects are forwarded to a PACS (``--forward-results``).
    data: bytes | None = None


@dataclass(frozen=True)
class _Inferred:
    """One batch after the model: results in batch order, or the exception that failed the whole batch."""

    batch: list[_Decoded]
    results: list[InferenceResult] | None
    error: Exception | None
    started: float
    inference_s: float


class ArchiveScorer:
    """Decode ahead in a thread pool, run full batches through the predictor, append one line per file."""

    def __init__(
        self,
        predictor: Predictor,
        model_ref: ModelRef,
        *,
        n_samples: int,
        cams: str | tuple[int, ...],
        batch_size: int,
        decode_workers: int,
        max_pixels: int,
        reject_ood: bool = False,
        forwarder: ResultForwarder | None = None,
    ) -> None:
        self.predictor = predictor
        self.forwarder = forwarder
        self.reject_ood = reject_ood
        self.spec: ModelSpec = predictor.spec
        self.model_ref = model_ref
        self.n_samples = n_samples
        self.cams = cams
        self.batch_size = batch_size
        self.decode_workers = decode_workers
        self.max_pixels = max_pixels

    def score(self, items: Sequence[ScoreItem], out: IO[str], progress: Progress) -> ScoreSummary:
        """Score ``items``; a file's line is appended once its batch is done, flushed once per batch."""
        started = time.perf_counter()
        with (
            # The model runs on this thread; helpers run their tensor work inline (bayesnet/runtime.py).
            ThreadPoolExecutor(
                self.decode_workers, thread_name_prefix="batch-decode", initializer=single_threaded_torch
            ) as decode_pool,
            ThreadPoolExecutor(1, thread_name_prefix="batch-write", initializer=single_threaded_torch) as write_pool,
        ):
            run = _ScoreRun(self, iter(items), out, progress, decode_pool, write_pool)
            run.run()
        return ScoreSummary(run.scored, run.failed, time.perf_counter() - started)

    def _decode(self, item: ScoreItem) -> tuple[ImageFacts, Tensor, bytes | None]:
        """Stage 1 (decode pool): the file's image facts and its preprocessed tensor, staged for the device (and
        its bytes when they are forwarded)."""
        data = item.file.read_bytes()
        image, tensor = decode_for_model(data, self.spec, max_pixels=self.max_pixels)
        kept = data if self.forwarder is not None else None
        return image, self.predictor.stage(tensor), kept  # page-locked on CUDA: the batch's copies become DMAs

    def _infer(self, batch: list[_Decoded]) -> _Inferred:
        """Stage 2 (calling thread): one batch through the model; a failure fails only this batch's files."""
        requests = [
            InferenceRequest(d.tensor, self.n_samples, for_population(self.cams, outside=bool(d.population.flags)))
            for d in batch
        ]
        started = time.perf_counter()
        try:
            results = self.predictor.run(requests)
        except Exception as err:
            log.exception("a batch of %d images failed inside the model", len(batch))
            return _Inferred(batch, None, err, started, time.perf_counter() - started)
        return _Inferred(batch, results, None, started, time.perf_counter() - started)

    def _lines(self, inferred: _Inferred) -> list[tuple[str, bool]]:
        """Stage 3 (writer thread): ``(output line, succeeded)`` per file of a batch, in batch order."""
        if inferred.results is None:
            err = inferred.error
            assert err is not None
            detail = f"inference failed for the batch containing this file ({type(err).__name__}: {err})"
            return [(error_line(d.item.key, err, detail), False) for d in inferred.batch]
        lines = []
        for decoded, result in zip(inferred.batch, inferred.results, strict=True):
            rejected = self._rejection(decoded, result)
            if rejected is not None:
                lines.append((error_line(decoded.item.key, rejected), False))
                continue
            response = build_response(
                request_id=request_id_for(decoded.item.key),
                model_ref=self.model_ref,
                spec=self.spec,
                n_samples=self.n_samples,
                image=decoded.image,
                result=result,
                population=decoded.population,
                heatmaps=encode_heatmaps(result.cams, self.spec) if result.cams else {},
                queue_s=inferred.started - decoded.ready_at,
                inference_s=inferred.inference_s,
                total_s=time.perf_counter() - decoded.submitted_at,
            )
            if self.forwarder is not None and decoded.data is not None:  # before the line: at least once on resume
                self.forwarder.forward(decoded.item.key, decoded.data, response)
            lines.append((result_line(decoded.item.key, response), True))
        return lines

    def _rejection(self, decoded: _Decoded, result: InferenceResult) -> OutOfDistributionError | None:
        """With ``reject_ood``, the error recorded instead of a film's result when its OOD gate flags it."""
        verdict = ood_result(result, self.spec)
        if not self.reject_ood or verdict is None or verdict.in_distribution:
            return None
        return OutOfDistributionError(
            f"not scored: out-of-distribution score {verdict.score:.3g} is above the model's threshold "
            f"{verdict.threshold:.3g}; this does not look like a frontal chest radiograph",
            ood=verdict,
            image=decoded.image,
            mc_samples=self.n_samples,
        )


class _ScoreRun:
    """One ``ArchiveScorer.score`` call: the decodings in flight, the batch being filled, the write in progress."""

    def __init__(
        self,
        scorer: ArchiveScorer,
        todo: Iterator[ScoreItem],
        out: IO[str],
        progress: Progress,
        decode_pool: ThreadPoolExecutor,
        write_pool: ThreadPoolExecutor,
    ) -> None:
        self.scorer, self.todo, self.out, self.progress = scorer, todo, out, progress
        self.decode_pool, self.write_pool = decode_pool, write_pool
        # Enough decoded images in flight to fill the next batch while the model runs the current one.
        self.window = 2 * scorer.batch_size + scorer.decode_workers
        self.pending: deque[tuple[ScoreItem, float, Future[tuple[ImageFacts, Tensor, bytes | None]]]] = deque()
        self.batch: list[_Decoded] = []
        self.errors: list[str] = []  # lines of files that failed to decode, written with the next batch
        self.writing: Future[None] | None = None
        self.scored = self.failed = 0  # updated by the writer thread, read once it is done

    def run(self) -> None:
        """Collect decodings in order, hand each full batch (or full list of errors) on, then the remainder."""
        size = self.scorer.batch_size
        self._decode_ahead()
        while self.pending:
            item, submitted_at, future = self.pending.popleft()
            self._decode_ahead()
            self._collect(item, submitted_at, future)
            if len(self.batch) >= size or len(self.errors) >= size:
                self._hand_over(run_model=len(self.batch) >= size)
        self._hand_over(run_model=True)
        assert self.writing is not None
        self.writing.result()

    def _decode_ahead(self) -> None:
        while len(self.pending) < self.window:
            item = next(self.todo, None)
            if item is None:
                return
            self.pending.append((item, time.perf_counter(), self.decode_pool.submit(self.scorer._decode, item)))

    def _collect(
        self, item: ScoreItem, submitted_at: float, future: Future[tuple[ImageFacts, Tensor, bytes | None]]
    ) -> None:
        try:
            image, tensor, data = future.result()
        except PacsUnavailableError:
            raise  # not this film's fault: the run stops, and a rerun resumes after what was written
        except Exception as err:  # one bad file is recorded and the run goes on
            if not isinstance(err, OSError | ValueError):
                log.exception("unexpected error decoding %s", item.key)
            self.errors.append(error_line(item.key, err))
        else:
            population = assess(image, item.declared)
            self.batch.append(_Decoded(item, image, tensor, submitted_at, time.perf_counter(), population, data))

    def _hand_over(self, run_model: bool) -> None:
        """Run the model on the batch if asked, then queue its lines and the decode errors for the writer."""
        inferred = self.scorer._infer(self.batch) if run_model and self.batch else None
        if self.writing is not None:
            self.writing.result()  # raises what the writer met (a full disk, say)
        self.writing = self.write_pool.submit(self._write, self.errors, inferred)
        self.errors = []
        if inferred is not None:
            self.batch = []

    def _write(self, failed_lines: list[str], inferred: _Inferred | None) -> None:
        lines = [(line, False) for line in failed_lines] + (self.scorer._lines(inferred) if inferred else [])
        self.out.writelines(line for line, _ in lines)
        self.out.flush()
        ok = sum(success for _, success in lines)
        self.scored += ok
        self.failed += len(lines) - ok
        self.progress.update(ok, len(lines) - ok)
