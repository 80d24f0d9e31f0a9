"""Grad-CAM heatmaps as DICOM Secondary Capture images: valid, in the source's study, placed where the map is."""

from __future__ import annotations

import base64
import io
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pydicom
import pytest

from bayesnet import decode_image
from service.dicom import (
    HEATMAP_SERIES_NUMBER,
    build_heatmaps,
    dicom_source,
    heatmap_answers,
    heatmaps_for_upload,
    sr_answer,
)
from service.dicom.heatmaps import MAX_SIDE_PX, heatmap_intensity, hot_spots, place_on_film
from service.dicom.sr import SR_SERIES_NUMBER, checked_source, read_sr_findings
from service.runtime.heatmap_png import heatmap_png
from service.schemas import (
    FindingPrediction,
    Heatmap,
    ImageInfo,
    ModelRef,
    PredictionResponse,
    Referral,
    Timing,
)
from tests.dicom.dicom_files import OPERATOR, PATIENT_ID, PATIENT_NAME, chest_cr, dciodvfy_errors

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def heatmap(intensity: np.ndarray) -> Heatmap:
    return Heatmap(
        png_base64=base64.b64encode(heatmap_png(intensity)).decode("ascii"),
        width=intensity.shape[1],
        height=intensity.shape[0],
    )


def corner_map(size: int = 64, level: float = 0.8) -> np.ndarray:
    """A map hot in its top-left quarter, cold elsewhere."""
    intensity = np.zeros((size, size), dtype=np.float32)
    intensity[: size // 4, : size // 4] = level
    return intensity


def result_with(gradcam: dict[str, Heatmap]) -> PredictionResponse:
    finding = FindingPrediction(
        conf=0.81,
        uncertainty=0.01,
        std=0.1,
        interval=(0.6, 0.9),
        mutual_information=0.01,
        decision="positive",
        threshold=0.5,
        mc_standard_error=0.023,
        clear_below=None,
        positive_at=0.7,
        decided_on="conf",
        reason="above_positive_threshold",
    )
    return PredictionResponse(
        request_id="req-1",
        model=ModelRef(name="tiny-dicom-model", version="2.0.1", sha256="ab" * 32),
        mc_samples=8,
        mc_seed="00000000000000ff",
        predictions={"Cardiomegaly": finding, "Edema": finding},
        decisions_withheld=[],
        uncertain=False,
        referral=Referral(refer=True, reasons=["possible_finding"]),
        gradcam=gradcam,
        image=ImageInfo(format="dicom", width=1841, height=1955, photometric="MONOCHROME1", warnings=[]),
        timing_ms=Timing(queue=0.0, inference=0.0, total=0.0),
    )


def test_each_heatmap_is_a_valid_secondary_capture_in_the_source_study_placed_where_the_map_is_hot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    upload = chest_cr()
    source = dicom_source(upload)
    film = decode_image(upload).pixels
    result = result_with({"Cardiomegaly": heatmap(corner_map()), "Edema": heatmap(corner_map(level=0.5))})
    with caplog.at_level(logging.DEBUG):
        answers = heatmap_answers(source, film, result, resize="squash", created=NOW)
    assert len(answers) == 2
    for record in caplog.records:
        assert PATIENT_NAME not in record.getMessage() and PATIENT_ID not in record.getMessage()

    images = [pydicom.dcmread(io.BytesIO(data)) for data in answers]
    for number, (data, image) in enumerate(zip(answers, images, strict=True), start=1):
        assert dciodvfy_errors(data, tmp_path) == []
        assert image.SOPClassUID == SECONDARY_CAPTURE
        # Same study, a new series of its own (not the source's, not the SR's), one instance per finding.
        assert image.StudyInstanceUID == source.StudyInstanceUID
        assert image.SeriesInstanceUID != source.SeriesInstanceUID
        assert image.SeriesInstanceUID == images[0].SeriesInstanceUID
        assert image.SeriesNumber == HEATMAP_SERIES_NUMBER != SR_SERIES_NUMBER
        assert image.InstanceNumber == number
        # The patient and study attributes of the source, so the PACS files it there; nothing else.
        assert (str(image.PatientName), image.PatientID) == (PATIENT_NAME, PATIENT_ID)
        assert image.AccessionNumber == source.AccessionNumber
        assert "OperatorsName" not in image and OPERATOR.encode() not in data
        # The source is referenced; the colour is burned in and the image says what it is.
        (reference,) = image.SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
        assert image.BurnedInAnnotation == "YES"  # the film does not say, so its pixels may identify the patient
        assert list(image.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert "not for diagnosis" in image.SeriesDescription
        assert "not for diagnosis" in image.ImageComments and "Grad-CAM" in image.DerivationDescription
        assert image.PhotometricInterpretation == "RGB" and image.SamplesPerPixel == 3
        assert max(image.Rows, image.Columns) <= MAX_SIDE_PX + 200  # film at most 1024 px, plus the caption
    assert "Cardiomegaly" in images[0].ImageComments and "Edema" in images[1].ImageComments

    # The film fills the image's columns at its aspect ratio (1955 x 1841 -> 1024 x 964), the caption below it.
    pixels = images[0].pixel_array.astype(int)
    film_rows, columns = 1024, 964
    assert images[0].Columns == columns and images[0].Rows > film_rows
    hot = pixels[film_rows // 16, columns // 16]  # inside the top-left quarter, where the map is hot
    cold = pixels[film_rows * 3 // 4, columns * 3 // 4]  # where it is cold: the film, in gray
    assert hot[0] - hot[2] > 100, hot  # red-to-yellow over the film
    assert abs(cold[0] - cold[2]) <= 2 and abs(cold[0] - cold[1]) <= 2, cold
    # A weaker map is a more transparent colour.
    weaker = images[1].pixel_array.astype(int)[film_rows // 16, columns // 16]
    assert 0 < weaker[0] - weaker[2] < hot[0] - hot[2]


def test_burned_in_annotation_follows_the_film_whose_pixels_it_shows() -> None:
    result = result_with({"Cardiomegaly": heatmap(corner_map())})
    for film_says, image_says in (("NO", "NO"), ("YES", "YES"), (None, "YES")):  # unknown: assume it may identify
        upload = chest_cr() if film_says is None else chest_cr(BurnedInAnnotation=film_says)
        (image,) = build_heatmaps(
            dicom_source(upload), decode_image(upload).pixels, result, resize="squash", created=NOW
        )
        assert image.BurnedInAnnotation == image_says


def test_the_heatmap_is_placed_as_the_model_saw_the_film() -> None:
    # A 100 x 50 film: letterboxed into the square, it sits between two pads of 25 columns (16 of 64 map columns).
    intensity = np.zeros((64, 64), dtype=np.float32)
    intensity[:, :16] = 1.0  # hot over the left pad only
    letterbox = place_on_film(intensity, (100, 50), (100, 50), "letterbox")
    squash = place_on_film(intensity, (100, 50), (100, 50), "squash")
    assert letterbox.shape == squash.shape == (100, 50)
    assert letterbox[:, 2:].max() < 0.05  # the pad is cropped off: nothing lies on the film
    assert squash[:, :10].min() > 0.95 and squash[:, 16:].max() < 0.05  # stretched: the left quarter of the film


def test_the_map_is_read_back_from_the_png_exactly() -> None:
    levels = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) % 256 / 255.0
    assert np.array_equal(np.round(heatmap_intensity(heatmap(levels)) * 255), np.round(levels * 255))


def test_no_heatmap_no_image_and_no_decoding() -> None:
    upload = chest_cr()
    source = dicom_source(upload)
    result = result_with({})
    assert build_heatmaps(source, decode_image(upload).pixels, result, resize="squash", created=NOW) == []
    # Without heatmaps the film is not even decoded (these bytes would not decode).
    assert heatmaps_for_upload(b"not a film", source, result, resize="squash", max_pixels=10**8, created=NOW) == []


def test_the_sr_lists_its_heatmap_images_beside_the_source_and_stays_valid(tmp_path: Path) -> None:
    upload = chest_cr()
    source = dicom_source(upload)
    result = result_with({"Cardiomegaly": heatmap(corner_map())})
    images = build_heatmaps(source, decode_image(upload).pixels, result, resize="squash", created=NOW)
    answer = sr_answer(source, result, NOW, images)
    assert dciodvfy_errors(answer, tmp_path) == []
    assert evidence_uids(pydicom.dcmread(io.BytesIO(answer))) == {source.SOPInstanceUID, images[0].SOPInstanceUID}


def evidence_uids(sr: pydicom.Dataset) -> set[str]:
    """The SOP Instance UIDs an SR lists as evidence of the current procedure."""
    return {
        str(instance.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }


def test_a_hot_spot_is_where_the_map_peaks_on_the_films_pixel_matrix() -> None:
    """``hot_spots`` gives (column, row) in the film's pixels: the inverse of how the model's square covered it."""
    intensity = np.zeros((64, 64), dtype=np.float32)
    intensity[8, 48] = 1.0  # one hot cell: map row 8, column 48
    result = result_with({"Cardiomegaly": heatmap(intensity)})
    (column, row) = hot_spots(result, (2000, 1000), "squash")["Cardiomegaly"]
    assert abs(column - (48.5 / 64) * 1000) < 1000 / 64 and abs(row - (8.5 / 64) * 2000) < 2000 / 64
    # Letterboxed, the 1000-column film sat in the middle half of the square's width: map column 48 is its 3/4 mark
    # of the square, which is column 1000 * (48.5/64 - 1/4) * 2 of the film.
    (column, row) = hot_spots(result, (2000, 1000), "letterbox")["Cardiomegaly"]
    assert abs(column - 1000 * (48.5 / 64 - 0.25) * 2) < 2 * 1000 / 64 and abs(row - (8.5 / 64) * 2000) < 2000 / 64
    assert hot_spots(result_with({}), (2000, 1000), "squash") == {}


def _root_items(sr: pydicom.Dataset) -> dict[str, pydicom.Dataset]:
    return {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in sr.ContentSequence}


def test_findings_with_a_heatmap_get_a_point_region_on_the_source_image_and_the_sr_stays_valid(tmp_path: Path) -> None:
    """A viewer that shows SR content as image annotations (OHIF) needs a region: the findings with a heatmap get
    a planar ROI group (TID 1410) whose SCOORD POINT references the source image, and every group under "Imaging
    Measurements" has one (OHIF fails on a group without). The other findings and the referral are report-level
    qualitative evaluations; every finding still reads back with its decision and MC numbers."""
    upload = chest_cr()
    source = dicom_source(upload)
    result = result_with({"Cardiomegaly": heatmap(corner_map())})
    spots = hot_spots(result, (int(source.Rows), int(source.Columns)), "squash")
    answer = sr_answer(source, result, NOW, [], spots)
    assert dciodvfy_errors(answer, tmp_path) == []
    sr = pydicom.dcmread(io.BytesIO(answer))
    root = _root_items(sr)
    regions = {}
    for group in root["Imaging Measurements"].ContentSequence:
        name = next(c.TextValue for c in group.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == "112039")
        regions[name] = [c for c in group.ContentSequence if c.ValueType == "SCOORD"]
    assert list(regions) == ["Cardiomegaly"]
    (point,) = regions["Cardiomegaly"]
    assert point.GraphicType == "POINT" and point.RelationshipType == "CONTAINS"
    column, row = (float(v) for v in point.GraphicData)
    assert (column, row) == pytest.approx(spots["Cardiomegaly"], abs=0.01)
    assert 0 <= column <= source.Columns / 4 + 1 and 0 <= row <= source.Rows / 4 + 1  # the corner map's hot quarter
    assert point.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    evaluations = root["Qualitative Evaluations"]
    assert evaluations.ConceptNameCodeSequence[0].CodingSchemeDesignator == "UMLS"
    coded = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in evaluations.ContentSequence}
    assert "Pulmonary edema" in coded and "Cardiomegaly" not in coded and "Refer to a radiologist" in coded
    edema = coded["Pulmonary edema"]
    assert edema.ValueType == "CODE" and edema.ConceptCodeSequence[0].CodeMeaning == "Present"
    assert {c.ValueType for c in edema.ContentSequence} == {"NUM", "CODE"}  # MC numbers and the decision reason
    findings, _, _ = read_sr_findings(sr)
    assert set(findings) == {"Cardiomegaly", "Edema"} and findings["Cardiomegaly"].conf == pytest.approx(0.81)
    assert findings["Edema"].decision == "positive" and findings["Edema"].positive_at == pytest.approx(0.7)


def test_an_sr_without_regions_has_no_empty_measurements_container(tmp_path: Path) -> None:
    """No heatmap, no region: the report carries its findings and referral as qualitative evaluations only (TID
    1500 allows that container alone) and stays valid and readable."""
    source = dicom_source(chest_cr())
    answer = sr_answer(source, result_with({}), NOW)
    assert dciodvfy_errors(answer, tmp_path) == []
    sr = pydicom.dcmread(io.BytesIO(answer))
    assert "Imaging Measurements" not in _root_items(sr) and "Qualitative Evaluations" in _root_items(sr)
    findings, refer, reasons = read_sr_findings(sr)
    assert set(findings) == {"Cardiomegaly", "Edema"} and isinstance(refer, bool) and reasons


def test_a_zero_pixel_spacing_is_not_copied_and_valid_numbers_are(tmp_path: Path) -> None:
    """RG1's header says Pixel Spacing 0.000\\0.000, which makes viewers show the film black: the header the derived
    objects copy from leaves it out. A valid spacing and the patient's numeric values (DS) are kept as sent."""
    assert "PixelSpacing" not in dicom_source(chest_cr())
    with pytest.warns(UserWarning, match="Invalid value for VR AS"):  # pydicom's own check, as a sender's would be
        film = chest_cr(PatientAge="62")
    _, warnings = checked_source(film)
    assert warnings == [
        "DICOM header: PatientAge is not valid for its value representation; the AI result objects leave it out",
        "DICOM header: PixelSpacing is zero or negative; the AI result objects leave it out",
    ]
    kept = dicom_source(chest_cr(PixelSpacing=[0.143, 0.143], PatientWeight="72.5"))
    assert [float(v) for v in kept.PixelSpacing] == [0.143, 0.143] and float(kept.PatientWeight) == 72.5
    assert "ImagerPixelSpacing" not in dicom_source(chest_cr(ImagerPixelSpacing=[0.1, -0.1]))
    answer = sr_answer(kept, result_with({}), NOW)
    assert dciodvfy_errors(answer, tmp_path) == []
    assert float(pydicom.dcmread(io.BytesIO(answer)).PatientWeight) == 72.5  # the patient study module, copied
