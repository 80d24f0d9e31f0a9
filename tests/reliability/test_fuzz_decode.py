"""Property: for any bytes, ``bayesnet.decode_image`` returns a valid image or raises ``bayesnet.ImageError``.

Random bytes alone almost never get past the format sniffing, so most examples mutate real seeds (a PNG,
a 16-bit PNG, a JPEG, a DICOM): bit flips, overwritten runs, truncations, insertions and splices reach
the header parsers and the pixel decoders. The profile is derandomized and database-less so CI runs the
same examples every time, and small enough to take seconds.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bayesnet import DecodedImage, ImageError, decode_image
from tests.reliability.hostile_corpus import dicom_bytes, gradient, jpeg_bytes, png_bytes

# Small enough that a mutated header declaring a big image is refused instead of decoded for seconds.
MAX_PIXELS = 1_000_000

SEEDS = {
    "png": png_bytes(gradient(48, 40)),
    "png16": png_bytes(gradient(40, 48, np.uint16)),
    "jpeg": jpeg_bytes(Image.fromarray(gradient(48, 48)), quality=80),
    "dicom": dicom_bytes(rows=32, columns=40, identifiers=False, WindowCenter=2048, WindowWidth=4096),
}

PROFILE = settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def assert_decodes_or_refuses(data: bytes) -> None:
    image: DecodedImage | None = None
    refusal: ImageError | None = None
    try:
        image = decode_image(data, max_pixels=MAX_PIXELS)
    except ImageError as err:
        refusal = err
    if refusal is not None:
        assert str(refusal), "an ImageError must carry a message a person can act on"
        return
    assert image is not None
    assert image.pixels.dtype == np.float32
    assert image.pixels.shape == (image.height, image.width)
    assert np.isfinite(image.pixels).all()
    assert float(image.pixels.min()) >= 0.0 and float(image.pixels.max()) <= 1.0


@st.composite
def mutated_seed(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    # Mostly behind the magic bytes (the DICOM preamble + "DICM" is 132), so the parsers see the damage.
    keep = 0 if draw(st.integers(0, 9)) == 0 else (132 if name == "dicom" else 8)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "delete", "splice"]))
        at = draw(st.integers(min(keep, len(data)), max(min(keep, len(data)), len(data) - 1)))
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            patch = draw(st.sampled_from([b"\xff", b"\x00\x00", b"\xff\xff\xff\xff", b"\x7f\xff", b"\x80\x00\x00\x00"]))
            data[at : at + len(patch)] = patch
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        else:
            other = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
            data[at:] = other[draw(st.integers(0, len(other))) :]
    return bytes(data)


@PROFILE
@given(mutated_seed())
def test_mutated_real_files_decode_or_raise_image_error(data: bytes) -> None:
    assert_decodes_or_refuses(data)


@settings(PROFILE, max_examples=300)
@given(
    st.one_of(
        st.binary(max_size=2048),
        # Valid magic followed by noise: the parsers themselves, not only the sniffing.
        st.builds(lambda tail: b"\x89PNG\r\n\x1a\n" + tail, st.binary(max_size=512)),
        st.builds(lambda tail: b"\xff\xd8\xff" + tail, st.binary(max_size=512)),
        st.builds(
            lambda pre, tail: pre + b"DICM" + tail, st.binary(min_size=128, max_size=128), st.binary(max_size=512)
        ),
    )
)
def test_random_bytes_decode_or_raise_image_error(data: bytes) -> None:
    assert_decodes_or_refuses(data)


def test_the_seeds_themselves_decode() -> None:
    """The mutations start from files that are valid, so the property is not vacuously about garbage."""
    for name, data in SEEDS.items():
        image = decode_image(data, max_pixels=MAX_PIXELS)
        assert image.format == ("png" if name.startswith("png") else name), name
