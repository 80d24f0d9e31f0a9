"""The out-of-distribution gate's math, its spec, and how it is stored beside the weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bayesnet import BayesianEfficientNet, CheckpointError, ModelSpec, SpecError, build_model, load_checkpoint
from bayesnet.checkpoint import SPEC_FILE, WEIGHTS_FILE, sha256_file
from bayesnet.ood import OODGate, copy_ood_gate, feature_map, hellinger, load_ood_gate, save_ood_gate
from bayesnet.spec import OODSpec


def _gate(feature_dim: int = 12, dims: int = 3, *, residual_weight: float = 0.5, seed: int = 0) -> OODGate:
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(feature_dim, dims)))
    root = rng.normal(size=(dims, dims))
    precision = root @ root.T + np.eye(dims)
    spec = OODSpec(threshold=4.0, dims=dims, feature_dim=feature_dim, residual_weight=residual_weight)
    return OODGate(
        torch.from_numpy(rng.normal(size=feature_dim)), torch.from_numpy(basis), torch.from_numpy(precision), spec
    )


def test_score_is_subspace_mahalanobis_plus_weighted_residual() -> None:
    gate = _gate()
    features = torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mean, basis, precision = (t.double().numpy() for t in (gate.mean, gate.basis, gate.precision))
    centred = features.numpy() - mean
    projector = basis @ basis.T
    expected = [
        c @ basis @ precision @ basis.T @ c + 0.5 * np.sum(((np.eye(12) - projector) @ c) ** 2) for c in centred
    ]
    scores = gate.score(features)
    assert scores.shape == (5,) and scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-4)


def test_mean_scores_zero_and_distance_grows_along_any_direction() -> None:
    gate = _gate(residual_weight=1.0)
    assert gate.score(gate.mean[None]).item() == pytest.approx(0.0, abs=1e-5)
    inside = gate.mean + 3.0 * gate.basis[:, 0]
    outside_direction = torch.linalg.svd(gate.basis, full_matrices=True).U[:, -1]  # orthogonal to the basis
    outside = gate.mean + 3.0 * outside_direction
    far_outside = gate.mean + 6.0 * outside_direction
    scores = gate.score(torch.stack([inside, outside, far_outside]))
    assert scores[1].item() == pytest.approx(9.0, rel=1e-4)  # residual only: weight 1 x 3^2
    assert scores[2].item() == pytest.approx(36.0, rel=1e-4)
    assert scores[0].item() > 0.0
    assert gate.in_distribution(torch.tensor([3.9, 4.0, 4.1])).tolist() == [True, True, False]


def test_subspace_only_gate_ignores_the_residual() -> None:
    gate = _gate(residual_weight=0.0)
    direction = torch.linalg.svd(gate.basis, full_matrices=True).U[:, -1]
    assert gate.score((gate.mean + 100.0 * direction)[None]).item() == pytest.approx(0.0, abs=1e-3)


def test_hellinger_map_is_the_root_of_the_l1_normalised_features() -> None:
    features = torch.tensor([[4.0, 0.0, 12.0], [0.0, 0.0, 0.0], [-4.0, 1.0, 0.0]])
    mapped = hellinger(features)
    torch.testing.assert_close(mapped[0], torch.tensor([0.5, 0.0, 0.75**0.5]))
    torch.testing.assert_close(mapped[1], torch.zeros(3))  # a row of zeros stays zero, no NaN
    torch.testing.assert_close(mapped[2], torch.tensor([-(0.8**0.5), 0.2**0.5, 0.0]))  # signed root
    assert feature_map("hellinger-pca-residual") == "hellinger"
    assert feature_map("pca-residual") == feature_map("pca-shrinkage-mahalanobis") == "none"


def test_a_hellinger_gate_scores_the_mapped_features_and_ignores_their_overall_scale() -> None:
    rng = np.random.default_rng(3)
    basis, _ = np.linalg.qr(rng.normal(size=(12, 3)))
    spec = OODSpec(threshold=0.5, dims=3, feature_dim=12, residual_weight=1.0, method="hellinger-pca-residual")
    mean = hellinger(torch.from_numpy(rng.random((20, 12)))).mean(dim=0)
    gate = OODGate(mean, torch.from_numpy(basis), torch.zeros(3, 3), spec)
    features = torch.from_numpy(rng.random((4, 12))).float()
    raw = OODGate(gate.mean, gate.basis, gate.precision, OODSpec(**{**spec.to_dict(), "method": "pca-residual"}))
    torch.testing.assert_close(gate.score(features), raw.score(hellinger(features)))
    # A film with more contrast (every activation twice as large) is no further from the reference.
    torch.testing.assert_close(gate.score(3.0 * features), gate.score(features))
    assert not torch.allclose(raw.score(3.0 * features), raw.score(features))


def test_features_of_another_width_are_refused() -> None:
    with pytest.raises(ValueError, match=r"expects features \(B, 12\)"):
        _gate().score(torch.zeros(2, 13))


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"threshold": -1.0}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"dims": 0}, "dims"),
        ({"dims": 13}, "dims"),
        ({"residual_weight": -0.1}, "residual_weight"),
        ({"threshold_quantile": 0.0}, "threshold_quantile"),
        ({"file": "../weights.safetensors"}, "plain file name"),
    ],
)
def test_invalid_ood_specs_are_refused(changes: dict[str, object], fragment: str) -> None:
    values: dict[str, object] = {"threshold": 1.0, "dims": 3, "feature_dim": 12, **changes}
    with pytest.raises(SpecError, match=fragment):
        OODSpec(**values)  # type: ignore[arg-type]


def test_gate_tensors_must_fit_the_spec() -> None:
    gate = _gate()
    with pytest.raises(SpecError, match="basis"):
        OODGate(gate.mean, gate.basis[:, :2], gate.precision, gate.spec)


def test_model_spec_round_trips_its_ood_record() -> None:
    ood = OODSpec(threshold=71.4, dims=64, feature_dim=1280, residual_weight=1.0, sha256="ab", details={"n": 3})
    spec = ModelSpec(ood=ood)
    again = ModelSpec.from_json(spec.to_json())
    assert again.ood == ood and again.ood is not None and again.ood.details == {"n": 3}
    assert ModelSpec.from_json(ModelSpec().to_json()).ood is None
    with pytest.raises(SpecError, match="unknown fields"):
        ModelSpec.from_dict({**spec.to_dict(), "ood": {**ood.to_dict(), "surprise": 1}})


def test_trunk_features_are_the_pooled_features_for_head_only_models(tiny_model: BayesianEfficientNet) -> None:
    x = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        features = tiny_model.trunk_features(tiny_model.forward_trunk(x))
        expected = tiny_model.pool(tiny_model.forward_features(x))
    torch.testing.assert_close(features, expected)


def test_trunk_features_of_a_block_dropout_layout_are_pooled_and_deterministic(tiny_spec: ModelSpec) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_spec.replace(mc_dropout_blocks=2))
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        z = model.forward_trunk(x)
        first, second = model.trunk_features(z), model.trunk_features(model.forward_trunk(x))
    assert z.dim() == 4 and first.shape == (2, z.shape[1])
    torch.testing.assert_close(first, second)


def _gate_for(model: BayesianEfficientNet, threshold: float = 2.0) -> OODGate:
    width = model.num_features
    spec = OODSpec(threshold=threshold, dims=4, feature_dim=width, residual_weight=1.0)
    basis, _ = torch.linalg.qr(torch.randn(width, 4, generator=torch.Generator().manual_seed(0)))
    return OODGate(torch.zeros(width), basis, torch.eye(4), spec)


def test_saving_a_gate_keeps_the_weights_and_records_it_in_the_spec(
    tiny_model: BayesianEfficientNet, tiny_checkpoint: Path
) -> None:
    weights_before = sha256_file(tiny_checkpoint / WEIGHTS_FILE)
    gate = _gate_for(tiny_model)
    spec = save_ood_gate(tiny_checkpoint, gate, metadata={"ood": {"auroc": 0.9}})
    assert sha256_file(tiny_checkpoint / WEIGHTS_FILE) == weights_before
    document = json.loads((tiny_checkpoint / SPEC_FILE).read_text())
    assert document["weights_sha256"] == weights_before
    assert document["spec"]["ood"]["threshold"] == 2.0
    assert document["spec"]["ood"]["sha256"] == sha256_file(tiny_checkpoint / "ood.safetensors")
    assert document["metadata"]["ood"] == {"auroc": 0.9}
    _, loaded_spec = load_checkpoint(tiny_checkpoint)  # the weights still verify
    assert loaded_spec == spec
    loaded = load_ood_gate(tiny_checkpoint, loaded_spec)
    assert loaded is not None
    features = torch.randn(4, tiny_model.num_features, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(loaded.score(features), gate.score(features))


def test_checkpoint_without_a_gate_loads_none(tiny_checkpoint: Path) -> None:
    _, spec = load_checkpoint(tiny_checkpoint)
    assert spec.ood is None
    assert load_ood_gate(tiny_checkpoint, spec) is None


def test_damaged_or_missing_gate_files_are_refused(tiny_model: BayesianEfficientNet, tiny_checkpoint: Path) -> None:
    spec = save_ood_gate(tiny_checkpoint, _gate_for(tiny_model))
    gate_file = tiny_checkpoint / "ood.safetensors"
    data = bytearray(gate_file.read_bytes())
    data[-1] ^= 0xFF
    gate_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_ood_gate(tiny_checkpoint, spec)
    gate_file.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_ood_gate(tiny_checkpoint, spec)


def test_copy_ood_gate_carries_the_file_to_another_checkpoint(
    tiny_model: BayesianEfficientNet, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    spec = save_ood_gate(tiny_checkpoint, _gate_for(tiny_model))
    target = tmp_path / "copy"
    target.mkdir()
    copy_ood_gate(tiny_checkpoint, target, spec)
    assert load_ood_gate(target, spec) is not None
    copy_ood_gate(tiny_checkpoint, target, spec.replace(ood=None))  # no gate: nothing to do


def test_scoring_needs_no_scikit_learn() -> None:
    """scikit-learn is a training extra: the service scores with torch alone."""
    code = "import sys, bayesnet, bayesnet.ood; assert 'sklearn' not in sys.modules, 'sklearn imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
