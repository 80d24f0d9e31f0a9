"""Grad-CAM for every requested label of a batch, without touching the model's mode or its ``.grad``.

Grad-CAM of class c on a feature map A (B, F, h, w): weights ``a_cf = mean_ij dy_c/dA_fij``, map
``relu(sum_f a_cf A_f)``, resampled (bilinear) to the input size and scaled to [0, 1] per map. The
resampling puts each feature cell where the convolutions actually centre it
(:meth:`BayesianEfficientNet.feature_alignment`), not where a plain ``interpolate`` assumes: with
symmetric padding that differs by half a cell at stride 32.

Fast path: when the head is pool -> dropout -> linear, the MC-mean logit is ``W_c . mean_ij A + b_c``
(the dropout's expectation is the identity), so ``dy_c/dA_fij = W_cf / (h w)`` for every pixel and
all K maps are one einsum over the final feature map: no backward pass at all.

General path: an autograd Grad-CAM on any module's output. A forward hook swaps the module's output for
a detached leaf (so the backward never reaches earlier layers or parameters) and ``torch.autograd.grad``
asks for gradients w.r.t. that leaf only, so parameters' ``.grad`` stay as they were. The hook is
removed in ``finally``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayesnet.errors import ModelModeError
from bayesnet.model import BayesianEfficientNet, GridAlignment


def _class_indices(model: BayesianEfficientNet, classes: Sequence[int | str] | None) -> list[int]:
    if classes is None:
        return list(range(model.spec.num_classes))
    return [model.spec.label_index(c) for c in classes]


def _axis_weights(n_out: int, n_in: int, scale: float, offset: float, device: torch.device) -> Tensor:
    """``(n_out, n_in)`` linear-interpolation weights placing output pixel ``p`` at cell ``(p - offset) / scale``.

    Positions outside the grid take the edge cell's value (clamped), as ``grid_sample`` does with
    ``padding_mode="border"``. Bilinear resampling is separable, so ``Ry @ map @ Rx.T`` is the whole resample:
    two small matrix products instead of a gather per output pixel.
    """
    cell = ((torch.arange(n_out, device=device, dtype=torch.float32) - offset) / scale).clamp(0, n_in - 1)
    low = cell.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    frac = cell - low.float()
    weights = torch.zeros(n_out, n_in, device=device)
    rows = torch.arange(n_out, device=device)
    weights.index_put_((rows, low), 1.0 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights


def normalise_maps(cams: Tensor, size: tuple[int, int], alignment: GridAlignment | None = None) -> Tensor:
    """Rectify, resample ``(B, K, h, w)`` to ``size`` and scale each map to [0, 1] (all-zero stays zero).

    With ``alignment`` each cell is placed at its receptive-field centre (edges clamped); without, the
    map is stretched over the image (``interpolate``), the right choice for maps of unknown geometry.
    """
    cams = F.relu(cams.float())
    if alignment is None:
        cams = F.interpolate(cams, size=size, mode="bilinear", align_corners=False)
    else:
        h, w = cams.shape[-2:]
        ry = _axis_weights(size[0], h, alignment.scale_y, alignment.offset_y, cams.device)
        rx = _axis_weights(size[1], w, alignment.scale_x, alignment.offset_x, cams.device)
        cams = torch.einsum("yh,bkhw,xw->bkyx", ry, cams, rx)
    cams = cams.clamp_min(0.0)
    peak = cams.amax(dim=(2, 3), keepdim=True)
    return torch.where(peak > 0, cams / peak.clamp_min(1e-12), torch.zeros_like(cams))


def cam_grids(model: BayesianEfficientNet, features: Tensor, classes: Sequence[int | str] | None) -> Tensor:
    """Closed-form Grad-CAM on the feature grid: ``(B, K, h, w)`` float32, rectified, not yet resampled.

    Valid for the MC-mean logit when dropout sits in the head only; see the module docstring.
    """
    idx = _class_indices(model, classes)
    weight = model.classifier.weight[idx].to(features.dtype)  # (K, F)
    h, w = features.shape[-2:]
    return F.relu(torch.einsum("bfhw,kf->bkhw", features, weight).float() / float(h * w))


def cams_from_features(
    model: BayesianEfficientNet,
    features: Tensor,
    classes: Sequence[int | str] | None,
    size: tuple[int, int],
) -> Tensor:
    """Closed-form Grad-CAM ``(B, K, *size)`` from the final feature map ``(B, F, h, w)`` (:func:`cam_grids`,
    resampled to ``size`` and scaled to [0, 1] by :func:`normalise_maps`)."""
    return normalise_maps(cam_grids(model, features, classes), size, model.feature_alignment(*size))


def resampling_matrices(
    model: BayesianEfficientNet, grid: tuple[int, int], size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """``(Ry, Rx)``: ``Ry @ grid_map @ Rx.T`` is :func:`normalise_maps`'s aligned bilinear resample to ``size``."""
    alignment = model.feature_alignment(*size)
    cpu = torch.device("cpu")
    ry = _axis_weights(size[0], grid[0], alignment.scale_y, alignment.offset_y, cpu)
    rx = _axis_weights(size[1], grid[1], alignment.scale_x, alignment.offset_x, cpu)
    return ry.numpy(), rx.numpy()


class GridCams(Mapping[int, np.ndarray]):
    """One image's Grad-CAM maps kept on the feature grid, each resampled to the input size when first read.

    ``cams[k]`` is the ``(H, W)`` float32 map in [0, 1] that :func:`normalise_maps` gives (to float rounding),
    computed by two small matrix products on whichever thread reads it and then kept. The service's inference
    thread (the busiest thread on a CPU; on a GPU, the one that copies results back) so does only the ``(K, h,
    w)`` einsum and hands over a few hundred floats per map instead of ``H x W``; the decode threads resample as
    they encode the heatmap PNGs.
    """

    def __init__(self, grids: Mapping[int, np.ndarray], ry: np.ndarray, rx: np.ndarray) -> None:
        self._grids = dict(grids)  # label index -> (h, w) float32, rectified
        self._ry, self._rx = ry, rx
        self._maps: dict[int, np.ndarray] = {}

    def __getitem__(self, k: int) -> np.ndarray:
        done = self._maps.get(k)
        if done is None:
            resampled = (self._ry @ self._grids[k] @ self._rx.T).astype(np.float32, copy=False)
            peak = float(resampled.max())
            if peak > 0:
                resampled /= np.float32(peak)  # in place: the product is a fresh array, no second one per map
            else:
                resampled[...] = 0.0
            done = resampled
            self._maps[k] = done
        return done

    def __iter__(self) -> Iterator[int]:
        return iter(self._grids)

    def __len__(self) -> int:
        return len(self._grids)


def gradcam_autograd(
    model: BayesianEfficientNet,
    x: Tensor,
    classes: Sequence[int | str] | None = None,
    target_layer: nn.Module | None = None,
) -> Tensor:
    """Grad-CAM ``(B, K, H, W)`` of the deterministic (MC-mean) logits on ``target_layer``'s output.

    ``target_layer`` defaults to the final conv block (``model.bn2``: conv_head + BN + activation).
    """
    if model.training:
        raise ModelModeError("Grad-CAM needs a model in eval mode (BatchNorm must not update)")
    layer = target_layer if target_layer is not None else model.bn2
    idx = _class_indices(model, classes)
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> Tensor:
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        # A clone, so an in-place op downstream cannot alter the activation we weight.
        return leaf.clone()

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(x)
            if len(captured) != 1:
                raise ValueError(
                    f"target layer ran {len(captured)} times in one forward pass; expected once. Pick a module "
                    "the forward pass calls once, e.g. a block model.blocks[stage][index] (stage containers "
                    "are not called as a whole)"
                )
            act = captured[0]
            grads = []
            for n, c in enumerate(idx):
                (g,) = torch.autograd.grad(logits[:, c].sum(), act, retain_graph=n < len(idx) - 1)
                grads.append(g)
    finally:
        handle.remove()
    grad = torch.stack(grads, dim=1)  # (B, K, F, h, w)
    alpha = grad.mean(dim=(3, 4))  # (B, K, F)
    raw = torch.einsum("bkf,bfhw->bkhw", alpha, act.detach())
    size = (x.shape[-2], x.shape[-1])
    # The cell geometry is traced for the final feature map; an earlier layer's map is stretched.
    return normalise_maps(raw, size, model.feature_alignment(*size) if layer is model.bn2 else None)


def gradcam(
    model: BayesianEfficientNet,
    x: Tensor,
    classes: Sequence[int | str] | None = None,
    *,
    target_layer: nn.Module | None = None,
) -> Tensor:
    """Grad-CAM heatmaps ``(B, K, H, W)`` in [0, 1] for a batch ``x`` ``(B, C, H, W)``.

    ``classes`` are label names or indices (default: every label, in the spec's order). Uses the
    closed form when dropout is head-only and no other target layer is asked for, otherwise autograd.
    """
    if model.training:
        raise ModelModeError("Grad-CAM needs a model in eval mode (BatchNorm must not update)")
    if target_layer is None and model.head_only:
        with torch.inference_mode():
            return cams_from_features(model, model.forward_features(x), classes, (x.shape[-2], x.shape[-1]))
    return gradcam_autograd(model, x, classes, target_layer)
