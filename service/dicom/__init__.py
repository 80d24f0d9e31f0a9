"""Hospital imaging integration: DICOM SR results (``sr``), the STOW-RS receiver (``stow``) and the forwarding
outbox to a PACS (``outbox``). See docs/dicom.md."""

from service.dicom.sr import (
    DicomSourceError,
    SRFinding,
    build_sr,
    dicom_source,
    read_sr_findings,
    sr_answer,
    sr_bytes,
)

__all__ = ["DicomSourceError", "SRFinding", "build_sr", "dicom_source", "read_sr_findings", "sr_answer", "sr_bytes"]
