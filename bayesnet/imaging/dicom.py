"""DICOM Part 10: one projection radiograph, read through pydicom.

No patient identifier is read here: the file is parsed with an explicit list of the technical
elements this module needs (``specific_tags``, see ``_DICOM_TAGS``), so identifying elements are
never decoded.

Decisions worth knowing (see the individual functions for details):

* **Accepted DICOM modalities.** ``CR``, ``DX`` and ``RG`` (projection radiography), the
  non-standard ``DR`` (treated as ``DX``), ``OT`` (other: secondary captures and digitised films,
  where converted radiographs usually end up) and a missing/empty Modality; the last three add a
  warning. Everything else, including ``MG`` (mammography is not a chest radiograph), ``XA``/``RF``
  (angiography/fluoroscopy), ``CT``, ``MR``, ``US``, ``NM``, ``PT`` and non-image objects, raises
  :class:`NotRadiographError`. Whether the image shows a *chest* is another component's question.
* **Colour DICOM** (``RGB``, ``YBR_*``) is converted to grayscale by luminance with a warning, the
  same policy as colour PNG/JPEG (secondary captures of radiographs are sometimes stored in
  colour). ``PALETTE COLOR`` is refused: no radiograph is stored that way.
* **Intensity range.** DICOM goes through the modality transform (Modality LUT or rescale), then the
  first VOI LUT or window, and is mapped to [0, 1] using the *output range of that transform*
  (the range ``pydicom`` maps to, see :func:`_modality_output_range`); with no VOI the full range
  implied by BitsStored/PixelRepresentation, passed through the modality transform, is used. An
  image is never normalised by its own minimum and maximum: that would erase the difference
  between a dense and a lucent film. ``MONOCHROME1`` is inverted after the VOI transform;
  Presentation LUT Shape is not applied separately (for DX it only restates MONOCHROME1/2).
  A damaged window (width < 1, non-numeric) is ignored with a warning rather than refusing an
  otherwise readable image; a DX "For Processing" object is read with a warning.
"""

from __future__ import annotations

import io
import math
from typing import Final

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi, apply_windowing
from pydicom.uid import UID

from bayesnet.errors import (
    CorruptImageError,
    DicomNoPixelDataError,
    MultiFrameDicomError,
    NotRadiographError,
    TruncatedImageError,
    UnsupportedFormatError,
)
from bayesnet.imaging.decoded import (
    WARN_MONOCHROME1,
    WARN_NO_VOI,
    DecodedImage,
    FloatArray,
    luminance,
    population_evidence,
    population_flags,
)
from bayesnet.imaging.integrity import check_encapsulated_frame
from bayesnet.imaging.limits import check_pixel_count

# DICOM elements read from uploads. Only these are parsed, so patient identifiers never are.
_DICOM_TAGS: Final[list[str]] = [
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    # Read only to flag children as outside the intended population; the value is never kept.
    "PatientAge",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "ModalityLUTSequence",
    "VOILUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
]

# (7FE0,0010) Pixel Data as tag bytes, little and big endian.
_PIXEL_DATA_TAG_LE: Final[bytes] = b"\xe0\x7f\x10\x00"
_PIXEL_DATA_TAG_BE: Final[bytes] = b"\x7f\xe0\x00\x10"
# (FFFE,E0DD) Sequence Delimitation Item with zero length: the end of encapsulated pixel data.
_SEQUENCE_DELIMITER: Final[bytes] = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"

_RADIOGRAPHY_MODALITIES: Final[frozenset[str]] = frozenset({"CR", "DX", "RG"})
_MODALITY_NAMES: Final[dict[str, str]] = {
    "CT": "computed tomography",
    "MR": "magnetic resonance",
    "US": "ultrasound",
    "NM": "nuclear medicine",
    "PT": "PET",
    "MG": "mammography",
    "XA": "X-ray angiography",
    "RF": "radiofluoroscopy",
    "IO": "intra-oral radiography",
    "PX": "panoramic dental X-ray",
    "ES": "endoscopy",
    "XC": "external camera photography",
    "OP": "ophthalmic photography",
    "SR": "structured report",
    "SEG": "segmentation",
    "PR": "presentation state",
    "KO": "key object selection",
    "DOC": "document",
}

_MONOCHROME: Final[frozenset[str]] = frozenset({"MONOCHROME1", "MONOCHROME2"})
_COLOUR_PHOTOMETRICS: Final[frozenset[str]] = frozenset(
    {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"}
)


def decode_dicom(data: bytes, max_pixels: int) -> DecodedImage:
    """Decode a single-frame projection radiograph from a DICOM Part 10 file.

    Order of checks: pixel data present, modality, frames, photometric interpretation, pixel count,
    transfer syntax decodable, pixel data length (or, compressed, a complete JPEG or JPEG 2000 frame:
    :func:`~bayesnet.imaging.integrity.check_encapsulated_frame`); only then are pixels decoded by pydicom's pixel
    handlers (native, RLE, JPEG, JPEG-LS, JPEG 2000 through pylibjpeg).
    """
    try:
        ds = pydicom.dcmread(io.BytesIO(data), specific_tags=list(_DICOM_TAGS))
    except EOFError as err:
        raise TruncatedImageError(
            "The DICOM file is truncated: it ends inside its header. Upload the complete file again."
        ) from err
    warnings: list[str] = []

    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise UnsupportedFormatError(
                "The DICOM file stores floating-point pixel data, which no radiograph uses. "
                "Send the original radiograph."
            )
        tag_at = max(data.rfind(_PIXEL_DATA_TAG_LE), data.rfind(_PIXEL_DATA_TAG_BE))
        if tag_at >= 0:
            # The bytes hold a Pixel Data element that the parser dropped. Without the sequence
            # delimiter that closes compressed pixel data, the file was cut short (pydicom warns
            # and drops the element); otherwise the header is damaged (e.g. a wrong length).
            if _SEQUENCE_DELIMITER not in data[tag_at:]:
                raise TruncatedImageError(
                    "The DICOM file is truncated: it ends inside its pixel data. Upload the complete file again."
                )
            raise CorruptImageError(
                "The DICOM header is damaged: its pixel data could not be reached. "
                "Export the image again from its source."
            )
        if "Rows" in ds or "Columns" in ds or _is_image_storage(ds):
            raise DicomNoPixelDataError(
                "The DICOM file describes an image but contains no Pixel Data: the upload may have "
                "been cut short, or the object is header-only. Send the complete image file."
            )
        raise DicomNoPixelDataError(
            "The DICOM file contains no image (no Pixel Data): it may be a report, a presentation "
            "state or a header-only object. Send the image object itself."
        )

    modality = _dicom_code(ds, "Modality")
    _check_modality(modality, warnings)
    if "For Processing" in _sop_class_name(ds):
        warnings.append("'For Processing' DICOM: raw detector data, not the image prepared for viewing")

    frames = _dicom_int(ds, "NumberOfFrames", default=1)
    if frames > 1:
        raise MultiFrameDicomError(
            f"The DICOM file holds {frames} frames (cine, tomosynthesis or a volume); one "
            "radiograph is expected. Export the single image you want read."
        )
    if frames < 1:
        raise CorruptImageError(f"The DICOM file declares an invalid Number of Frames ({frames}).")

    rows = _dicom_int(ds, "Rows")
    columns = _dicom_int(ds, "Columns")
    if rows < 1 or columns < 1:
        raise CorruptImageError(f"The DICOM file declares an empty image ({columns} x {rows} pixels).")
    check_pixel_count("DICOM file", columns, rows, frames, max_pixels)

    photometric = _dicom_code(ds, "PhotometricInterpretation") or ""
    samples = _dicom_int(ds, "SamplesPerPixel", default=1)
    bits_stored = _dicom_int(ds, "BitsStored")
    bits_allocated = _dicom_int(ds, "BitsAllocated")
    if photometric == "PALETTE COLOR":
        raise UnsupportedFormatError(
            "The DICOM file uses PALETTE COLOR, which no radiograph uses. Send a MONOCHROME export."
        )
    if not ((photometric in _MONOCHROME and samples == 1) or (photometric in _COLOUR_PHOTOMETRICS and samples == 3)):
        raise UnsupportedFormatError(
            f"The DICOM Photometric Interpretation {photometric or '(missing)'!r} with {samples} "
            "sample(s) per pixel is not read; a radiograph is MONOCHROME1 or MONOCHROME2."
        )
    if not 1 <= bits_stored <= bits_allocated <= 32:
        raise CorruptImageError(
            f"The DICOM file declares inconsistent bit depths (Bits Stored {bits_stored}, "
            f"Bits Allocated {bits_allocated})."
        )

    transfer_syntax = _transfer_syntax(ds)
    if transfer_syntax.is_compressed:
        check_encapsulated_frame(ds.PixelData, transfer_syntax, rows=rows, columns=columns)
    else:
        _check_native_length(ds, rows * columns * frames, samples, bits_allocated, photometric)

    try:
        stored = ds.pixel_array
    except ValueError as err:
        text = str(err).lower()
        if any(word in text for word in ("length", "truncat", "premature", "insufficient", "short")):
            raise TruncatedImageError(
                "The DICOM pixel data is shorter than the image it declares. Upload the complete file again."
            ) from err
        raise CorruptImageError(
            f"The DICOM pixel data ({transfer_syntax.name}) could not be decoded "
            f"({type(err).__name__}). Export the image again from its source."
        ) from err

    expected_shape = (rows, columns) if samples == 1 else (rows, columns, 3)
    if stored.shape != expected_shape:
        raise CorruptImageError(
            f"The DICOM pixel data decodes to shape {stored.shape}, not the declared {expected_shape}."
        )

    if samples == 3:
        scaled = luminance(stored, warnings) / float(2**bits_stored - 1)
    else:
        scaled = _monochrome_to_unit(stored, ds, bits_stored, warnings)
        if photometric == "MONOCHROME1":
            scaled = 1.0 - scaled
            warnings.append(WARN_MONOCHROME1)
    if not np.all(np.isfinite(scaled)):
        raise CorruptImageError("The DICOM intensity transform (rescale or window values) produced invalid numbers.")
    pixels = np.clip(scaled, 0.0, 1.0).astype(np.float32)
    body_part, view_position = _dicom_code(ds, "BodyPartExamined"), _dicom_code(ds, "ViewPosition")
    age = _dicom_code(ds, "PatientAge")  # read to decide, never kept
    return DecodedImage(
        pixels=pixels,
        format="dicom",
        width=columns,
        height=rows,
        bit_depth=bits_stored,
        photometric=photometric,
        warnings=tuple(warnings),
        modality=modality,
        body_part=body_part,
        view_position=view_position,
        population_flags=population_flags(body_part=body_part, view_position=view_position, age=age),
        population_verified=population_evidence(view_position=view_position, age=age),
    )


def _sop_class_name(ds: Dataset) -> str:
    """Registered name of the file meta's SOP class (e.g. "Computed Radiography Image Storage"), or ""."""
    file_meta = getattr(ds, "file_meta", None)
    sop_class = file_meta.get("MediaStorageSOPClassUID") if file_meta is not None else None
    return UID(str(sop_class)).name if sop_class else ""


def _is_image_storage(ds: Dataset) -> bool:
    """Whether the SOP class is an image storage class (CR, DX, Secondary Capture...).

    Reports, presentation states and key-object notes have no pixels by design; an image class
    without Pixel Data is a cut-short or header-only file.
    """
    return "Image Storage" in _sop_class_name(ds)


def _dicom_code(ds: Dataset, keyword: str) -> str | None:
    """A code-string element as a short, printable string (None when absent or empty).

    Values are sanitised (letters, digits, space, underscore; at most 64 characters) because they
    can appear in messages and logs and a hostile file controls them.
    """
    value = ds.get(keyword)
    if value is None:
        return None
    if not isinstance(value, str):
        value = str(value)
    cleaned = "".join(c for c in value.strip() if c.isascii() and (c.isalnum() or c in " _"))[:64]
    return cleaned.upper() or None


def _dicom_int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """An integer element (US or IS); CorruptImageError when missing without default or invalid."""
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise CorruptImageError(f"The DICOM file lacks the required {keyword} element.")
        return default
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise CorruptImageError(f"The DICOM {keyword} element is not a number.") from err
    if not math.isfinite(number) or number != int(number):
        raise CorruptImageError(f"The DICOM {keyword} element is not an integer.")
    return int(number)


def _check_modality(modality: str | None, warnings: list[str]) -> None:
    """Accept projection radiography (see the module docstring); raise NotRadiographError else."""
    if modality is None:
        warnings.append("no Modality in the DICOM header: assumed to be a projection radiograph")
        return
    if modality in _RADIOGRAPHY_MODALITIES:
        return
    if modality == "DR":
        warnings.append("non-standard Modality 'DR' treated as DX (digital radiography)")
        return
    if modality == "OT":
        warnings.append("Modality OT (other): assumed to be a digitised or converted radiograph")
        return
    described = _MODALITY_NAMES.get(modality)
    shown = f"{modality} ({described})" if described else modality[:16]
    raise NotRadiographError(
        f"The DICOM Modality is {shown}, not a projection radiograph. This service reads chest "
        "X-rays stored as CR, DX or RG (or OT secondary captures)."
    )


def _transfer_syntax(ds: Dataset) -> UID:
    """The file's transfer syntax, checked to be one pydicom can decode with installed plugins."""
    file_meta = getattr(ds, "file_meta", None)
    uid = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not uid:
        raise CorruptImageError("The DICOM file meta information has no Transfer Syntax UID.")
    uid = UID(str(uid))
    if uid.is_transfer_syntax and not uid.is_compressed:
        return uid
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as err:
        raise UnsupportedFormatError(
            f"The DICOM transfer syntax {_uid_label(uid)} cannot be decoded here (video or an "
            "unknown encoding). Export the radiograph uncompressed or as JPEG/JPEG 2000."
        ) from err
    if not decoder.is_available:
        raise UnsupportedFormatError(
            f"No decoder is installed for the DICOM transfer syntax {_uid_label(uid)}. "
            "Export the radiograph uncompressed."
        )
    return uid


def _uid_label(uid: UID) -> str:
    """A UID with its registered name when pydicom knows it (the UID itself is not an identifier)."""
    name = uid.name
    return f"{name} ({uid})" if name and name != str(uid) else str(uid)[:64]


def _check_native_length(ds: Dataset, pixel_count: int, samples: int, bits_allocated: int, photometric: str) -> None:
    """Raise TruncatedImageError when uncompressed pixel data is shorter than declared."""
    samples_stored = 2 if photometric == "YBR_FULL_422" else samples
    expected_bytes = math.ceil(pixel_count * samples_stored * bits_allocated / 8)
    actual_bytes = len(ds["PixelData"].value or b"")
    if actual_bytes < expected_bytes:
        raise TruncatedImageError(
            f"The DICOM pixel data is truncated: {actual_bytes:,} bytes for an image that needs "
            f"{expected_bytes:,}. Upload the complete file again."
        )


def _modality_output_range(ds: Dataset, bits_stored: int) -> tuple[float, float]:
    """Values that the smallest and largest storable pixel map to through the modality transform.

    This is exactly the ``(y_min, y_max)`` that :func:`pydicom.pixels.apply_windowing` uses as its
    output range (pydicom 3 ``processing.py``): a Modality LUT gives ``[0, 2**bits - 1]`` with
    ``bits`` its descriptor's third value; otherwise the BitsStored range (signed or unsigned per
    PixelRepresentation), passed through Rescale Slope/Intercept when both are present. With a
    negative slope the pair is reversed, as it is in pydicom.
    """
    if ds.get("ModalityLUTSequence"):
        lut_bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**lut_bits - 1)
    if _dicom_int(ds, "PixelRepresentation", default=0) == 0:
        low, high = 0.0, float(2**bits_stored - 1)
    else:
        low, high = float(-(2 ** (bits_stored - 1))), float(2 ** (bits_stored - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return low, high


def _voi_kind(ds: Dataset) -> str | None:
    """Which VOI transform applies, by the rule of ``apply_voi_lut``: a VOI LUT, else a window."""
    sequence = ds.get("VOILUTSequence")
    if sequence:
        item = sequence[0]
        if item.get("LUTDescriptor") is not None and item.get("LUTData") is not None:
            return "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return None


def _window_is_valid(ds: Dataset) -> bool:
    """Whether the first Window Center/Width pair can be applied as the standard defines.

    A damaged window (non-numeric, infinite, a LINEAR width below 1, an unknown VOI LUT Function)
    says nothing about the pixels, so the image is still read, over its full range, with a warning.
    """
    try:
        center = _first_number(ds["WindowCenter"].value)
        width = _first_number(ds["WindowWidth"].value)
    except (TypeError, ValueError, IndexError):
        return False
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if not (math.isfinite(center) and math.isfinite(width)):
        return False
    if function == "LINEAR":
        return width >= 1
    return function in {"LINEAR_EXACT", "SIGMOID"} and width > 0


def _first_number(value: object) -> float:
    """First value of a possibly multi-valued numeric element, as float."""
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0]
    if not isinstance(value, (int, float, str)):
        raise TypeError(f"not a number: {type(value).__name__}")
    return float(value)


def _monochrome_to_unit(
    stored: npt.NDArray[np.generic], ds: Dataset, bits_stored: int, warnings: list[str]
) -> FloatArray:
    """Modality transform, then the first VOI LUT or window, then map its output range to [0, 1].

    Result increases with the *displayed* brightness of MONOCHROME2 (the caller inverts
    MONOCHROME1). Never uses the image's own min/max.
    """
    low, high = _modality_output_range(ds, bits_stored)
    if not (math.isfinite(low) and math.isfinite(high)) or low == high:
        raise CorruptImageError("The DICOM rescale values (Rescale Slope/Intercept) give an empty or invalid range.")
    values = apply_modality_lut(stored, ds)
    kind = _voi_kind(ds)
    if kind == "lut":
        item = ds.VOILUTSequence[0]
        entries, first_mapped, lut_bits = (int(v) for v in item.LUTDescriptor)
        entries = entries or 2**16
        # LUT input is an integer index; clipping to the LUT's domain first is what the LUT does
        # anyway (values outside map to the first/last entry) and keeps pydicom's index arithmetic
        # inside its unsigned dtype.
        index = np.clip(np.rint(values), first_mapped, first_mapped + entries - 1).astype(np.int64)
        output = apply_voi(index, ds, 0).astype(np.float64)
        return output / float(2**lut_bits - 1)
    if kind == "window":
        if _window_is_valid(ds):
            output = apply_windowing(values, ds, 0)
            return (np.asarray(output, dtype=np.float64) - low) / (high - low)
        warnings.append("invalid VOI window ignored")
    warnings.append(WARN_NO_VOI)
    low, high = min(low, high), max(low, high)
    return (np.asarray(values, dtype=np.float64) - low) / (high - low)
