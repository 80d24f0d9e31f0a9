"""Grad-CAM heatmaps as DICOM: one Secondary Capture image per finding, the heatmap fused on the radiograph.

Why a Secondary Capture (docs/dicom.md, "Heatmaps in the PACS"): it is the one heatmap object every open-source
viewer we checked displays. OHIF v3 shows Secondary Capture as an ordinary image; its Parametric Map support (3.9, the
``cornerstone-dicom-pmap`` extension) overlays a map only on a reconstructed volume ("stack viewport PMAP is not
supported yet"), which a single chest radiograph is not, and it renders no presentation state (OHIF issue #4106).
Orthanc's own decoder (Orthanc Explorer's previews) renders uncompressed RGB. So the colour is burned into the
pixels, and the object says so (image type DERIVED\\SECONDARY, the derivation described, the source referenced).

Each image is the source radiograph as decoded for the model (display orientation, VOI window applied, long side
at most :data:`MAX_SIDE_PX`), the heatmap placed on it exactly as the model saw the film (``squash``: stretched
over the whole image; ``letterbox``: the padding cropped off), coloured red (weak) to yellow (strongest) with an
opacity that grows with the intensity, and a caption strip below the film naming the finding, its probability
and "research use only, not for diagnosis". The source image is referenced (Source Image Sequence, derivation
description), the images join the source's study in their own series (number :data:`HEATMAP_SERIES_NUMBER`), and
the patient and study attributes are those of the header :func:`service.dicom.sr.dicom_source` cleaned, the same
as the SR's. Nothing else from the header is copied, and none of it is logged.
"""

from __future__ import annotations

import base64
import io
from datetime import datetime

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from bayesnet import decode_image
from bayesnet.spec import ResizeMode
from service.dicom.derived import new_series, secondary_capture
from service.dicom.sr import MANUFACTURER, sr_bytes
from service.schemas import Heatmap, PredictionResponse

HEATMAP_SERIES_NUMBER = 9902
HEATMAP_SERIES_DESCRIPTION = "bayesnet-cxr AI heatmaps (research use only, not for diagnosis)"
#: Longest side of a heatmap image: enough to see where a map lies on the film, 3 MB of RGB per finding
#: uncompressed (a 3000 px film at full size would be 27 MB per finding in the outbox and the PACS).
MAX_SIDE_PX = 1024
#: Opacity of the colour where the map is strongest; the film stays visible under it.
MAX_OPACITY = 0.6

FloatArray = npt.NDArray[np.float32]


class HeatmapError(ValueError):
    """A heatmap in a response that cannot be decoded (not the palette PNG ``service.runtime.heatmap_png`` writes)."""


def heatmap_intensity(heatmap: Heatmap) -> FloatArray:
    """``(S, S)`` float32 in [0, 1]: the Grad-CAM map carried by a response's palette PNG.

    The palette index of each pixel is its intensity level (``service.runtime.heatmap_png``), so the map is read
    losslessly from the indices, not from the colours.
    """
    try:
        with Image.open(io.BytesIO(base64.b64decode(heatmap.png_base64, validate=True))) as png:
            mode = png.mode
            levels = np.asarray(png, dtype=np.uint8)
    except (OSError, ValueError) as err:  # bad base64, not a PNG, damaged data
        raise HeatmapError(f"the heatmap PNG cannot be decoded ({type(err).__name__})") from err
    if mode != "P" or levels.ndim != 2:
        raise HeatmapError(f"expected an 8-bit palette PNG, got mode {mode}")
    intensity: FloatArray = levels.astype(np.float32) / 255.0
    return intensity


def output_size(height: int, width: int, max_side_px: int = MAX_SIDE_PX) -> tuple[int, int]:
    """``(rows, columns)`` of the heatmap image of a ``height`` x ``width`` film (never enlarged)."""
    scale = min(1.0, max_side_px / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def place_on_film(
    intensity: FloatArray, film_size: tuple[int, int], out_size: tuple[int, int], resize: ResizeMode
) -> FloatArray:
    """Resample a model-input map ``(S, S)`` onto the film's frame, at ``out_size`` ``(rows, columns)``.

    The inverse of ``bayesnet.preprocess.to_square``: with ``squash`` the square stretched the whole film, so the
    whole map covers it; with ``letterbox`` the film sat centred in a square padded with black, so only the map's
    part over the film is kept.
    """
    map_rows, map_columns = intensity.shape
    height, width = film_size
    box: tuple[float, float, float, float] = (0.0, 0.0, float(map_columns), float(map_rows))
    if resize == "letterbox" and height != width:
        padded = max(height, width)
        top, left = (padded - height) // 2, (padded - width) // 2
        sy, sx = map_rows / padded, map_columns / padded
        box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
    rows, columns = out_size
    placed = Image.fromarray(intensity, mode="F").resize((columns, rows), Image.Resampling.BILINEAR, box=box)
    return np.clip(np.asarray(placed, dtype=np.float32), 0.0, 1.0)


#: The long side of the map a hot spot is found on: fine enough for a point a reader can see, cheap for any film.
HOT_SPOT_SIDE_PX = 512


def hot_spots(
    result: PredictionResponse, film_size: tuple[int, int], resize: ResizeMode
) -> dict[str, tuple[float, float]]:
    """Where each heatmap of ``result`` is hottest, as ``(column, row)`` in the film's pixel matrix (DICOM SCOORD
    image coordinates: (0, 0) is the top left corner of the top left pixel, so a pixel's centre is at + 0.5).

    ``film_size``: the film's ``(Rows, Columns)``; ``resize``: the model's ``ModelSpec.resize``. Found on the map
    resampled onto the film's frame at :data:`HOT_SPOT_SIDE_PX`, then scaled to the film.
    """
    spots: dict[str, tuple[float, float]] = {}
    rows, columns = film_size
    out_rows, out_columns = output_size(rows, columns, HOT_SPOT_SIDE_PX)
    for label, heatmap in result.gradcam.items():
        placed = place_on_film(heatmap_intensity(heatmap), film_size, (out_rows, out_columns), resize)
        row, column = np.unravel_index(int(np.argmax(placed)), placed.shape)
        spots[label] = ((column + 0.5) * columns / out_columns, (row + 0.5) * rows / out_rows)
    return spots


def fuse(gray: FloatArray, intensity: FloatArray) -> npt.NDArray[np.uint8]:
    """``(H, W, 3)`` uint8 RGB: the film in gray with the map over it, red (weak) to yellow (strongest).

    The web page's ramp tops out in white, which on a fused grayscale film cannot be told from bone; here the hue
    stops at yellow and the opacity (up to :data:`MAX_OPACITY`) grows with the intensity, so a cold region shows
    the film unchanged.
    """
    colour = np.stack([np.ones_like(intensity), intensity, np.zeros_like(intensity)], axis=-1)
    alpha = (MAX_OPACITY * intensity)[..., None]
    rgb = gray[..., None] * (1.0 - alpha) + colour * alpha
    fused: npt.NDArray[np.uint8] = (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return fused


def _font(size_px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size_px)


def caption_strip(lines: list[str], width: int) -> npt.NDArray[np.uint8]:
    """``(h, width, 3)`` uint8: white text on black, one row per line, the font shrunk until every line fits."""
    size_px = max(10, width // 36)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = _font(size_px)
    while size_px > 8 and max(measure.textlength(line, font=font) for line in lines) > width - size_px:
        size_px -= 1
        font = _font(size_px)
    line_px = round(size_px * 1.35)
    strip = Image.new("RGB", (width, line_px * len(lines) + size_px), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    for row, line in enumerate(lines):
        draw.text((size_px // 2, size_px // 2 + row * line_px), line, fill=(255, 255, 255), font=font)
    return np.asarray(strip, dtype=np.uint8)


def film_gray(pixels: FloatArray, out_size: tuple[int, int]) -> FloatArray:
    """The decoded film ``(H, W)`` in [0, 1] downscaled (antialiased) to ``out_size`` ``(rows, columns)``."""
    if pixels.shape == out_size:
        return pixels
    rows, columns = out_size
    small = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F").resize(
        (columns, rows), Image.Resampling.BILINEAR
    )
    return np.clip(np.asarray(small, dtype=np.float32), 0.0, 1.0)


def build_heatmaps(
    source: Dataset, pixels: FloatArray, result: PredictionResponse, *, resize: ResizeMode, created: datetime
) -> list[hd.sc.SCImage]:
    """One Secondary Capture per heatmap of ``result`` (none when it has none), in one new series.

    ``source`` is the film's header from :func:`service.dicom.sr.dicom_source`; ``pixels`` the film as
    ``bayesnet.decode_image`` decodes it (``(H, W)`` float in [0, 1], display orientation); ``resize`` the
    model's ``ModelSpec.resize``, which says how its square input covered the film.
    """
    if not result.gradcam:
        return []
    film_size = (int(pixels.shape[0]), int(pixels.shape[1]))
    out_size = output_size(*film_size)
    gray = film_gray(pixels, out_size)
    series = new_series(HEATMAP_SERIES_NUMBER, HEATMAP_SERIES_DESCRIPTION)
    model = result.model
    images = []
    for number, (label, heatmap) in enumerate(result.gradcam.items(), start=1):
        prediction = result.predictions.get(label)
        placed = place_on_film(heatmap_intensity(heatmap), film_size, out_size, resize)
        what = f"AI heatmap (Grad-CAM): {label}"
        if prediction is not None:
            what += f", probability {prediction.conf:.2f} ({prediction.decision})"
        caption = [what, f"{MANUFACTURER} {model.name} {model.version}: research use only, not for diagnosis"]
        rgb = np.concatenate([fuse(gray, placed), caption_strip(caption, out_size[1])], axis=0)
        images.append(
            secondary_capture(
                source,
                rgb,
                series=series,
                number=number,
                model=model,
                created=created,
                contribution=f"Grad-CAM heatmaps of {model.name} {model.version}, weights sha256 {model.sha256}",
                comments=f"{what}. Research use only, not for diagnosis.",
                derivation=(
                    f"Grad-CAM heatmap of {label} fused in colour on the source radiograph (resized, {resize}); "
                    "not for diagnosis"
                ),
                shows_film=True,
                film_oriented=True,
            )
        )
    return images


def heatmap_answers(
    source: Dataset, pixels: FloatArray, result: PredictionResponse, *, resize: ResizeMode, created: datetime
) -> list[bytes]:
    """:func:`build_heatmaps` as Part 10 files (what the forwarding outbox stores), in instance order."""
    return [sr_bytes(image) for image in build_heatmaps(source, pixels, result, resize=resize, created=created)]


def heatmaps_for_upload(
    data: bytes,
    source: Dataset,
    result: PredictionResponse,
    *,
    resize: ResizeMode,
    max_pixels: int,
    created: datetime,
) -> list[hd.sc.SCImage]:
    """:func:`build_heatmaps` for an uploaded DICOM film; the film is decoded only when ``result`` has heatmaps
    (blocking: run it off the event loop)."""
    if not result.gradcam:
        return []
    pixels = decode_image(data, max_pixels=max_pixels).pixels
    return build_heatmaps(source, pixels, result, resize=resize, created=created)
