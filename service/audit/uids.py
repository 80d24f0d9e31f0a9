"""How the audit trail knows a DICOM film without holding its identifiers: the sha256 of its Study and SOP Instance
UIDs. A radiologist's verdict sent by UID (``POST /v1/outcomes``) is matched by hashing the UID it names; the trail
alone cannot tell which study a record is about."""

from __future__ import annotations

import hashlib
import io

import pydicom

from bayesnet import sniff_format


def uid_digest(uid: str) -> str:
    """sha256 (hex) of a DICOM UID as written, surrounding spaces and NULs (DICOM padding) removed."""
    return hashlib.sha256(uid.strip(" \x00").encode("ascii", "replace")).hexdigest()


def dicom_uid_digests(data: bytes) -> tuple[str | None, str | None]:
    """``(study, sop instance)`` UID digests of a DICOM upload; ``(None, None)`` for anything else or a header that
    cannot be read (the prediction reports that; the audit record just has no UID)."""
    if sniff_format(data[:1024]) != "dicom":
        return None, None
    try:
        header = pydicom.dcmread(
            io.BytesIO(data), stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SOPInstanceUID"]
        )
    except Exception:  # a damaged header: no UID to match by, never a failed audit record
        return None, None
    study, sop = header.get("StudyInstanceUID"), header.get("SOPInstanceUID")
    return (uid_digest(str(study)) if study else None, uid_digest(str(sop)) if sop else None)
