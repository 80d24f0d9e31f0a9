"""Spec-driven preprocessing: a decoded radiograph -> the model's input tensor.

Everything comes from the :class:`ModelSpec` (size, resize mode, channels, mean/std), never from timm's
pretrained config. The same function serves training (after augmentation) and inference, so the two
cannot drift apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bayesnet.spec import ModelSpec

if TYPE_CHECKING:
    from bayesnet.imaging import DecodedImage


def to_square(pixels: Tensor, spec: ModelSpec) -> Tensor:
    """Resize ``(..., H, W)`` float pixels in [0, 1] to ``(..., S, S)`` per ``spec.resize``.

    ``squash`` stretches to the square (CheXpert's usual practice); ``letterbox`` keeps the aspect ratio
    and pads the short side with black (0, the value of air).
    """
    size = spec.image_size
    h, w = pixels.shape[-2:]
    lead = pixels.shape[:-2]
    x = pixels.reshape(-1, 1, h, w)
    if spec.resize == "letterbox" and h != w:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        x = F.pad(x, (left, side - w - left, top, side - h - top), value=0.0)
    if x.shape[-2:] != (size, size):
        # antialias matters when shrinking 2-3k px films to 224-512: plain bilinear would alias rib edges.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0).reshape(*lead, size, size)


def normalise(square: Tensor, spec: ModelSpec) -> Tensor:
    """``(..., S, S)`` or ``(..., 1, S, S)`` gray in [0, 1] -> ``(..., in_chans, S, S)`` normalised."""
    if square.dim() < 3 or square.shape[-3] != 1:
        square = square.unsqueeze(-3)
    x = square.expand(*square.shape[:-3], spec.in_chans, *square.shape[-2:])
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


def preprocess(image: DecodedImage | np.ndarray | Tensor, spec: ModelSpec) -> Tensor:
    """One radiograph -> model input ``(in_chans, S, S)`` float32.

    ``image`` is a :class:`~bayesnet.imaging.DecodedImage` or its ``pixels``: ``(H, W)`` float in [0, 1],
    display orientation. Stack several results with ``torch.stack`` to make a batch.
    """
    pixels = getattr(image, "pixels", image)
    if isinstance(pixels, np.ndarray):
        pixels = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    if not isinstance(pixels, Tensor) or pixels.dim() != 2:
        shape = tuple(pixels.shape) if hasattr(pixels, "shape") else type(pixels).__name__
        raise ValueError(f"preprocess expects a 2-D grayscale image (H, W), got {shape}")
    return normalise(to_square(pixels.float(), spec), spec).contiguous()
