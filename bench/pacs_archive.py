"""A small PACS archive to score: radiographs wrapped as DICOM with chosen headers, loaded into an Orthanc.

Used by ``tests/service/test_archive_dicomweb.py`` and (later) ``bench/archive_scorer.py``'s DICOMweb path. The
films: PNGs of the NIH sample (``../shared/data``) wrapped as CR or DX instances in several transfer syntaxes, the
real SIIM CR (JPEG baseline) and RG1 (pydicom-data), and instances the archive scorer must skip or never see:
lateral views, another body part, a child, a multi-frame instance, a CT. Nothing here identifies a person.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from bayesnet.imaging.decoded import POPULATION_LATERAL, POPULATION_NON_CHEST, POPULATION_PAEDIATRIC
from service.archive.dicomweb import MULTI_FRAME

CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")


@dataclass(frozen=True)
class Film:
    """One instance for the archive and what the scorer should make of it (None: scored; else the skip reason;
    ``"not_listed"``: the query does not name it)."""

    data: bytes
    expected: str | None
    name: str


def dicom_from_image(
    pixels: np.ndarray,
    *,
    study_uid: str,
    modality: str = "CR",
    view: str | None = "PA",
    body_part: str | None = "CHEST",
    age: str | None = "045Y",
    syntax: UID = ExplicitVRLittleEndian,
    frames: int = 1,
    accession: str = "",
    study_date: str = "20261101",
) -> bytes:
    """A CR or DX instance holding ``pixels`` (8-bit greyscale, repeated ``frames`` times) with these header values."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = DX_STORAGE if modality == "DX" else CR_STORAGE
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.StudyDate, ds.AccessionNumber = modality, study_date, accession
    ds.PatientName, ds.PatientID = "Synthetic^Archive", "ARCHIVE-TEST"
    for keyword, value in (("ViewPosition", view), ("BodyPartExamined", body_part), ("PatientAge", age)):
        if value is not None:
            setattr(ds, keyword, value)
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    stack = np.repeat(pixels[None], frames, axis=0) if frames > 1 else pixels
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.ascontiguousarray(stack, dtype=np.uint8).tobytes()
    if syntax == RLELossless:
        ds.compress(RLELossless)
    elif syntax == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _png(path: Path, size: int = 512) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L").resize((size, size)), dtype=np.uint8)


def mixed_archive(shared_data: Path, *, nih_films: int = 8, size: int = 512) -> list[Film]:
    """Films of mixed kinds, views, body parts and transfer syntaxes (see the module)."""
    pngs = sorted((shared_data / "nih-cxr14-sample" / "images").glob("*.png"))[: max(nih_films, 1)]
    syntaxes = (ExplicitVRLittleEndian, RLELossless, ImplicitVRLittleEndian)
    films = []
    for i, png in enumerate(pngs):
        study = generate_uid()
        data = dicom_from_image(
            _png(png, size), study_uid=study, modality="DX" if i % 2 else "CR", syntax=syntaxes[i % 3]
        )
        films.append(Film(data, None, f"nih-{i}"))
    pixels = _png(pngs[0], size)
    odd = {
        POPULATION_LATERAL: {"view": "LL"},
        POPULATION_NON_CHEST: {"body_part": "KNEE", "view": None},
        POPULATION_PAEDIATRIC: {"age": "004Y"},
        MULTI_FRAME: {"frames": 2},
    }
    for reason, tags in odd.items():
        films.append(Film(dicom_from_image(pixels, study_uid=generate_uid(), **tags), reason, reason))  # type: ignore[arg-type]
    films.append(Film((shared_data / "originals" / "siim-chest-cr-jpeg-baseline.dcm").read_bytes(), None, "siim"))
    from pydicom.data import get_testdata_file

    for name, expected in (("RG1_UNCR.dcm", None), ("CT_small.dcm", "not_listed")):
        path = get_testdata_file(name)
        if path is not None:
            films.append(Film(Path(str(path)).read_bytes(), expected, name))
    return films


def load_into_orthanc(dicomweb_url: str, films: Iterable[Film]) -> list[str]:
    """Store each film in the Orthanc whose DICOMweb root is ``dicomweb_url`` (its REST API); their SOP UIDs."""
    root = dicomweb_url.removesuffix("/").removesuffix("/dicom-web")
    uids = []
    with httpx.Client(timeout=60) as client:
        for film in films:
            answer = client.post(f"{root}/instances", content=film.data)
            answer.raise_for_status()
            uids.append(str(pydicom.dcmread(io.BytesIO(film.data), stop_before_pixels=True).SOPInstanceUID))
    return uids
