"""The result page (``service.dicom.summary``): what it says, what it shows, and that it is a valid DICOM image."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest

from bayesnet import decode_image
from service.dicom.heatmaps import build_heatmaps
from service.dicom.sr import dicom_source, sr_bytes
from service.dicom.summary import PAGE_SIZE, SUMMARY_SERIES_NUMBER, build_summary, page_text
from service.schemas import Referral
from service.wording import DISCLAIMER, WITHHELD_WORDS
from tests.dicom.dicom_files import PATIENT_ID, PATIENT_NAME, chest_cr, dciodvfy_errors
from tests.dicom.test_heatmaps import NOW, corner_map, heatmap, result_with

GUARANTEE = "Of films that have a finding, at most 10% are reported negative for it (a test sentence)."


def _words(result, guarantee=GUARANTEE) -> str:  # type: ignore[no-untyped-def]
    return "\n".join(
        " ".join(filter(None, [b.text, *(text for _, text in b.cells)]))
        for b in page_text(result, guarantee=guarantee, created=NOW)
    )


def _orange(pixels: np.ndarray) -> np.ndarray:
    red, green, blue = (pixels[..., i].astype(int) for i in range(3))
    return (red > 230) & (green > 110) & (green < 170) & (blue < 90)


def _green(pixels: np.ndarray) -> np.ndarray:
    red, green, blue = (pixels[..., i].astype(int) for i in range(3))
    return (green > 180) & (red < 140) & (blue < 150)


def test_a_referred_film_s_page_says_why_the_guarantee_and_every_finding_and_shows_its_heatmaps(
    tmp_path: Path,
) -> None:
    upload = chest_cr()
    source = dicom_source(upload)
    result = result_with({"Cardiomegaly": heatmap(corner_map())})
    words = _words(result)
    assert "Refer to a radiologist" in words and "a finding decided positive" in words
    assert GUARANTEE in words and DISCLAIMER in words
    for label, prediction in result.predictions.items():
        low, high = prediction.interval
        assert any(
            line.startswith(label)
            and "POSITIVE" in line
            and f"{prediction.conf:.2f}  ({low:.2f} to {high:.2f})" in line
            for line in words.splitlines()
        )
    assert result.model.version in words and result.model.sha256[:16] in words
    assert PATIENT_NAME.split("^")[0] not in words and PATIENT_ID not in words  # no identifier in the pixels

    pixels = decode_image(upload, max_pixels=50_000_000).pixels
    heatmaps = build_heatmaps(source, pixels, result, resize="squash", created=NOW)
    page = build_summary(source, result, guarantee=GUARANTEE, heatmaps=heatmaps, created=NOW)
    assert dciodvfy_errors(sr_bytes(page), tmp_path) == []
    assert (page.Columns, page.Rows) == PAGE_SIZE and page.SeriesNumber == SUMMARY_SERIES_NUMBER
    assert page.StudyInstanceUID == source.StudyInstanceUID and page.PatientID == source.PatientID
    assert page.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert page.BurnedInAnnotation == "YES"  # the film's pixels are in it, and the film does not say they are clean
    rgb = np.asarray(page.pixel_array)
    left, right = rgb[:, : PAGE_SIZE[0] // 2], rgb[:, PAGE_SIZE[0] * 3 // 5 :]
    assert _orange(left).sum() > 200  # "Refer to a radiologist" in the referral colour
    assert (right.mean(axis=-1) > 60).mean() > 0.2  # the film under the heatmap fills the right-hand panel
    assert (right[..., 0].astype(int) - right[..., 2]).max() > 100  # with the map's colour on it
    read_back = pydicom.dcmread(io.BytesIO(sr_bytes(page)))
    assert "not for diagnosis" in read_back.ImageComments


def test_a_cleared_film_s_page_says_so_in_its_own_colour_and_without_heatmaps_names_no_film_pixels(
    tmp_path: Path,
) -> None:
    source = dicom_source(chest_cr())
    base = result_with({})
    negative = {
        label: p.model_copy(update={"decision": "negative", "conf": 0.02, "reason": "cleared"})
        for label, p in base.predictions.items()
    }
    result = base.model_copy(update={"predictions": negative, "referral": Referral(refer=False, reasons=[])})
    words = _words(result, guarantee=None)
    assert "Cleared as normal by the referral rule" in words and "Refer to" not in words
    assert "No referral rule is fitted" in words
    page = build_summary(source, result, guarantee=None, heatmaps=[], created=NOW)
    assert dciodvfy_errors(sr_bytes(page), tmp_path) == []
    assert page.BurnedInAnnotation == "NO"  # text only: nothing from the film
    rgb = np.asarray(page.pixel_array)
    assert _green(rgb).sum() > 200 and _orange(rgb).sum() < 50
    assert (rgb[:, PAGE_SIZE[0] * 3 // 4 :].mean(axis=-1) > 60).mean() < 0.05  # no panel: only text reaches there


def test_a_withheld_film_s_page_lists_no_finding_and_says_why() -> None:
    result = result_with({}).model_copy(
        update={
            "decisions_withheld": ["outside_intended_population"],
            "referral": Referral(refer=True, reasons=["outside_intended_population"]),
        }
    )
    words = _words(result)
    assert f"No findings are reported because {WITHHELD_WORDS['outside_intended_population']}." in words
    assert "Cardiomegaly" not in words and "Probability" not in words


@pytest.mark.parametrize("decisions", [("uncertain", "positive", "positive"), ("positive", "uncertain", "negative")])
def test_the_key_heatmaps_are_the_positive_findings_first_then_the_uncertain(decisions: tuple[str, ...]) -> None:
    from service.dicom.summary import KEY_HEATMAPS, _key_heatmaps

    labels = ["Cardiomegaly", "Edema", "Pneumonia"]
    base = result_with({})
    finding = base.predictions["Cardiomegaly"]
    predictions = {
        label: finding.model_copy(update={"decision": decision, "conf": 0.5 + i / 10})
        for i, (label, decision) in enumerate(zip(labels, decisions, strict=True))
    }
    result = base.model_copy(
        update={"predictions": predictions, "gradcam": {label: heatmap(corner_map()) for label in labels}}
    )
    stand_ins = [type("Image", (), {"pixel_array": np.full((2, 2, 3), i, np.uint8)})() for i in range(3)]
    chosen = [int(pixels[0, 0, 0]) for pixels in _key_heatmaps(result, stand_ins)]  # type: ignore[arg-type]
    ranked = sorted(range(3), key=lambda i: ({"positive": 0, "uncertain": 1, "negative": 2}[decisions[i]], -i))
    assert chosen == ranked[:KEY_HEATMAPS]
