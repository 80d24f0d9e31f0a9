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
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi, apply_windowing, convert_color_space
from pydicom.pixels.utils import as_pixel_options
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

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
    luminance_to_unit,
    population_evidence,
    population_flags,
    rows_to_unit,
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

# The elements that say how large the image is (the decode's memory, a Deflated dataset's size).
SIZE_TAGS: Final[list[str]] = [
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
]
_PIXEL_DATA: Final[int] = 0x7FE00010
_PIXEL_DATA_HEADER_BYTES: Final[int] = 12  # tag, VR, reserved, 32-bit length

# The file meta group starts after the preamble and 'DICM'; explicit VRs whose length field is 4 bytes.
_DICOM_META_START: Final[int] = 132
_LONG_LENGTH_VRS: Final[frozenset[bytes]] = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
# Deflated datasets: how much is inflated to read the header, in what pieces, and what may follow the pixel data.
_DEFLATED_HEAD_BYTES: Final[int] = 1 << 20
_INFLATE_INPUT_BYTES: Final[int] = 1 << 12
_AFTER_PIXEL_DATA_BYTES: Final[int] = 1 << 20

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
# Decoded colour that pydicom converts to RGB (by default, with ``as_rgb``); the others it returns as they are.
_YBR_FULL: Final[frozenset[str]] = frozenset({"YBR_FULL", "YBR_FULL_422"})


def decode_dicom(data: bytes, max_pixels: int) -> DecodedImage:
    """Decode a single-frame projection radiograph from a DICOM Part 10 file.

    Order of checks: pixel data present, modality, frames, photometric interpretation, pixel count,
    transfer syntax decodable, pixel data length (or, compressed, a complete JPEG or JPEG 2000 frame:
    :func:`~bayesnet.imaging.integrity.check_encapsulated_frame`); only then are pixels decoded by pydicom's pixel
    handlers (native, RLE, JPEG, JPEG-LS, JPEG 2000 through pylibjpeg). A Deflated file is first checked to
    inflate to no more than its declared image needs (:func:`check_deflated_size`).
    """
    check_deflated_size(data, max_pixels)
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

    frames = dicom_int(ds, "NumberOfFrames", default=1)
    if frames > 1:
        raise MultiFrameDicomError(
            f"The DICOM file holds {frames} frames (cine, tomosynthesis or a volume); one "
            "radiograph is expected. Export the single image you want read."
        )
    if frames < 1:
        raise CorruptImageError(f"The DICOM file declares an invalid Number of Frames ({frames}).")

    rows = dicom_int(ds, "Rows")
    columns = dicom_int(ds, "Columns")
    if rows < 1 or columns < 1:
        raise CorruptImageError(f"The DICOM file declares an empty image ({columns} x {rows} pixels).")
    check_pixel_count("DICOM file", columns, rows, frames, max_pixels)

    photometric = _dicom_code(ds, "PhotometricInterpretation") or ""
    samples = dicom_int(ds, "SamplesPerPixel", default=1)
    bits_stored = dicom_int(ds, "BitsStored")
    bits_allocated = dicom_int(ds, "BitsAllocated")
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

    body_part, view_position = _dicom_code(ds, "BodyPartExamined"), _dicom_code(ds, "ViewPosition")
    age = _dicom_code(ds, "PatientAge")  # read to decide, never kept
    transfer_syntax = _transfer_syntax(ds)
    if transfer_syntax.is_compressed:
        check_encapsulated_frame(ds.PixelData, transfer_syntax, rows=rows, columns=columns, samples=samples)
    else:
        _check_native_length(ds, rows * columns * frames, samples, bits_allocated, photometric)

    try:
        stored, stored_photometric = _stored_samples(ds, transfer_syntax, samples, bits_stored, bits_allocated)
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
        to_rgb = stored_photometric in _YBR_FULL

        def rgb(block: slice) -> npt.NDArray[Any]:
            return convert_color_space(stored[block], "YBR_FULL", "RGB") if to_rgb else stored[block]

        pixels = luminance_to_unit(rgb, rows, columns, float(2**bits_stored - 1), warnings)
    else:
        transform = _monochrome_to_unit(ds, bits_stored, warnings)
        invert = photometric == "MONOCHROME1"
        if invert:
            warnings.append(WARN_MONOCHROME1)

        def to_unit(block: slice) -> FloatArray:
            scaled = transform(stored[block])
            if invert:
                scaled = 1.0 - scaled
            if not np.all(np.isfinite(scaled)):
                raise CorruptImageError(
                    "The DICOM intensity transform (rescale or window values) produced invalid numbers."
                )
            return np.clip(scaled, 0.0, 1.0)

        pixels = rows_to_unit(rows, columns, to_unit)
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


def _stored_samples(
    ds: Dataset, transfer_syntax: UID, samples: int, bits_stored: int, bits_allocated: int
) -> tuple[npt.NDArray[Any], str]:
    """The stored samples as pydicom decodes them (``ds.pixel_array``), with their photometric interpretation.

    Two of pydicom's options are changed, neither changing a value: native samples that need no processing are a
    read-only view of the Pixel Data's bytes instead of a copy (``view_only``; only then, since pydicom warns when
    it must copy a view), and YBR colour is returned as stored (``as_rgb=False``) for the caller to convert a block
    of rows at a time, by the same function pydicom would apply to the whole image in float32 at once.
    """
    view_only = samples == 1 and bits_stored == bits_allocated
    options = as_pixel_options(ds, as_rgb=False, view_only=view_only)
    stored, properties = get_decoder(transfer_syntax).as_array(ds, index=None, validate=True, raw=False, **options)
    return stored, str(properties.get("photometric_interpretation", ""))


def file_meta_transfer_syntax(data: bytes) -> tuple[UID | None, int]:
    """The Transfer Syntax UID of a DICOM Part 10 file and the offset of its dataset, from the file meta group.

    Read as pydicom reads the group (explicit VR little endian elements of group 0002 after the ``DICM`` prefix)
    but without going on to the dataset, which pydicom inflates whole for a Deflated file. The UID is None when
    the group has none.
    """
    pos, end, found = _DICOM_META_START, len(data), None
    while pos + 8 <= end:
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 2:
            break
        vr = data[pos + 4 : pos + 6]
        if not (vr.isalpha() and vr.isupper()):  # implicit VR: not conformant, but pydicom reads it so
            (length,) = struct.unpack_from("<I", data, pos + 4)
            start = pos + 8
        elif vr in _LONG_LENGTH_VRS:
            if pos + 12 > end:
                break
            (length,) = struct.unpack_from("<I", data, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            start = pos + 8
        if element == 0x0010:
            found = data[start : start + length].rstrip(b"\x00 ").decode("ascii", errors="replace")
        pos = start + length
    return (UID(found) if found else None), pos


def _inflate(compressed: memoryview) -> Iterator[bytes]:
    """The raw deflate stream ``compressed`` inflated piece by piece, 4 KiB of input at a time: no piece of output
    is larger than deflate's largest ratio (1032:1) allows, 4.1 MiB, and the input is never copied whole."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    for start in range(0, len(compressed), _INFLATE_INPUT_BYTES):
        try:
            piece = inflater.decompress(compressed[start : start + _INFLATE_INPUT_BYTES])
        except zlib.error as err:
            raise CorruptImageError(
                "The DICOM file's deflated dataset is damaged and cannot be inflated. Export the image again."
            ) from err
        yield piece
        if inflater.eof:
            return


def deflated_dataset(data: bytes, max_pixels: int) -> tuple[Dataset, int] | None:
    """For a Deflated Explicit VR Little Endian file, the size elements its dataset starts with and the most bytes
    the dataset may inflate to; None for any other transfer syntax.

    pydicom inflates such a dataset whole before reading any of it, so a deflate bomb (a few MB inflating to
    gigabytes) would be decompressed before the pixel count could be checked. The first MiB is inflated here and
    read up to the Pixel Data element: the dataset may then hold that header, the pixel data its Rows, Columns,
    Samples per Pixel, Bits Allocated and Number of Frames need, and a MiB after it (padding, signatures). A header
    longer than a MiB allows the largest image ``max_pixels`` allows.

    Raises:
        CorruptImageError: the deflate stream is damaged within its first MiB.
    """
    transfer_syntax, offset = file_meta_transfer_syntax(data)
    if transfer_syntax != DeflatedExplicitVRLittleEndian:
        return None
    head = bytearray()
    ended = True
    for piece in _inflate(memoryview(data)[offset:]):
        head += piece
        if len(head) >= _DEFLATED_HEAD_BYTES:
            ended = False
            break
    if ended:
        limit = len(head)  # the whole dataset is inflated: nothing more can come
    else:
        limit = _DEFLATED_HEAD_BYTES + _PIXEL_DATA_HEADER_BYTES + 12 * max_pixels + _AFTER_PIXEL_DATA_BYTES
    buffer = io.BytesIO(bytes(head))
    reached: list[int] = []

    def at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
        if tag == _PIXEL_DATA:
            reached.append(buffer.tell())
        return tag == _PIXEL_DATA

    try:
        header = pydicom.filereader.read_dataset(
            buffer, False, True, stop_when=at_pixel_data, specific_tags=[Tag(keyword) for keyword in SIZE_TAGS]
        )
    except Exception:  # a header cut by the first MiB, or damaged: the conservative limit stands
        return Dataset(), limit
    if reached and not ended:
        try:
            rows, columns = dicom_int(header, "Rows"), dicom_int(header, "Columns")
            frames, samples = dicom_int(header, "NumberOfFrames", 1), dicom_int(header, "SamplesPerPixel", 1)
            bits = dicom_int(header, "BitsAllocated")
        except CorruptImageError:
            return header, reached[0] + _AFTER_PIXEL_DATA_BYTES  # no image declared: no pixel data allowed
        pixel_bytes = math.ceil(max(0, rows * columns * frames * samples) * max(0, bits) / 8)
        limit = reached[0] + pixel_bytes + _AFTER_PIXEL_DATA_BYTES
    return header, limit


def check_deflated_size(data: bytes, max_pixels: int) -> None:
    """Refuse a Deflated DICOM whose dataset declares too many pixels or inflates to more than its declared image
    needs (:func:`deflated_dataset`), by inflating it once here and keeping nothing; other files pass.

    Raises:
        TooManyPixelsError: the declared image is above ``max_pixels``.
        CorruptImageError: the dataset inflates to more than its image needs (a deflate bomb).
    """
    found = deflated_dataset(data, max_pixels)
    if found is None:
        return
    header, limit = found
    try:
        rows, columns = dicom_int(header, "Rows"), dicom_int(header, "Columns")
        frames = dicom_int(header, "NumberOfFrames", 1)
    except CorruptImageError:
        pass  # the decoder says what is missing once the dataset is read
    else:
        check_pixel_count("DICOM file", columns, rows, frames, max_pixels)
    _, offset = file_meta_transfer_syntax(data)
    inflated = 0
    for piece in _inflate(memoryview(data)[offset:]):
        inflated += len(piece)
        if inflated > limit:
            raise CorruptImageError(
                f"The DICOM file's deflated dataset inflates to more than the {limit:,} bytes its declared image "
                "needs (a decompression bomb, or a damaged file). Export the image again, uncompressed."
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


def dicom_int(ds: Dataset, keyword: str, default: int | None = None) -> int:
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
    if dicom_int(ds, "PixelRepresentation", default=0) == 0:
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


def _monochrome_to_unit(ds: Dataset, bits_stored: int, warnings: list[str]) -> Callable[[npt.NDArray[Any]], FloatArray]:
    """Modality transform, then the first VOI LUT or window, then map its output range to [0, 1].

    Returns the transform as a function of stored samples (any block of them: every step is elementwise, so
    :func:`~bayesnet.imaging.decoded.rows_to_unit` applies it a block of rows at a time); the warnings it implies
    are noted once, here. Result increases with the *displayed* brightness of MONOCHROME2 (the caller inverts
    MONOCHROME1). Never uses the image's own min/max.
    """
    low, high = _modality_output_range(ds, bits_stored)
    if not (math.isfinite(low) and math.isfinite(high)) or low == high:
        raise CorruptImageError("The DICOM rescale values (Rescale Slope/Intercept) give an empty or invalid range.")
    kind = _voi_kind(ds)
    if kind == "lut":
        item = ds.VOILUTSequence[0]
        entries, first_mapped, lut_bits = (int(v) for v in item.LUTDescriptor)
        entries = entries or 2**16

        def through_lut(stored: npt.NDArray[Any]) -> FloatArray:
            values = apply_modality_lut(stored, ds)
            # LUT input is an integer index; clipping to the LUT's domain first is what the LUT does
            # anyway (values outside map to the first/last entry) and keeps pydicom's index arithmetic
            # inside its unsigned dtype.
            index = np.clip(np.rint(values), first_mapped, first_mapped + entries - 1).astype(np.int64)
            output = apply_voi(index, ds, 0).astype(np.float64)
            return output / float(2**lut_bits - 1)

        return through_lut
    if kind == "window":
        if _window_is_valid(ds):

            def through_window(stored: npt.NDArray[Any]) -> FloatArray:
                output = apply_windowing(apply_modality_lut(stored, ds), ds, 0)
                return (np.asarray(output, dtype=np.float64) - low) / (high - low)

            return through_window
        warnings.append("invalid VOI window ignored")
    warnings.append(WARN_NO_VOI)
    low, high = min(low, high), max(low, high)

    def full_range(stored: npt.NDArray[Any]) -> FloatArray:
        return (np.asarray(apply_modality_lut(stored, ds), dtype=np.float64) - low) / (high - low)

    return full_range
