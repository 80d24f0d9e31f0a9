"""Out-of-distribution gate: how far an image's trunk features lie from those of adult frontal chest films.

A classifier shown a cat, a knee or a CT slice still returns confident-looking numbers. The gate scores
every image from the features the batch already computed (:meth:`BayesianEfficientNet.trunk_features`:
the pooled features for the default head-only layout), so it costs two small matrix products and no
second forward pass.

The features may first go through a fixed map, then the score is a squared distance inside a
low-dimensional principal subspace of the reference films' mapped features, what lies outside it, or both::

    h = map(f)                         (F,)   "hellinger": sign(f) sqrt|f| / ||sqrt|f|||; otherwise f itself
    c = h - mean                       (F,)   centred
    y = basis^T c                      (k,)   coordinates in the top-k principal subspace
    score = y^T precision y + residual_weight * ||c - basis y||^2

The map is named by the spec's ``method`` (:data:`HELLINGER_PREFIX`; :func:`feature_map`). The Hellinger
map (the square root of the L1-normalised non-negative features, as RootSIFT does for SIFT descriptors:
Arandjelovic and Zisserman, CVPR 2012) makes the distance depend on the pattern of activations rather than
their overall magnitude, which varies with a film's contrast and processing from site to site; the signed
root keeps it defined for the block-dropout layouts, whose features can be negative.

``precision`` is the inverse of a shrinkage covariance of ``y`` (fitted in ``train.ood``, which is where
scikit-learn lives: this module needs only torch), or zero for a residual-only gate. A full F x F precision
matrix would be estimated from a few hundred images in 1280 dimensions (statistically poor) and would not
fit the shipped model's size budget; a small k avoids both. Scalars (threshold, k, weight, method) are in the
spec (:class:`OODSpec`), arrays in a safetensors file beside the weights whose sha256 the spec records;
nothing is ever unpickled. Which map, k and threshold the shipped gate uses, and why, is in docs/ood.md.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from bayesnet.checkpoint import SPEC_FILE, read_checkpoint_document, sha256_file
from bayesnet.errors import CheckpointError, SpecError
from bayesnet.spec import ModelSpec, OODSpec

OOD_FORMAT: Final = "bayesnet-ood/1"
_TENSORS: Final = ("mean", "basis", "precision")
#: ``OODSpec.method`` values starting with this score Hellinger-mapped features (:func:`hellinger`).
HELLINGER_PREFIX: Final = "hellinger-"


def hellinger(features: Tensor) -> Tensor:
    """Signed square root, then unit L2 norm per row: ``(B, F)`` -> ``(B, F)`` float32.

    For non-negative features this is ``sqrt(f / sum(f))``, the embedding in which the Euclidean distance is the
    Hellinger distance between the features read as histograms. A row of zeros stays zero.
    """
    features = features.to(torch.float32)
    root = features.sign() * features.abs().sqrt()
    norm: Tensor = torch.linalg.vector_norm(root, dim=1, keepdim=True)
    return root / norm.clamp_min(1e-12)


def feature_map(method: str) -> str:
    """The map the gate applies to the features before scoring, from ``OODSpec.method``: ``hellinger`` or ``none``."""
    return "hellinger" if method.startswith(HELLINGER_PREFIX) else "none"


@dataclass(frozen=True)
class OODGate:
    """A fitted gate: ``mean`` ``(F,)``, orthonormal ``basis`` ``(F, k)``, ``precision`` ``(k, k)`` and its spec."""

    mean: Tensor
    basis: Tensor
    precision: Tensor
    spec: OODSpec

    def __post_init__(self) -> None:
        f, k = self.spec.feature_dim, self.spec.dims
        shapes = {"mean": (f,), "basis": (f, k), "precision": (k, k)}
        for name, expected in shapes.items():
            actual = tuple(getattr(self, name).shape)
            if actual != expected:
                raise SpecError(f"OOD gate tensor {name!r} has shape {actual}, the OOD spec needs {expected}")
        for name in _TENSORS:
            object.__setattr__(self, name, getattr(self, name).detach().to(torch.float32).contiguous())

    @property
    def threshold(self) -> float:
        return self.spec.threshold

    def to(self, device: torch.device | str) -> OODGate:
        """The same gate with its tensors on ``device``."""
        return OODGate(self.mean.to(device), self.basis.to(device), self.precision.to(device), self.spec)

    def score(self, features: Tensor) -> Tensor:
        """Scores ``(B,)`` float32 of features ``(B, F)``: larger means further from the training images."""
        if features.dim() != 2 or features.shape[1] != self.spec.feature_dim:
            raise ValueError(
                f"OOD gate expects features (B, {self.spec.feature_dim}), got {tuple(features.shape)}: "
                "was it fitted on another model or MC layout?"
            )
        mapped = features.to(device=self.mean.device, dtype=torch.float32)
        if feature_map(self.spec.method) == "hellinger":
            mapped = hellinger(mapped)
        centred = mapped - self.mean
        coords = centred @ self.basis  # (B, k)
        inside = ((coords @ self.precision) * coords).sum(dim=1)
        if self.spec.residual_weight == 0.0:
            return inside
        # The part of c outside the subspace, computed directly: ||c||^2 - ||y||^2 would be the same number
        # in exact arithmetic but loses the small residuals of in-distribution images to float32 round-off.
        outside = (centred - coords @ self.basis.T).square().sum(dim=1)
        return inside + self.spec.residual_weight * outside

    def in_distribution(self, scores: Tensor) -> Tensor:
        """Boolean ``(B,)``: the score is at or below the calibrated threshold."""
        return scores <= self.spec.threshold


def save_ood_gate(
    path: str | os.PathLike[str],
    gate: OODGate,
    *,
    metadata: dict[str, Any] | None = None,
) -> ModelSpec:
    """Write ``gate`` into the checkpoint directory ``path`` and record it in ``model.json``'s spec.

    The weights file is not touched: only the gate's safetensors file is written and the spec in
    ``model.json`` gains ``ood`` (with that file's sha256). ``metadata`` entries (e.g. measured AUROC)
    are merged into ``model.json``'s metadata. Returns the new spec.
    """
    root = Path(path)
    document = read_checkpoint_document(root)
    try:
        old_spec = ModelSpec.from_dict(document["spec"])
    except (KeyError, TypeError, SpecError) as err:
        raise CheckpointError(f"{root / SPEC_FILE}: invalid spec ({err})") from err
    target = root / gate.spec.file
    tmp = root / (gate.spec.file + ".tmp")
    tensors = {name: getattr(gate, name).detach().to("cpu", torch.float32).contiguous() for name in _TENSORS}
    save_file(tensors, str(tmp), metadata={"format": OOD_FORMAT})
    tmp.chmod(0o644)
    tmp.replace(target)
    ood_spec = OODSpec.from_dict({**gate.spec.to_dict(), "sha256": sha256_file(target)})
    spec = old_spec.replace(ood=ood_spec)
    document["spec"] = spec.to_dict()
    if metadata:
        document["metadata"] = {**(document.get("metadata") or {}), **metadata}
    spec_tmp = root / (SPEC_FILE + ".tmp")
    spec_tmp.write_text(json.dumps(document, indent=2) + "\n")
    spec_tmp.replace(root / SPEC_FILE)
    return spec


def load_ood_gate(path: str | os.PathLike[str], spec: ModelSpec) -> OODGate | None:
    """The gate recorded in ``spec`` from checkpoint directory ``path``, or None if it has none.

    Raises :class:`CheckpointError` when the spec names a gate whose file is missing, does not match its
    recorded sha256, or holds tensors that do not fit the spec.
    """
    if spec.ood is None:
        return None
    file = Path(path) / spec.ood.file
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; the spec records an OOD gate in this file (copy it with the weights)")
    actual = sha256_file(file)
    if spec.ood.sha256 and actual != spec.ood.sha256:
        raise CheckpointError(
            f"{file}: sha256 {actual} does not match {spec.ood.sha256} recorded in {SPEC_FILE} (damaged or replaced)"
        )
    try:
        tensors = load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err
    missing = [name for name in _TENSORS if name not in tensors]
    if missing:
        raise CheckpointError(f"{file}: missing tensors {missing}")
    try:
        return OODGate(tensors["mean"], tensors["basis"], tensors["precision"], spec.ood)
    except SpecError as err:
        raise CheckpointError(f"{file}: {err}") from err


def copy_ood_gate(source: str | os.PathLike[str], target: str | os.PathLike[str], spec: ModelSpec) -> None:
    """Copy the gate file ``spec`` names from checkpoint ``source`` to ``target`` (no-op without a gate)."""
    if spec.ood is None:
        return
    src, dst = Path(source) / spec.ood.file, Path(target) / spec.ood.file
    if src.resolve() != dst.resolve():
        shutil.copyfile(src, dst)
