"""The decoders' common result: :class:`DecodedImage`, its warning strings and the luminance reduction.

:class:`ImageFacts` is a decoded image without its pixels: what a response, an audit record or a report says
about the image, kept instead of the whole :class:`DecodedImage` once the model's input has been made.

Every decoder (:mod:`~bayesnet.imaging.raster`, :mod:`~bayesnet.imaging.dicom`) returns a
:class:`DecodedImage` and notes in its ``warnings`` what a conversion changed or assumed. Colour is
reduced to gray in the same way for every format, by :func:`luminance`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final

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


@dataclass(frozen=True)
class ImageFacts:
    """A decoded radiograph's description without its pixels (the fields of :class:`DecodedImage` but ``pixels``).

    The service and the archive scorer keep this, not the :class:`DecodedImage`, from the moment the model's input
    exists until the answer is sent: the full-resolution array (1 MB of float32 for a 512 px PNG, 36 MB for a
    3,000 px DICOM) is freed in the thread that made it, instead of being held by every request waiting for its
    batch (peak RSS at 64 clients: 1.32 against 1.42 GB, docs/benchmarks.md).
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


def luminance(rgb: npt.NDArray[np.generic], warnings: list[str]) -> FloatArray:
    """Float luminance ``0.299 R + 0.587 G + 0.114 B`` of ``(H, W, 3)`` samples, in sample units.

    Images whose three channels are identical (gray stored as colour) are returned as-is with no
    warning: nothing was lost.
    """
    r, g, b = (rgb[..., i] for i in range(3))
    if np.array_equal(r, g) and np.array_equal(g, b):
        return np.asarray(r, dtype=np.float64)
    warnings.append(WARN_COLOUR)
    wr, wg, wb = _LUMA_WEIGHTS
    return wr * r.astype(np.float64) + wg * g.astype(np.float64) + wb * b.astype(np.float64)


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
