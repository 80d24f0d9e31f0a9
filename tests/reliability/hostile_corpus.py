"""A corpus of malformed and hostile uploads for the inference service, and how to judge the answers.

Every case is built in memory (Pillow, numpy, pydicom and the DICOM files bundled with pydicom), so
nothing binary is committed. The rule each answer is judged by (:func:`check_response`): never a 5xx,
never a hang, always JSON with a message a person can act on; the few inputs that are legitimately
decodable (a 16-bit PNG, an RGB DICOM, a CMYK JPEG...) get 200 and, where decoding had to convert or
assume something, say so in ``image.warnings``.

Used by ``tests/reliability/test_hostile.py`` and by the ``make reliability`` runner, so it imports
nothing from pytest. The API (``HostileCase``, ``build_corpus``, ``send_case``, ``check_response``)
is a contract with that runner.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import struct
import zipfile
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

#: The service's default upload limit (service.settings.DEFAULT_MAX_UPLOAD_BYTES), repeated here so the
#: corpus does not import the service; pass the server's real limit to :func:`build_corpus`.
DEFAULT_MAX_UPLOAD_BYTES = 32 * 1024 * 1024

#: Fake identifiers carried by the DICOM cases; a test asserts they never come back.
PATIENT_NAME = "Hostile^Zebediah^Quux"
PATIENT_ID = "PID-HOSTILE-7319"
PATIENT_BIRTH_DATE = "19010203"
ACCESSION_NUMBER = "ACC-HOSTILE-4471"
PATIENT_IDENTIFIERS = (PATIENT_NAME, "Zebediah", PATIENT_ID, PATIENT_BIRTH_DATE, ACCESSION_NUMBER)

BOUNDARY = "hostile-boundary-4f1c"

#: How long one case may take before it counts as a hang (seconds).
CASE_TIMEOUT_S = 60.0

EXPECT_4XX = "4xx"
EXPECT_200 = "200"
EXPECT_200_WARNING = "200-with-warning"


@dataclass(frozen=True)
class HostileCase:
    """One hostile request and what an acceptable answer is.

    By default the request is ``multipart/form-data`` with ``payload`` as the file in ``field``.
    ``raw_body`` replaces the whole body (malformed multipart, no multipart at all) and is sent with
    ``content_type`` as the request's Content-Type. ``slow_total_bytes`` sends a body of that size
    in ``slow_chunk_bytes`` chunks with ``slow_delay_s`` between them and no Content-Length (chunked
    transfer), the way a slow or malicious client would.

    ``expect`` is ``"4xx"``, ``"200"`` or ``"200-with-warning"``. For 4xx, ``statuses`` lists the
    acceptable codes and ``detail_contains`` a word the problem's ``detail`` must contain (case
    insensitive) so that the message says what went wrong. For ``"200-with-warning"``,
    ``warning_contains`` must appear in one of ``image.warnings``.
    """

    name: str
    description: str
    expect: str
    path: str = "/v1/predict"
    payload: bytes = b""
    field: str = "file"
    filename: str = "upload.bin"
    file_content_type: str = "application/octet-stream"
    raw_body: bytes | None = None
    content_type: str | None = None
    params: tuple[tuple[str, str], ...] = (("cams", "none"),)
    statuses: frozenset[int] = frozenset()
    detail_contains: str = ""
    warning_contains: str = ""
    slow_total_bytes: int = 0
    slow_chunk_bytes: int = 256 * 1024
    slow_delay_s: float = 0.002

    def __post_init__(self) -> None:
        if self.expect not in (EXPECT_4XX, EXPECT_200, EXPECT_200_WARNING):
            raise ValueError(f"{self.name}: expect must be 4xx, 200 or 200-with-warning, not {self.expect!r}")
        if self.expect == EXPECT_4XX and not self.statuses:
            raise ValueError(f"{self.name}: a 4xx case names its acceptable statuses")
        if self.expect == EXPECT_200_WARNING and not self.warning_contains:
            raise ValueError(f"{self.name}: a 200-with-warning case names the warning it expects")


# --- builders -------------------------------------------------------------------------------------


def png_bytes(pixels: np.ndarray, mode: str | None = None, **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def gradient(height: int, width: int, dtype: type = np.uint8) -> np.ndarray:
    """A smooth test film: brighter towards the centre, in the full range of ``dtype``."""
    y, x = np.mgrid[0:height, 0:width]
    r = np.hypot((y - height / 2) / max(height, 1), (x - width / 2) / max(width, 1))
    unit = np.clip(1.0 - r * 1.5, 0.0, 1.0)
    top = np.iinfo(dtype).max
    return (unit * top).astype(dtype)


def gray_png(size: int = 128) -> bytes:
    return png_bytes(gradient(size, size))


def jpeg_bytes(image: Image.Image, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **save)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_declared_size(width: int, height: int, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    """A PNG that declares ``width x height`` in a valid IHDR and carries a tiny (bogus) image."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_zlib_bomb(side: int = 12_000) -> bytes:
    """A real, valid PNG of ``side x side`` zeros: about 100 KB that inflates to ``side**2`` bytes."""
    row = b"\x00" + b"\x00" * side
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_ztxt_bomb() -> bytes:
    """A small valid PNG with a compressed text chunk that inflates to 64 MiB (Pillow caps text chunks)."""
    base = gray_png(64)
    text = b"Comment\x00\x00" + zlib.compress(b"A" * (64 * 1024 * 1024), 9)
    iend = len(base) - 12
    return base[:iend] + png_chunk(b"zTXt", text) + base[iend:]


def jpeg_with_declared_size(width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) is rewritten to declare ``width x height``."""
    data = bytearray(jpeg_bytes(Image.fromarray(gradient(16, 16))))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def animated_png() -> bytes:
    frames = [Image.fromarray(gradient(64, 64)), Image.fromarray(255 - gradient(64, 64))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def animated_gif() -> bytes:
    frames = [Image.fromarray(gradient(64, 64)).convert("P"), Image.fromarray(255 - gradient(64, 64)).convert("P")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def cmyk_jpeg() -> bytes:
    film = gradient(96, 96)
    cmyk = np.stack([np.zeros_like(film), np.zeros_like(film), np.zeros_like(film), 255 - film], axis=-1)
    return jpeg_bytes(Image.fromarray(cmyk, mode="CMYK"), quality=90)


def zip_of(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


def dicom_bytes(
    *,
    rows: int = 64,
    columns: int = 64,
    frames: int = 1,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    pixel_bytes: bytes | None = None,
    with_pixels: bool = True,
    identifiers: bool = True,
    **elements: object,
) -> bytes:
    """A DICOM Part 10 file built from scratch (16-bit, explicit VR little endian), with fake identifiers."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["hostile", modality, str(rows), str(frames)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    if identifiers:
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.PatientBirthDate = PATIENT_BIRTH_DATE
        ds.AccessionNumber = ACCESSION_NUMBER
        ds.InstitutionName = "Hostile General Hospital"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = columns
    if frames != 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    if with_pixels:
        if pixel_bytes is None:
            film = (gradient(rows, columns).astype(np.uint16) * 16).astype("<u2")
            samples = int(ds.SamplesPerPixel)
            one = np.repeat(film[..., None], samples, axis=-1) if samples > 1 else film
            pixel_bytes = np.ascontiguousarray(np.stack([one] * frames)).tobytes()
        ds.PixelData = pixel_bytes
        ds["PixelData"].VR = "OW"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def bundled_dicom(name: str, **changes: object) -> bytes:
    """A DICOM file shipped inside pydicom itself (no download), with identifiers added."""
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"pydicom's bundled test file {name} is missing")
    ds = pydicom.dcmread(path)
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = PATIENT_BIRTH_DATE
    ds.AccessionNumber = ACCESSION_NUMBER
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def multipart_body(parts: list[tuple[str, str | None, bytes]], boundary: str = BOUNDARY, close: bool = True) -> bytes:
    """A hand-built multipart/form-data body from ``(field, filename or None, content)`` parts."""
    out = bytearray()
    for name, filename, content in parts:
        out += f"--{boundary}\r\n".encode()
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"Content-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + content + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return bytes(out)


# --- the corpus -----------------------------------------------------------------------------------


def build_corpus(max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> list[HostileCase]:
    """Every hostile case; ``max_upload_bytes`` is the server's limit (sizes the over-the-limit cases)."""
    multipart = f"multipart/form-data; boundary={BOUNDARY}"
    png = gray_png()
    jpeg = jpeg_bytes(Image.fromarray(gradient(128, 128)))
    dx = dicom_bytes()
    over = max_upload_bytes + 2 * 1024 * 1024
    s413, s415, s422 = frozenset({413}), frozenset({415}), frozenset({422})

    def refused(
        name: str, description: str, payload: bytes, statuses: frozenset[int], words: str, filename: str = "upload.bin"
    ) -> HostileCase:
        # File names and part Content-Types are the client's claims: named like images to show they are ignored.
        kind = {"png": "image/png", "jpg": "image/jpeg", "dcm": "application/dicom"}.get(filename.rsplit(".", 1)[-1])
        return HostileCase(
            name,
            description,
            EXPECT_4XX,
            payload=payload,
            filename=filename,
            file_content_type=kind or "application/octet-stream",
            statuses=statuses,
            detail_contains=words,
        )

    cases = [
        # --- not an image at all --------------------------------------------------------------------
        refused("empty-file", "zero bytes in the file field", b"", s422, "empty"),
        refused(
            "text-as-png", "plain text sent as chest.png", b"patient is fine, no image\n" * 8, s415, "text", "chest.png"
        ),
        refused(
            "html-as-jpeg",
            "an HTML error page saved as film.jpg",
            b"<!DOCTYPE html><html>404</html>",
            s415,
            "html",
            "film.jpg",
        ),
        refused("json-as-dicom", "a JSON document sent as study.dcm", b'{"image": "none"}', s415, "json", "study.dcm"),
        refused("zip-archive", "a ZIP archive holding a PNG", zip_of("chest.png", png), s415, "zip"),
        refused("gzip-archive", "a gzipped PNG", gzip.compress(png), s415, "gzip"),
        refused("pdf-document", "a PDF report", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj <<>> endobj\n", s415, "pdf"),
        refused("animated-gif", "an animated GIF (GIF is not read)", animated_gif(), s415, "gif"),
        refused("random-bytes", "64 KiB of random binary", np.random.default_rng(7).bytes(65536), s415, "png"),
        # --- damaged images ------------------------------------------------------------------------------
        refused("png-truncated-header", "a PNG cut inside its IHDR", png[:20], s422, "truncated"),
        refused("png-truncated-data", "a PNG cut inside its image data", png[: len(png) // 2], s422, "truncated"),
        refused(
            "png-bad-crc",
            "a PNG whose IHDR checksum is wrong",
            png[:29] + b"\x00\x00\x00\x00" + png[33:],
            s422,
            "checksum",
        ),
        refused("jpeg-truncated", "a JPEG cut before its first scan", jpeg[:100], s422, "truncated"),
        refused(
            "jpeg-cut-in-scan",
            "a JPEG cut inside its entropy-coded data",
            jpeg[: len(jpeg) * 2 // 3],
            s422,
            "truncated",
        ),
        refused("dicom-truncated-header", "a DICOM cut inside its header", dx[:200], s422, "cut short"),
        refused(
            "dicom-short-pixel-data",
            "DICOM whose pixel data is half what Rows x Columns needs",
            dicom_bytes(pixel_bytes=b"\x00" * 4096),
            s422,
            "truncated",
        ),
        refused(
            "dicom-no-pixel-data", "a DX header without Pixel Data", dicom_bytes(with_pixels=False), s422, "pixel data"
        ),
        refused("dicom-no-preamble", "a DICOM dataset without the Part 10 preamble", dx[132 + 200 :], s415, "dicom"),
        # --- decompression bombs and sizes -------------------------------------------------------------
        refused(
            "png-declares-100k-square",
            "a tiny PNG declaring 100000 x 100000 pixels",
            png_with_declared_size(100_000, 100_000),
            s413,
            "pixels",
        ),
        refused(
            "png-zlib-bomb",
            "a valid 100 KB PNG of 12000 x 12000 zeros (144 MB inflated)",
            png_zlib_bomb(),
            s413,
            "pixels",
        ),
        refused(
            "jpeg-declares-65535-square",
            "a JPEG whose SOF0 declares 65535 x 65535",
            jpeg_with_declared_size(65535, 65535),
            s413,
            "pixels",
        ),
        refused(
            "dicom-declares-huge",
            "DICOM with Rows = Columns = 65535 and 8 KB of pixels",
            dicom_bytes(rows=65535, columns=65535, pixel_bytes=b"\x00" * 8192),
            s413,
            "pixels",
        ),
        refused(
            "png-extreme-aspect",
            "a 4000 x 200 PNG: no radiograph is a strip",
            png_bytes(gradient(200, 4000)),
            s422,
            "aspect",
        ),
        refused(
            "png-1x1",
            "a 1 x 1 PNG: too small to be a radiograph",
            png_bytes(np.array([[128]], dtype=np.uint8)),
            s422,
            "pixels",
        ),
        refused(
            "png-ztxt-bomb",
            "a PNG whose zTXt chunk inflates to 64 MiB (Pillow's text cap refuses it)",
            png_ztxt_bomb(),
            s422,
            "too large",
        ),
        # --- decodable variants: accepted with what was assumed ------------------------------------------
        HostileCase(
            "png-16-bit",
            "a 16-bit grayscale PNG: the native format of exported films, read at full depth without a warning",
            EXPECT_200,
            payload=png_bytes(gradient(128, 128, np.uint16)),
        ),
        HostileCase(
            "png-16-bit-rgb",
            "a 16-bit RGB PNG: Pillow reduces it to 8 bits per channel, said in a warning",
            EXPECT_200_WARNING,
            payload=_png_rgb16(),
            warning_contains="16-bit colour",
        ),
        HostileCase(
            "png-animated",
            "an animated PNG: the first frame is read, with a warning",
            EXPECT_200_WARNING,
            payload=animated_png(),
            warning_contains="first frame",
        ),
        HostileCase(
            "jpeg-cmyk",
            "a CMYK JPEG (a print workflow export): converted to RGB then gray, with a warning",
            EXPECT_200_WARNING,
            payload=cmyk_jpeg(),
            warning_contains="CMYK",
        ),
        HostileCase(
            "dicom-rgb",
            "an RGB secondary-capture DICOM (pydicom's SC_rgb.dcm): gray by luminance, with a warning",
            EXPECT_200_WARNING,
            payload=bundled_dicom("SC_rgb.dcm"),
            warning_contains="colour",
        ),
        HostileCase(
            "dicom-invalid-window",
            "a DX whose Window Width is 0: the window is ignored, the full range used, with a warning",
            EXPECT_200_WARNING,
            payload=dicom_bytes(WindowCenter=2048, WindowWidth=0),
            warning_contains="window",
        ),
        refused(
            "dicom-multiframe",
            "a 3-frame DX (tomosynthesis-like): one radiograph is expected",
            dicom_bytes(frames=3),
            s422,
            "frames",
        ),
        refused(
            "dicom-ct",
            "a CT slice (pydicom's CT_small.dcm) instead of a radiograph",
            bundled_dicom("CT_small.dcm"),
            s422,
            "computed tomography",
        ),
        refused(
            "dicom-mr-multiframe",
            "a 10-frame MR (pydicom's emri_small.dcm)",
            bundled_dicom("emri_small.dcm"),
            s422,
            "magnetic resonance",
        ),
        refused(
            "dicom-palette", "a DX claiming PALETTE COLOR", dicom_bytes(photometric="PALETTE COLOR"), s415, "palette"
        ),
        # --- malformed requests --------------------------------------------------------------------------
        HostileCase(
            "missing-file-field",
            "a multipart form with only a text field",
            EXPECT_4XX,
            raw_body=multipart_body([("note", None, b"hello")]),
            content_type=multipart,
            statuses=s422,
            detail_contains="'file'",
        ),
        HostileCase(
            "wrong-field-name",
            "the image sent in the field 'image' instead of 'file'",
            EXPECT_4XX,
            payload=png,
            field="image",
            statuses=s422,
            detail_contains="'file'",
        ),
        HostileCase(
            "file-field-as-text",
            "'file' sent as a plain form field (no filename), not as a file",
            EXPECT_4XX,
            raw_body=multipart_body([("file", None, b"not a file")]),
            content_type=multipart,
            statuses=s422,
            detail_contains="file",
        ),
        HostileCase(
            "multipart-no-boundary",
            "Content-Type multipart/form-data without a boundary parameter",
            EXPECT_4XX,
            raw_body=multipart_body([("file", "a.png", png)]),
            content_type="multipart/form-data",
            statuses=frozenset({400, 422}),
            detail_contains="multipart/form-data",
        ),
        HostileCase(
            "multipart-unterminated",
            "a multipart body that never closes its boundary",
            EXPECT_4XX,
            raw_body=multipart_body([("file", "a.png", png)], close=False),
            content_type=multipart,
            statuses=frozenset({400, 422}),
            detail_contains="multipart/form-data",
        ),
        HostileCase(
            "multipart-garbage",
            "a multipart Content-Type over random bytes",
            EXPECT_4XX,
            raw_body=np.random.default_rng(11).bytes(4096),
            content_type=multipart,
            statuses=frozenset({400, 422}),
            detail_contains="multipart/form-data",
        ),
        HostileCase(
            "raw-png-body",
            "the PNG sent as the raw body (Content-Type image/png) instead of a form: a supported upload",
            EXPECT_200,
            raw_body=png,
            content_type="image/png",
        ),
        HostileCase(
            "raw-body-claims-png-holds-text",
            "a raw body whose Content-Type says image/png but whose bytes are text",
            EXPECT_4XX,
            raw_body=b"this is not an image at all, whatever the header says",
            content_type="image/png",
            statuses=s415,
            detail_contains="PNG",
        ),
        HostileCase(
            "json-body",
            "a JSON body with a base64 image",
            EXPECT_4XX,
            raw_body=json.dumps({"file": "iVBORw0KGgo="}).encode(),
            content_type="application/json",
            statuses=s415,
            detail_contains="multipart/form-data",
        ),
        HostileCase(
            "too-many-form-fields",
            "5000 tiny form fields (a parser-exhaustion attempt)",
            EXPECT_4XX,
            raw_body=multipart_body([(f"f{i}", None, b"x") for i in range(5000)] + [("file", "a.png", png)]),
            content_type=multipart,
            statuses=frozenset({400, 413, 422}),
            detail_contains="fields",
        ),
        HostileCase(
            "repeated-file-parts",
            "999 junk 'file' parts before a real one (which would be scored, if any?)",
            EXPECT_4XX,
            raw_body=multipart_body([("file", f"junk{i}.png", b"junk") for i in range(999)] + [("file", "a.png", png)]),
            content_type=multipart,
            statuses=frozenset({400}),
            detail_contains="more than one field named 'file'",
        ),
        HostileCase(
            "two-file-parts-preview",
            "two radiographs in the field 'file' of the preview",
            EXPECT_4XX,
            path="/v1/preview",
            raw_body=multipart_body([("file", "a.png", png), ("file", "b.png", png)]),
            content_type=multipart,
            statuses=frozenset({400}),
            detail_contains="more than one field named 'file'",
        ),
        HostileCase(
            "huge-part-header",
            "a part whose Content-Disposition filename is 200 KB long",
            EXPECT_4XX,
            raw_body=multipart_body([("file", "x" * 200_000 + ".png", png)]),
            content_type=multipart,
            statuses=frozenset({400, 413, 422}),
            detail_contains="multipart/form-data",
        ),
        HostileCase(
            "bad-query-parameters",
            "mc_samples=abc and cams naming a finding that does not exist",
            EXPECT_4XX,
            payload=png,
            params=(("mc_samples", "abc"), ("cams", "Broken Heart")),
            statuses=s422,
            detail_contains="mc_samples",
        ),
        HostileCase(
            "oversized-declared",
            "a body over the limit sent at once with its Content-Length",
            EXPECT_4XX,
            payload=b"\x89PNG\r\n\x1a\n" + b"\x00" * over,
            statuses=s413,
            detail_contains="limit",
        ),
        HostileCase(
            "oversized-slow-chunked",
            "a body over the limit trickled in 256 KiB chunks without Content-Length",
            EXPECT_4XX,
            slow_total_bytes=over,
            statuses=s413,
            detail_contains="limit",
        ),
        HostileCase(
            "batch-no-files",
            "a batch request whose form has no 'files'",
            EXPECT_4XX,
            path="/v1/predict/batch",
            raw_body=multipart_body([("note", None, b"x")]),
            content_type=multipart,
            statuses=s422,
            detail_contains="'files'",
        ),
        HostileCase(
            "preview-html",
            "an HTML page sent to /v1/preview",
            EXPECT_4XX,
            path="/v1/preview",
            payload=b"<html><script>alert(1)</script></html>",
            params=(),
            statuses=s415,
            detail_contains="html",
        ),
        HostileCase(
            "preview-bomb",
            "a decompression bomb sent to /v1/preview",
            EXPECT_4XX,
            path="/v1/preview",
            payload=png_with_declared_size(100_000, 100_000),
            params=(),
            statuses=s413,
            detail_contains="pixels",
        ),
    ]
    names = [case.name for case in cases]
    if len(set(names)) != len(names):
        raise ValueError("hostile case names must be unique")
    return cases


def _png_rgb16() -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    height, width = 64, 64
    film = gradient(height, width, np.uint16)
    rgb = np.stack([film, film // 2, film], axis=-1).astype(">u2")
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


# --- sending and judging --------------------------------------------------------------------------


async def _slow_body(case: HostileCase, sent: list[int]) -> AsyncIterator[bytes]:
    """The slow case's body: multipart framing around ``slow_total_bytes`` of data, chunk by chunk."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{case.field}"; filename="{case.filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    yield head
    sent[0] += len(head)
    chunk = b"\x89PNG\r\n\x1a\n" + b"\x00" * (case.slow_chunk_bytes - 8)
    remaining = case.slow_total_bytes
    while remaining > 0:
        piece = chunk[: min(remaining, len(chunk))]
        yield piece
        sent[0] += len(piece)
        remaining -= len(piece)
        await asyncio.sleep(case.slow_delay_s)
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    yield tail
    sent[0] += len(tail)


async def send_case(client: httpx.AsyncClient, case: HostileCase) -> httpx.Response:
    """Send one case with ``client`` (its ``base_url`` is the server); raises TimeoutError on a hang.

    For the slow case the response's ``extensions["hostile_bytes_sent"]`` holds how many body bytes
    the client had sent when the answer came (less than the body: the server answered early).
    """
    params = list(case.params)
    request: Callable[[], object]
    sent = [0]
    if case.slow_total_bytes:
        headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        request = lambda: client.post(case.path, content=_slow_body(case, sent), headers=headers, params=params)  # noqa: E731
    elif case.raw_body is not None:
        headers = {"Content-Type": case.content_type or "application/octet-stream"}
        request = lambda: client.post(case.path, content=case.raw_body, headers=headers, params=params)  # noqa: E731
    else:
        files = [(case.field, (case.filename, case.payload, case.file_content_type))]
        request = lambda: client.post(case.path, files=files, params=params)  # noqa: E731
    response = await asyncio.wait_for(request(), timeout=CASE_TIMEOUT_S)  # type: ignore[arg-type]
    assert isinstance(response, httpx.Response)
    if case.slow_total_bytes:
        response.extensions = {**response.extensions, "hostile_bytes_sent": sent[0]}
    return response


def check_response(case: HostileCase, response: httpx.Response) -> str | None:
    """None when ``response`` is an acceptable answer to ``case``, else the reason it is not."""
    status = response.status_code
    if status >= 500:
        return f"server error {status}: {response.text[:300]}"
    if case.expect == EXPECT_4XX:
        return _check_problem(case, response)
    if status != 200:
        return f"expected 200 ({case.expect}), got {status}: {response.text[:300]}"
    if case.path == "/v1/preview":
        return None if response.headers.get("content-type") == "image/png" else "preview is not a PNG"
    try:
        body = response.json()
    except ValueError:
        return f"200 but not JSON: {response.text[:200]!r}"
    image = body.get("image") if isinstance(body, dict) else None
    if not isinstance(image, dict) or not isinstance(image.get("warnings"), list):
        return f"200 without image.warnings: {response.text[:300]}"
    if case.expect == EXPECT_200_WARNING:
        wanted = case.warning_contains.lower()
        if not any(wanted in str(w).lower() for w in image["warnings"]):
            return f"expected a warning containing {case.warning_contains!r}, got {image['warnings']}"
    return None


def _check_problem(case: HostileCase, response: httpx.Response) -> str | None:
    status = response.status_code
    if status not in case.statuses:
        return f"expected {sorted(case.statuses)}, got {status}: {response.text[:300]}"
    if not response.headers.get("content-type", "").startswith("application/problem+json"):
        return f"{status} is not application/problem+json but {response.headers.get('content-type')!r}"
    try:
        problem = response.json()
    except ValueError:
        return f"{status} body is not JSON: {response.text[:200]!r}"
    if not isinstance(problem, dict):
        return f"problem body is not an object: {problem!r}"
    missing = [key for key in ("type", "title", "status", "detail", "request_id") if not problem.get(key)]
    if missing:
        return f"problem lacks {missing}: {problem}"
    if problem["status"] != status:
        return f"problem status {problem['status']} differs from HTTP status {status}"
    detail = str(problem["detail"])
    if len(detail) < 20:
        return f"problem detail too terse to act on: {detail!r}"
    if case.detail_contains.lower() not in detail.lower():
        return f"problem detail does not mention {case.detail_contains!r}: {detail!r}"
    return None
