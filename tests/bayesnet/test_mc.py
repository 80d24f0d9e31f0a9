"""MC dropout: trunk once, stacked stochastic rows, equal to separate full passes, never touching BN or mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bayesnet import (
    BayesianEfficientNet,
    Decision,
    DropoutMasks,
    ModelModeError,
    ModelSpec,
    build_model,
    decide,
    mc_predict,
)


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


def assert_same_buffers(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = dict(model.named_buffers())
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def check_stacked_equals_separate(model: BayesianEfficientNet, x: torch.Tensor, n_samples: int) -> None:
    batch = x.shape[0]
    masks = DropoutMasks(torch.Generator().manual_seed(7), record=True)
    pred = mc_predict(model, x, n_samples, masks=masks, return_samples=True, calibrated=False)
    assert pred.samples is not None and pred.samples.shape == (n_samples, batch, model.spec.num_classes)
    assert set(masks.recorded) == set(model.dropout_sites)
    for t in range(n_samples):
        replay = DropoutMasks.replay({k: m[t * batch : (t + 1) * batch] for k, m in masks.recorded.items()})
        with torch.no_grad():
            full = torch.sigmoid(model(x, replay))
        torch.testing.assert_close(full, pred.samples[t], atol=1e-5, rtol=0)


def test_build_model_default_is_efficientnet_b0_in_eval_mode() -> None:
    model = build_model()
    assert model.spec == ModelSpec()
    assert not model.training
    assert model.num_features == 1280
    assert model.head_only and model.dropout_sites == ("head",)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert first.shape == (2, 14)
    assert torch.equal(first, second)  # deterministic in eval mode


def test_stacked_mc_equals_separate_full_passes_efficientnet_b0() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(image_size=64))
    check_stacked_equals_separate(model, torch.randn(3, 1, 64, 64), n_samples=6)


def test_stacked_mc_equals_separate_passes_with_dropout_in_the_last_blocks(tiny_spec: ModelSpec) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_spec.replace(mc_dropout_blocks=2, dropout=0.3))
    assert not model.head_only
    assert model.dropout_sites == ("block3", "block4", "head")
    check_stacked_equals_separate(model, torch.randn(2, 1, 64, 64), n_samples=5)


def test_trunk_runs_once_and_the_stochastic_part_is_one_batched_call(tiny_model: BayesianEfficientNet) -> None:
    stem_calls: list[int] = []
    head_rows: list[int] = []
    hooks = [
        tiny_model.conv_stem.register_forward_hook(lambda m, i, o: stem_calls.append(i[0].shape[0])),
        tiny_model.classifier.register_forward_hook(lambda m, i, o: head_rows.append(i[0].shape[0])),
    ]
    try:
        mc_predict(tiny_model, torch.randn(4, 1, 64, 64), n_samples=20)
    finally:
        for hook in hooks:
            hook.remove()
    assert stem_calls == [4]
    assert head_rows == [80]


def test_dropout_gives_real_variance_and_p0_gives_none(tiny_spec: ModelSpec) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1, 64, 64)
    noisy = mc_predict(build_model(tiny_spec.replace(dropout=0.5)), x, 20, torch.Generator().manual_seed(0))
    assert noisy.variance.min() > 0  # the functional-dropout pitfall would give exactly 0 here
    torch.manual_seed(0)
    silent_model = build_model(tiny_spec.replace(dropout=0.0, mc_dropout_blocks=1))
    silent = mc_predict(silent_model, x, 20, torch.Generator().manual_seed(0), return_samples=True)
    assert torch.count_nonzero(silent.variance) == 0
    with torch.no_grad():
        torch.testing.assert_close(silent.mean, torch.sigmoid(silent_model(x)))


def test_same_generator_seed_reproduces(tiny_model: BayesianEfficientNet) -> None:
    x = torch.randn(2, 1, 64, 64)
    a = mc_predict(tiny_model, x, 10, torch.Generator().manual_seed(3), return_samples=True)
    b = mc_predict(tiny_model, x, 10, torch.Generator().manual_seed(3), return_samples=True)
    c = mc_predict(tiny_model, x, 10, torch.Generator().manual_seed(4), return_samples=True)
    assert a.samples is not None and b.samples is not None and c.samples is not None
    assert torch.equal(a.samples, b.samples)
    assert not torch.equal(a.samples, c.samples)


def test_summaries_are_consistent(tiny_spec: ModelSpec) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_spec.replace(dropout=0.5))
    pred = mc_predict(model, torch.randn(3, 1, 64, 64), 30, torch.Generator().manual_seed(1), return_samples=True)
    assert pred.samples is not None and pred.n_samples == 30
    for field in ("mean", "variance", "std", "entropy", "expected_entropy", "mutual_information"):
        assert getattr(pred, field).shape == (3, 14), field
    torch.testing.assert_close(pred.mean, pred.samples.mean(0))
    torch.testing.assert_close(pred.std**2, pred.variance)
    torch.testing.assert_close(pred.mutual_information, (pred.entropy - pred.expected_entropy).clamp_min(0))
    assert (pred.mutual_information >= 0).all()
    assert (pred.entropy <= torch.log(torch.tensor(2.0)) + 1e-6).all()


def test_temperature_from_the_spec_is_applied(tiny_spec: ModelSpec) -> None:
    torch.manual_seed(0)
    hot = build_model(tiny_spec.replace(dropout=0.0, temperature=(2.0,) * 14))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        logits = hot(x)
    torch.testing.assert_close(mc_predict(hot, x, 3).mean, torch.sigmoid(logits / 2.0))
    torch.testing.assert_close(mc_predict(hot, x, 3, calibrated=False).mean, torch.sigmoid(logits))


def test_mode_and_batchnorm_untouched_even_when_a_call_raises(tiny_model: BayesianEfficientNet) -> None:
    before = bn_buffers(tiny_model)
    x = torch.randn(2, 1, 64, 64)
    mc_predict(tiny_model, x, 20)
    bad_masks = DropoutMasks.replay({"head": torch.ones(1, 3)})
    with pytest.raises(ValueError, match="mask for site 'head'"):
        mc_predict(tiny_model, x, 4, masks=bad_masks)
    with pytest.raises(RuntimeError):
        mc_predict(tiny_model, torch.randn(2, 3, 64, 64), 4)  # wrong channel count
    assert not tiny_model.training
    assert all(not m.training for m in tiny_model.modules())
    assert_same_buffers(tiny_model, before)


def test_refuses_a_model_in_training_mode_without_touching_it(tiny_model: BayesianEfficientNet) -> None:
    tiny_model.train()
    before = bn_buffers(tiny_model)
    with pytest.raises(ModelModeError, match="eval mode"):
        mc_predict(tiny_model, torch.randn(2, 1, 64, 64), 5)
    assert tiny_model.training
    assert_same_buffers(tiny_model, before)


def test_training_mode_forward_samples_dropout_like_nn_dropout(tiny_spec: ModelSpec) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_spec.replace(dropout=0.5)).train()
    x = torch.randn(4, 1, 64, 64)
    assert not torch.equal(model(x), model(x))


def test_decisions_follow_threshold_and_sample_disagreement() -> None:
    spec = ModelSpec(labels=("a", "b", "c"), threshold=(0.5, 0.3, 0.5), uncertainty_threshold=(0.2, 0.2, 0.2))
    samples = torch.tensor(
        [
            # a: all high -> positive; b: 0.35 > 0.3 -> positive; c: half above, half below -> uncertain
            [[0.9, 0.35, 0.6]],
            [[0.8, 0.35, 0.4]],
            [[0.9, 0.35, 0.6]],
            [[0.8, 0.35, 0.4]],
        ]
    )
    assert decide(samples, spec) == [[Decision.POSITIVE, Decision.POSITIVE, Decision.UNCERTAIN]]
    assert decide(torch.tensor([[[0.1, 0.1, 0.49]]]), spec) == [[Decision.NEGATIVE] * 3]
