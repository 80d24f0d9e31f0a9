"""The result page: one Secondary Capture image a person reads in any DICOM viewer.

Why an image and not an Encapsulated PDF (docs/dicom.md, "The result page"): the SR is complete but viewers show
little of it (OHIF 3.13 only its regions), and a PDF needs a PDF reader inside the viewer (OHIF's PDF extension
embeds the browser's; Orthanc Explorer offers a PDF only as a download). An RGB Secondary Capture is shown by every
viewer that shows the heatmaps: OHIF as an ordinary image, Orthanc Explorer in its preview.

The page says, in words: the referral and its reasons (or that the film was cleared), decisions withheld and why,
the rule's guarantee (``bayesnet.referral.describe``), every finding with its decision and probability (the MC
mean and the 5th-95th percentile of the samples), the model, its version and weights, "not for diagnosis", and
the key heatmaps (positive first, then uncertain, by probability). It names no patient: the patient and study
modules are in the header, as for the SR and the heatmaps, never in the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from service.dicom.derived import new_series, secondary_capture
from service.dicom.sr import MANUFACTURER, REASON_MEANINGS, SR_SERIES_NUMBER
from service.schemas import PredictionResponse
from service.wording import DISCLAIMER, NO_CLEARING, OOD_WARNING, WITHHELD_WORDS

SUMMARY_SERIES_NUMBER = 9903
SUMMARY_SERIES_DESCRIPTION = "bayesnet-cxr AI result page (research use only)"
#: Page size in pixels (columns, rows): 4:3, the shape of a reading-room monitor; 5.8 MB of uncompressed RGB.
PAGE_SIZE = (1600, 1200)
#: How many heatmaps the page shows beside the text.
KEY_HEATMAPS = 2

_MARGIN = 40
_WHITE = (235, 235, 235)
_GREY = (160, 160, 160)
_YELLOW = (255, 214, 10)
_ORANGE = (255, 140, 50)
_GREEN = (110, 210, 120)
_DECISION_WORDS = {"positive": "POSITIVE", "uncertain": "uncertain", "negative": "negative"}
_DECISION_COLOUR = {"positive": _ORANGE, "uncertain": _YELLOW, "negative": _GREY}
_DECISION_ORDER = {"positive": 0, "uncertain": 1, "negative": 2}


def _font(size_px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size_px)


@dataclass(frozen=True)
class Block:
    """One piece of the page's text: a paragraph (``cells`` empty) or a table row (``cells``: x offset and text)."""

    text: str
    size_px: int
    colour: tuple[int, int, int] = _WHITE
    gap: float = 0.5
    cells: tuple[tuple[int, str], ...] = ()
    footer: bool = False


def page_text(result: PredictionResponse, *, guarantee: str | None, created: datetime) -> list[Block]:
    """What the page says, top to bottom (the tests read it here; :func:`render_page` draws it)."""
    model = result.model
    blocks = [
        Block("AI result for this chest radiograph", 40, gap=0.2),
        Block(DISCLAIMER, 24, _YELLOW, gap=0.8),
    ]
    referral = result.referral
    if referral.refer:
        blocks.append(Block("Refer to a radiologist", 34, _ORANGE, gap=0.2))
        because = "; ".join(REASON_MEANINGS[r].lower() for r in referral.reasons)
        blocks.append(Block(f"Because: {because}.", 22, gap=0.8))
    else:
        blocks.append(Block("Cleared as normal by the referral rule", 34, _GREEN, gap=0.8))
    if result.ood is not None and not result.ood.in_distribution:
        blocks.append(Block(OOD_WARNING, 22, _ORANGE))
    rule = f"The rule's guarantee: {guarantee}" if guarantee else "No referral rule is fitted: every film is referred."
    blocks.append(Block(rule, 20, _GREY, gap=1.0))
    if result.decisions_withheld:
        why = " and ".join(WITHHELD_WORDS[w] for w in result.decisions_withheld)
        blocks.append(Block(f"No findings are reported because {why}.", 26, _ORANGE, gap=1.0))
    else:
        if result.predictions and all(p.clear_below is None for p in result.predictions.values()):
            blocks.append(Block(NO_CLEARING, 20, _GREY))
        header = ((0, "Finding"), (330, "Decision"), (600, "Probability (5th-95th percentile)"))
        blocks.append(Block("", 22, _GREY, cells=header))
        ordered = sorted(result.predictions.items(), key=lambda kv: (_DECISION_ORDER[kv[1].decision], -kv[1].conf))
        for label, p in ordered:
            low, high = p.interval
            cells = ((0, label), (330, _DECISION_WORDS[p.decision]), (600, f"{p.conf:.2f}  ({low:.2f} to {high:.2f})"))
            blocks.append(Block("", 22, _DECISION_COLOUR[p.decision], cells=cells))
    footer = (
        f"Model {model.name} {model.version}, weights sha256 {model.sha256[:16]}..., {result.mc_samples} "
        f"Monte-Carlo dropout samples; {MANUFACTURER}, created {created:%Y-%m-%d %H:%M} UTC. The full result is the "
        f"DICOM SR of this study (series {SR_SERIES_NUMBER}); request {result.request_id}."
    )
    blocks.append(Block(footer, 18, _GREY, footer=True))
    return blocks


def _wrap(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int
) -> list[str]:
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            candidate = word
        line = candidate
    return [*lines, line] if line else lines


def _key_heatmaps(result: PredictionResponse, heatmaps: list[hd.sc.SCImage]) -> list[npt.NDArray[np.uint8]]:
    """The heatmap images' pixels (film, map and caption) for the findings that matter most, at most
    :data:`KEY_HEATMAPS`: positive before uncertain, higher probability first."""
    labels = list(result.gradcam)

    def rank(index: int) -> tuple[int, float]:
        prediction = result.predictions.get(labels[index])
        if prediction is None:
            return (3, 0.0)
        return (_DECISION_ORDER[prediction.decision], -prediction.conf)

    order = sorted(range(min(len(labels), len(heatmaps))), key=rank)
    return [np.asarray(heatmaps[i].pixel_array, dtype=np.uint8) for i in order[:KEY_HEATMAPS]]


def render_page(blocks: list[Block], heatmaps: list[npt.NDArray[np.uint8]]) -> npt.NDArray[np.uint8]:
    """``(rows, columns, 3)`` uint8: the page, white text on black, the heatmaps on the right when there are any."""
    columns, rows = PAGE_SIZE
    page = Image.new("RGB", PAGE_SIZE, (0, 0, 0))
    draw = ImageDraw.Draw(page)
    panel = columns * 2 // 5 if heatmaps else 0
    width = columns - panel - 2 * _MARGIN
    y = _MARGIN
    for block in blocks:
        font = _font(block.size_px)
        step = round(block.size_px * 1.3)
        if block.cells:
            for offset, text in block.cells:
                draw.text((_MARGIN + offset, y), text, fill=block.colour, font=font)
            y += round(block.size_px * 1.35)
            continue
        lines = _wrap(draw, block.text, font, width)
        if block.footer:  # at the foot of the page, unless the text above reaches it
            y = max(y + block.size_px, rows - _MARGIN - step * len(lines))
        for line in lines:
            draw.text((_MARGIN, y), line, fill=block.colour, font=font)
            y += step
        y += round(block.size_px * block.gap)
    if heatmaps:
        slot_w, slot_h = panel - _MARGIN, (rows - _MARGIN * (len(heatmaps) + 1)) // len(heatmaps)
        top = _MARGIN
        for pixels in heatmaps:
            image = Image.fromarray(pixels, mode="RGB")
            image.thumbnail((slot_w, slot_h), Image.Resampling.LANCZOS)
            page.paste(image, (columns - panel + (slot_w - image.width) // 2, top))
            top += slot_h + _MARGIN
    return np.asarray(page, dtype=np.uint8)


def build_summary(
    source: Dataset,
    result: PredictionResponse,
    *,
    guarantee: str | None,
    heatmaps: list[hd.sc.SCImage],
    created: datetime,
) -> hd.sc.SCImage:
    """The result page of ``result`` for the film whose header is ``source``, in its own series of the film's study.

    ``guarantee``: the referral rule in words (``bayesnet.referral.describe``; None: no rule). ``heatmaps``: the
    heatmap images built for the same result (``service.dicom.heatmaps``), in the order of ``result.gradcam``.
    """
    key = _key_heatmaps(result, heatmaps)
    model = result.model
    return secondary_capture(
        source,
        render_page(page_text(result, guarantee=guarantee, created=created), key),
        series=new_series(SUMMARY_SERIES_NUMBER, SUMMARY_SERIES_DESCRIPTION),
        number=1,
        model=model,
        created=created,
        contribution=f"Result page of {model.name} {model.version}, weights sha256 {model.sha256}",
        comments="AI result page (findings, referral, guarantee, key heatmaps). Research use only, not for diagnosis.",
        derivation="Text of the AI result and the key Grad-CAM heatmaps on the source radiograph; not for diagnosis",
        shows_film=bool(key),
        film_oriented=False,
    )
