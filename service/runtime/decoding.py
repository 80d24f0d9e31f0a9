"""The input side of scoring: upload bytes -> decoded radiograph -> the model's input tensor.

The HTTP pipeline (``service.runtime.pipeline``) and the archive scorer (``service.archive``) both call
:func:`decode_for_model`, so a film scored from an archive gets exactly the preprocessing it would get over
HTTP. Nothing here imports FastAPI: the archive scorer runs where only the core library and torch are installed.
"""

from __future__ import annotations

from torch import Tensor

from bayesnet import ImageFacts, ModelSpec, check_radiograph_geometry, decode_image, preprocess


def decode_for_model(data: bytes, spec: ModelSpec, *, max_pixels: int) -> tuple[ImageFacts, Tensor]:
    """Decode (format sniffed from content) and preprocess from the spec: ``(facts, (C, S, S) tensor)``.

    The full-resolution pixels are dropped here, in the thread that decoded them: callers keep the image's
    :class:`~bayesnet.ImageFacts` (format, size, warnings, population flags) while it waits for its batch.

    Raises:
        bayesnet.ImageError: the bytes are not a usable PNG, JPEG or DICOM radiograph.
    """
    image = decode_image(data, max_pixels=max_pixels)
    check_radiograph_geometry(image)  # a 1 x 1 icon or a strip would still get confident-looking numbers
    return image.facts, preprocess(image, spec)
