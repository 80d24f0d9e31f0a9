"""The frozen CPU trunk graph: same features as eager at any batch size, refused where it would be wrong."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bayesnet import BayesianEfficientNet, ModelModeError, ModelSpec, build_model
from bayesnet.frozen import frozen_trunk
from service.runtime.predictor import InferenceRequest, Predictor


def randomise_batchnorm(model: BayesianEfficientNet) -> None:
    """Non-trivial running statistics, so folding BatchNorm into the convolutions is really exercised."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


@pytest.mark.parametrize("arch", ["test_efficientnet", "tf_efficientnet_lite0"])
def test_frozen_trunk_matches_eager_at_every_batch_size(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch=arch, image_size=64))
    randomise_batchnorm(model)
    graph = frozen_trunk(model, torch.randn(2, 1, 64, 64))
    for batch in (1, 3, 8):
        x = torch.randn(batch, 1, 64, 64)
        with torch.inference_mode():
            expected = model.forward_features(x)
            got = graph(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-4 * float(expected.abs().max()), rtol=1e-3)


def test_refuses_trunk_dropout_training_mode_and_other_devices(tiny_spec: ModelSpec) -> None:
    example = torch.zeros(1, 1, 64, 64)
    with pytest.raises(ValueError, match="MC dropout"):
        frozen_trunk(build_model(dataclasses.replace(tiny_spec, mc_dropout_blocks=1)), example)
    model = build_model(tiny_spec)
    model.train()
    with pytest.raises(ModelModeError):
        frozen_trunk(model, example)
    model.eval()
    with pytest.raises(ValueError, match="CPU"):
        frozen_trunk(model, example.to("meta"))


def test_predictor_results_are_the_same_with_the_frozen_trunk(tiny_spec: ModelSpec) -> None:
    spec = dataclasses.replace(tiny_spec, dropout=0.0)  # no sampling noise: eager and frozen must agree
    torch.manual_seed(0)
    model = build_model(spec)
    randomise_batchnorm(model)
    images = torch.rand(3, spec.in_chans, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(2))
    requests = [InferenceRequest(image, 5, "auto") for image in images]
    eager = Predictor(model, spec, device=torch.device("cpu")).run(requests)
    frozen = Predictor(model, spec, device=torch.device("cpu"), freeze_trunk=True)
    got = frozen.run(requests)
    assert frozen._trunk is not model.forward_features  # the graph is really in use
    for a, b in zip(eager, got, strict=True):
        torch.testing.assert_close(torch.from_numpy(b.mean), torch.from_numpy(a.mean), atol=1e-5, rtol=0)
        assert a.cams.keys() == b.cams.keys()
        for k in a.cams:
            torch.testing.assert_close(torch.from_numpy(b.cams[k]), torch.from_numpy(a.cams[k]), atol=1e-3, rtol=0)
