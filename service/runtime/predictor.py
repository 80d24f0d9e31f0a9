"""The model work of one batch, run in the batcher's worker thread: trunk once, B x T rows, Grad-CAM.

For the default head-only MC layout a batch costs one trunk pass: the final feature map feeds both the
stochastic head (pooled, repeated T times in one call) and the closed-form Grad-CAM. Other layouts run the
deterministic trunk once for the batch, sample the rest, and use the autograd Grad-CAM. In every layout the
out-of-distribution gate scores the trunk's pooled features (``trunk_features``) of that same pass.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from bayesnet import BayesianEfficientNet, ModelSpec, gradcam
from bayesnet.cudagraph import CudaGraphError, GraphedTrunk
from bayesnet.decision import Decision, Reason, decide_with_reasons
from bayesnet.frozen import FrozenGraphError, frozen_trunk
from bayesnet.gradcam import GridCams, cam_grids, resampling_matrices
from bayesnet.mc import MCPrediction, input_seed, mc_from_trunk
from bayesnet.model import PerImageMasks
from bayesnet.ood import OODGate
from bayesnet.referral import study_cleared
from service.runtime.heatmaps import AUTO, CamSelection, auto_classes

log = logging.getLogger("service.runtime.predictor")


@dataclass(frozen=True)
class InferenceRequest:
    """One preprocessed image and what to compute for it."""

    tensor: Tensor  # (C, S, S) float32, CPU
    n_samples: int
    cams: CamSelection  # AUTO, or label indices (possibly empty): service.runtime.heatmaps
    #: The image's MC seed (bayesnet.input_seed of ``tensor`` and the weights); None: the predictor derives it.
    seed: int | None = None


@dataclass(frozen=True)
class InferenceResult:
    """Per-image numbers, label-indexed like the spec (numpy, CPU)."""

    mean: np.ndarray  # (K,)
    variance: np.ndarray
    std: np.ndarray
    standard_error: np.ndarray  # Monte-Carlo standard error of ``mean`` (NaN with one sample)
    interval: np.ndarray  # (K, 2): 5th and 95th percentile of the sample probabilities
    mutual_information: np.ndarray
    decisions: tuple[Decision, ...]
    reasons: tuple[Reason, ...]  # why each label got its decision (bayesnet.decision.Reason)
    seed: int  # the seed this image's dropout masks were drawn from
    cams: Mapping[int, np.ndarray]  # label index -> (S, S) float32 in [0, 1] (GridCams: resampled when read)
    ood_score: float | None = None  # the OOD gate's score; None when the checkpoint has no gate
    cleared: bool = False  # the study-level referral rule clears the film as normal (bayesnet.referral)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Predictor:
    """Owns the model on its device; ``run`` is called from exactly one thread (the batcher's)."""

    def __init__(
        self,
        model: BayesianEfficientNet,
        spec: ModelSpec,
        *,
        device: torch.device,
        autocast: str = "auto",
        ood: OODGate | None = None,
        freeze_trunk: bool = False,
        max_batch: int | None = None,
        pad_batches: bool | None = None,
        cuda_graphs: bool = True,
        weights_sha256: str = "",
    ) -> None:
        """``weights_sha256``: the digest of the weights, mixed into every image's MC seed (:meth:`seed_for`), so
        that one film gets one answer from these weights on any replica, and other weights draw other masks.

        ``max_batch``: the most images one ``run`` gets (the batcher's limit).

        ``pad_batches`` (default: on CUDA): pad each batch with blank images up to a size in
        :func:`batch_buckets` and warm every such size up, so the network only ever sees a handful of
        shapes. cuDNN pays seconds the first time it meets an input shape in fp16 or channels_last
        (docs/benchmarks.md); unpadded, every new batch size stalled live requests by that much.
        On a CPU a new shape costs nothing and padding would only add work. With dropout inside the network
        (``mc_dropout_blocks`` > 0, not the default) the stochastic blocks still see ``B x T`` rows of every B;
        padding those too would multiply the padded work by T, so it is left for when such a model is served.

        ``cuda_graphs``: with padding on CUDA and head-only dropout, :meth:`warmup` captures the trunk of each
        bucket size as a CUDA graph (bayesnet/cudagraph.py: one replay instead of hundreds of kernel
        launches), checked against eager; eager stays in use if capture or the check fails.
        """
        self.spec = spec
        self.device = device
        self.weights_sha256 = weights_sha256
        self.model = model.to(device).eval()
        self.ood = ood.to(device) if ood is not None else None
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self._autocast_dtype = self._pick_autocast(autocast)
        self._trained = [spec.label_index(label) for label in spec.trained_labels]
        self._trunk: Callable[[Tensor], Tensor] = self.model.forward_features
        # Built on the first run, i.e. on the thread that runs the model (bayesnet/runtime.py: one OpenMP team).
        self._freeze_pending = freeze_trunk and device.type == "cpu" and self.model.head_only
        self._resamplers: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
        pad = device.type == "cuda" if pad_batches is None else pad_batches
        self.buckets: tuple[int, ...] = batch_buckets(max_batch) if pad and max_batch else ()
        self._graph_pending = cuda_graphs and device.type == "cuda" and self.model.head_only and bool(self.buckets)
        self.graphed = False  # True once the trunk replays CUDA graphs
        self._pin = True  # stage() page-locks images on CUDA until that fails once

    def _freeze_trunk(self) -> None:
        self._freeze_pending = False
        example = torch.zeros(2, self.spec.in_chans, self.spec.image_size, self.spec.image_size)
        try:
            self._trunk = frozen_trunk(self.model, example)
        except (FrozenGraphError, RuntimeError) as err:  # tracing is an optimisation: eager stays correct
            log.warning("frozen CPU trunk unavailable, running it eagerly: %s", err)

    def _pick_autocast(self, mode: str) -> torch.dtype | None:
        if self.device.type != "cuda" or mode == "off":
            return None  # on CPU, fp32 is both the fastest and the exact path
        # auto is fp16: bf16 keeps 8 mantissa bits and moves the demo model's probabilities on real films far more
        # than fp16 does (bench/precision.py, docs/benchmarks.md). bf16 only when asked for.
        return torch.bfloat16 if mode == "bf16" else torch.float16

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        if self._autocast_dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self._autocast_dtype):
                yield

    def seed_for(self, tensor: Tensor) -> int:
        """The MC seed of one preprocessed image ``(C, S, S)``: a digest of it and of the weights. Callers on
        other threads (the decode pool) compute it there, off the inference thread."""
        return input_seed(tensor, self.weights_sha256)

    def warmup(self) -> None:
        """One real batch through every code path (trunk, stacked head, Grad-CAM); each bucket size when padding."""
        size = self.spec.image_size
        dummy = torch.zeros(self.spec.in_chans, size, size)
        self.run([InferenceRequest(dummy, self.spec.mc_samples, AUTO), InferenceRequest(dummy, 2, (0,))])
        for bucket in self.buckets:
            self.run([InferenceRequest(dummy, self.spec.mc_samples, (0,))] * bucket)
        if self._graph_pending:
            self._capture_graphs()

    def _capture_graphs(self) -> None:
        self._graph_pending = False
        try:
            self._trunk = GraphedTrunk(self.model, self.buckets, autocast=self._autocast_dtype)
        except (CudaGraphError, RuntimeError) as err:  # graphs are an optimisation: eager stays correct
            log.warning("CUDA graphs unavailable, running the trunk eagerly: %s", err)
        else:
            self.graphed = True
            log.info("the trunk replays CUDA graphs for batch sizes %s", ", ".join(map(str, self.buckets)))

    def stage(self, tensor: Tensor) -> Tensor:
        """A preprocessed image made ready for this predictor's device, in the caller's (decode) thread.

        On CUDA the tensor is copied into page-locked memory, so :meth:`run` moves it to the GPU by DMA,
        asynchronously, with no host-side copy on the inference thread. Stacking a batch of float images in
        pageable memory and copying it over took most of that thread's time in a profile of the server on a GPU
        (docs/benchmarks.md). Identity on CPU, and wherever page-locking fails (the copy is
        then synchronous, as before, and the answers are the same).
        """
        if self.device.type != "cuda" or not self._pin:
            return tensor
        try:
            return tensor.pin_memory()
        except RuntimeError as err:  # e.g. a container that limits locked memory: fall back, say so once
            self._pin = False
            log.warning("page-locked staging unavailable, copying batches from pageable memory: %s", err)
            return tensor

    def _batch(self, requests: Sequence[InferenceRequest]) -> Tensor:
        """The requests' images as one batch on the device, padded to its bucket (channels_last on CUDA)."""
        shape = requests[0].tensor.shape
        if any(r.tensor.shape != shape for r in requests):
            raise ValueError(
                f"images of one batch differ in shape: {sorted({tuple(r.tensor.shape) for r in requests})}"
            )
        if self.device.type != "cuda":
            return self._padded(torch.stack([r.tensor for r in requests]))
        n = len(requests)
        x = torch.empty((self._bucket(n), *shape), device=self.device)
        for row, request in enumerate(requests):  # from pinned memory (stage) these are asynchronous DMAs
            x[row].copy_(request.tensor, non_blocking=True)
        x[n:].zero_()
        return x.contiguous(memory_format=torch.channels_last)

    def _bucket(self, n: int) -> int:
        """The batch size ``n`` images run at: the smallest bucket that holds them (``n`` without buckets)."""
        return next((b for b in self.buckets if b >= n), n)

    def _padded(self, x: Tensor) -> Tensor:
        """``x`` with blank rows appended up to the smallest bucket that holds it (unchanged without buckets)."""
        n = x.shape[0]
        target = self._bucket(n)
        if target == n:
            return x
        return torch.cat([x, x.new_zeros((target - n, *x.shape[1:]))])

    def run(self, requests: Sequence[InferenceRequest]) -> list[InferenceResult]:
        """Process one batch; returns one result per request, in order."""
        if self._freeze_pending:
            self._freeze_trunk()
        n = len(requests)
        x = self._batch(requests)
        features: Tensor | None = None
        results: list[InferenceResult | None] = [None] * n
        with torch.inference_mode(), self._precision():
            # The trunk runs on the padded batch; everything after it sees the real rows only.
            if self.model.head_only:
                features = self._trunk(x)[:n]
                trunk = self.model.pool(features)
            else:
                trunk = self.model.forward_trunk(x)[:n]
            scores = self._ood_scores(trunk)
            seeds = [self.seed_for(r.tensor) if r.seed is None else r.seed for r in requests]
            for n_samples, idx in _group_by_samples(requests):
                # Each image's masks come from its own seed, whatever else shares the batch (PerImageMasks).
                masks = PerImageMasks([seeds[i] for i in idx], n_samples)
                pred = mc_from_trunk(self.model, trunk[idx], n_samples, masks=masks, return_samples=True)
                summaries = self._summaries(
                    pred, None if scores is None else [scores[i] for i in idx], [seeds[i] for i in idx]
                )
                for i, result in zip(idx, summaries, strict=True):
                    results[i] = result
        done = [r for r in results if r is not None]
        assert len(done) == len(requests)
        cam_requests = [
            (i, self._cam_classes(request.cams, result))
            for i, (request, result) in enumerate(zip(requests, done, strict=True))
        ]
        self._add_cams(x, features, cam_requests, done)
        return done

    def _ood_scores(self, trunk: Tensor) -> list[float] | None:
        """The OOD gate's score of each image, from the trunk output the MC head consumes (no extra pass)."""
        if self.ood is None:
            return None
        scores: list[float] = self.ood.score(self.model.trunk_features(trunk).float()).cpu().tolist()
        return scores

    def _summaries(self, pred: MCPrediction, ood_scores: list[float] | None, seeds: list[int]) -> list[InferenceResult]:
        """Per-image results of one MC call, converted to numpy in one go (rows in the call's order)."""
        assert pred.samples is not None
        samples = pred.samples.float()  # (T, G, K)
        decided = decide_with_reasons(samples, self.spec)
        cleared = study_cleared(samples, self.spec)
        q = torch.tensor([0.05, 0.95], device=samples.device)
        interval = torch.quantile(samples, q, dim=0).permute(1, 2, 0)  # (G, K, 2)
        mean, variance, std, se, mi, interval_np = (
            t.cpu().numpy()
            for t in (pred.mean, pred.variance, pred.std, pred.standard_error, pred.mutual_information, interval)
        )
        return [
            InferenceResult(
                mean=mean[g],
                variance=variance[g],
                std=std[g],
                standard_error=se[g],
                interval=interval_np[g],
                mutual_information=mi[g],
                decisions=tuple(decision for decision, _ in decided[g]),
                reasons=tuple(reason for _, reason in decided[g]),
                seed=seeds[g],
                cams={},
                ood_score=None if ood_scores is None else ood_scores[g],
                cleared=cleared[g],
            )
            for g in range(samples.shape[1])
        ]

    def _cam_classes(self, cams: CamSelection, result: InferenceResult) -> list[int]:
        if not isinstance(cams, str):
            return list(cams)
        gate, score = self.spec.ood, result.ood_score
        in_distribution = gate is None or score is None or gate.in_distribution(score)
        return auto_classes(result.mean, result.decisions, self._trained, in_distribution=in_distribution)

    def _add_cams(
        self,
        x: Tensor,
        features: Tensor | None,
        cam_requests: list[tuple[int, list[int]]],
        results: list[InferenceResult],
    ) -> None:
        wanted = sorted({k for _, ks in cam_requests for k in ks})
        rows = [i for i, ks in cam_requests if ks]
        if not wanted or not rows:
            return
        size = (x.shape[-2], x.shape[-1])
        chosen = dict(cam_requests)
        if features is not None:
            # Closed form on the feature grid; each map is resampled to the input size by whoever reads it (GridCams:
            # the decode threads), not on this thread, and only h x w floats per map leave the device.
            with self._precision(), torch.inference_mode():
                grids = cam_grids(self.model, features[rows].float(), wanted).cpu().numpy()
            ry, rx = self._resampling(grids.shape[-2:], size)
            for row, i in enumerate(rows):
                maps = GridCams({k: grids[row, wanted.index(k)] for k in chosen[i]}, ry, rx)
                results[i] = replace(results[i], cams=maps)
            return
        with self._precision():
            full = gradcam(self.model, self._padded(x[rows]), wanted)[: len(rows)]
        maps_np = full.float().cpu().numpy()
        for row, i in enumerate(rows):
            results[i] = replace(results[i], cams={k: maps_np[row, wanted.index(k)] for k in chosen[i]})

    def _resampling(self, grid: tuple[int, ...], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The (Ry, Rx) resampling matrices from the feature grid to ``size``, computed once per shape."""
        key = (grid[0], grid[1], *size)
        if key not in self._resamplers:
            self._resamplers[key] = resampling_matrices(self.model, (grid[0], grid[1]), size)
        return self._resamplers[key]


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a padded batch takes: powers of two below ``max_batch``, and ``max_batch`` itself."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return (*sizes, max_batch)


def _group_by_samples(requests: Sequence[InferenceRequest]) -> list[tuple[int, list[int]]]:
    groups: dict[int, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(request.n_samples, []).append(i)
    return sorted(groups.items())
