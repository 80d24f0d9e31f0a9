"""Shared fixtures: tiny real models (timm's ``test_efficientnet``) and the real data folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bayesnet import BayesianEfficientNet, ModelSpec, build_model, save_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _state_in_a_temporary_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Services the tests start keep their default state (the SQLite audit trail) in a temporary directory, never
    in the home directory of whoever runs the suite; server subprocesses inherit the variable."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip: a user's clone does not have it."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (only present on the project's machines)")
    return SHARED_DATA


@pytest.fixture
def tiny_spec() -> ModelSpec:
    return ModelSpec(arch="test_efficientnet", image_size=64, name="tiny-test")


@pytest.fixture
def tiny_model(tiny_spec: ModelSpec) -> BayesianEfficientNet:
    torch.manual_seed(0)
    return build_model(tiny_spec)


@pytest.fixture
def tiny_checkpoint(tiny_model: BayesianEfficientNet, tmp_path: Path) -> Path:
    return save_checkpoint(tiny_model, None, tmp_path / "ckpt")
