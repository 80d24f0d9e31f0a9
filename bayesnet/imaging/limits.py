"""Size limits: the pixel budget checked before decoding, and the size and shape of a radiograph.

The declared pixel count is read from the header *before* any pixels are decoded: each decoder calls
:func:`check_pixel_count` with its header's values, so a tiny file that declares a gigantic image (a
decompression bomb) is refused without allocating memory. :func:`check_radiograph_geometry` is a later
question, asked by callers that score uploads: whether a decoded image's size and shape can be a
radiograph at all.
"""

from __future__ import annotations

from typing import Final

from bayesnet.errors import ImageGeometryError, TooManyPixelsError
from bayesnet.imaging.decoded import DecodedImage

DEFAULT_MAX_PIXELS: Final[int] = 50_000_000
"""Largest accepted ``width * height`` (times frames for DICOM), checked before decoding.

The largest chest detectors are 43 x 43 cm at 100 um pitch, about 4300 x 4300 = 18.5 million
pixels; 50 million leaves room for finer pitch (about 7000 x 7000) while bounding memory: a decode
holds the stored samples (1 to 4 bytes a pixel, twice while a DICOM codec's output is copied) and the
float32 result (4 bytes a pixel), its float64 arithmetic done a block of rows at a time, so a few
hundred MB at the limit; :func:`~bayesnet.imaging.memory.decode_memory_bytes` bounds it for a given
file from its header, and docs/decode-memory.md has the measured figures. It is also below Pillow's
own decompression-bomb threshold (``PIL.Image.MAX_IMAGE_PIXELS``, 89.5 million), so Pillow's
``DecompressionBombWarning`` never fires; a larger ``max_pixels`` is capped at that threshold for
PNG/JPEG rather than changing Pillow's global setting.
"""

MIN_SIDE_PX: Final[int] = 32
"""Shortest side, in pixels, of an image read as a radiograph (see :func:`check_radiograph_geometry`)."""

MAX_ASPECT_RATIO: Final[float] = 4.0
"""Largest long-side / short-side ratio of an image read as a radiograph (chest films are 0.8 to 1.25)."""


def check_pixel_count(kind: str, width: int, height: int, frames: int, max_pixels: int) -> None:
    """Raise TooManyPixelsError when the declared size is above ``max_pixels``."""
    total = width * height * frames
    if total > max_pixels:
        size = f"{width} x {height}" + (f" x {frames} frames" if frames != 1 else "")
        raise TooManyPixelsError(
            f"The {kind} declares {size} = {total:,} pixels, above the limit of {max_pixels:,}. "
            "Send a smaller export of the radiograph."
        )


def check_radiograph_geometry(
    image: DecodedImage, *, min_side_px: int = MIN_SIDE_PX, max_aspect_ratio: float = MAX_ASPECT_RATIO
) -> None:
    """Raise :class:`ImageGeometryError` when ``image`` cannot be a radiograph by its size or shape.

    :func:`~bayesnet.imaging.decode_image` reads any valid file, whatever its size (training crops
    and tests use tiny images); a model input is resized to a fixed square, so a 1 x 1 pixel or a
    20000 x 1 strip would still produce confident-looking numbers about nothing. Callers that score
    uploads (the service) call this after decoding to refuse such images with the reason instead.
    """
    short, long = sorted((image.width, image.height))
    if short < min_side_px:
        raise ImageGeometryError(
            f"The image is {image.width} x {image.height} pixels; a radiograph needs at least {min_side_px} "
            "pixels on each side. Send the full-resolution film, not a thumbnail or icon."
        )
    if long / short > max_aspect_ratio:
        raise ImageGeometryError(
            f"The image is {image.width} x {image.height} pixels, an aspect ratio of {long / short:.1f}:1; a "
            f"radiograph is at most {max_aspect_ratio:g}:1. Send the whole film, not a strip or a collage."
        )
