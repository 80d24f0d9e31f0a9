"""How a finding is coded outside the service: the project code and, where one is unambiguous, SNOMED CT.

Shared by the FHIR DiagnosticReport (``service.fhir``) and the DICOM Structured Report (``service.dicom.sr``),
so a finding carries the same codes in both.
"""

from __future__ import annotations

import re

__all__ = ["SNOMED_BY_LABEL", "finding_code"]

#: SNOMED CT concepts for the CheXpert findings that have an unambiguous one. Findings without one (No
#: Finding, Enlarged Cardiomediastinum, Lung Opacity, Lung Lesion, Pleural Other, Support Devices) carry only
#: the project code. A site's terminology service should verify these before relying on them.
SNOMED_BY_LABEL: dict[str, tuple[str, str]] = {
    "Cardiomegaly": ("8186001", "Cardiomegaly"),
    "Edema": ("19242006", "Pulmonary edema"),
    "Consolidation": ("95436008", "Lung consolidation"),
    "Pneumonia": ("233604007", "Pneumonia"),
    "Atelectasis": ("46621007", "Atelectasis"),
    "Pneumothorax": ("36118008", "Pneumothorax"),
    "Pleural Effusion": ("60046008", "Pleural effusion"),
    "Fracture": ("125605004", "Fracture of bone"),
}


def finding_code(label: str) -> str:
    """The project code of a finding: its label in kebab-case (``Pleural Effusion`` -> ``pleural-effusion``)."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
