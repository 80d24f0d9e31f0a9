"""CUDA graphs of the trunk: the guards that hold on any machine (the replays are tested in tests/gpu)."""

from __future__ import annotations

import pytest
import torch

from bayesnet import ModelSpec, build_model
from bayesnet.cudagraph import GraphedTrunk
from bayesnet.errors import ModelModeError
from service.runtime.predictor import Predictor


def test_graphs_refuse_a_cpu_model_a_training_model_and_dropout_in_the_trunk() -> None:
    spec = ModelSpec(arch="test_efficientnet", image_size=64)
    with pytest.raises(ValueError, match="CUDA"):
        GraphedTrunk(build_model(spec).eval(), (1, 2))
    with pytest.raises(ModelModeError):
        GraphedTrunk(build_model(spec).train(), (1,))
    stochastic = ModelSpec(arch="test_efficientnet", image_size=64, mc_dropout_blocks=1)
    with pytest.raises(ValueError, match="same masks"):
        GraphedTrunk(build_model(stochastic).eval(), (1,))


def test_a_cpu_predictor_never_captures_graphs_even_when_padding() -> None:
    spec = ModelSpec(arch="test_efficientnet", image_size=64)
    predictor = Predictor(build_model(spec), spec, device=torch.device("cpu"), max_batch=2, pad_batches=True)
    predictor.warmup()
    assert not predictor.graphed and predictor.buckets == (1, 2)
