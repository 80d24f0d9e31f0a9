"""The decoders' common result: :class:`DecodedImage`, its warning strings and the luminance reduction.

:class:`ImageFacts` is a decoded image without its pixels: what a response, an audit record or a report says
about the image, kept instead of the whole :class:`DecodedImage` once the model's input has been made.

Every decoder (:mod:`~bayesnet.imaging.raster`, :mod:`~bayesnet.imaging.dicom`) returns a
:class:`DecodedImage` and notes in its ``warnings`` what a conversion changed or assumed. Colour is
reduced to gray in the same way for every format, by :func:`luminance_to_unit`.

**Memory.** Stored samples become the float32 result a block of rows at a time (:func:`rows_to_unit`): the
float64 arithmetic of the intensity transforms runs on at most :data:`BLOCK_PIXELS` pixels at once, so a
decode holds its stored samples, the float32 result and one block's temporaries, never a full-size float64
copy. Each element is computed by the same operations in the same order as on the whole array, so the result
is bit for bit what whole-array arithmetic gives. The bound on a decode's memory is
:func:`~bayesnet.imaging.memory.decode_memory_bytes`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any, Final

import numpy as np
import numpy.typing as npt

# Human-readable notes carried in DecodedImage.warnings; fixed strings so callers can match them.
WARN_COLOUR: Final[str] = "colour image converted to grayscale"
WARN_ALPHA: Final[str] = "alpha channel ignored"
WARN_MONOCHROME1: Final[str] = "MONOCHROME1 inverted for display"
WARN_NO_VOI: Final[str] = "no VOI window: full BitsStored range used"

# Why a DICOM film is outside the model's intended population (adult frontal chest radiographs), as fixed codes.
# Derived from header fields at decode; the fields' values themselves are never kept, returned or logged.
POPULATION_PAEDIATRIC: Final[str] = "paediatric"
POPULATION_LATERAL: Final[str] = "lateral_or_oblique_view"
POPULATION_NON_CHEST: Final[str] = "non_chest_body_part"

# What a header (or a client's declaration) positively establishes about the intended population.
VERIFIED_AGE: Final[str] = "age"
VERIFIED_VIEW: Final[str] = "view"

#: Youngest age, in years, of the intended population (the training data are adult films).
ADULT_AGE_YEARS: Final[float] = 18.0

_FRONTAL_VIEWS: Final[frozenset[str]] = frozenset({"PA", "AP", "APS", "PAS", "APE", "APL"})
_NON_FRONTAL_VIEWS: Final[frozenset[str]] = frozenset(
    {
        "LL",
        "RL",
        "LAT",
        "LATERAL",
        "LLO",
        "RLO",
        "LAO",
        "RAO",
        "LPO",
        "RPO",
        "OBL",
        "OBLIQUE",
        "RLD",
        "LLD",
        "DECUBITUS",
    }
)
_CHEST_WORDS: Final[tuple[str, ...]] = ("CHEST", "THORAX", "LUNG", "THORACIC", "RIB", "HEART")
_AGE_UNITS_YEARS: Final[dict[str, float]] = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}

# Luminance weights (ITU-R BT.601), the same ones Pillow's "L" conversion uses, applied in float.
_LUMA_WEIGHTS: Final[tuple[float, float, float]] = (0.299, 0.587, 0.114)

FloatArray = npt.NDArray[np.float64]

BLOCK_PIXELS: Final[int] = 1 << 18
"""Pixels converted to float at once (:func:`rows_to_unit`): a block's float64 temporaries are a few times 2 MB."""


@dataclass(frozen=True)
class ImageFacts:
    """A decoded radiograph's description without its pixels (the fields of :class:`DecodedImage` but ``pixels``).

    The service and the archive scorer keep this, not the :class:`DecodedImage`, from the moment the model's input
    exists until the answer is sent: the full-resolution array (1 MB of float32 for a 512 px PNG, 36 MB for a
    3,000 px DICOM) is freed in the thread that made it, instead of being held by every request waiting for its
    batch, which lowers the service's peak resident memory under many clients (docs/benchmarks.md).
    """

    format: str
    width: int
    height: int
    bit_depth: int
    photometric: str
    warnings: tuple[str, ...]
    modality: str | None = None
    body_part: str | None = None
    view_position: str | None = None
    population_flags: tuple[str, ...] = ()
    population_verified: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """One decoded radiograph, ready for model preprocessing.

    ``pixels`` is ``float32`` ``(H, W)`` in ``[0, 1]``, display orientation (bone bright, lungs dark),
    after EXIF rotation for PNG/JPEG; ``width``/``height`` describe that array. The array belongs to
    the caller (it is writable and not shared). ``eq=False`` because array fields make field-wise
    equality ambiguous; compare ``pixels`` explicitly.

    ``bit_depth`` is the stored bits per sample (8 or 16 for PNG/JPEG, BitsStored for DICOM, e.g.
    15). ``photometric`` is the Pillow mode read for PNG/JPEG (``"L"``, ``"I;16"``, ``"RGBA"``...)
    and the PhotometricInterpretation for DICOM. ``warnings`` are human-readable notes about
    conversions that changed or assumed something. ``modality``, ``body_part`` and
    ``view_position`` are copied from DICOM (None when absent or for PNG/JPEG); none of them
    identifies a patient. ``population_flags`` are the ``POPULATION_*`` codes of
    :func:`population_flags` (always empty for PNG/JPEG, which carry no such header);
    ``population_verified`` the ``VERIFIED_*`` facts the header establishes (:func:`population_evidence`).
    """

    pixels: npt.NDArray[np.float32]
    format: str
    width: int
    height: int
    bit_depth: int
    photometric: str
    warnings: tuple[str, ...]
    modality: str | None = None
    body_part: str | None = None
    view_position: str | None = None
    population_flags: tuple[str, ...] = ()
    population_verified: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Check the invariants every consumer relies on (cheap: shape and dtype only)."""
        if self.pixels.dtype != np.float32 or self.pixels.shape != (self.height, self.width):
            raise ValueError(
                f"DecodedImage.pixels must be float32 of shape (height, width) = "
                f"({self.height}, {self.width}), got {self.pixels.dtype} {self.pixels.shape}"
            )

    @property
    def facts(self) -> ImageFacts:
        """Everything but the pixels: what to keep once the model's input has been made from them."""
        return ImageFacts(**{field.name: getattr(self, field.name) for field in fields(ImageFacts)})


def row_blocks(height: int, width: int) -> Iterator[slice]:
    """Consecutive row slices of an ``(height, width)`` image, each of at most :data:`BLOCK_PIXELS` pixels
    (at least one row)."""
    rows = max(1, BLOCK_PIXELS // max(1, width))
    for start in range(0, height, rows):
        yield slice(start, min(height, start + rows))


def rows_to_unit(height: int, width: int, convert: Callable[[slice], npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
    """The float32 ``(height, width)`` array whose rows ``rows`` are ``convert(rows)``, filled a block at a time.

    ``convert`` returns the block in any float dtype; it is cast to float32 on assignment, the same rounding as
    ``astype(np.float32)``. Only one block's temporaries exist at a time (see the module docstring).
    """
    out = np.empty((height, width), dtype=np.float32)
    for rows in row_blocks(height, width):
        out[rows] = convert(rows)
    return out


def luminance_to_unit(
    samples: Callable[[slice], npt.NDArray[Any]], height: int, width: int, full_scale: float, warnings: list[str]
) -> npt.NDArray[np.float32]:
    """Float luminance ``0.299 R + 0.587 G + 0.114 B`` of ``(H, W, >=3)`` samples, divided by ``full_scale``
    and clipped to [0, 1], as float32 ``(H, W)``.

    ``samples(rows)`` gives the samples of a block of rows (a view of an array, or a strip read from a Pillow
    image); channels past the third (alpha) are ignored. The arithmetic is float64, as on a whole array: an image
    whose three channels are identical everywhere (gray stored as colour) is its first channel with no warning,
    nothing was lost; any other gets the weighted sum and :data:`WARN_COLOUR`. The first block whose channels
    differ switches to the weighted sum and starts again from the top, so a gray image is read once and a colour
    one at most twice.
    """
    out = np.empty((height, width), dtype=np.float32)
    for rows in row_blocks(height, width):
        block = samples(rows)
        if not (np.array_equal(block[..., 0], block[..., 1]) and np.array_equal(block[..., 1], block[..., 2])):
            break
        out[rows] = np.clip(np.asarray(block[..., 0], dtype=np.float64) / full_scale, 0.0, 1.0)
    else:
        return out
    del out
    warnings.append(WARN_COLOUR)

    def weighted(rows: slice) -> FloatArray:
        block = samples(rows)
        wr, wg, wb = _LUMA_WEIGHTS
        lum = wr * block[..., 0].astype(np.float64) + wg * block[..., 1].astype(np.float64)
        lum += wb * block[..., 2].astype(np.float64)
        return np.clip(lum / full_scale, 0.0, 1.0)

    return rows_to_unit(height, width, weighted)


def _age_years(age: str | None) -> float | None:
    """A DICOM AS value (``"034Y"``, ``"006M"``, ``"021D"``) in years; None when absent or malformed."""
    if not age:
        return None
    text = age.strip().upper()
    if len(text) < 2 or text[-1] not in _AGE_UNITS_YEARS or not text[:-1].isdigit():
        return None
    return int(text[:-1]) * _AGE_UNITS_YEARS[text[-1]]


def population_flags(*, body_part: str | None, view_position: str | None, age: str | None) -> tuple[str, ...]:
    """Why a film is outside the intended population (adult frontal chest radiographs), from DICOM header values.

    Missing or unrecognised values raise no flag: a header that does not say is not evidence. ``age`` is the raw
    Patient's Age (AS) value; the caller must not keep it. A body part that names the chest in any common way
    (CHEST, THORAX, ...) is a chest; any other non-empty value is not. Lateral, oblique and decubitus views are
    flagged; PA and AP are frontal.
    """
    flags = []
    years = _age_years(age)
    if years is not None and years < ADULT_AGE_YEARS:
        flags.append(POPULATION_PAEDIATRIC)
    view = (view_position or "").strip().upper()
    if view in _NON_FRONTAL_VIEWS or (view and view not in _FRONTAL_VIEWS and "LAT" in view):
        flags.append(POPULATION_LATERAL)
    part = (body_part or "").strip().upper()
    if part and not any(word in part for word in _CHEST_WORDS):
        flags.append(POPULATION_NON_CHEST)
    return tuple(flags)


def population_evidence(*, view_position: str | None, age: str | None) -> tuple[str, ...]:
    """What the header establishes about the intended population: ``VERIFIED_AGE`` when Patient's Age (AS) says
    adult, ``VERIFIED_VIEW`` when View Position says frontal (PA or AP). Silence establishes nothing."""
    evidence = []
    years = _age_years(age)
    if years is not None and years >= ADULT_AGE_YEARS:
        evidence.append(VERIFIED_AGE)
    if (view_position or "").strip().upper() in _FRONTAL_VIEWS:
        evidence.append(VERIFIED_VIEW)
    return tuple(evidence)
