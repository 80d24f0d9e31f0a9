"""Hospital imaging integration: DICOM SR results (``sr``), Grad-CAM heatmaps as Secondary Capture images
(``heatmaps``) and the result page (``summary``), made alike (``derived``); the STOW-RS receiver (``stow``), the
DIMSE C-STORE listener (``dimse``) and the forwarding outbox to a PACS (``outbox``). See docs/dicom.md."""

from service.dicom.heatmaps import (
    HEATMAP_SERIES_NUMBER,
    HeatmapError,
    build_heatmaps,
    heatmap_answers,
    heatmaps_for_upload,
)
from service.dicom.sr import (
    DicomSourceError,
    SRFinding,
    build_sr,
    checked_source,
    dicom_source,
    read_sr_findings,
    sr_answer,
    sr_bytes,
    with_header_warnings,
)
from service.dicom.summary import SUMMARY_SERIES_NUMBER, build_summary

__all__ = [
    "HEATMAP_SERIES_NUMBER",
    "SUMMARY_SERIES_NUMBER",
    "DicomSourceError",
    "HeatmapError",
    "SRFinding",
    "build_heatmaps",
    "build_sr",
    "build_summary",
    "checked_source",
    "dicom_source",
    "heatmap_answers",
    "heatmaps_for_upload",
    "read_sr_findings",
    "sr_answer",
    "sr_bytes",
    "with_header_warnings",
]
