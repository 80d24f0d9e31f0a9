"""The deterministic trunk replayed from CUDA graphs: one captured graph per batch size.

On a GPU a small CNN is launch-bound: EfficientNet-B0's trunk is a few hundred kernels, and at the batch
sizes an online service sees (1-32 images) the GPU finishes each one faster than Python and the driver can
issue the next. A CUDA graph records the whole launch sequence once and replays it with one call, so the
host's cost per forward no longer grows with the number of layers. The H200 numbers are in
docs/benchmarks.md (``bench/serve.py`` times (a) eager and graphed on CUDA).

A graph replays fixed memory: it reads its input from one static tensor and writes its output to another.
:class:`GraphedTrunk` copies each batch into the static input of the graph of that batch size (the
service pads batches to a few sizes, service/runtime/predictor.py, so every live batch has a graph) and returns the
static output, which stays valid until the next call. A batch size without a graph runs eagerly. Every
graph is checked against the eager trunk on a random batch when it is captured.

Only the trunk is graphed: with head-only dropout it is a fixed function, while the MC head draws fresh
masks on every call (a graph would replay the same random numbers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from bayesnet.errors import ModelModeError
from bayesnet.model import BayesianEfficientNet

#: Largest |graph - eager| / max|eager| accepted per batch size. The graph runs the same kernels as the
#: eager call it recorded, so any real difference is a capture fault, not rounding.
TOLERANCE = 1e-2
#: Eager calls on a side stream before each capture (lazy initialisation, cuDNN algorithm choice).
WARMUP_CALLS = 2


class CudaGraphError(RuntimeError):
    """A captured graph does not reproduce the eager trunk; callers fall back to eager."""


class GraphedTrunk:
    """``model.forward_features`` for a CUDA batch: a graph replay where one was captured for its size."""

    def __init__(
        self,
        model: BayesianEfficientNet,
        batch_sizes: Iterable[int],
        *,
        autocast: torch.dtype | None = None,
        memory_format: torch.memory_format = torch.channels_last,
    ) -> None:
        """Capture one graph per batch size (largest first, all in one memory pool: they never run at once).

        Args:
            model: an eval-mode model on a CUDA device, dropout in the head only (``model.head_only``).
            batch_sizes: the sizes to capture.
            autocast: the mixed-precision dtype the trunk runs under (None: the model's own dtype).
            memory_format: the layout of the batches the caller passes (the service uses channels_last).

        Raises:
            ModelModeError: the model is in training mode.
            ValueError: not on CUDA, or dropout inside the trunk (a graph would replay one mask forever).
            CudaGraphError: a graph's output differs from the eager trunk's.
        """
        if model.training:
            raise ModelModeError("capture the trunk of an eval-mode model only (BatchNorm must not update)")
        if not model.head_only:
            raise ValueError("the trunk holds MC dropout layers: a graph would replay the same masks every call")
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model; this one is on {device}")
        self.model = model
        self._autocast = autocast
        self._device = device
        spec = model.spec
        self._shape = (spec.in_chans, spec.image_size, spec.image_size)
        self._memory_format = memory_format
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        pool = None
        for size in sorted(set(batch_sizes), reverse=True):
            graph, static_in, static_out = self._capture(size, pool)
            pool = graph.pool()
            self._graphs[size] = (graph, static_in, static_out)
            self._check(size)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        if self._autocast is None:
            yield
        else:  # the cast-weight cache must be off while capturing (its tensors would outlive the capture)
            with torch.autocast("cuda", dtype=self._autocast, cache_enabled=False):
                yield

    def _capture(self, size: int, pool: Any) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        static_in = torch.zeros((size, *self._shape), device=self._device).contiguous(memory_format=self._memory_format)
        side = torch.cuda.Stream(self._device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side), torch.inference_mode(), self._precision():
            for _ in range(WARMUP_CALLS):
                self.model.forward_features(static_in)
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a CUDA call from another thread during the capture must not invalidate it.
        with (
            torch.inference_mode(),
            torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"),
            self._precision(),
        ):
            static_out = self.model.forward_features(static_in)
        return graph, static_in, static_out

    def _check(self, size: int) -> None:
        generator = torch.Generator(device=self._device).manual_seed(size)
        x = torch.randn((size, *self._shape), device=self._device, generator=generator)
        x = x.contiguous(memory_format=self._memory_format)
        with torch.inference_mode():
            got = self(x).float()
            with self._precision():
                expected = self.model.forward_features(x).float()
        error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
        if got.shape != expected.shape or not error <= TOLERANCE:
            raise CudaGraphError(
                f"CUDA graph of batch {size} differs from eager by {error:.2e} (relative), over {TOLERANCE:.0e}"
            )

    def __call__(self, x: Tensor) -> Tensor:
        """The trunk's feature map of ``x`` (valid until the next call when it came from a graph)."""
        entry = self._graphs.get(x.shape[0])
        if entry is None or x.device != self._device:
            with self._precision():
                return self.model.forward_features(x)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out
