"""The Secondary Capture images the service derives from a film: the heatmaps and the result page.

One place decides what such an image copies from the film's header (the patient and study modules of the header
``service.dicom.sr.dicom_source`` cleaned, the body part, the orientation when the film states it) and what it
says about itself (the model as contributing equipment, the source referenced, burned-in annotation, comments), so
the objects of one result agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from service.dicom.sr import MANUFACTURER
from service.schemas import ModelRef


@dataclass(frozen=True)
class Series:
    """A new series of derived images in the film's study."""

    number: int
    description: str
    uid: str


def new_series(number: int, description: str) -> Series:
    return Series(number=number, description=description, uid=hd.UID())


def _source_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item


def secondary_capture(
    source: Dataset,
    rgb: npt.NDArray[np.uint8],
    *,
    series: Series,
    number: int,
    model: ModelRef,
    created: datetime,
    contribution: str,
    comments: str,
    derivation: str,
    shows_film: bool,
    film_oriented: bool,
) -> hd.sc.SCImage:
    """An RGB Secondary Capture of ``rgb`` in ``series`` of the film's study.

    ``shows_film``: whether the film's own pixels are in the image (then Burned In Annotation is "NO" only when the
    film says "NO"). ``film_oriented``: whether the image keeps the film's rows and columns, so the film's
    orientation labels hold for it (copied when the film states them, else left empty as type 2C allows).
    """
    equipment = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name,
        software_versions=[model.version, model.sha256],
        contribution_datetime=created,
        contribution_description=contribution,
    )
    stated = source.get("PatientOrientation") if film_oriented else None
    orientation: tuple[str, str] | None = (str(stated[0]), str(stated[1])) if stated and len(stated) == 2 else None
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        # highdicom wants a value; without one from the film it is emptied below rather than invented.
        patient_orientation=orientation or ("L", "F"),
        series_instance_uid=series.uid,
        series_number=series.number,
        sop_instance_uid=hd.UID(),
        instance_number=number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        series_description=series.description,
        content_date=created.date(),
        content_time=created.time(),
        contributing_equipment=[equipment],
    )
    if orientation is None:
        image.PatientOrientation = []  # type 2C: empty when the film does not say (or the image is not the film)
    if "BodyPartExamined" in source:  # a technical attribute; a chest is unpaired, so no Laterality
        image.BodyPartExamined = source.BodyPartExamined
    else:
        image.Laterality = ""  # type 2C: present and empty when the body part is not known
    # Burned In Annotation says whether the pixels could identify the patient. The service's own text cannot (it
    # names findings and the model), but the film's pixels can carry a name: "NO" only when the film says "NO".
    image.BurnedInAnnotation = "NO" if not shows_film or source.get("BurnedInAnnotation") == "NO" else "YES"
    image.RecognizableVisualFeatures = "NO"
    image.ImageComments = comments
    image.DerivationDescription = derivation
    image.SourceImageSequence = [_source_reference(source)]
    return image
