"""Monte-Carlo dropout prediction: trunk once, the stochastic part once for B x T stacked rows.

The T samples of a batch of B images are rows ``t * B + b`` of one batched call of
:meth:`BayesianEfficientNet.forward_stochastic`. With head-only dropout that call is a (B*T, F) x (F, K)
matrix product, so 20 samples cost little more than one deterministic forward pass.

Uncertainty summaries, per image and label, over the T per-sample probabilities ``p_t``:

- ``mean`` = E[p_t] (the reported confidence), ``variance`` = Var[p_t] (population variance, divisor T),
  ``std`` = its square root;
- ``entropy`` = H(E[p_t]) (predictive/total uncertainty, binary entropy in nats),
  ``expected_entropy`` = E[H(p_t)] (aleatoric), ``mutual_information`` = their difference (epistemic);
- ``standard_error`` = the Monte-Carlo standard error of ``mean`` as an estimate of the expectation over
  dropout masks, ``sqrt(s^2 / T)`` with the unbiased sample variance ``s^2`` (NaN for T = 1): how much the
  reported confidence would move with another set of T masks.

Repeatable answers: :func:`input_seed` derives a seed from an image's model input and the weights' digest, and
:class:`~bayesnet.model.PerImageMasks` draws each image's masks from its own seed, so one film gets one answer
whatever batch it runs in, on every replica. ``T`` (``mc_samples``) stays the knob for precision.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bayesnet.errors import ModelModeError
from bayesnet.model import BayesianEfficientNet, DropoutMasks

_EPS = 1e-7


@dataclass(frozen=True)
class MCPrediction:
    """Summaries of T stochastic samples; every field is ``(B, K)`` float32 except ``samples`` ``(T, B, K)``."""

    mean: Tensor
    variance: Tensor
    std: Tensor
    entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor
    standard_error: Tensor
    samples: Tensor | None = None

    @property
    def n_samples(self) -> int:
        return 0 if self.samples is None else int(self.samples.shape[0])


def binary_entropy(p: Tensor) -> Tensor:
    """Entropy in nats of Bernoulli(p), elementwise, finite at p = 0 and 1."""
    p = p.clamp(_EPS, 1.0 - _EPS)
    return -(p * p.log() + (1.0 - p) * (1.0 - p).log())


def summarise(probs: Tensor, *, keep_samples: bool = False) -> MCPrediction:
    """Summaries of per-sample probabilities ``(T, B, K)`` (computed in float32)."""
    probs = probs.float()
    n_samples = int(probs.shape[0])
    mean = probs.mean(dim=0)
    variance = probs.var(dim=0, correction=0)
    # s^2 / T with s^2 = variance * T / (T - 1): variance / (T - 1); undefined for one sample.
    standard_error = (variance / (n_samples - 1)).sqrt() if n_samples > 1 else torch.full_like(mean, float("nan"))
    entropy = binary_entropy(mean)
    expected_entropy = binary_entropy(probs).mean(dim=0)
    return MCPrediction(
        mean=mean,
        variance=variance,
        std=variance.sqrt(),
        entropy=entropy,
        expected_entropy=expected_entropy,
        # Jensen makes this >= 0 mathematically; clamp the float round-off.
        mutual_information=(entropy - expected_entropy).clamp_min(0.0),
        standard_error=standard_error,
        samples=probs if keep_samples else None,
    )


def input_seed(x: Tensor | np.ndarray, weights_sha256: str) -> int:
    """The MC seed of one image: the first 8 bytes of sha256(weights digest, dtype, shape, model-input bytes).

    ``x`` is the image's model input ``(C, S, S)`` as it enters the network (float32 after preprocessing). The same
    input with the same weights always gives the same seed; any change to either gives an unrelated one.
    """
    array = np.ascontiguousarray(x.detach().cpu().numpy() if isinstance(x, Tensor) else x)
    digest = hashlib.sha256(weights_sha256.encode("ascii"))
    digest.update(f"{array.dtype.str}{array.shape}".encode("ascii"))
    digest.update(array.tobytes())  # 200 KB for a 224 px float32 input
    return int.from_bytes(digest.digest()[:8], "big") & ((1 << 63) - 1)  # torch seeds are signed 64-bit


def _check_eval(model: BayesianEfficientNet) -> None:
    if model.training:
        raise ModelModeError(
            "MC prediction needs a model in eval mode: in training mode BatchNorm would use and update "
            "batch statistics. Call model.eval() once after training; dropout stays samplable in eval."
        )


def _temperature(model: BayesianEfficientNet, like: Tensor) -> Tensor:
    return torch.tensor(model.spec.temperature, device=like.device, dtype=torch.float32)


def mc_logits(
    model: BayesianEfficientNet,
    z: Tensor,
    n_samples: int,
    *,
    generator: torch.Generator | None = None,
    masks: DropoutMasks | None = None,
) -> Tensor:
    """Raw (uncalibrated) logits ``(T, B, K)`` of T stochastic passes from a trunk output ``z``, one call."""
    _check_eval(model)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    batch = z.shape[0]
    rows = z.repeat(n_samples, *([1] * (z.dim() - 1)))  # (T*B, ...), sample-major
    logits = model.forward_stochastic(rows, masks if masks is not None else DropoutMasks(generator))
    return logits.float().reshape(n_samples, batch, -1)


def mc_from_trunk(
    model: BayesianEfficientNet,
    z: Tensor,
    n_samples: int,
    *,
    generator: torch.Generator | None = None,
    masks: DropoutMasks | None = None,
    return_samples: bool = False,
    calibrated: bool = True,
) -> MCPrediction:
    """MC sampling from a trunk output ``z`` (see :meth:`BayesianEfficientNet.forward_trunk`).

    Lets a caller that already ran the trunk (e.g. to share it with Grad-CAM) skip running it again.
    """
    logits = mc_logits(model, z, n_samples, generator=generator, masks=masks)
    if calibrated:
        logits = logits / _temperature(model, logits)
    return summarise(torch.sigmoid(logits), keep_samples=return_samples)


def mc_predict(
    model: BayesianEfficientNet,
    x: Tensor,
    n_samples: int = 20,
    generator: torch.Generator | None = None,
    *,
    masks: DropoutMasks | None = None,
    return_samples: bool = False,
    calibrated: bool = True,
) -> MCPrediction:
    """Monte-Carlo dropout prediction for a batch ``x`` ``(B, C, H, W)``.

    Runs the deterministic trunk once and the stochastic part once for all ``B * n_samples`` rows.
    Never changes the model's mode or BatchNorm statistics; raises :class:`ModelModeError` if the model
    is in training mode. ``generator`` makes the draw reproducible; ``masks`` injects a mask source
    (e.g. one that records its masks). ``calibrated`` applies the spec's per-label temperature to the
    logits before the sigmoid.
    """
    _check_eval(model)
    with torch.inference_mode():
        z = model.forward_trunk(x)
        return mc_from_trunk(
            model,
            z,
            n_samples,
            generator=generator,
            masks=masks,
            return_samples=return_samples,
            calibrated=calibrated,
        )
