"""The objects a PACS receives for one scored DICOM film, as Part 10 files: the SR (which lists the other objects
in its evidence), the result page (``service.dicom.summary``), then the heatmap images (``service.dicom.heatmaps``).

One builder for every path that forwards results: STOW-RS and DIMSE (``service.dicom.stow``, run in the pipeline's
decode pool) and the archive scorer (``service.archive.forward``, in its writer thread). Blocking: the heatmaps
decode the film once more.
"""

from __future__ import annotations

from datetime import datetime

from pydicom.dataset import Dataset

from bayesnet import ModelSpec
from bayesnet.referral import describe
from service.dicom.heatmaps import heatmaps_for_upload, hot_spots
from service.dicom.sr import sr_answer, sr_bytes
from service.dicom.summary import build_summary
from service.schemas import PredictionResponse

__all__ = ["pacs_objects"]


def pacs_objects(
    data: bytes, header: Dataset, result: PredictionResponse, *, spec: ModelSpec, max_pixels: int, created: datetime
) -> list[bytes]:
    """The SR, the result page and the heatmap images of ``result`` for the film ``data`` whose header is
    ``header`` (``service.dicom.sr.checked_source``); heatmap images only for the heatmaps ``result`` carries."""
    heatmaps = heatmaps_for_upload(data, header, result, resize=spec.resize, max_pixels=max_pixels, created=created)
    rule = spec.referral
    page = build_summary(header, result, guarantee=describe(rule) if rule else None, heatmaps=heatmaps, created=created)
    spots = hot_spots(result, (int(header.Rows), int(header.Columns)), spec.resize)
    sr = sr_answer(header, result, created, [page, *heatmaps], spots)
    return [sr, sr_bytes(page), *(sr_bytes(image) for image in heatmaps)]
