"""A synthetic dataset in CheXpert-v1.0-small's layout, with pixel-exact ground truth for every finding.

Why: the real CheXpert cannot ship with the project, takes hours to learn, and has no localisation
labels. This generator writes a drop-in stand-in (same CSV columns, label coding and folder layout, so
the real data loaders read it unchanged) on which a tiny CNN reaches high AUROC within seconds on a CPU,
and whose per-pixel label maps let tests check that Grad-CAM points at the right place.

Each image is a crude frontal chest film (dark lung fields either side of a bright mediastinum and
spine, soft curved rib bands, a heart shadow, diaphragm domes, vignetting and film grain). Each of the
13 findings other than "No Finding" owns one cell of a 4x4 grid over the image and, when positive, is
planted there with its own high-contrast texture (see :data:`LAYOUT`), jittered in position and size but
never leaving its cell, so findings never overlap. Uncertain findings (``-1.0``) are planted at
:data:`UNCERTAIN_CONTRAST` of the positive contrast.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from bayesnet.labels import CHEXPERT_LABELS

NO_FINDING: Final = "No Finding"

#: The 13 findings that are drawn, in CheXpert order. "No Finding" is never drawn.
PLANTED_FINDINGS: Final[tuple[str, ...]] = tuple(label for label in CHEXPERT_LABELS if label != NO_FINDING)

#: The image is split into ``GRID_CELLS x GRID_CELLS`` cells; each planted finding owns one.
GRID_CELLS: Final = 4

#: Opacity of a positive finding's texture over the film (not 1.0, so a little anatomy shows through).
POSITIVE_OPACITY: Final = 0.9

#: Contrast of an uncertain (-1.0) finding relative to a positive one.
UNCERTAIN_CONTRAST: Final = 0.5

#: Columns of the written CSVs, in order: CheXpert's own columns, then the path of the label map.
CSV_COLUMNS: Final[tuple[str, ...]] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS, "Mask")

# A planted pattern's side, as a fraction of its cell's side: 0.8..0.95 of a quarter of the image, i.e.
# about 1/5 to 1/4 of the image side, large enough to be obvious at 224 px.
_MIN_PATTERN_FRACTION: Final = 0.80
_MAX_PATTERN_FRACTION: Final = 0.95
# Resolution of the random field behind the speckle texture (drawn for every finding, see render_sample).
_SPECKLE_GRID: Final = 8
_MIN_IMAGE_SIZE: Final = 32

FloatImage = NDArray[np.float32]
BoolImage = NDArray[np.bool_]
# A texture maps local coordinates (u across, v down, both (s, s) in [-1, 1]), the radius, and a uniform
# random field to (footprint, intensity in [0, 1]); the footprint is what the label map marks.
_Texture = Callable[[FloatImage, FloatImage, FloatImage, FloatImage], tuple[BoolImage, FloatImage]]


@dataclass(frozen=True)
class Placement:
    """Where and how one finding is planted: its cell of the grid (row from the top, column from the left)."""

    row: int
    col: int
    texture: str


#: Per finding: the grid cell it owns and the name of its texture. The places loosely follow anatomy
#: (fracture at a clavicle, pneumothorax at an apex, effusion at a costophrenic angle); the bottom row's
#: three right-hand cells stay empty.
LAYOUT: Final[Mapping[str, Placement]] = MappingProxyType(
    {
        "Fracture": Placement(0, 0, "cross"),
        "Enlarged Cardiomediastinum": Placement(0, 1, "vertical stripes"),
        "Support Devices": Placement(0, 2, "ring"),
        "Pneumothorax": Placement(0, 3, "dark hole"),
        "Lung Lesion": Placement(1, 0, "bright disc"),
        "Lung Opacity": Placement(1, 1, "dot lattice"),
        "Pneumonia": Placement(1, 2, "checkerboard"),
        "Consolidation": Placement(1, 3, "diagonal hatching"),
        "Edema": Placement(2, 0, "horizontal stripes"),
        "Cardiomegaly": Placement(2, 1, "radial blob"),
        "Atelectasis": Placement(2, 2, "speckle"),
        "Pleural Other": Placement(2, 3, "square frame"),
        "Pleural Effusion": Placement(3, 0, "triangle"),
    }
)

_BRIGHT: Final = 0.95
_DARK: Final = 0.05


def _two_tone(bright: BoolImage) -> FloatImage:
    return np.where(bright, np.float32(_BRIGHT), np.float32(_DARK)).astype(np.float32)


def _flat(footprint: BoolImage) -> tuple[BoolImage, FloatImage]:
    return footprint, np.full(footprint.shape, _BRIGHT, dtype=np.float32)


def _bands(t: FloatImage, n_bands: int) -> BoolImage:
    """Alternating bands of ``t`` in [-1, 1] (or wider): ``n_bands`` bands across [-1, 1]."""
    band = np.floor((t + 1.0) * (n_bands / 2.0)).astype(np.int64)
    return np.asarray(band % 2 == 0, dtype=np.bool_)


def _lattice(t: FloatImage) -> FloatImage:
    """Offset from the nearest centre of a 4-cell lattice over [-1, 1], in cell units (-0.5..0.5)."""
    return ((t + 1.0) * 2.0) % 1.0 - 0.5


def _whole(u: FloatImage) -> BoolImage:
    return np.ones(u.shape, dtype=np.bool_)


_TEXTURES: Final[Mapping[str, _Texture]] = MappingProxyType(
    {
        "cross": lambda u, v, r, f: _flat((np.abs(u) <= 0.3) | (np.abs(v) <= 0.3)),
        "vertical stripes": lambda u, v, r, f: (_whole(u), _two_tone(_bands(u, 6))),
        "ring": lambda u, v, r, f: _flat((r <= 0.95) & (r >= 0.55)),
        "dark hole": lambda u, v, r, f: (r <= 0.95, _two_tone(r >= 0.7)),
        "bright disc": lambda u, v, r, f: _flat(r <= 0.9),
        "dot lattice": lambda u, v, r, f: (_whole(u), _two_tone(_lattice(u) ** 2 + _lattice(v) ** 2 <= 0.1)),
        "checkerboard": lambda u, v, r, f: (_whole(u), _two_tone(_bands(u, 4) ^ _bands(v, 4))),
        "diagonal hatching": lambda u, v, r, f: (_whole(u), _two_tone(_bands(u + v, 8))),
        "horizontal stripes": lambda u, v, r, f: (_whole(u), _two_tone(_bands(v, 6))),
        "radial blob": lambda u, v, r, f: (r <= 1.0, (_DARK + (_BRIGHT - _DARK) * (1.0 - r**2))),
        "speckle": lambda u, v, r, f: (r <= 0.95, _two_tone(f >= 0.55)),
        "square frame": lambda u, v, r, f: _flat(np.maximum(np.abs(u), np.abs(v)) >= 0.55),
        "triangle": lambda u, v, r, f: _flat((np.abs(u) <= (v + 0.95) / 2.0) & (v <= 0.95)),
    }
)


@dataclass(frozen=True)
class SyntheticPaths:
    """What :func:`generate` wrote: the dataset root and its two CSVs, with their row counts."""

    root: Path
    train_csv: Path
    valid_csv: Path
    n_train: int
    n_valid: int


@lru_cache(maxsize=8)
def _axes(size: int) -> tuple[FloatImage, FloatImage]:
    """Pixel-centre coordinates in [0, 1]: ``y`` of shape (size, 1) and ``x`` of shape (1, size)."""
    t = ((np.arange(size, dtype=np.float32) + 0.5) / size).astype(np.float32)
    t.setflags(write=False)
    return t[:, None], t[None, :]


@lru_cache(maxsize=64)
def _local_axes(side: int) -> tuple[FloatImage, FloatImage, FloatImage, NDArray[np.intp]]:
    """Local coordinates of a ``side`` x ``side`` pattern box: u (across), v (down), radius, speckle index."""
    t = ((np.arange(side, dtype=np.float32) + 0.5) / side * 2.0 - 1.0).astype(np.float32)
    u = np.broadcast_to(t[None, :], (side, side))
    v = np.broadcast_to(t[:, None], (side, side))
    r = np.sqrt(u * u + v * v).astype(np.float32)
    speckle_index = (np.arange(side) * _SPECKLE_GRID) // side
    for a in (u, v, r, speckle_index):
        if a.flags.writeable:
            a.setflags(write=False)
    return u, v, r, speckle_index


def _soft_ellipse(y: FloatImage, x: FloatImage, cy: float, cx: float, ry: float, rx: float, edge: float) -> FloatImage:
    """1 inside the ellipse, 0 outside, with a logistic edge ``edge`` (in normalised radius) wide."""
    d = np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
    return (1.0 / (1.0 + np.exp((d - 1.0) / edge))).astype(np.float32)


def _film(rng: np.random.Generator, size: int) -> FloatImage:
    """A (size, size) frontal chest film without findings, intensities roughly in [0, 1].

    Draws exactly 12 numbers from ``rng`` whatever ``size`` is.
    """
    y, x = _axes(size)
    p = rng.random(12).tolist()  # Python floats keep the arithmetic in float32
    # Soft tissue of the torso over a darker (air) surround.
    img = 0.10 + 0.42 * _soft_ellipse(y, x, 0.58, 0.5, 0.75, 0.50 + 0.04 * p[0], 0.06)
    # Lung fields: two tall ellipses either side of the midline.
    lungs = np.maximum(
        _soft_ellipse(y, x, 0.46 + 0.03 * p[1], 0.29, 0.32 + 0.04 * p[2], 0.16 + 0.03 * p[3], 0.06),
        _soft_ellipse(y, x, 0.46 + 0.03 * p[1], 0.71, 0.32 + 0.04 * p[2], 0.16 + 0.03 * p[4], 0.06),
    )
    img = img - (0.30 + 0.06 * p[5]) * lungs
    # Ribs: soft periodic bands that curve down laterally, visible over the lungs.
    n_ribs = 9.0 + 2.0 * p[6]
    phase = (y - 0.10 + (0.9 + 0.4 * p[7]) * (x - 0.5) ** 2) * n_ribs + p[8]
    img = img + 0.13 * (0.5 + 0.5 * np.cos(2.0 * math.pi * phase)) ** 4 * lungs
    # Mediastinum and spine: a bright vertical band with a brighter narrow core.
    midline = np.exp(-(((x - 0.5) / 0.075) ** 2)) * (0.25 + 0.1 * y) + 0.12 * np.exp(-(((x - 0.5) / 0.025) ** 2))
    img = img + midline
    # Heart shadow, to the image's right of the midline, and the diaphragm domes below the lungs.
    img = img + 0.22 * _soft_ellipse(y, x, 0.66, 0.55 + 0.03 * p[9], 0.13, 0.15 + 0.03 * p[10], 0.12)
    dome = 0.80 + 0.10 * ((np.abs(x - 0.5) - 0.21) / 0.21) ** 2
    img = img + 0.30 / (1.0 + np.exp(-(y - dome) / 0.015))
    # Vignetting and an overall exposure difference between films.
    img = img * (1.0 - 0.55 * ((x - 0.5) ** 2 + (y - 0.5) ** 2)) * (0.9 + 0.2 * p[11])
    return np.asarray(img, dtype=np.float32)


def _opacity(label: str, value: float) -> float:
    """Opacity to plant ``label`` with: positive, uncertain at reduced contrast, or 0 (not drawn)."""
    if label not in LAYOUT and label != NO_FINDING:
        raise ValueError(f"unknown finding {label!r}; expected one of {CHEXPERT_LABELS}")
    if label == NO_FINDING:
        return 0.0
    if value == 1.0:
        return POSITIVE_OPACITY
    if value == -1.0:
        return POSITIVE_OPACITY * UNCERTAIN_CONTRAST
    return 0.0


def render_sample(
    rng: np.random.Generator, findings: Mapping[str, float], size: int = 256, *, contrast: float = 1.0
) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """Render one synthetic frontal film with ``findings`` planted, and its per-pixel label map.

    Args:
        rng: the only source of randomness (film shape, pattern jitter, grain).
        findings: label -> CheXpert value. 1.0 is planted at full contrast, -1.0 at
            :data:`UNCERTAIN_CONTRAST`; anything else (0.0, NaN, a missing key) is not drawn, and
            "No Finding" is never drawn. Keys must be CheXpert labels.
        size: side of the square image in pixels (at least 32).
        contrast: multiplies every planted finding's opacity (0 to 1): below 1, subtler disease than the
            generator's training sets show (a shifted site, ``bench/guarantee_site.py``).

    Returns:
        ``(image, label_map)``, both uint8 of shape (size, size). ``label_map`` holds, per pixel, the
        index in ``CHEXPERT_LABELS`` (1..13) of the finding planted there, 0 elsewhere.

    The number of draws from ``rng`` does not depend on ``findings``: two generators in the same state
    render the same film, the same jitter and the same grain whatever is planted, so an image with a
    finding and one without differ only inside that finding's label-map region.
    """
    if size < _MIN_IMAGE_SIZE:
        raise ValueError(f"size must be at least {_MIN_IMAGE_SIZE} pixels, got {size}")
    if not 0.0 <= contrast <= 1.0:
        raise ValueError(f"contrast must be in [0, 1], got {contrast}")
    opacities = {label: contrast * _opacity(label, value) for label, value in findings.items()}
    img = _film(rng, size)
    label_map = np.zeros((size, size), dtype=np.uint8)
    edges = [round(i * size / GRID_CELLS) for i in range(GRID_CELLS + 1)]
    for label in PLANTED_FINDINGS:
        placement = LAYOUT[label]
        # Drawn for every finding, planted or not, so rng consumption is independent of the findings.
        jitter = rng.random(3)
        field = rng.random((_SPECKLE_GRID, _SPECKLE_GRID))
        opacity = opacities.get(label, 0.0)
        if opacity == 0.0:
            continue
        top, bottom = edges[placement.row], edges[placement.row + 1]
        left, right = edges[placement.col], edges[placement.col + 1]
        cell = min(bottom - top, right - left)
        fraction = _MIN_PATTERN_FRACTION + (_MAX_PATTERN_FRACTION - _MIN_PATTERN_FRACTION) * jitter[0]
        side = max(1, min(cell, round(cell * fraction)))
        y0 = top + int(jitter[1] * (bottom - top - side + 1))
        x0 = left + int(jitter[2] * (right - left - side + 1))
        u, v, r, speckle_index = _local_axes(side)
        speckle = field[speckle_index[:, None], speckle_index[None, :]].astype(np.float32)
        footprint, texture = _TEXTURES[placement.texture](u, v, r, speckle)
        alpha = opacity * footprint.astype(np.float32)
        box = img[y0 : y0 + side, x0 : x0 + side]
        box *= 1.0 - alpha
        box += alpha * texture
        label_map[y0 : y0 + side, x0 : x0 + side][footprint] = CHEXPERT_LABELS.index(label)
    # Film grain, added after planting so the patterns look exposed on the same film.
    img += np.float32(0.025) * rng.standard_normal((size, size), dtype=np.float32)
    image = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return image, label_map


def _format_label(value: float) -> str:
    """CheXpert's coding: ``1.0``, ``0.0``, ``-1.0``, or blank for "not mentioned"."""
    return "" if math.isnan(value) else f"{value:.1f}"


def generate(
    out_dir: Path,
    n: int,
    seed: int,
    *,
    image_size: int = 256,
    valid_fraction: float = 0.2,
    prevalence: float = 0.3,
    uncertain_fraction: float = 0.05,
    blank_fraction: float = 0.1,
    progress: bool = False,
) -> SyntheticPaths:
    """Write ``n`` synthetic studies under ``out_dir`` in CheXpert-v1.0-small's layout.

    Layout: ``train.csv`` and ``valid.csv``; images at ``{train,valid}/patientNNNNN/study1/
    view1_frontal.png`` (8-bit grayscale PNG, ``image_size`` square); label maps (see
    :func:`render_sample`) at the same relative path under ``masks/``. As in CheXpert, ``Path`` (and
    the extra ``Mask`` column) are relative to ``out_dir``'s parent, e.g. ``synth/train/...``.

    Labels: each planted finding is positive with probability ``prevalence`` and independently of the
    others, uncertain (``-1.0``) with probability ``uncertain_fraction``, otherwise negative, written
    blank ("not mentioned") instead of ``0.0`` with probability ``blank_fraction``. "No Finding" is
    ``1.0`` exactly when no finding is positive or uncertain, else ``0.0``. One frontal image per
    patient; the last ``round(n * valid_fraction)`` patients form the validation split.

    Everything is drawn from one ``np.random.Generator(seed)``, so the same arguments write the same
    bytes. Existing files at the same paths are overwritten.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if not 0.0 <= prevalence <= 1.0 or not 0.0 <= uncertain_fraction <= 1.0 - prevalence:
        raise ValueError(
            f"need 0 <= prevalence <= 1 and 0 <= uncertain_fraction <= 1 - prevalence, "
            f"got prevalence={prevalence}, uncertain_fraction={uncertain_fraction}"
        )
    if not 0.0 <= blank_fraction <= 1.0:
        raise ValueError(f"blank_fraction must be in [0, 1], got {blank_fraction}")
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {_MIN_IMAGE_SIZE} pixels, got {image_size}")
    # Normalised but not resolved: a symlinked out_dir keeps its own name in the CSV paths.
    root = Path(os.path.abspath(out_dir))
    if not root.name:
        raise ValueError(f"out_dir must be a named directory (CSV paths start with its name), got {out_dir}")

    rng = np.random.default_rng(seed)
    n_findings = len(PLANTED_FINDINGS)
    draw = rng.random((n, n_findings))
    positive = draw < prevalence
    uncertain = ~positive & (draw < prevalence + uncertain_fraction)
    blank = ~positive & ~uncertain & (rng.random((n, n_findings)) < blank_fraction)
    values = np.zeros((n, n_findings))
    values[positive] = 1.0
    values[uncertain] = -1.0
    values[blank] = np.nan
    no_finding = np.where((positive | uncertain).any(axis=1), 0.0, 1.0)
    sexes = np.where(rng.random(n) < 0.5, "Female", "Male")
    ages = np.clip(np.rint(rng.normal(60.0, 17.0, n)), 18, 90).astype(np.int64)
    views = np.where(rng.random(n) < 0.5, "AP", "PA")
    n_valid = round(n * valid_fraction)
    n_train = n - n_valid
    digits = max(5, len(str(n)))

    csv_paths = {"train": root / "train.csv", "valid": root / "valid.csv"}
    root.mkdir(parents=True, exist_ok=True)
    indices: Iterable[int] = range(n)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, total=n, desc="synth", unit="img")
    with (
        csv_paths["train"].open("w", newline="") as train_file,
        csv_paths["valid"].open("w", newline="") as valid_file,
    ):
        writers = {
            split: csv.writer(file, lineterminator="\n")
            for split, file in (("train", train_file), ("valid", valid_file))
        }
        for writer in writers.values():
            writer.writerow(CSV_COLUMNS)
        for i in indices:
            split = "train" if i < n_train else "valid"
            relative = Path(split, f"patient{i + 1:0{digits}d}", "study1", "view1_frontal.png")
            findings = dict(zip(PLANTED_FINDINGS, values[i].tolist(), strict=True))
            coded = {NO_FINDING: float(no_finding[i]), **findings}
            image, label_map = render_sample(rng, findings, image_size)
            for array, path in ((image, root / relative), (label_map, root / "masks" / relative)):
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path, format="PNG")
            writers[split].writerow(
                [
                    f"{root.name}/{relative.as_posix()}",
                    sexes[i],
                    int(ages[i]),
                    "Frontal",
                    views[i],
                    *(_format_label(coded[label]) for label in CHEXPERT_LABELS),
                    f"{root.name}/masks/{relative.as_posix()}",
                ]
            )
    return SyntheticPaths(
        root=root,
        train_csv=csv_paths["train"],
        valid_csv=csv_paths["valid"],
        n_train=n_train,
        n_valid=n_valid,
    )
