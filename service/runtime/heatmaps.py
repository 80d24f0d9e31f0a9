"""The heatmap policy, in one place: which findings get a Grad-CAM map, and how the maps reach a response.

``cams`` (a query parameter of the predict routes, ``--cams`` of the archive scorer) says which maps to draw:

* ``auto`` (the default): the findings decided positive or uncertain, most probable first, at most
  :data:`AUTO_CAM_LIMIT`: what a reader would look at. None for an image the out-of-distribution gate flags or a
  film outside the intended population: no finding is shown for those, so no map is drawn.
* ``all``: every trained finding; ``none`` (or nothing): no map;
* comma-separated finding names: those, whatever their decision (an explicit request is honoured as asked).

The predictor computes the chosen maps in the batch (:func:`auto_classes` on its results); the pipeline encodes them
(:func:`encode_heatmaps`, palette PNGs from ``service.runtime.heatmap_png``) in a decode thread.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence

import numpy as np

from bayesnet import ModelSpec
from bayesnet.decision import Decision
from service.runtime.heatmap_png import heatmap_png
from service.schemas import Heatmap

__all__ = [
    "AUTO",
    "AUTO_CAM_LIMIT",
    "CamSelection",
    "CamSelectionError",
    "auto_classes",
    "encode_heatmaps",
    "for_population",
    "parse_cams",
]

AUTO = "auto"
#: Most maps ``cams=auto`` draws for one image.
AUTO_CAM_LIMIT = 4

#: What the predictor is asked for: :data:`AUTO`, or label indices (possibly none).
CamSelection = str | tuple[int, ...]


class CamSelectionError(ValueError):
    """A ``cams`` value names something other than auto / all / none or the model's trained findings."""


def parse_cams(value: str, spec: ModelSpec) -> CamSelection:
    """``auto`` | ``all`` | ``none`` | comma-separated trained label names (any case for the keywords) -> what the
    predictor is asked for.

    Raises:
        CamSelectionError: a name that is not one of the model's trained findings.
    """
    trained = {label: spec.label_index(label) for label in spec.trained_labels}
    text = value.strip()
    if text.lower() == AUTO:
        return AUTO
    if text.lower() == "all":
        return tuple(trained.values())
    if text.lower() in ("none", ""):
        return ()
    chosen = []
    for name in (part.strip() for part in text.split(",")):
        if name not in trained:
            raise CamSelectionError(
                f"cams: {name!r} is not a finding this model was trained on; use auto, all, none or "
                f"a comma-separated list of: {', '.join(trained)}"
            )
        chosen.append(trained[name])
    return tuple(dict.fromkeys(chosen))


def for_population(wanted: CamSelection, *, outside: bool) -> CamSelection:
    """``auto`` draws nothing for a film outside the intended population (its findings are not shown)."""
    return () if wanted == AUTO and outside else wanted


def auto_classes(
    mean: np.ndarray, decisions: Sequence[Decision], trained: Sequence[int], *, in_distribution: bool
) -> list[int]:
    """The label indices ``auto`` draws for one image: its positive trained findings, then its uncertain ones, each
    most probable first, at most :data:`AUTO_CAM_LIMIT`; none when the out-of-distribution gate flagged the image.
    (Positive first: a finding the rule called positive at 0.43 matters more than an uncertain one at 0.75.)"""
    if not in_distribution:
        return []
    flagged = [k for k in trained if decisions[k] in (Decision.POSITIVE, Decision.UNCERTAIN)]
    flagged.sort(key=lambda k: (decisions[k] != Decision.POSITIVE, -float(mean[k])))
    return flagged[:AUTO_CAM_LIMIT]


def encode_heatmaps(cams: Mapping[int, np.ndarray], spec: ModelSpec) -> dict[str, Heatmap]:
    """An image's Grad-CAM maps (label index -> ``(H, W)`` in [0, 1]) as base64 palette PNGs keyed by label name
    (PNG encoding: call it off the event loop)."""
    out = {}
    for k, intensity in cams.items():
        out[spec.labels[k]] = Heatmap(
            png_base64=base64.b64encode(heatmap_png(intensity)).decode("ascii"),
            width=int(intensity.shape[1]),
            height=int(intensity.shape[0]),
        )
    return out
