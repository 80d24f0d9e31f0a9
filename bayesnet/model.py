"""The Bayesian EfficientNet: a timm EfficientNet whose dropout layers are MC-samplable by argument.

Why not timm's own dropout: timm applies head dropout functionally (``F.dropout(training=self.training)``),
so the usual "switch the ``nn.Dropout`` modules back to train mode" recipe finds no module and silently
yields zero variance, while ``model.train()`` would make BatchNorm use batch statistics and update its
running averages. Here every stochastic layer is a named *site* whose mask comes from an explicit
:class:`DropoutMasks` argument; the module's mode is never consulted at inference.

Layout of the forward pass (``F`` = feature channels of the final conv, e.g. 1280)::

    x (B, C_in, S, S) -> stem -> blocks[0..N-1] (dropout after the last ``mc_dropout_blocks``)
      -> conv_head + bn2 = final feature map (B, F, h, w) -> global average pool (B, F)
      -> dropout ("head") -> classifier -> logits (B, K)

``forward_trunk`` runs the deterministic prefix once; ``forward_stochastic`` runs the rest, so MC
sampling repeats only what is random.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import timm
import torch
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import get_same_padding
from torch import Tensor, nn

from bayesnet.errors import SpecError
from bayesnet.spec import ModelSpec

HEAD_SITE = "head"


def block_site(index: int) -> str:
    """Name of the dropout site after flattened block ``index``."""
    return f"block{index}"


class DropoutMasks:
    """Supplies the inverted-dropout masks of one (possibly stacked) stochastic forward pass.

    Three uses: sample masks from ``generator`` (reproducible) or the global RNG; additionally
    ``record=True`` keeps every mask drawn in :attr:`recorded`; or :meth:`replay` fixed masks, which is
    how tests check that the stacked pass equals separate full passes. Masks hold 0 or ``1/(1-p)`` so
    that the expectation of a sampled pass is the deterministic pass.
    """

    def __init__(self, generator: torch.Generator | None = None, *, record: bool = False) -> None:
        self.generator = generator
        self.record = record
        self.recorded: dict[str, Tensor] = {}
        self._given: Mapping[str, Tensor] | None = None

    @classmethod
    def replay(cls, masks: Mapping[str, Tensor]) -> DropoutMasks:
        source = cls()
        source._given = dict(masks)
        return source

    def apply(self, site: str, x: Tensor, p: float) -> Tensor:
        if self._given is not None:
            try:
                mask = self._given[site]
            except KeyError as err:
                raise KeyError(f"no mask given for dropout site {site!r}; have {sorted(self._given)}") from err
            if mask.shape != x.shape:
                raise ValueError(f"mask for site {site!r} has shape {tuple(mask.shape)}, activation {tuple(x.shape)}")
            return x * mask.to(device=x.device, dtype=x.dtype)
        mask = self.sample(x, p)
        if self.record:
            self.recorded[site] = mask
        return x * mask

    def sample(self, x: Tensor, p: float) -> Tensor:
        if p == 0.0:
            return torch.ones_like(x)
        device = self.generator.device if self.generator is not None else x.device
        keep = torch.empty(x.shape, device=device, dtype=torch.float32)
        keep.bernoulli_(1.0 - p, generator=self.generator)
        return (keep / (1.0 - p)).to(device=x.device, dtype=x.dtype)


class PerImageMasks(DropoutMasks):
    """Masks for the ``T x B`` stacked rows of an MC batch (row ``t * B + b``), drawn per image from its own seed.

    Image ``b``'s ``T`` masks at every site come from ``torch.Generator().manual_seed(seeds[b])`` alone, in the
    network's fixed site order, always on the CPU: the same image with the same seed gets the same masks whatever
    else is in its batch, on any device, in any process. With a seed derived from the image itself
    (:func:`bayesnet.mc.input_seed`) the same film gets the same answer every time it is sent.
    """

    def __init__(self, seeds: Sequence[int], n_samples: int, *, record: bool = False) -> None:
        super().__init__(None, record=record)
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        self.n_samples = n_samples
        self._generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]

    def sample(self, x: Tensor, p: float) -> Tensor:
        images, rows = len(self._generators), self.n_samples * len(self._generators)
        if x.shape[0] != rows:
            raise ValueError(f"{images} images x {self.n_samples} samples = {rows} rows, activation has {x.shape[0]}")
        if p == 0.0:
            return torch.ones_like(x)
        keep = torch.empty((self.n_samples, images, *x.shape[1:]), dtype=torch.float32)
        for b, generator in enumerate(self._generators):
            # Drawn contiguous, one image at a time: the stream of an image never depends on its neighbours.
            keep[:, b] = torch.empty((self.n_samples, *x.shape[1:])).bernoulli_(1.0 - p, generator=generator)
        return (keep.reshape(x.shape) / (1.0 - p)).to(device=x.device, dtype=x.dtype)


@dataclass(frozen=True)
class GridAlignment:
    """Where the final feature map's cells sit on the input image, per axis.

    Feature cell ``i`` is centred on input pixel index ``scale * i + offset`` (pixel ``j`` covers
    ``[j, j + 1)``). With PyTorch's symmetric padding a stride-2, 3x3 conv centres output ``i`` on input
    ``2i``, not ``2i + 0.5``; over five such layers the cells sit 15.5 px up-left of where a plain
    ``interpolate`` would put them, half a cell at stride 32. Heatmaps use this to land where the
    evidence is.
    """

    scale_y: float
    offset_y: float
    scale_x: float
    offset_x: float


def _conv_centre(module: nn.Conv2d, size: tuple[int, int]) -> tuple[tuple[float, float], tuple[float, float]]:
    """Per axis ``(stride, offset)``: output ``i`` of this conv is centred on input ``stride * i + offset``."""
    out = []
    for axis in range(2):
        k, s, d = module.kernel_size[axis], module.stride[axis], module.dilation[axis]
        if isinstance(module, Conv2dSame):
            before = get_same_padding(size[axis], k, s, d) // 2
        elif isinstance(module.padding, str):  # "same" (stride 1 only) or "valid"
            before = (d * (k - 1)) // 2 if module.padding == "same" else 0
        else:
            before = module.padding[axis]
        out.append((float(s), -before + d * (k - 1) / 2.0))
    return out[0], out[1]


_M = TypeVar("_M", bound=nn.Module)


def _submodule(net: nn.Module, name: str, kind: type[_M]) -> _M:
    module = getattr(net, name)
    if not isinstance(module, kind):
        raise SpecError(f"{type(net).__name__}.{name} is a {type(module).__name__}, expected {kind.__name__}")
    return module


class BayesianEfficientNet(nn.Module):
    """EfficientNet-family network (any timm ``EfficientNet``) with explicit, samplable dropout.

    Submodules keep timm's names (``conv_stem``, ``bn1``, ``blocks``, ``conv_head``, ``bn2``,
    ``classifier``) so state dicts are key-compatible with timm's. ``model(x)`` is deterministic in eval
    mode (dropout replaced by its expectation); in training mode, dropout samples from the global RNG
    like ``nn.Dropout``.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        try:
            net = timm.create_model(
                spec.arch,
                pretrained=False,
                num_classes=spec.num_classes,
                in_chans=spec.in_chans,
                drop_rate=0.0,
                drop_path_rate=0.0,
            )
        except RuntimeError as err:  # timm raises RuntimeError for unknown model names
            raise SpecError(f"cannot build architecture {spec.arch!r}: {err}") from err
        needed = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "classifier")
        missing = [name for name in needed if not hasattr(net, name)]
        if missing or not isinstance(getattr(net, "classifier", None), nn.Linear):
            raise SpecError(
                f"architecture {spec.arch!r} is not an EfficientNet-family timm model "
                f"(missing {missing or ['a Linear classifier']}); use e.g. efficientnet_b0 or tf_efficientnet_lite0"
            )
        self.spec = spec
        self.conv_stem: nn.Module = _submodule(net, "conv_stem", nn.Module)
        self.bn1: nn.Module = _submodule(net, "bn1", nn.Module)
        self.blocks: nn.Sequential = _submodule(net, "blocks", nn.Sequential)
        self.conv_head: nn.Module = _submodule(net, "conv_head", nn.Module)
        self.bn2: nn.Module = _submodule(net, "bn2", nn.Module)
        self.classifier: nn.Linear = _submodule(net, "classifier", nn.Linear)
        self.num_features: int = int(self.classifier.in_features)
        self._flat_blocks: list[nn.Module] = list(itertools.chain.from_iterable(self.blocks))  # type: ignore[arg-type]
        n_blocks = len(self._flat_blocks)
        if spec.mc_dropout_blocks > n_blocks:
            raise SpecError(f"mc_dropout_blocks={spec.mc_dropout_blocks} but {spec.arch} has only {n_blocks} blocks")
        # Index of the first block followed by dropout; n_blocks means "head only".
        self.first_stochastic_block: int = n_blocks - spec.mc_dropout_blocks
        self._alignment: dict[tuple[int, int], GridAlignment] = {}
        self.eval()

    # --- structure ------------------------------------------------------------------------------

    @property
    def head_only(self) -> bool:
        """True when the only stochastic layer is the head dropout (the trunk includes pooling)."""
        return self.first_stochastic_block == len(self._flat_blocks)

    @property
    def dropout_sites(self) -> tuple[str, ...]:
        blocks = range(self.first_stochastic_block, len(self._flat_blocks))
        return (*(block_site(i) for i in blocks), HEAD_SITE)

    def _dropout(self, site: str, x: Tensor, masks: DropoutMasks | None) -> Tensor:
        p = self.spec.dropout
        if masks is not None:
            return masks.apply(site, x, p)
        if self.training and p > 0.0:
            return nn.functional.dropout(x, p=p, training=True)
        return x

    def _blocks(self, x: Tensor, start: int, stop: int, masks: DropoutMasks | None) -> Tensor:
        for i in range(start, stop):
            x = self._flat_blocks[i](x)
            if i >= self.first_stochastic_block:
                x = self._dropout(block_site(i), x, masks)
        return x

    def feature_alignment(self, height: int, width: int) -> GridAlignment:
        """Geometry of the final feature map for ``(height, width)`` inputs (traced once, then cached).

        Composes ``(stride, offset)`` of every strided or padded conv on the main path, as they run.
        """
        key = (height, width)
        if key not in self._alignment:
            # Per axis (scale, offset): the current map's index i sits on input pixel scale * i + offset.
            state = {"y": (1.0, 0.0), "x": (1.0, 0.0)}

            def trace(module: nn.Module, inputs: tuple[Tensor, ...], _output: Any) -> None:
                h, w = inputs[0].shape[-2:]
                if min(h, w) == 1:  # squeeze-excitation convs on pooled 1x1 maps
                    return
                assert isinstance(module, nn.Conv2d)
                (sy, oy), (sx, ox) = _conv_centre(module, (int(h), int(w)))
                for axis, (s, o) in (("y", (sy, oy)), ("x", (sx, ox))):
                    scale, offset = state[axis]
                    state[axis] = (scale * s, scale * o + offset)

            convs = [m for m in self.modules() if isinstance(m, nn.Conv2d)]
            handles = [m.register_forward_hook(trace) for m in convs]
            try:
                probe = torch.zeros(1, self.spec.in_chans, height, width, device=self.classifier.weight.device)
                with torch.inference_mode():
                    self.forward_features(probe)
            finally:
                for handle in handles:
                    handle.remove()
            self._alignment[key] = GridAlignment(*state["y"], *state["x"])
        return self._alignment[key]

    # --- forward pieces -------------------------------------------------------------------------

    def forward_features(self, x: Tensor, masks: DropoutMasks | None = None) -> Tensor:
        """Final feature map ``(B, F, h, w)`` (the Grad-CAM layer); deterministic when ``masks`` is None in eval."""
        x = self.bn1(self.conv_stem(x))
        x = self._blocks(x, 0, len(self._flat_blocks), masks)
        return self.bn2(self.conv_head(x))  # type: ignore[no-any-return]

    @staticmethod
    def pool(features: Tensor) -> Tensor:
        """Global average pool ``(B, F, h, w) -> (B, F)``."""
        return features.mean(dim=(2, 3))

    def forward_head(self, pooled: Tensor, masks: DropoutMasks | None = None) -> Tensor:
        """Pooled features ``(B, F)`` -> logits ``(B, K)`` through the head dropout and the classifier."""
        return self.classifier(self._dropout(HEAD_SITE, pooled, masks))  # type: ignore[no-any-return]

    def forward_trunk(self, x: Tensor) -> Tensor:
        """The deterministic prefix, up to the first stochastic layer.

        Head-only MC: pooled features ``(B, F)``. Otherwise the activation ``(B, C, h, w)`` leaving the
        first block that is followed by dropout (that dropout not yet applied).
        """
        if self.head_only:
            return self.pool(self.forward_features(x))
        x = self.bn1(self.conv_stem(x))
        for i in range(self.first_stochastic_block + 1):
            x = self._flat_blocks[i](x)
        return x

    def trunk_features(self, z: Tensor) -> Tensor:
        """Deterministic per-image features ``(B, F')`` from a :meth:`forward_trunk` output ``z``.

        Head-only MC: ``z`` itself (the pooled final features). Otherwise the global average pool of the
        trunk's last activation. What the out-of-distribution gate scores: computed once per batch,
        never touched by dropout, and no second forward pass.
        """
        return z if z.dim() == 2 else self.pool(z)

    def forward_stochastic(self, z: Tensor, masks: DropoutMasks | None = None) -> Tensor:
        """The rest of the network after :meth:`forward_trunk`: ``z`` -> logits ``(rows, K)``."""
        if self.head_only:
            return self.forward_head(z, masks)
        k = self.first_stochastic_block
        x = self._dropout(block_site(k), z, masks)
        x = self._blocks(x, k + 1, len(self._flat_blocks), masks)
        x = self.bn2(self.conv_head(x))
        return self.forward_head(self.pool(x), masks)

    def forward(self, x: Tensor, masks: DropoutMasks | None = None) -> Tensor:
        """Logits ``(B, K)``; deterministic in eval mode unless ``masks`` is given."""
        return self.forward_head(self.pool(self.forward_features(x, masks)), masks)


def build_model(spec: ModelSpec | None = None) -> BayesianEfficientNet:
    """Build the model described by ``spec`` (default: ``ModelSpec()``), randomly initialised, in eval mode."""
    return BayesianEfficientNet(spec if spec is not None else ModelSpec())
