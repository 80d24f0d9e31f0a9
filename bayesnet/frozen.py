"""A frozen CPU inference graph of the deterministic trunk: BatchNorm folded into the convolutions.

With dropout in the head only, the trunk (stem, blocks, head conv) is a fixed function in eval mode, so it
can be traced once and frozen: BatchNorm's running statistics fold into the preceding convolution's
weights, oneDNN fuses convolutions with their activations, and the whole forward runs in C++ without
taking Python's GIL once per layer. That makes ``forward_features`` faster than eager on a CPU
(``bench/serve.py`` prints both; the figures are in docs/benchmarks.md), and it keeps the inference thread from
queueing for the GIL behind request handling.

TorchScript is the only graph path that needs no C++ compiler at run time (``torch.compile``'s CPU
backend does, and the runtime image has none). ``torch.jit.trace`` announces its deprecation with a
``FutureWarning``; that warning is silenced here, in this block only. The graph is checked against the
eager trunk before it is used.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from bayesnet.errors import ModelModeError
from bayesnet.model import BayesianEfficientNet

#: Largest |graph - eager| / max|eager| accepted on the example batch (folding BN changes rounding only).
TOLERANCE = 1e-3


class FrozenGraphError(RuntimeError):
    """The traced graph does not reproduce the eager trunk; callers fall back to eager."""


class _Trunk(nn.Module):
    def __init__(self, model: BayesianEfficientNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)


def frozen_trunk(model: BayesianEfficientNet, example: Tensor) -> Callable[[Tensor], Tensor]:
    """``forward_features`` as a frozen, inference-optimised TorchScript graph (CPU; any batch size).

    Args:
        model: an eval-mode model whose stochastic layers are all in the head (``model.head_only``).
        example: a ``(B, C, S, S)`` batch on the CPU at the spec's input size, used to trace and to check.

    Raises:
        ModelModeError: the model is in training mode.
        ValueError: dropout sits inside the trunk (it would be frozen into the graph) or not on the CPU.
        FrozenGraphError: the graph's output differs from the eager trunk's on ``example``.
    """
    if model.training:
        raise ModelModeError("freeze the trunk of an eval-mode model only (BatchNorm must not update)")
    if not model.head_only:
        raise ValueError("the trunk holds MC dropout layers: it is not a fixed function and cannot be frozen")
    if example.device.type != "cpu":
        raise ValueError(f"the frozen graph is a CPU path; got an example on {example.device}")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        traced = torch.jit.trace(_Trunk(model).eval(), example, check_trace=False)  # type: ignore[no-untyped-call]
        graph = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        expected = model.forward_features(example)
        got = graph(example)
    error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    if got.shape != expected.shape or not error <= TOLERANCE:
        raise FrozenGraphError(f"frozen trunk differs from eager by {error:.2e} (relative), over {TOLERANCE:.0e}")
    return graph  # type: ignore[no-any-return]
