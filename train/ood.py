"""Fitting and validating the out-of-distribution gate of a checkpoint (``python -m train ood``), weights untouched.

1. Reference films (:class:`Film`): adult frontal chest radiographs from every source given, CheXpert-layout
   CSVs (``--train``, ``--valid``) and folders with a ``labels.csv`` (``--films``, e.g. the other-sites set),
   each with its patient (a patient's films are never split between fitting and testing) and its source.
2. Features (:func:`reference_features`): the model's deterministic trunk features, the ones the service
   scores, of each film decoded and preprocessed as the service does, and of ``crops`` random field-of-view
   crops of it (:func:`fov_crop`): how tightly a film is collimated varies from site to site, and a bedside
   film without shoulders should not look foreign for that alone. Films of patients known to be under 18
   are left out: the reference is adult films.
3. Fit (:func:`fit_gate`): the Hellinger map of the features (see :mod:`bayesnet.ood`), their mean and
   top-``dims`` principal subspace; the score is the squared residual outside it (``subspace``: a Ledoit-Wolf
   Mahalanobis distance inside it instead, ``combined``: both).
4. Threshold (:meth:`GateRecipe.fit`): ``margin`` times the ``quantile`` of the films' cross-fitted scores,
   each film scored by a gate fitted without its patient (grouped K-fold). Scoring a film with a subspace fitted
   on it would understate its residual, and so the threshold.
5. Validation (:func:`evaluate`): steps 2-4 repeated inside outer grouped folds and with each source left
   out in turn; what is reported is how many held-out films each fold's gate flags, per source, and how many
   images that are not chest radiographs it catches, per kind (:func:`probe_images`). ``python -m train ood``
   prints that table and stores it in ``model.json``'s metadata; the shipped gate is then fitted on all films.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, ImageDraw

from bayesnet import BayesianEfficientNet, ModelSpec, decode_image, load_checkpoint, preprocess
from bayesnet.imaging.decoded import ADULT_AGE_YEARS
from bayesnet.ood import HELLINGER_PREFIX, OODGate, save_ood_gate
from bayesnet.spec import OODSpec
from train.card import counts_text, with_ood_section

log = logging.getLogger("train.ood")

FloatArray = npt.NDArray[np.float64]
ScoreKind = Literal["subspace", "residual", "combined"]
FeatureMap = Literal["none", "hellinger"]
#: The spec's short name of each score (``OODSpec.method``), before the feature map's prefix.
METHOD_NAMES: Final[dict[str, str]] = {
    "subspace": "pca-mahalanobis",
    "residual": "pca-residual",
    "combined": "pca-mahalanobis+residual",
}
#: A field-of-view crop keeps this fraction of each side of the film (drawn uniformly, per side).
CROP_FRACTION: Final = (0.8, 0.95)
#: Crops per film in the recipe :func:`comparison_grid` sets beside one without crops.
COMPARISON_CROPS: Final = 1
#: The kinds of image that are not frontal chest radiographs, in report order.
PROBE_KINDS: Final = ("photo", "radiograph-other", "ct", "noise", "shapes")

#: scikit-image samples that ship inside the package (no download): photos, textures, micrographs, text.
SKIMAGE_SAMPLES: Final = (
    "astronaut",
    "chelsea",
    "coffee",
    "camera",
    "rocket",
    "coins",
    "moon",
    "brick",
    "page",
    "text",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "grass",
    "gravel",
    "colorwheel",
    "logo",
    "clock",
    "checkerboard",
    "cell",
    "shepp_logan_phantom",
)
#: The CT instances in pydicom's and pydicom-data's test files with a slice of at least 128 x 128 pixels, one per
#: distinct image (693_UNCI/J2KR/J2KI repeat 693_UNCR; the dicomdirtests CT instances are 16 x 16 or have no pixels).
CT_INSTANCES: Final = (
    "CT_small.dcm",
    "693_UNCR.dcm",
    "explicit_VR-UN.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "eCT_Supplemental.dcm",
    "bad_sequence.dcm",
)
#: How a CT slice is rendered to an 8-bit picture: its full stored range, or a (centre, width) window in HU.
CT_WINDOWS: Final[dict[str, tuple[float, float] | None]] = {
    "full": None,
    "lung": (-600.0, 1500.0),
    "soft-tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
}


@dataclass(frozen=True)
class Probe:
    """One image that is not a frontal chest radiograph, as the bytes a client would upload."""

    name: str
    kind: Literal["photo", "radiograph-other", "ct", "noise", "shapes"]
    data: bytes


def png_bytes(pixels: npt.NDArray[Any]) -> bytes:
    """An 8-bit PNG of a 2-D (gray) or 3-D (RGB/RGBA) array; floats and booleans are scaled to 0..255."""
    array = np.asarray(pixels)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        lo, hi = float(array.min()), float(array.max())
        array = ((array - lo) / (hi - lo if hi > lo else 1.0) * 255.0 + 0.5).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def synthetic_probes(seed: int = 0, *, size: int = 256) -> list[Probe]:
    """Noise (uniform, Gaussian, salt-and-pepper) and shapes (disks, boxes, gradient, stripes): always available."""
    rng = np.random.default_rng(seed)
    probes = [
        Probe("uniform-noise", "noise", png_bytes(rng.integers(0, 256, (size, size), dtype=np.uint8))),
        Probe(
            "gaussian-noise", "noise", png_bytes(np.clip(rng.normal(128, 40, (size, size)), 0, 255).astype(np.uint8))
        ),
        Probe("salt-and-pepper", "noise", png_bytes((rng.random((size, size)) < 0.5).astype(np.uint8) * 255)),
        Probe("rgb-noise", "noise", png_bytes(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))),
    ]
    for i in range(3):
        canvas = Image.new("L", (size, size), int(rng.integers(0, 80)))
        draw = ImageDraw.Draw(canvas)
        for _ in range(6):
            x0, y0 = (int(v) for v in rng.integers(0, size - 40, 2))
            w, h = (int(v) for v in rng.integers(20, size // 2, 2))
            shade = int(rng.integers(100, 256))
            if rng.random() < 0.5:
                draw.ellipse((x0, y0, x0 + w, y0 + h), fill=shade)
            else:
                draw.rectangle((x0, y0, x0 + w, y0 + h), fill=shade)
        probes.append(Probe(f"shapes-{i}", "shapes", png_bytes(np.asarray(canvas))))
    ramp = np.tile(np.linspace(0, 255, size), (size, 1))
    probes.append(Probe("gradient", "shapes", png_bytes(ramp)))
    stripes = ((np.arange(size) // 16) % 2 * 255).astype(np.uint8)
    probes.append(Probe("stripes", "shapes", png_bytes(np.tile(stripes, (size, 1)))))
    return probes


def ct_renderings(path: Path, stem: str) -> list[Probe]:
    """One CT slice (the first frame) as PNGs, one per :data:`CT_WINDOWS` entry that gives a different picture:
    what a CT screenshot looks like.

    As DICOM a CT is refused before the gate, by its Modality; as a picture only the gate can catch it.
    """
    from pydicom import dcmread

    ds = dcmread(str(path))
    stored = np.asarray(ds.pixel_array, dtype=np.float64)
    stored = stored[0] if stored.ndim == 3 else stored
    hu = stored * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    probes: list[Probe] = []
    for window, centre_width in CT_WINDOWS.items():
        if centre_width is None:
            picture = stored
        else:
            centre, width = centre_width
            picture = np.clip((hu - (centre - width / 2)) / width, 0.0, 1.0)
        data = png_bytes(picture)
        if all(data != probe.data for probe in probes):
            probes.append(Probe(f"pydicom-{stem}-{window}", "ct", data))
    return probes


def package_probes() -> list[Probe]:
    """Real non-chest images shipped by installed packages (skipped, with a log line, when absent).

    scikit-image's bundled samples (photos, textures, micrographs, text, a head phantom); from pydicom-data the
    NEMA tibia radiograph ``RG3`` as DICOM in two transfer syntaxes (a real radiograph of the wrong body part;
    there is no knee radiograph in any installed package) and the CT slices of :data:`CT_INSTANCES`, each
    rendered four ways (:func:`ct_renderings`).
    """
    probes: list[Probe] = []
    try:
        import skimage.data
    except ImportError:
        log.warning("scikit-image is not installed: the gate is checked without natural photos")
    else:
        for name in SKIMAGE_SAMPLES:
            kind: Literal["photo", "ct"] = "ct" if name == "shepp_logan_phantom" else "photo"
            probes.append(Probe(f"skimage-{name}", kind, png_bytes(getattr(skimage.data, name)())))
    from pydicom.data import get_testdata_file

    for name, label in (("RG3_UNCR.dcm", "pydicom-RG3-tibia"), ("RG3_J2KI.dcm", "pydicom-RG3-tibia-j2k")):
        found = get_testdata_file(name)
        if found is None:
            log.warning("pydicom-data is not installed: the gate is checked without the tibia radiograph %s", name)
            continue
        probes.append(Probe(label, "radiograph-other", Path(str(found)).read_bytes()))
    for name in CT_INSTANCES:
        found = get_testdata_file(name)
        if found is None:
            log.warning("%s is not installed (pydicom-data): the gate is checked without it", name)
            continue
        probes.extend(ct_renderings(Path(str(found)), name.removesuffix(".dcm")))
    return probes


def probe_images(seed: int = 0) -> list[Probe]:
    """Every non-radiograph probe available here: package images first, then synthetic ones."""
    return package_probes() + synthetic_probes(seed)


def other_chest_radiographs(extra: Sequence[Path] = ()) -> list[tuple[str, bytes]]:
    """Frontal chest radiographs never used to fit the gate: pydicom-data's NEMA RG1 CR (as uncompressed DICOM
    and as JPEG 2000) and the ``extra`` files given (e.g. the SIIM chest CR in ../shared).

    How the gate treats a film from a source it never saw is what a deployment elsewhere meets first.
    """
    from pydicom.data import get_testdata_file

    found = [(name, get_testdata_file(name)) for name in ("RG1_UNCR.dcm", "RG1_J2KI.dcm")]
    films = [(f"pydicom-{name}", Path(str(path)).read_bytes()) for name, path in found if path is not None]
    return films + [(path.name, path.read_bytes()) for path in extra]


def image_features(
    model: BayesianEfficientNet, spec: ModelSpec, images: Iterable[bytes], *, batch_size: int = 16
) -> FloatArray:
    """Trunk features ``(N, F)`` of uploaded-file bytes, decoded and preprocessed as the service does."""
    tensors = [preprocess(decode_image(data), spec) for data in images]
    return _features(model, tensors, batch_size)


def _features(model: BayesianEfficientNet, tensors: Sequence[torch.Tensor], batch_size: int) -> FloatArray:
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, len(tensors), batch_size):
            x = torch.stack(list(tensors[start : start + batch_size])).to(device)
            out.append(model.trunk_features(model.forward_trunk(x)).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


# --- reference films ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Film:
    """One radiograph: its file, its patient (the unit of every split), its source (site, set), its age if known."""

    path: Path
    patient: str
    source: str
    age_years: float | None = None

    @property
    def adult(self) -> bool:
        """Not known to be a child: the gate's reference is adult films, and a missing age is not evidence."""
        return self.age_years is None or self.age_years >= ADULT_AGE_YEARS


def _ages(csv_path: Path) -> dict[str, float]:
    """``Path`` -> ``Age`` (years) of the rows of a CheXpert-layout CSV that have a numeric age."""
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    ages = {}
    for row in rows:
        try:
            age = float(row.get("Age") or "")
        except ValueError:
            continue
        if math.isfinite(age):
            ages[row["Path"]] = age
    return ages


def csv_films(csv_path: Path, *, max_samples: int | None = None) -> list[Film]:
    """The frontal (AP/PA) films a CheXpert-layout CSV lists, with the ``Age`` column when it has one; the source
    is the dataset folder's name."""
    from train.data import load_chexpert

    ds = load_chexpert(csv_path, max_samples=max_samples)
    source = csv_path.resolve().parent.name
    ages = _ages(csv_path)
    return [
        Film(Path(row["image"]["path"]), f"{source}/{row['patient_id']}", source, ages.get(row["path"]))
        for row in ds.select_columns(["image", "patient_id", "path"])
    ]


def folder_films(folder: Path) -> list[Film]:
    """The films a folder's ``labels.csv`` lists (columns ``file`` and, optionally, ``patientid`` and ``license``).

    Rows without a patient are their own patient. The source is the folder's name. Films under a share-alike licence
    (``license`` containing "SA", e.g. CC BY-SA) are left out: the shipped gate's statistics are computed from the
    films it is fitted on, and a share-alike film would put the gate file under that licence.
    """
    labels = folder / "labels.csv"
    if not labels.is_file():
        raise FileNotFoundError(f"{labels} does not exist: a film folder lists its files (and patients) there")
    with labels.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "file" not in rows[0]:
        raise ValueError(f"{labels} has no 'file' column or no rows")
    films = []
    for row in rows:
        if "SA" in (row.get("license") or "").upper().replace("-", " ").split():
            log.info("left out of the reference films (share-alike licence %s): %s", row["license"], row["file"])
            continue
        patient = (row.get("patientid") or "").strip() or row["file"]
        path = folder / row["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in {labels} but does not exist")
        films.append(Film(path, f"{folder.name}/{patient}", folder.name))
    return films


def fov_crop(pixels: npt.NDArray[Any], rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """A random field-of-view crop of a film ``(H, W)``: each side keeps a :data:`CROP_FRACTION` share of it."""
    height, width = pixels.shape
    lo, hi = CROP_FRACTION
    h = max(1, int(height * rng.uniform(lo, hi)))
    w = max(1, int(width * rng.uniform(lo, hi)))
    top = int(rng.integers(0, height - h + 1))
    left = int(rng.integers(0, width - w + 1))
    return np.ascontiguousarray(pixels[top : top + h, left : left + w], dtype=np.float32)


@dataclass(frozen=True)
class Reference:
    """Trunk features of the reference films ``(N, F)``, of their crops ``(C, N, F)``, and who each film is."""

    features: FloatArray
    crops: FloatArray
    patients: npt.NDArray[np.str_]
    sources: npt.NDArray[np.str_]
    names: npt.NDArray[np.str_]

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def subset(self, index: npt.NDArray[np.intp]) -> Reference:
        return Reference(
            self.features[index], self.crops[:, index], self.patients[index], self.sources[index], self.names[index]
        )

    def fitting_features(self, crops: int) -> FloatArray:
        """The films' features and those of their first ``crops`` crops, stacked ``(N * (1 + crops), F)``."""
        return np.vstack([self.features, *self.crops[:crops]])


def reference_features(
    model: BayesianEfficientNet,
    spec: ModelSpec,
    films: Sequence[Film],
    *,
    crops: int,
    seed: int = 0,
    batch_size: int = 16,
) -> Reference:
    """Features of each film and of ``crops`` random field-of-view crops of it (``seed`` fixes the crops).

    Films are decoded ``batch_size`` at a time, so memory holds one batch of images, not the whole set.
    """
    rng = np.random.default_rng(seed)
    whole: list[FloatArray] = []
    cropped: list[FloatArray] = []
    for start in range(0, len(films), batch_size):
        images = [decode_image(film.path.read_bytes()).pixels for film in films[start : start + batch_size]]
        whole.append(_features(model, [preprocess(pixels, spec) for pixels in images], batch_size))
        crops_of_batch = [[preprocess(fov_crop(pixels, rng), spec) for pixels in images] for _ in range(crops)]
        if crops:
            cropped.append(np.stack([_features(model, c, batch_size) for c in crops_of_batch]))
    features = np.vstack(whole) if whole else np.zeros((0, 0))
    return Reference(
        features,
        np.concatenate(cropped, axis=1) if cropped else np.zeros((0, *features.shape)),
        np.array([f.patient for f in films]),
        np.array([f.source for f in films]),
        np.array([f"{f.source}/{f.path.name}" for f in films]),
    )


# --- the gate --------------------------------------------------------------------------------------------------


def hellinger(features: FloatArray) -> FloatArray:
    """:func:`bayesnet.ood.hellinger` in float64 numpy: signed square root, then unit L2 norm per row."""
    root = np.sign(features) * np.sqrt(np.abs(features))
    return np.asarray(root / np.maximum(np.linalg.norm(root, axis=1, keepdims=True), 1e-12))


@dataclass(frozen=True)
class GateFit:
    """The arrays and weight of a fitted gate, before a threshold is chosen."""

    mean: FloatArray  # (F,)
    basis: FloatArray  # (F, k)
    precision: FloatArray  # (k, k)
    residual_weight: float
    shrinkage: float
    kind: ScoreKind = "residual"
    feature_map: FeatureMap = "hellinger"

    @property
    def method(self) -> str:
        """``OODSpec.method``: the score's name, prefixed with the feature map's (see :mod:`bayesnet.ood`)."""
        prefix = HELLINGER_PREFIX if self.feature_map == "hellinger" else ""
        return prefix + METHOD_NAMES[self.kind]

    def gate(self, threshold: float, **spec_fields: Any) -> OODGate:
        spec = OODSpec(
            threshold=threshold,
            dims=self.basis.shape[1],
            feature_dim=self.basis.shape[0],
            residual_weight=self.residual_weight,
            method=self.method,
            **spec_fields,
        )
        return OODGate(
            torch.from_numpy(self.mean), torch.from_numpy(self.basis), torch.from_numpy(self.precision), spec
        )

    def score(self, features: FloatArray) -> FloatArray:
        """Scores ``(N,)`` of trunk features in float64 (the gate computes the same in float32 with torch)."""
        mapped = hellinger(features) if self.feature_map == "hellinger" else features
        centred = mapped - self.mean
        coords = centred @ self.basis
        inside = np.einsum("nk,kj,nj->n", coords, self.precision, coords)
        outside = ((centred - coords @ self.basis.T) ** 2).sum(axis=1)
        return np.asarray(inside + self.residual_weight * outside)


def fit_gate(
    features: FloatArray, *, dims: int, kind: ScoreKind = "residual", feature_map: FeatureMap = "hellinger"
) -> GateFit:
    """Fit a gate on reference trunk features ``(N, F)`` (N >= 2), after ``feature_map``.

    ``residual``: the squared norm outside the top-``dims`` principal subspace (reconstruction error).
    ``subspace``: the Mahalanobis distance inside it with a Ledoit-Wolf shrinkage covariance (the sample
    covariance of N < F points is singular, and its small eigenvalues are noise). ``combined``: both, the
    residual weighted so that the two parts have the same mean on the reference images.
    """
    from sklearn.covariance import LedoitWolf

    n, f = features.shape
    if n < 2:
        raise ValueError(f"fitting an OOD gate needs at least 2 training images, got {n}")
    mapped = hellinger(features) if feature_map == "hellinger" else features
    dims = min(dims, f, n - 1)
    mean = mapped.mean(axis=0)
    centred = mapped - mean
    # Right singular vectors of the centred data = principal axes, largest variance first.
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    basis = np.ascontiguousarray(vt[:dims].T)
    coords = centred @ basis
    estimator = LedoitWolf(assume_centered=True).fit(coords)
    precision = np.asarray(estimator.precision_, dtype=np.float64)
    precision = (precision + precision.T) / 2.0
    outside = ((centred - coords @ basis.T) ** 2).sum(axis=1)
    inside = np.einsum("nk,kj,nj->n", coords, precision, coords)
    if kind == "subspace":
        weight = 0.0
    elif kind == "residual":
        precision, weight = np.zeros_like(precision), 1.0
    else:
        weight = float(inside.mean() / max(outside.mean(), 1e-12))
    return GateFit(mean, basis, precision, weight, float(estimator.shrinkage_), kind, feature_map)


def describe(fitted: GateFit) -> str:
    """One sentence saying what the score of a fitted gate measures."""
    dims, features = fitted.basis.shape[1], fitted.basis.shape[0]
    mapped = "Hellinger-mapped " if fitted.feature_map == "hellinger" else ""
    subspace = f"the top-{dims} principal subspace of the reference films' {features} {mapped}pooled trunk features"
    mahalanobis = f"squared Mahalanobis distance (Ledoit-Wolf shrinkage {fitted.shrinkage:.2f}) inside {subspace}"
    if fitted.kind == "subspace":
        return mahalanobis
    if fitted.kind == "residual":
        return f"squared distance of the features from {subspace} (PCA reconstruction error)"
    return f"{mahalanobis}, plus the squared distance from that subspace weighted {fitted.residual_weight:.3g}"


def calibrate_threshold(scores: FloatArray, quantile: float = 0.99) -> float:
    """The ``quantile`` of held-out radiographs' scores (linear interpolation): the accept/flag boundary."""
    if scores.size == 0:
        raise ValueError("calibrating the OOD threshold needs at least one held-out radiograph")
    return float(np.quantile(scores, quantile))


def auroc(in_scores: FloatArray, out_scores: FloatArray) -> float:
    """P(score of a non-radiograph > score of a radiograph), ties counted half (Mann-Whitney)."""
    if in_scores.size == 0 or out_scores.size == 0:
        return math.nan
    greater = (out_scores[:, None] > in_scores[None, :]).sum()
    ties = (out_scores[:, None] == in_scores[None, :]).sum()
    return float((greater + 0.5 * ties) / (in_scores.size * out_scores.size))


def grouped_folds(ref: Reference, folds: int, seed: int) -> Iterator[tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]]:
    """``(fit, test)`` index pairs: no patient on both sides, each source spread over the folds when it can be.

    ``min(folds, patients)`` folds (at least 2 patients are needed); stratified by source when every source has
    at least that many films, else plain grouped folds.
    """
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    patients = np.unique(ref.patients)
    if patients.size < 2:
        raise ValueError(f"splitting the reference films needs at least 2 patients, got {patients.size}")
    n = min(folds, patients.size)
    _, source_codes, counts = np.unique(ref.sources, return_inverse=True, return_counts=True)
    if counts.min() >= n:
        splitter: GroupKFold | StratifiedGroupKFold = StratifiedGroupKFold(n, shuffle=True, random_state=seed)
    else:
        splitter = GroupKFold(n, shuffle=True, random_state=seed)
    yield from splitter.split(ref.features, source_codes, groups=ref.patients)


@dataclass(frozen=True)
class GateRecipe:
    """How a gate is fitted and its threshold chosen from a set of reference films (the procedure validated)."""

    dims: int = 32
    kind: ScoreKind = "residual"
    feature_map: FeatureMap = "hellinger"
    crops: int = 1
    quantile: float = 0.99
    margin: float = 1.0
    folds: int = 5

    def label(self) -> str:
        return f"{self.feature_map} {self.kind} k={self.dims}, {self.crops} crop(s)/film"

    def fit_arrays(self, ref: Reference) -> GateFit:
        return fit_gate(ref.fitting_features(self.crops), dims=self.dims, kind=self.kind, feature_map=self.feature_map)

    def crossfit_scores(self, ref: Reference, seed: int = 0) -> FloatArray:
        """Each film's score from a gate fitted without its patient (and without that patient's crops)."""
        scores = np.full(len(ref), np.nan)
        for fit, test in grouped_folds(ref, self.folds, seed):
            scores[test] = self.fit_arrays(ref.subset(fit)).score(ref.features[test])
        return scores

    def fit(self, ref: Reference, seed: int = 0) -> tuple[GateFit, float, FloatArray]:
        """The gate fitted on every film (and crop) of ``ref``, its threshold, and the cross-fitted scores."""
        scores = self.crossfit_scores(ref, seed)
        threshold = self.margin * calibrate_threshold(scores, self.quantile)
        return self.fit_arrays(ref), threshold, scores


def _count(flags: npt.NDArray[np.bool_]) -> list[int]:
    return [int(flags.sum()), int(flags.size)]


def _sum_counts(counts: Iterable[Sequence[int]]) -> list[int]:
    """``[k, n]`` pairs added up."""
    pairs = list(counts)
    return [sum(p[0] for p in pairs), sum(p[1] for p in pairs)]


def evaluate(
    recipe: GateRecipe,
    ref: Reference,
    probes: FloatArray,
    probe_kinds: Sequence[str],
    others: FloatArray,
    *,
    probe_names: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Validate ``recipe`` on films it never fitted: outer grouped folds, then each source left out.

    Per outer fold the recipe is fitted (with its own cross-fitted threshold) on the other folds' films; its
    held-out films flagged (per source), non-chest ``probes`` caught (per kind) and ``others`` (chest films
    from elsewhere, never fitted) accepted are counted. Leaving a whole source out asks what a new site meets.
    """
    kinds = np.asarray(probe_kinds)
    names = np.asarray(probe_names if probe_names is not None else [str(i) for i in range(len(probe_kinds))])
    rows: list[dict[str, Any]] = []
    aurocs = []
    for number, (fit, test) in enumerate(grouped_folds(ref, recipe.folds, seed), start=1):
        fitted, threshold, _ = recipe.fit(ref.subset(fit), seed)
        held_out = fitted.score(ref.features[test])
        probe_scores = fitted.score(probes)
        aurocs.append(auroc(held_out, probe_scores))
        rows.append(
            {
                "fold": number,
                "n_fit": len(fit),
                "threshold": threshold,
                "held_out_flagged": {
                    source: _count(held_out[ref.sources[test] == source] > threshold)
                    for source in np.unique(ref.sources)
                },
                "non_chest_caught": {
                    kind: _count(probe_scores[kinds == kind] > threshold) for kind in PROBE_KINDS if kind in kinds
                },
                "other_chest_accepted": _count(fitted.score(others) <= threshold) if others.size else [0, 0],
                "flagged_films": [str(name) for name in ref.names[test][held_out > threshold]],
            }
        )
    total_flagged = {str(s): _sum_counts(r["held_out_flagged"][s] for r in rows) for s in np.unique(ref.sources)}
    caught = {kind: _sum_counts(r["non_chest_caught"][kind] for r in rows) for kind in rows[0]["non_chest_caught"]}
    new_source = []
    sources = np.unique(ref.sources)
    if sources.size > 1:
        for source in sources:
            fitted, threshold, _ = recipe.fit(ref.subset(np.flatnonzero(ref.sources != source)), seed)
            held_out = fitted.score(ref.features[ref.sources == source])
            probe_scores = fitted.score(probes)
            new_source.append(
                {
                    "held_out": str(source),
                    "flagged": _count(held_out > threshold),
                    "non_chest_caught": _count(probe_scores > threshold),
                    "non_chest_missed": [str(name) for name in names[probe_scores <= threshold]],
                    "worst_over_threshold": float(held_out.max() / threshold),
                }
            )
    return {
        "folds": rows,
        "held_out_flagged": total_flagged,
        "held_out_flagged_total": _sum_counts(total_flagged.values()),
        "non_chest_caught": caught,
        "non_chest_caught_total": _sum_counts(caught.values()),
        "other_chest_accepted": _sum_counts(r["other_chest_accepted"] for r in rows),
        "auroc": float(np.nanmean(aurocs)),
        "new_source": new_source,
    }


def comparison_grid(chosen: GateRecipe) -> list[GateRecipe]:
    """The recipes :func:`compare_recipes` sets beside ``chosen``: raw features with k = 64 (the gate shipped
    before), ``chosen`` with one crop per film (or none), other subspace sizes and the combined score. The
    reference needs at least one crop per film computed (:data:`COMPARISON_CROPS`)."""
    grid = [
        replace(chosen, feature_map="none", crops=0, dims=64),
        chosen,
        replace(chosen, crops=COMPARISON_CROPS if chosen.crops == 0 else 0),
        *(replace(chosen, dims=dims) for dims in (16, 64) if dims != chosen.dims),
        replace(chosen, kind="combined"),
    ]
    return [recipe for i, recipe in enumerate(grid) if recipe not in grid[:i]]


def compare_recipes(
    chosen: GateRecipe,
    ref: Reference,
    probes: FloatArray,
    probe_kinds: Sequence[str],
    others: FloatArray,
    *,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The same validation for a few other recipes, so that the choice is measured, not guessed."""
    rows = []
    for recipe in comparison_grid(chosen):
        result = evaluate(recipe, ref, probes, probe_kinds, others, seed=seed)
        flagged_new = _sum_counts(r["flagged"] for r in result["new_source"])
        caught = result["non_chest_caught_total"]
        rows.append(
            {
                "feature_map": recipe.feature_map,
                "crops": recipe.crops,
                "kind": recipe.kind,
                "dims": recipe.dims,
                "held_out_flagged": counts_text(result["held_out_flagged_total"]),
                "new_source_flagged": counts_text(flagged_new) if result["new_source"] else "n/a",
                "non_chest_caught": counts_text(caught),
                "auroc": result["auroc"],
                "outliers_flagged": caught[0] / caught[1] if caught[1] else math.nan,
            }
        )
    return rows


def fold_table(report: dict[str, Any]) -> str:
    """The validation in ``report`` as plain text: one line per fold, totals, each source left out, variants."""
    validation = report["validation"]
    sources = list(validation["held_out_flagged"])
    kinds = list(validation["non_chest_caught"])
    header = ["fold", "fit films", "threshold"] + [f"flagged {s}" for s in sources] + [f"caught {k}" for k in kinds]
    header.append("other chest accepted")
    lines = [" | ".join(header)]
    for row in validation["folds"]:
        cells = [str(row["fold"]), str(row["n_fit"]), f"{row['threshold']:.4f}"]
        cells += [counts_text(row["held_out_flagged"][s]) for s in sources]
        cells += [counts_text(row["non_chest_caught"][k]) for k in kinds]
        cells.append(counts_text(row["other_chest_accepted"]))
        lines.append(" | ".join(cells))
    total = ["total", "", ""] + [counts_text(validation["held_out_flagged"][s]) for s in sources]
    total += [counts_text(validation["non_chest_caught"][k]) for k in kinds]
    total.append(counts_text(validation["other_chest_accepted"]))
    lines.append(" | ".join(total))
    lines.append(
        f"held-out chest films flagged: {counts_text(validation['held_out_flagged_total'])}; non-chest caught: "
        f"{counts_text(validation['non_chest_caught_total'])}; mean fold AUROC {validation['auroc']:.4f}"
    )
    flagged = [name for row in validation["folds"] for name in row["flagged_films"]]
    lines.append(f"held-out chest films flagged: {', '.join(flagged) or 'none'}")
    for row in validation["new_source"]:
        lines.append(
            f"{row['held_out']} left out (a new site): {counts_text(row['flagged'])} of its films flagged (worst "
            f"{row['worst_over_threshold']:.2f} x threshold), non-chest caught {counts_text(row['non_chest_caught'])}"
            + (f" (missed: {', '.join(row['non_chest_missed'])})" if row["non_chest_missed"] else "")
        )
    for variant in report.get("variants") or []:
        lines.append(
            f"variant {variant['feature_map']} {variant['kind']} k={variant['dims']} crops={variant['crops']}: "
            f"held-out flagged {variant['held_out_flagged']}, new site flagged {variant['new_source_flagged']}, "
            f"non-chest caught {variant['non_chest_caught']}, AUROC {variant['auroc']:.4f}"
        )
    lines.append(f"shipped gate: threshold {report['threshold']:.4f}; non-chest flagged {report['flagged_by_kind']}")
    lines.append(f"  non-chest images it lets through: {', '.join(report['missed']) or 'none'}")
    for name, other in (report.get("other_chest") or {}).items():
        verdict = "accepted" if other["accepted"] else "flagged"
        lines.append(f"  {name}: {other['score_over_threshold']:.2f} x threshold ({verdict})")
    if "children_left_out" in report:
        children = report["children_left_out"]
        lines.append(
            f"films of patients under {ADULT_AGE_YEARS:g} left out of the reference: {children['n']} "
            f"({children['flagged_by_shipped_gate']} flagged by the shipped gate; too few to call it a detector)"
        )
    return "\n".join(lines)


def fit_ood(
    checkpoint: Path,
    train_csv: Path,
    valid_csv: Path | None = None,
    *,
    films: Sequence[Path] = (),
    checks: Sequence[Path] = (),
    out: Path | None = None,
    recipe: GateRecipe = GateRecipe(),
    max_train_samples: int | None = None,
    compare: bool = True,
    write: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Validate ``recipe`` on the reference films, then fit the gate on all of them and save it.

    Reference films: ``train_csv`` (``max_train_samples`` of it), ``valid_csv`` and the film folders ``films``.
    ``checks``: chest films never fitted, reported beside pydicom-data's RG1. The gate goes into ``checkpoint``
    (or ``out``, a copy); ``write=False`` only measures. Returns the report also stored in ``model.json``'s
    metadata (``ood``) and quoted by the model card. The weights file is never rewritten.
    """
    model, spec = load_checkpoint(checkpoint)
    listed = csv_films(train_csv, max_samples=max_train_samples)
    if valid_csv is not None:
        listed += csv_films(valid_csv)
    for folder in films:
        listed += folder_films(folder)
    reference_films = [film for film in listed if film.adult]
    children = [film for film in listed if not film.adult]
    if children:
        log.info("OOD gate: %d films of patients under %g left out of the reference", len(children), ADULT_AGE_YEARS)
    crops = max(recipe.crops, COMPARISON_CROPS) if compare else recipe.crops
    ref = reference_features(model, spec, reference_films, crops=crops, seed=seed)
    probes = probe_images(seed)
    probe_features = image_features(model, spec, (p.data for p in probes))
    kinds = [p.kind for p in probes]
    others = other_chest_radiographs(checks)
    other_features = image_features(model, spec, (data for _, data in others))
    log.info("OOD gate: %d reference films, %d non-chest probes; validating %s", len(ref), len(probes), recipe.label())
    names = [p.name for p in probes]
    validation = evaluate(recipe, ref, probe_features, kinds, other_features, probe_names=names, seed=seed)
    fitted, threshold, crossfit = recipe.fit(ref, seed)
    in_sample, out_scores = fitted.score(ref.features), fitted.score(probe_features)
    flagged = {p.name: bool(s > threshold) for p, s in zip(probes, out_scores, strict=True)}
    sources = {str(s): int((ref.sources == s).sum()) for s in np.unique(ref.sources)}
    held_out = validation["held_out_flagged_total"]
    report: dict[str, Any] = {
        "method": describe(fitted),
        "feature_map": recipe.feature_map,
        "dims": fitted.basis.shape[1],
        "crops_per_film": recipe.crops,
        "threshold": threshold,
        "threshold_quantile": recipe.quantile,
        "threshold_margin": recipe.margin,
        "threshold_from": f"{recipe.quantile:g} quantile of the films' cross-fitted scores "
        f"({recipe.folds} grouped folds)" + (f" x {recipe.margin:g}" if recipe.margin != 1.0 else ""),
        "sources": sources,
        "n_patients": int(np.unique(ref.patients).size),
        "n_train": len(ref),
        "train_csv": ", ".join(sources),
        "n_valid": held_out[1],
        "valid_csv": f"{recipe.folds} grouped folds",
        "auroc": validation["auroc"],
        "valid_accepted": 1.0 - held_out[0] / held_out[1],
        "train_accepted": float(np.mean(in_sample <= threshold)),
        "crossfit_accepted": float(np.mean(crossfit <= threshold)),
        "n_outliers": len(probes),
        "outliers_flagged": float(np.mean(out_scores > threshold)),
        "lowest_outlier_over_threshold": float(out_scores.min() / threshold) if out_scores.size else math.nan,
        "flagged_by_kind": {
            kind: counts_text(_count(np.array([flagged[p.name] for p in probes if p.kind == kind])))
            for kind in PROBE_KINDS
            if kind in kinds
        },
        "missed": sorted(name for name, hit in flagged.items() if not hit),
        "other_chest": {
            name: {"score_over_threshold": float(score / threshold), "accepted": bool(score <= threshold)}
            for (name, _), score in zip(others, fitted.score(other_features), strict=True)
        },
        "validation": validation,
    }
    if children:
        child_scores = fitted.score(image_features(model, spec, (film.path.read_bytes() for film in children)))
        # Reported, not a claim: too few films to say whether the gate can tell a child's film from an adult's.
        report["children_left_out"] = {
            "n": len(children),
            "flagged_by_shipped_gate": int((child_scores > threshold).sum()),
        }
    if compare:
        report["variants"] = compare_recipes(recipe, ref, probe_features, kinds, other_features, seed=seed)
    if not write:
        return report
    target = checkpoint
    if out is not None and out.resolve() != checkpoint.resolve():
        shutil.copytree(checkpoint, out, dirs_exist_ok=True)
        target = out
    gate = fitted.gate(
        threshold,
        threshold_quantile=recipe.quantile,
        details={
            "n_train": report["n_train"],
            "sources": sources,
            "crops_per_film": recipe.crops,
            "threshold_margin": recipe.margin,
            "held_out_flagged": counts_text(held_out),
            "auroc": report["auroc"],
        },
    )
    save_ood_gate(target, gate, metadata={"ood": report})
    card = target / "MODEL_CARD.md"
    if card.is_file():
        card.write_text(with_ood_section(card.read_text(), report))
    log.info("OOD gate written to %s: threshold %.4f, held-out flagged %s", target, threshold, counts_text(held_out))
    return report
