"""Fitting the out-of-distribution gate of a checkpoint (``python -m train ood``), without retraining it.

1. Features: the model's deterministic trunk features (:meth:`BayesianEfficientNet.trunk_features`, the
   same ones the service scores) of the frontal training radiographs, decoded and preprocessed exactly as
   the service does.
2. Fit (:func:`fit_gate`): mean and top-``dims`` principal subspace. The default score is the squared
   residual outside that subspace; ``subspace`` uses a Ledoit-Wolf shrinkage Mahalanobis distance inside
   it instead, ``combined`` both (weighted to count equally on the training images). On the demo model
   the residual separated best (see the variants table in its card and docs/ood.md).
3. Threshold (:func:`calibrate_threshold`): a high quantile (99th percentile) of held-out radiographs'
   scores, so about 1% of in-distribution films are flagged by construction.
4. Check (:func:`probe_images`): natural photos bundled with scikit-image, a tibia radiograph and a CT
   slice from pydicom's test data, noise and synthetic shapes. The AUROC of radiographs against those
   and the fraction flagged go into ``model.json`` and the model card; several subspace sizes and score
   variants are compared on the same images so the choice is measured, not guessed.
"""

from __future__ import annotations

import io
import logging
import math
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, ImageDraw

from bayesnet import BayesianEfficientNet, ModelSpec, decode_image, load_checkpoint, preprocess
from bayesnet.ood import OODGate, save_ood_gate
from bayesnet.spec import OODSpec

log = logging.getLogger("train.ood")

FloatArray = npt.NDArray[np.float64]
ScoreKind = Literal["subspace", "residual", "combined"]
#: The spec's short name of each score (``OODSpec.method``).
METHOD_NAMES: Final[dict[str, str]] = {
    "subspace": "pca-mahalanobis",
    "residual": "pca-residual",
    "combined": "pca-mahalanobis+residual",
}

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


def package_probes() -> list[Probe]:
    """Real non-chest images shipped by installed packages (skipped, with a log line, when absent).

    scikit-image's bundled samples (photos, textures, micrographs, text, a head phantom), the NEMA tibia
    radiograph ``RG3_UNCR.dcm`` from pydicom-data (a real radiograph of the wrong body part, as DICOM), and
    pydicom's ``CT_small.dcm`` rendered to PNG (as DICOM it is refused earlier, by modality).
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
    try:
        from pydicom import dcmread
        from pydicom.data import get_testdata_file
    except ImportError:  # pragma: no cover - pydicom is a core dependency
        return probes
    rg3 = get_testdata_file("RG3_UNCR.dcm")
    if rg3 is None:
        log.warning("pydicom-data is not installed: the gate is checked without the tibia radiograph")
    else:
        probes.append(Probe("pydicom-RG3-tibia", "radiograph-other", Path(str(rg3)).read_bytes()))
    ct = get_testdata_file("CT_small.dcm")
    if ct is not None:
        probes.append(Probe("pydicom-CT_small", "ct", png_bytes(dcmread(str(ct)).pixel_array.astype(np.float64))))
    return probes


def other_chest_radiographs() -> list[tuple[str, bytes]]:
    """Frontal chest radiographs from a source other than the training data (pydicom-data's NEMA RG1 CR).

    Not outliers: reported separately, because how the gate treats an unseen site's films is what a
    deployment elsewhere would meet first.
    """
    from pydicom.data import get_testdata_file

    found = [(name, get_testdata_file(name)) for name in ("RG1_UNCR.dcm", "RG1_J2KI.dcm")]
    return [(f"pydicom-{name}", Path(str(path)).read_bytes()) for name, path in found if path is not None]


def probe_images(seed: int = 0) -> list[Probe]:
    """Every non-radiograph probe available here: package images first, then synthetic ones."""
    return package_probes() + synthetic_probes(seed)


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


def csv_features(
    model: BayesianEfficientNet, spec: ModelSpec, csv: Path, *, max_samples: int | None = None, batch_size: int = 16
) -> FloatArray:
    """Trunk features of the frontal (AP/PA) images a CheXpert-layout CSV lists."""
    from train.data import load_chexpert
    from train.loader import make_loader

    ds = load_chexpert(csv, max_samples=max_samples)
    loader = make_loader(ds, spec, train=False, batch_size=batch_size, workers=0)
    tensors = [x for batch, _ in loader for x in batch]
    return _features(model, tensors, batch_size)


@dataclass(frozen=True)
class GateFit:
    """The arrays and weight of a fitted gate, before a threshold is chosen."""

    mean: FloatArray  # (F,)
    basis: FloatArray  # (F, k)
    precision: FloatArray  # (k, k)
    residual_weight: float
    shrinkage: float

    def gate(self, threshold: float, **spec_fields: Any) -> OODGate:
        spec = OODSpec(
            threshold=threshold,
            dims=self.basis.shape[1],
            feature_dim=self.basis.shape[0],
            residual_weight=self.residual_weight,
            **spec_fields,
        )
        return OODGate(
            torch.from_numpy(self.mean), torch.from_numpy(self.basis), torch.from_numpy(self.precision), spec
        )

    def score(self, features: FloatArray) -> FloatArray:
        """Scores ``(N,)`` in float64 (the gate computes the same in float32 with torch)."""
        centred = features - self.mean
        coords = centred @ self.basis
        inside = np.einsum("nk,kj,nj->n", coords, self.precision, coords)
        outside = ((centred - coords @ self.basis.T) ** 2).sum(axis=1)
        return np.asarray(inside + self.residual_weight * outside)


def fit_gate(features: FloatArray, *, dims: int, kind: ScoreKind = "residual") -> GateFit:
    """Fit a gate on training features ``(N, F)`` (N >= 2).

    ``subspace``: Mahalanobis distance in the top-``dims`` principal subspace with a Ledoit-Wolf shrinkage
    covariance (the sample covariance of N < F points is singular, and its small eigenvalues are noise).
    ``residual``: only the squared norm outside that subspace (reconstruction error). ``combined``: both,
    the residual weighted so that the two parts have the same mean on the training images.
    """
    from sklearn.covariance import LedoitWolf

    n, f = features.shape
    if n < 2:
        raise ValueError(f"fitting an OOD gate needs at least 2 training images, got {n}")
    dims = min(dims, f, n - 1)
    mean = features.mean(axis=0)
    centred = features - mean
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
    return GateFit(mean, basis, precision, weight, float(estimator.shrinkage_))


def describe(kind: ScoreKind, fitted: GateFit) -> str:
    """One sentence saying what the score of a fitted gate measures."""
    dims, features = fitted.basis.shape[1], fitted.basis.shape[0]
    subspace = f"the top-{dims} principal subspace of the training images' {features} pooled trunk features"
    mahalanobis = f"squared Mahalanobis distance (Ledoit-Wolf shrinkage {fitted.shrinkage:.2f}) inside {subspace}"
    if kind == "subspace":
        return mahalanobis
    if kind == "residual":
        return f"squared distance of the features from {subspace} (PCA reconstruction error)"
    return f"{mahalanobis}, plus the squared distance from that subspace weighted {fitted.residual_weight:.3g}"


def calibrate_threshold(valid_scores: FloatArray, quantile: float = 0.99) -> float:
    """The ``quantile`` of held-out radiographs' scores (linear interpolation): the accept/flag boundary."""
    if valid_scores.size == 0:
        raise ValueError("calibrating the OOD threshold needs at least one held-out radiograph")
    return float(np.quantile(valid_scores, quantile))


def auroc(in_scores: FloatArray, out_scores: FloatArray) -> float:
    """P(score of a non-radiograph > score of a radiograph), ties counted half (Mann-Whitney)."""
    if in_scores.size == 0 or out_scores.size == 0:
        return math.nan
    greater = (out_scores[:, None] > in_scores[None, :]).sum()
    ties = (out_scores[:, None] == in_scores[None, :]).sum()
    return float((greater + 0.5 * ties) / (in_scores.size * out_scores.size))


def compare_variants(
    train: FloatArray,
    valid: FloatArray,
    outliers: FloatArray,
    *,
    dims_grid: Sequence[int] = (16, 32, 64, 128),
    kinds: Sequence[ScoreKind] = ("subspace", "residual", "combined"),
    quantile: float = 0.99,
) -> list[dict[str, Any]]:
    """AUROC (held-out radiographs vs outliers) and rates at the calibrated threshold, per variant."""
    rows = []
    for dims in dims_grid:
        for kind in kinds:
            fitted = fit_gate(train, dims=dims, kind=kind)
            valid_scores, out_scores = fitted.score(valid), fitted.score(outliers)
            threshold = calibrate_threshold(valid_scores, quantile)
            rows.append(
                {
                    "dims": fitted.basis.shape[1],
                    "kind": kind,
                    "auroc": auroc(valid_scores, out_scores),
                    "outliers_flagged": float(np.mean(out_scores > threshold)),
                }
            )
    return rows


def fit_ood(
    checkpoint: Path,
    train_csv: Path,
    valid_csv: Path,
    *,
    out: Path | None = None,
    dims: int = 64,
    kind: ScoreKind = "residual",
    quantile: float = 0.99,
    max_train_samples: int | None = None,
    compare: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit, calibrate and check the gate of ``checkpoint``; save it there (or into ``out``, a copy).

    Returns the report also stored in ``model.json``'s metadata (``ood``) and quoted by the model card.
    The weights file is never rewritten.
    """
    model, spec = load_checkpoint(checkpoint)
    target = checkpoint
    if out is not None and out.resolve() != checkpoint.resolve():
        shutil.copytree(checkpoint, out, dirs_exist_ok=True)
        target = out
    train = csv_features(model, spec, train_csv, max_samples=max_train_samples)
    valid = csv_features(model, spec, valid_csv)
    probes = probe_images(seed)
    outliers = image_features(model, spec, (p.data for p in probes))
    fitted = fit_gate(train, dims=dims, kind=kind)
    valid_scores, train_scores, out_scores = fitted.score(valid), fitted.score(train), fitted.score(outliers)
    threshold = calibrate_threshold(valid_scores, quantile)
    flagged = {p.name: bool(s > threshold) for p, s in zip(probes, out_scores, strict=True)}
    by_kind: dict[str, list[bool]] = {}
    for probe in probes:
        by_kind.setdefault(probe.kind, []).append(flagged[probe.name])
    report: dict[str, Any] = {
        "method": describe(kind, fitted),
        "threshold": threshold,
        "threshold_quantile": quantile,
        "n_train": int(train.shape[0]),
        "n_valid": int(valid.shape[0]),
        "train_csv": train_csv.name,
        "valid_csv": valid_csv.name,
        "auroc": auroc(valid_scores, out_scores),
        "valid_accepted": float(np.mean(valid_scores <= threshold)),
        "train_accepted": float(np.mean(train_scores <= threshold)),
        "n_outliers": len(probes),
        "outliers_flagged": float(np.mean(out_scores > threshold)),
        # How far the least unusual non-radiograph sits above the threshold (> 1: all flagged, with margin).
        "lowest_outlier_over_threshold": float(out_scores.min() / threshold) if out_scores.size else math.nan,
        "flagged_by_kind": {k: f"{sum(v)}/{len(v)}" for k, v in by_kind.items()},
        "missed": sorted(name for name, hit in flagged.items() if not hit),
    }
    others = other_chest_radiographs()
    if others:
        other_scores = fitted.score(image_features(model, spec, (data for _, data in others)))
        report["other_chest"] = {
            name: {"score_over_threshold": float(score / threshold), "accepted": bool(score <= threshold)}
            for (name, _), score in zip(others, other_scores, strict=True)
        }
    if compare:
        report["variants"] = compare_variants(train, valid, outliers, quantile=quantile)
    gate = fitted.gate(
        threshold,
        threshold_quantile=quantile,
        method=METHOD_NAMES[kind],
        details={"n_train": report["n_train"], "n_valid": report["n_valid"], "auroc": report["auroc"]},
    )
    save_ood_gate(target, gate, metadata={"ood": report})
    card = target / "MODEL_CARD.md"
    if card.is_file():
        from train.card import with_ood_section

        card.write_text(with_ood_section(card.read_text(), report))
    log.info("OOD gate written to %s: threshold %.2f, AUROC %.3f", target, threshold, report["auroc"])
    return report
