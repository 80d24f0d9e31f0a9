"""Checkpoints: safetensors + JSON spec, sha256-verified, strict, never unpickled."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from bayesnet import BayesianEfficientNet, CheckpointError, ModelSpec, build_model, load_checkpoint, save_checkpoint
from bayesnet.checkpoint import load_spec


def test_round_trip_restores_identical_outputs(tiny_model: BayesianEfficientNet, tiny_checkpoint: Path) -> None:
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == ["model.json", "model.safetensors"]
    document = json.loads((tiny_checkpoint / "model.json").read_text())
    assert len(document["weights_sha256"]) == 64
    model, spec = load_checkpoint(tiny_checkpoint)
    assert spec == tiny_model.spec and not model.training
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), tiny_model(x))
    assert load_spec(tiny_checkpoint) == spec


def test_checkpoint_files_are_readable_by_a_service_user(tiny_checkpoint: Path) -> None:
    for name in ("model.safetensors", "model.json"):
        assert (tiny_checkpoint / name).stat().st_mode & 0o044 == 0o044, name


def test_half_precision_checkpoint_loads_as_float32_close_to_original(
    tiny_model: BayesianEfficientNet, tmp_path: Path
) -> None:
    path = save_checkpoint(tiny_model, None, tmp_path / "half", dtype=torch.float16)
    model, _ = load_checkpoint(path)
    assert next(model.parameters()).dtype == torch.float32
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny_model(x), atol=2e-2, rtol=2e-2)


def test_damaged_weights_fail_the_checksum(tiny_checkpoint: Path) -> None:
    weights = tiny_checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tiny_checkpoint)


def test_spec_that_does_not_fit_the_weights_is_refused(tiny_checkpoint: Path) -> None:
    spec_path = tiny_checkpoint / "model.json"
    document = json.loads(spec_path.read_text())
    document["spec"]["labels"] = ["a", "b", "c"]
    document["spec"]["temperature"] = document["spec"]["threshold"] = []
    document["spec"]["uncertainty_threshold"] = document["spec"]["trained_labels"] = []
    spec_path.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=r"classifier\.weight.*3 labels"):
        load_checkpoint(tiny_checkpoint)
    document["spec"]["arch"] = "efficientnet_b0"
    spec_path.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="keys do not match"):
        load_checkpoint(tiny_checkpoint)


def test_missing_and_malformed_files_are_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"model\.json: missing"):
        load_checkpoint(tmp_path / "nowhere")
    (tiny_checkpoint / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        load_checkpoint(tiny_checkpoint)


@pytest.mark.parametrize("elsewhere", ["/etc/passwd", "../model.safetensors", "sub/model.safetensors", ".."])
def test_spec_cannot_point_at_weights_outside_the_checkpoint(tiny_checkpoint: Path, elsewhere: str) -> None:
    spec_path = tiny_checkpoint / "model.json"
    document = json.loads(spec_path.read_text())
    document["weights"] = elsewhere
    spec_path.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="must be a file name inside the checkpoint"):
        load_checkpoint(tiny_checkpoint, verify=False)


def test_a_pickle_is_never_loaded(tiny_checkpoint: Path) -> None:
    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pickle executed",))

    (tiny_checkpoint / "model.safetensors").write_bytes(pickle.dumps({"conv_stem.weight": Boom()}))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tiny_checkpoint, verify=False)


def test_saving_a_spec_of_another_model_is_refused(tiny_model: BayesianEfficientNet, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not describe this model"):
        save_checkpoint(tiny_model, ModelSpec(), tmp_path / "x")


def test_calibrated_spec_can_be_saved_beside_the_same_weights(tmp_path: Path) -> None:
    model = build_model(ModelSpec(arch="test_efficientnet", image_size=64))
    calibrated = model.spec.replace(temperature=(1.5,) * 14, version="0.0.1")
    path = save_checkpoint(model, calibrated, tmp_path / "cal")
    _, spec = load_checkpoint(path)
    assert spec.temperature == (1.5,) * 14 and spec.version == "0.0.1"
