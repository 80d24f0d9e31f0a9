"""How much memory one upload's decode can take, bounded from its header alone, before any pixel is decoded.

:func:`decode_memory_bytes` reads what the decoders read first (the PNG IHDR, the JPEG frame header, the DICOM
Rows, Columns, Samples per Pixel, Bits Allocated, Number of Frames and transfer syntax) and adds up the arrays
that :func:`~bayesnet.imaging.decode_image` and then the service's preprocessing hold at their peak. A caller
admits a decode against a memory budget with it (the service, so that concurrent uploads cannot together exhaust
the machine); ``bench/decode_memory.py`` measures the peak resident memory of worst-case inputs against it
(docs/decode-memory.md).

With ``N`` the declared pixel count and ``R = 4 N`` the float32 result, the decode holds at its peak:

* **PNG**: Pillow's decoded image ``P`` (1 byte per pixel for gray and palette, 2 for 16-bit gray, 4 for
  anything with colour or alpha), then ``P + R`` while it is converted (and turned upright) a strip at a time.
* **JPEG**: libjpeg's output (1 byte per pixel for gray, up to 4 for colour: Pillow stores RGB and CMYK in 4)
  plus, while it decodes, its whole-image coefficient buffer (2 bytes per sample and component, for progressive
  and multi-scan files), or ``R`` while the samples are converted.
* **DICOM**: the Pixel Data element's bytes (at most the file) and, for compressed data, the frame handed to the
  codec; the stored samples (``raw``: ``N x samples x bytes per sample``) twice while a codec's output is copied
  into pydicom's array, with the codec's own working memory (JPEG 2000: 4 bytes per sample; JPEG: its
  coefficient buffer), then ``raw + R`` during the conversion. Encapsulated JPEG, JPEG-LS and JPEG 2000 frames
  must declare the DICOM header's size (:func:`~bayesnet.imaging.integrity.check_encapsulated_frame`), so the
  codec never allocates for a larger image.
* **Every format**: one block of float64 temporaries (at most :data:`~bayesnet.imaging.decoded.BLOCK_PIXELS`
  pixels, or one row), and a fixed allowance for interpreter, codec and allocator overhead.

After the decode only ``R`` is held, plus the preprocessing: :func:`bayesnet.preprocess` for ``spec`` (its
first resampling pass; with ``letterbox`` a non-square image is first padded to a square, a second full-size
float32 array), or the browser preview (resampled to a long side of 1024 px, PNG-encoded). The bound is the
larger of the two phases, plus what the allocator may keep: glibc hands a freed allocation back to the system
only when it is at least :data:`HEAP_PIECE_BYTES` (32 MiB); a smaller one (a codec's buffers below 4096 x 4096
pixels, Pillow's images, which it allocates in 16 MiB pieces) may stay resident after it is freed, so it is
counted in the later phase too.

Bytes that the decoder refuses before decoding pixels (empty, not an image, a size above ``max_pixels``, a
damaged header, a multi-frame DICOM) get :data:`REFUSED_BYTES` plus what that refusal still reads (a DICOM's
Pixel Data element): this function never raises :class:`~bayesnet.errors.ImageError`, and leaves saying why to
the decoder, which reads the same header the same way. A Deflated DICOM, which pydicom inflates whole before
reading it, is bounded by the size the decoder lets it inflate to
(:func:`~bayesnet.imaging.dicom.check_deflated_size`): its compressed and inflated copies come on top.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000TransferSyntaxes, JPEGTransferSyntaxes

from bayesnet.errors import ImageError
from bayesnet.imaging import decoded
from bayesnet.imaging.dicom import SIZE_TAGS, deflated_dataset, dicom_int
from bayesnet.imaging.limits import DEFAULT_MAX_PIXELS
from bayesnet.imaging.raster import RasterHeader, jpeg_header, pillow_limit, png_header
from bayesnet.imaging.sniff import sniff_format

if TYPE_CHECKING:
    from bayesnet.spec import ModelSpec

MIB: Final[int] = 1024 * 1024

OVERHEAD_BYTES: Final[int] = 24 * MIB
"""Added to every bound: Python objects, codec state (zlib windows, libjpeg row buffers), the allocator's slack."""

HEAP_PIECE_BYTES: Final[int] = 32 * MIB
"""glibc's largest mmap threshold (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit): a freed allocation at least this large
is always handed back to the system, a smaller one may stay in the process's heap, and so in its resident memory,
until the process reuses it."""

REFUSED_BYTES: Final[int] = 4 * MIB
"""The bound for bytes the decoder refuses before decoding any pixel (its header parsing, the error)."""

PREVIEW_SIDE: Final[int] = 1024
"""Long side of the service's browser preview (``service.runtime.pipeline.preview_png``)."""

# Bytes per pixel of the float64 temporaries one block of rows needs at its peak: pydicom's windowing on a block
# (the samples as float64, its three masks, two arithmetic temporaries) or a strip of colour read from Pillow.
_BLOCK_BYTES_PER_PIXEL: Final[int] = 48
# Pillow's bytes per pixel for a PNG of IHDR colour type (0 gray, 2 RGB, 3 palette, 4 gray + alpha, 6 RGBA):
# gray is "1"/"L" (1) or "I;16" (2) at 16 bits; every multi-band mode (RGB, RGBA, LA, PA) is stored in 4.
_PNG_GRAY: Final[int] = 0
_PNG_PALETTE: Final[int] = 3
# Values longer than this are not read by the header parse (pydicom's ``defer_size``): the pixel data is skipped.
_DEFER_BYTES: Final[int] = 4096
# Working memory of a DICOM codec, in bytes per stored sample, beyond its output and pydicom's copy of it:
# OpenJPEG decodes every component into 32-bit integers; libjpeg may keep its 16-bit coefficient buffer.
_J2K_WORK_BYTES_PER_SAMPLE: Final[int] = 4
_JPEG_COEFFICIENT_BYTES: Final[int] = 2


def decode_memory_bytes(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, spec: ModelSpec | None = None) -> int:
    """An upper bound, in bytes, on the memory that decoding ``data`` and preprocessing it will take at its peak.

    Covers :func:`~bayesnet.imaging.decode_image` ``(data, max_pixels=max_pixels)`` (any ``max_side``: a reduced
    decode takes less) followed by either :func:`bayesnet.preprocess` for ``spec`` (``None``: any spec with an
    image size up to 1024 px, letterboxed) or the service's 1024 px preview: the peak of the process's resident
    memory above what it was with ``data`` already in memory. Reads only the header and decodes no pixel (for a
    Deflated DICOM, inflates the dataset's first MiB); how the bound is made, and what it assumes, is this module's
    docstring.

    Never raises :class:`~bayesnet.errors.ImageError`: bytes that the decoder refuses before decoding pixels get
    the small :data:`REFUSED_BYTES` (plus, for DICOM, the Pixel Data that refusal reads); the decoder says why.

    Raises:
        TypeError: ``data`` is not bytes-like (as :func:`~bayesnet.imaging.decode_image`).
        ValueError: ``max_pixels`` is not a positive integer.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_memory_bytes expects bytes, got {type(data).__name__}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    # decode_image copies any other bytes-like object to bytes first.
    copied = 0 if isinstance(data, bytes) else len(data)
    data = bytes(data)
    fmt = sniff_format(data) if data else None
    if fmt == "png":
        peak = _png_bytes(data, max_pixels, spec)
    elif fmt == "jpeg":
        peak = _jpeg_bytes(data, max_pixels, spec)
    elif fmt == "dicom":
        peak = _dicom_bytes(data, max_pixels, spec)
    else:
        peak = REFUSED_BYTES
    return copied + peak


def _block_bytes(height: int, width: int) -> int:
    """The float64 temporaries of the largest block of rows :func:`~bayesnet.imaging.decoded.rows_to_unit` makes."""
    pixels = min(height * width, max(decoded.BLOCK_PIXELS, width))
    return _BLOCK_BYTES_PER_PIXEL * pixels


def _after_decode_bytes(height: int, width: int, spec: ModelSpec | None) -> int:
    """The result ``R`` plus the larger of the preprocessing for ``spec`` and the preview, while ``R`` is held."""
    long_side, pixels = max(height, width), height * width
    size = spec.image_size if spec is not None else PREVIEW_SIDE
    letterbox = spec is None or spec.resize == "letterbox"
    # preprocess: the letterbox square, the first resampling pass (long side x size), the model input and its
    # normalised copies (3 channels at most).
    pad = 4 * long_side * long_side if letterbox and height != width else 0
    model = pad + 4 * size * long_side + 4 * 9 * size * size
    # preview_png: the first resampling pass, then the resampled image, its clamp, scale and rounding (float32),
    # the 8-bit copy and the PNG being written.
    shown = min(pixels, PREVIEW_SIDE * PREVIEW_SIDE)
    preview = 4 * PREVIEW_SIDE * long_side + 4 * 6 * shown
    return 4 * pixels + max(model, preview)


def _heap(*sizes: int) -> int:
    """Of buffers a decode frees, the bytes that may stay resident: those allocated in one piece smaller than
    :data:`HEAP_PIECE_BYTES`."""
    return sum(size for size in sizes if size < HEAP_PIECE_BYTES)


def _bound(
    height: int, width: int, decode_peak: int, spec: ModelSpec | None, *, retained: int = 0, released: int = 0
) -> int:
    """The larger of the decode's peak and what follows it, with the fixed overhead.

    ``decode_peak``: what the decode holds at once; ``retained``: what it freed before that peak and may still be
    resident; ``released``: what it holds at its peak and frees on returning, which may still be resident while
    the image is preprocessed.
    """
    after = _after_decode_bytes(height, width, spec) + released
    return max(decode_peak, after) + retained + OVERHEAD_BYTES


def _raster_header(parse: Callable[[bytes], RasterHeader], data: bytes, max_pixels: int) -> RasterHeader | None:
    """The PNG or JPEG header ``parse`` reads, or None when the decoder refuses the file before any pixel (a
    damaged header, more pixels than Pillow is allowed)."""
    try:
        header = parse(data)
    except ImageError:
        return None
    return header if header.height * header.width <= pillow_limit(max_pixels) else None


def _png_bytes(data: bytes, max_pixels: int, spec: ModelSpec | None) -> int:
    header = _raster_header(png_header, data, max_pixels)
    if header is None:
        return REFUSED_BYTES
    height, width = header.height, header.width
    pixels = height * width
    if header.color_type in (_PNG_GRAY, _PNG_PALETTE):
        stored = pixels * (2 if header.bit_depth == 16 and header.color_type == _PNG_GRAY else 1)
    else:
        stored = 4 * pixels
    block = _block_bytes(height, width)
    # Pillow allocates an image in pieces of at most 16 MiB: all of it may stay resident once freed.
    return _bound(height, width, stored + 4 * pixels + block, spec, released=stored + block)


def _jpeg_bytes(data: bytes, max_pixels: int, spec: ModelSpec | None) -> int:
    header = _raster_header(jpeg_header, data, max_pixels)
    if header is None:
        return REFUSED_BYTES
    height, width = header.height, header.width
    pixels = height * width
    samples = pixels * (1 if header.components == 1 else 4)
    # Coefficient blocks cover whole MCUs (up to 16 x 16 pixels with 2x2 chroma subsampling).
    coefficients = _JPEG_COEFFICIENT_BYTES * header.components * (height + 16) * (width + 16)
    block = _block_bytes(height, width)
    peak = samples + max(coefficients, 4 * pixels + block)
    # Freed before the conversion: the coefficients, and a strict decode's samples when Pillow decodes the file.
    retained = _heap(coefficients, samples)
    return _bound(height, width, peak, spec, retained=retained, released=_heap(samples) + block)


def _dicom_bytes(data: bytes, max_pixels: int, spec: ModelSpec | None) -> int:
    file_bytes = len(data)  # at most the Pixel Data element's bytes, which every parse that gets that far reads
    try:
        deflated = deflated_dataset(data, max_pixels)
    except ImageError:
        return file_bytes + REFUSED_BYTES  # a damaged deflate stream: the decoder refuses it as it inflates it
    if deflated is not None:
        # pydicom reads the compressed dataset (a copy), inflates it whole, then reads the Pixel Data from it; the
        # decoder has refused a dataset that inflates to more than ``inflated`` (check_deflated_size).
        header, inflated = deflated
        if not all(keyword in header for keyword in ("Rows", "Columns", "BitsAllocated")):
            return 2 * file_bytes + 2 * inflated + _largest_dicom_bytes(inflated, max_pixels, spec)
        ds, extra, pixel_data = header, file_bytes + inflated, inflated
    else:
        try:
            # The whole file is parsed, as the decoder parses it (an element after the pixel data counts too), but
            # only these elements' values are read: the pixel data is skipped.
            ds = pydicom.dcmread(io.BytesIO(data), specific_tags=list(SIZE_TAGS), defer_size=_DEFER_BYTES)
        except MemoryError:
            raise
        except Exception:
            # The decoder's parse of the same bytes fails the same way, before any pixel is decoded, and says why.
            return file_bytes + REFUSED_BYTES
        extra, pixel_data = 0, file_bytes
    try:
        # The sizes are read by the decoder's own function.
        rows, columns = dicom_int(ds, "Rows"), dicom_int(ds, "Columns")
        frames, samples = dicom_int(ds, "NumberOfFrames", 1), dicom_int(ds, "SamplesPerPixel", 1)
        bits_allocated = dicom_int(ds, "BitsAllocated")
    except MemoryError:
        raise
    except Exception:
        return extra + pixel_data + REFUSED_BYTES  # the decoder refuses an absent or invalid size element too
    if frames != 1 or rows < 1 or columns < 1 or rows * columns > max_pixels or samples not in (1, 3):
        return extra + pixel_data + REFUSED_BYTES  # refused before any pixel is decoded
    if not 1 <= bits_allocated <= 32:
        return extra + pixel_data + REFUSED_BYTES
    if deflated is not None:
        transfer_syntax = ExplicitVRLittleEndian  # what the inflated dataset is
    else:
        transfer_syntax = UID(str(ds.file_meta.get("TransferSyntaxUID") or ""))
        if not transfer_syntax.is_transfer_syntax:
            return pixel_data + REFUSED_BYTES  # the decoder refuses a missing or unknown transfer syntax
    decode = _dicom_decode_bytes(rows, columns, samples, bits_allocated, transfer_syntax, pixel_data, spec)
    return extra + pixel_data + decode


def _dicom_decode_bytes(
    rows: int,
    columns: int,
    samples: int,
    bits_allocated: int,
    transfer_syntax: UID | None,
    file_bytes: int,
    spec: ModelSpec | None,
) -> int:
    """The bound of one DICOM image's decode beside its Pixel Data element (see the module docstring);
    ``transfer_syntax`` None: any."""
    pixels = rows * columns
    raw = pixels * samples * max(1, math.ceil(bits_allocated / 8))
    if transfer_syntax is not None and not transfer_syntax.is_compressed:
        # The samples are a view of the Pixel Data or one processed copy of it (unused bits masked, byte order).
        decoding, retained = raw, 0
    else:
        # The frame handed to the codec (at most the file), pydicom's array, the codec's output and the codec's
        # working memory: by default as much again as its output (pylibjpeg-rle, CharLS), for OpenJPEG its 32-bit
        # components, for libjpeg its coefficient buffer (the strict completeness check decodes a JPEG frame too).
        work = raw
        if transfer_syntax is None or transfer_syntax in JPEG2000TransferSyntaxes:
            work = max(work, _J2K_WORK_BYTES_PER_SAMPLE * pixels * samples + raw)
        if transfer_syntax is None or transfer_syntax in JPEGTransferSyntaxes:
            coefficients = _JPEG_COEFFICIENT_BYTES * samples * (rows + 16) * (columns + 16)
            work = max(work, coefficients + raw)
        decoding = file_bytes + 2 * raw + work
        retained = _heap(file_bytes, raw, work)  # the frame, the codec's output and its working memory, freed
    # Then the samples and the float32 result, with a block's temporaries (and, for YBR colour, its conversion).
    block = 2 * _block_bytes(rows, columns)
    peak = max(decoding, raw + 4 * pixels + block)
    return _bound(rows, columns, peak, spec, retained=retained, released=_heap(raw) + block)


def _largest_dicom_bytes(file_bytes: int, max_pixels: int, spec: ModelSpec | None) -> int:
    """The bound for a DICOM whose header is not read here: the largest image ``max_pixels`` allows (square,
    colour, 32 bits per sample, any codec)."""
    side = math.isqrt(max_pixels)
    return _dicom_decode_bytes(side, side, 3, 32, None, file_bytes, spec)
