"""``service.runtime.decoding.decode_for_model``: the input side shared by the HTTP pipeline and the archive scorer."""

from __future__ import annotations

import gc
import io
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

import bayesnet.imaging
import service.runtime.decoding
from bayesnet import DecodedImage, ImageFacts, ModelSpec, decode_image, preprocess
from bayesnet.errors import ImageGeometryError
from service.runtime.decoding import decode_for_model

SPEC = ModelSpec(arch="tf_efficientnet_lite0", labels=("A", "B"), in_chans=1, image_size=64, mean=(0.5,), std=(0.5,))


def film(width: int = 300, height: int = 260) -> bytes:
    rng = np.random.default_rng(3)
    pixels = (rng.random((height, width)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_returns_the_facts_and_exactly_the_preprocessed_input() -> None:
    data = film()
    facts, tensor = decode_for_model(data, SPEC, max_pixels=10**7)
    image = decode_image(data)
    assert isinstance(facts, ImageFacts)
    assert facts == image.facts
    assert (facts.format, facts.width, facts.height, facts.photometric) == ("png", 300, 260, "L")
    assert tensor.shape == (1, 64, 64)
    torch.testing.assert_close(tensor, preprocess(image, SPEC), rtol=0, atol=0)


def test_the_full_resolution_pixels_are_freed_before_it_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[weakref.ref[DecodedImage]] = []

    def tracked(data: bytes, *, max_pixels: int) -> DecodedImage:
        image = bayesnet.imaging.decode_image(data, max_pixels=max_pixels)
        decoded.append(weakref.ref(image))
        return image

    monkeypatch.setattr(service.runtime.decoding, "decode_image", tracked)
    facts, _ = decode_for_model(film(), SPEC, max_pixels=10**7)
    gc.collect()
    assert len(decoded) == 1
    assert decoded[0]() is None  # nothing the caller holds keeps the decoded array alive
    assert not hasattr(facts, "pixels")


def test_a_strip_is_refused_before_preprocessing() -> None:
    with pytest.raises(ImageGeometryError):
        decode_for_model(film(width=2000, height=20), SPEC, max_pixels=10**7)
