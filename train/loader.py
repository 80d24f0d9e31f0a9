"""The torch side of training data: radiograph augmentation, the spec-driven transform and a seeded loader.

Without augmentation :class:`RadiographTransform` is exactly :func:`bayesnet.preprocess.preprocess`, so
training and serving cannot drift apart. Each item's augmentation draws from an RNG derived from
``(seed, epoch, index)`` and the shuffling sampler from ``(seed, epoch)``, so a batch does not depend on the
number of workers or on which worker loaded it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from bayesnet.errors import ImageError
from bayesnet.imaging import decode_image
from bayesnet.labels import CHEXPERT_LABELS
from bayesnet.preprocess import normalise, preprocess, to_square
from bayesnet.spec import ModelSpec

__all__ = ["Augment", "ChexpertTorchDataset", "RadiographTransform", "make_loader", "set_loader_epoch"]

# --- transforms -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augment:
    """Small, radiograph-appropriate random augmentation of a square ``(S, S)`` image in [0, 1].

    Geometry (one affine warp, bilinear, black = air outside): isotropic ``scale``, rotation within
    ``+-rotation_deg``, translation within ``+-translate_fraction`` of the side. Intensity: ``gamma``
    (log-uniform, so 0.8 and 1.25 are equally likely), ``contrast`` about the image mean, ``brightness``
    offset, then clipped to [0, 1]. No horizontal flip by default: left and right are anatomy (the heart
    is on the left; a flipped film looks like situs inversus), so ``hflip`` is opt-in.
    """

    scale: tuple[float, float] = (0.9, 1.1)
    rotation_deg: float = 7.0
    translate_fraction: float = 0.05
    brightness: float = 0.1
    contrast: tuple[float, float] = (0.85, 1.15)
    gamma: tuple[float, float] = (0.8, 1.25)
    hflip: bool = False

    def __post_init__(self) -> None:
        for name in ("scale", "contrast", "gamma"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high:
                raise ValueError(f"Augment.{name} must be (low, high) with 0 < low <= high, got {(low, high)}")
        if not 0.0 <= self.rotation_deg <= 45.0:
            raise ValueError(f"Augment.rotation_deg must be within 0..45, got {self.rotation_deg}")
        if not 0.0 <= self.translate_fraction < 0.5:
            raise ValueError(f"Augment.translate_fraction must be in [0, 0.5), got {self.translate_fraction}")
        if not 0.0 <= self.brightness < 1.0:
            raise ValueError(f"Augment.brightness must be in [0, 1), got {self.brightness}")

    def apply(self, square: Tensor, rng: np.random.Generator) -> Tensor:
        """``(S, S)`` float in [0, 1] -> augmented ``(S, S)`` in [0, 1].

        Always draws 8 numbers from ``rng``, whatever the settings, so two generators in the same state
        give the same result.
        """
        u: list[float] = rng.random(8).tolist()
        scale = self.scale[0] + (self.scale[1] - self.scale[0]) * u[0]
        angle = math.radians(self.rotation_deg * (2.0 * u[1] - 1.0))
        shift_x = self.translate_fraction * (2.0 * u[2] - 1.0)
        shift_y = self.translate_fraction * (2.0 * u[3] - 1.0)
        brightness = self.brightness * (2.0 * u[4] - 1.0)
        contrast = self.contrast[0] + (self.contrast[1] - self.contrast[0]) * u[5]
        log_gamma = math.log(self.gamma[0]) + (math.log(self.gamma[1]) - math.log(self.gamma[0])) * u[6]
        flip = self.hflip and u[7] < 0.5

        x = square
        if (scale, angle, shift_x, shift_y) != (1.0, 0.0, 0.0, 0.0):
            x = _affine(x, scale=scale, angle=angle, shift=(shift_x, shift_y))
        if flip:
            x = x.flip(-1)
        x = torch.pow(x.clamp(0.0, 1.0), math.exp(log_gamma))
        # (x - mean) * contrast + mean + brightness, written so that contrast 1 and brightness 0 are exact.
        x = x * contrast + (x.mean() * (1.0 - contrast) + brightness)
        return x.clamp(0.0, 1.0)


def _affine(square: Tensor, *, scale: float, angle: float, shift: tuple[float, float]) -> Tensor:
    """Warp ``(S, S)`` by scaling about the centre, rotating by ``angle`` rad and shifting by ``shift`` sides.

    ``affine_grid`` maps output to input coordinates (normalised to [-1, 1]), so ``theta`` is the inverse
    of the forward transform ``p -> scale * R(angle) p + 2 * shift``.
    """
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    inverse = torch.tensor([[cos, sin], [-sin, cos]], dtype=square.dtype)
    offset = -inverse @ torch.tensor([2.0 * shift[0], 2.0 * shift[1]], dtype=square.dtype)
    theta = torch.cat([inverse, offset[:, None]], dim=1)[None]
    size = square.shape[-1]
    grid = F.affine_grid(theta, [1, 1, size, size], align_corners=False)
    warped = F.grid_sample(square[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped[0, 0]


class RadiographTransform:
    """Decoded pixels ``(H, W)`` in [0, 1] -> model input ``(in_chans, S, S)``, per the spec.

    Eval (``train=False``) is exactly :func:`bayesnet.preprocess.preprocess`, the serving path. Train
    inserts ``augment`` (default :class:`Augment()`) between :func:`~bayesnet.preprocess.to_square` and
    :func:`~bayesnet.preprocess.normalise`; ``augment`` is ignored in eval.
    """

    def __init__(self, spec: ModelSpec, *, train: bool, augment: Augment | None = None) -> None:
        self.spec = spec
        self.train = train
        self.augment: Augment | None = (augment or Augment()) if train else None

    def __call__(
        self, pixels: npt.NDArray[np.floating[Any]] | Tensor, rng: np.random.Generator | None = None
    ) -> Tensor:
        """Transform one image; in train mode the augmentation draws from ``rng`` (None: fresh entropy)."""
        if self.augment is None:
            return preprocess(pixels, self.spec)
        x = pixels if isinstance(pixels, Tensor) else torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        if x.dim() != 2:
            raise ValueError(f"RadiographTransform expects a 2-D grayscale image (H, W), got {tuple(x.shape)}")
        square = to_square(x.float(), self.spec)
        square = self.augment.apply(square, rng if rng is not None else np.random.default_rng())
        return normalise(square, self.spec).contiguous()

    def __repr__(self) -> str:
        return f"RadiographTransform(image_size={self.spec.image_size}, train={self.train}, augment={self.augment})"


# --- torch side -----------------------------------------------------------------------------------


class ChexpertTorchDataset(torch.utils.data.Dataset[tuple[Tensor, Tensor]]):
    """A map-style torch dataset over a dataset from :func:`load_chexpert`: ``(image, labels)`` pairs.

    ``image`` is ``(in_chans, S, S)`` float32 from the file's bytes via :func:`bayesnet.decode_image` and
    ``transform``; ``labels`` is float32 in the spec's label order (``(14,)`` for the default spec), NaN =
    unknown. Item ``i`` of epoch ``e`` augments with an RNG seeded by ``(seed, e, i)``: reproducible with
    any number of workers. The epoch lives in shared memory so :meth:`set_epoch` reaches persistent
    workers too (call it before iterating the loader for that epoch).
    """

    def __init__(self, ds: datasets.Dataset, transform: RadiographTransform, *, seed: int = 0) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        missing = {"image", "labels"} - set(ds.column_names)
        if missing:
            raise ValueError(f"the dataset lacks columns {sorted(missing)}; build it with load_chexpert")
        unknown = [lb for lb in transform.spec.labels if lb not in CHEXPERT_LABELS]
        if unknown:
            raise ValueError(f"the spec has labels {unknown} that are not CheXpert labels {list(CHEXPERT_LABELS)}")
        ds = ds.select_columns(["image", "labels"])
        image_feature = ds.features["image"]
        if isinstance(image_feature, datasets.Image) and image_feature.decode:
            # Decode with bayesnet's decoder (as the service does), never with PIL via datasets.
            ds = ds.cast_column("image", datasets.Image(decode=False))
        self.ds = ds
        self.transform = transform
        self.seed = seed
        self._label_index = torch.tensor([CHEXPERT_LABELS.index(lb) for lb in transform.spec.labels])
        # torch leaves share_memory_ unannotated; it returns the tensor itself.
        self._epoch: Tensor = torch.zeros((), dtype=torch.int64).share_memory_()  # type: ignore[no-untyped-call]

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of ``epoch`` (shared with worker processes, persistent ones included)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        row = self.ds[index]
        image = row["image"]
        if isinstance(image, dict):
            data, name = image.get("bytes"), image.get("path")
        else:
            data, name = None, str(image)
        if data is None:
            if not name:
                raise ValueError(f"row {index} has neither image bytes nor a path")
            data = Path(name).read_bytes()
        try:
            decoded = decode_image(data)
        except ImageError as err:
            raise ImageError(f"cannot decode training image {name or f'row {index}'}: {err}") from err
        rng = np.random.default_rng([self.seed, self.epoch, index])
        pixels = self.transform(decoded.pixels, rng)
        labels = torch.tensor(row["labels"], dtype=torch.float32)[self._label_index]
        return pixels, labels


class _EpochShuffleSampler(Sampler[int]):
    """A permutation of ``dataset``'s indices drawn from ``(seed, dataset.epoch)``.

    Tied to the dataset's epoch rather than to a generator that advances with every ``iter()``, so the
    order of epoch ``e`` is the same with any number of workers and after resuming at epoch ``e``.
    """

    def __init__(self, dataset: ChexpertTorchDataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.dataset.epoch])
        order: list[int] = rng.permutation(len(self.dataset)).tolist()
        return iter(order)


def make_loader(
    ds: datasets.Dataset,
    spec: ModelSpec,
    *,
    train: bool,
    batch_size: int,
    workers: int = 0,
    seed: int = 0,
    sampler: Sampler[int] | None = None,
    augment: Augment | None = None,
    pin_memory: bool | None = None,
) -> DataLoader[tuple[Tensor, Tensor]]:
    """A DataLoader of ``(images (B, in_chans, S, S), labels (B, L))`` float32 batches, NaN = unknown.

    When ``train`` and no ``sampler`` is given it shuffles, with an order drawn from ``(seed, epoch)``;
    when ``train`` it augments. Call :func:`set_loader_epoch` before each epoch: it selects both the order
    and the augmentation, identically for any number of workers. ``pin_memory`` defaults to whether CUDA is
    available; workers persist across epochs; the last partial batch is kept.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    dataset = ChexpertTorchDataset(ds, RadiographTransform(spec, train=train, augment=augment), seed=seed)
    if sampler is None and train:
        sampler = _EpochShuffleSampler(dataset, seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=False,
        persistent_workers=workers > 0,
        # Only seeds the workers' torch RNGs, which nothing here uses; seeded anyway so that no global
        # RNG state leaks into a run.
        generator=torch.Generator().manual_seed(seed),
    )


def set_loader_epoch(loader: DataLoader[tuple[Tensor, Tensor]], epoch: int) -> None:
    """Start ``epoch`` on a loader from :func:`make_loader`: its augmentation and shuffling order.

    A caller's sampler with a ``set_epoch`` method (e.g. ``DistributedSampler``) is told too.
    """
    dataset = loader.dataset
    if not isinstance(dataset, ChexpertTorchDataset):
        raise TypeError(f"expected a loader from make_loader, its dataset is {type(dataset).__name__}")
    dataset.set_epoch(epoch)
    sampler_set_epoch = getattr(loader.sampler, "set_epoch", None)
    if callable(sampler_set_epoch):
        sampler_set_epoch(epoch)
