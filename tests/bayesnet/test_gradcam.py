"""Grad-CAM: closed form == autograd, batch x classes at once, hooks removed, .grad untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bayesnet import BayesianEfficientNet, ModelModeError, ModelSpec, build_model, gradcam
from bayesnet.gradcam import (
    GridCams,
    cam_grids,
    cams_from_features,
    gradcam_autograd,
    normalise_maps,
    resampling_matrices,
)
from bayesnet.model import GridAlignment


def test_fast_path_matches_autograd_for_all_14_classes_on_efficientnet_b0() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(image_size=96))
    x = torch.randn(2, 1, 96, 96)
    fast = gradcam(model, x)
    slow = gradcam_autograd(model, x)
    assert fast.shape == slow.shape == (2, 14, 96, 96)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)
    assert fast.min() >= 0 and fast.max() <= 1
    peaks = fast.amax(dim=(2, 3))
    assert torch.all((peaks == 0) | ((peaks - 1).abs() < 1e-6))


def test_classes_by_name_select_maps_in_the_requested_order(tiny_model: BayesianEfficientNet) -> None:
    x = torch.randn(3, 1, 64, 64)
    every = gradcam(tiny_model, x)
    some = gradcam(tiny_model, x, classes=["Edema", 0])
    assert some.shape == (3, 2, 64, 64)
    torch.testing.assert_close(some[:, 0], every[:, 5])
    torch.testing.assert_close(some[:, 1], every[:, 0])


def test_autograd_path_leaves_grads_mode_and_hooks_alone(tiny_model: BayesianEfficientNet) -> None:
    marker = torch.full_like(tiny_model.classifier.weight, 3.0)
    tiny_model.classifier.weight.grad = marker.clone()
    buffers = {k: v.clone() for k, v in tiny_model.named_buffers()}
    x = torch.randn(2, 1, 64, 64)
    gradcam_autograd(tiny_model, x, target_layer=tiny_model.blocks[3][0])
    assert torch.equal(tiny_model.classifier.weight.grad, marker)
    assert tiny_model.conv_stem.weight.grad is None
    assert not tiny_model.training
    assert all(not m._forward_hooks for m in tiny_model.modules())
    assert all(torch.equal(v, buffers[k]) for k, v in tiny_model.named_buffers())


def test_hook_is_removed_when_the_forward_raises(tiny_model: BayesianEfficientNet) -> None:
    with pytest.raises(RuntimeError):
        gradcam_autograd(tiny_model, torch.randn(2, 3, 64, 64))  # wrong channels
    with pytest.raises(ValueError, match="stage containers"):
        gradcam_autograd(tiny_model, torch.randn(2, 1, 64, 64), target_layer=tiny_model.blocks[1])
    assert all(not m._forward_hooks for m in tiny_model.modules())


def test_intermediate_layer_and_block_dropout_models_use_autograd(tiny_spec: ModelSpec) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_spec.replace(mc_dropout_blocks=1))
    x = torch.randn(2, 1, 64, 64)
    cams = gradcam(model, x, classes=[1, 2])
    assert cams.shape == (2, 2, 64, 64)
    torch.testing.assert_close(cams, gradcam_autograd(model, x, classes=[1, 2]))
    early = gradcam(model, x, classes=[1], target_layer=model.blocks[2][0])
    assert early.shape == (2, 1, 64, 64)


def test_refuses_training_mode(tiny_model: BayesianEfficientNet) -> None:
    tiny_model.train()
    with pytest.raises(ModelModeError):
        gradcam(tiny_model, torch.randn(1, 1, 64, 64))


@pytest.mark.parametrize(
    ("grid", "size", "scale", "offset"),
    [((7, 7), (224, 224), 32.0, 15.5), ((7, 5), (96, 200), 32.0, 16.0), ((1, 3), (8, 30), 8.0, -3.0)],
)
def test_separable_resample_equals_border_clamped_bilinear_sampling(
    grid: tuple[int, int], size: tuple[int, int], scale: float, offset: float
) -> None:
    """The two-matmul resample is exactly grid_sample(bilinear, border, align_corners=True) at the aligned grid."""
    cams = torch.rand(2, 3, *grid, generator=torch.Generator().manual_seed(0))
    alignment = GridAlignment(scale_y=scale, offset_y=offset, scale_x=scale, offset_x=offset)
    got = normalise_maps(cams, size, alignment)

    def coords(n_out: int, n_in: int) -> torch.Tensor:
        cell = (torch.arange(n_out, dtype=torch.float32) - offset) / scale
        return torch.zeros_like(cell) if n_in == 1 else cell / (n_in - 1) * 2.0 - 1.0

    ys, xs = coords(size[0], grid[0]), coords(size[1], grid[1])
    sample_at = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).unsqueeze(0).expand(6, -1, -1, -1)
    sampled = torch.nn.functional.grid_sample(
        cams.reshape(6, 1, *grid), sample_at, mode="bilinear", padding_mode="border", align_corners=True
    ).reshape(2, 3, *size)
    peak = sampled.amax(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(got, sampled / peak, atol=1e-5, rtol=0)


def test_grid_cams_read_lazily_equal_the_full_resolution_maps() -> None:
    torch.manual_seed(1)
    model = build_model(ModelSpec(image_size=96))
    x = torch.randn(3, 1, 96, 96)
    with torch.inference_mode():
        features = model.forward_features(x)
        full = cams_from_features(model, features, [2, 7, 11], (96, 96))
        grids = cam_grids(model, features, [2, 7, 11]).numpy()
    assert grids.shape == (3, 3, *features.shape[-2:]) and grids.min() >= 0
    ry, rx = resampling_matrices(model, grids.shape[-2:], (96, 96))
    for b in range(3):
        lazy = GridCams({k: grids[b, j] for j, k in enumerate((2, 7, 11))}, ry, rx)
        assert list(lazy) == [2, 7, 11] and len(lazy) == 3
        for j, k in enumerate((2, 7, 11)):
            got = lazy[k]
            assert got.shape == (96, 96) and got.dtype == np.float32
            np.testing.assert_allclose(got, full[b, j].numpy(), atol=1e-5, rtol=0)
            assert lazy[k] is got  # resampled once, then kept
    zero = GridCams({0: np.zeros_like(grids[0, 0])}, ry, rx)
    assert not zero[0].any()  # an all-zero map stays zero (no division by its peak)
