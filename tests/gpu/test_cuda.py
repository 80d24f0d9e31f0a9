"""The CUDA paths, checked against the CPU: run where a GPU is present, skipped elsewhere (CI has none).

What only a GPU exercises: channels_last, fp16 autocast in the predictor and in training (with a
GradScaler for fp16), the stacked MC head on the device, Grad-CAM under autocast, and the service's start-up
with ``CXR_DEVICE=cuda``. Each result is compared with the CPU's, within tolerances that follow from the
precision (fp32 kernels differ in summation order, cuDNN may use TF32; fp16 keeps 10 bits of mantissa) and
from MC noise.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bayesnet import load_checkpoint, load_spec, mc_predict, preprocess
from bayesnet.cudagraph import GraphedTrunk
from service.runtime.predictor import InferenceRequest, Predictor
from train.fit import FitConfig, fit
from train.synthetic import PLANTED_FINDINGS, generate, render_sample

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "demo"
CUDA = torch.device("cuda")


def film(seed: int) -> np.ndarray:
    """A 512x512 synthetic radiograph with some planted findings (uint8)."""
    rng = np.random.default_rng(seed)
    image, _ = render_sample(rng, {label: float(rng.random() < 0.4) for label in PLANTED_FINDINGS}, 512)
    return image


@pytest.fixture(scope="module")
def demo() -> tuple[torch.nn.Module, object]:
    model, spec = load_checkpoint(DEMO)
    return model.float().eval(), spec


@pytest.fixture(scope="module")
def batch(demo: tuple[torch.nn.Module, object]) -> torch.Tensor:
    _, spec = demo
    return torch.stack([preprocess(film(seed), spec) for seed in range(4)])  # type: ignore[arg-type]


def test_deterministic_forward_on_cuda_matches_cpu_in_fp32_and_fp16(demo, batch) -> None:  # type: ignore[no-untyped-def]
    model, _ = demo
    with torch.inference_mode():
        cpu = torch.sigmoid(model(batch))
        gpu_model = model.to(CUDA).to(memory_format=torch.channels_last)
        x = batch.to(CUDA).contiguous(memory_format=torch.channels_last)
        fp32 = torch.sigmoid(gpu_model(x)).cpu()
        with torch.autocast("cuda", dtype=torch.float16):  # the service's CXR_AUTOCAST=auto
            fp16 = torch.sigmoid(gpu_model(x).float()).cpu()
    model.to("cpu")
    assert (fp32 - cpu).abs().max().item() < 5e-3  # cuDNN may use TF32 convolutions
    assert (fp16 - cpu).abs().max().item() < 5e-2  # bf16 would not hold this (bench/precision.py)


def test_mc_predict_on_cuda_agrees_with_cpu_within_mc_noise(demo, batch) -> None:  # type: ignore[no-untyped-def]
    model, _ = demo
    samples = 100  # the service caps T at 100; more samples, tighter comparison
    cpu = mc_predict(model, batch, samples, torch.Generator().manual_seed(0))
    model.to(CUDA)
    try:
        with torch.autocast("cuda", dtype=torch.float16):
            gpu = mc_predict(model, batch.to(CUDA), samples, torch.Generator(device=CUDA).manual_seed(0))
    finally:
        model.to("cpu")
    mean, var = gpu.mean.float().cpu(), gpu.variance.float().cpu()
    assert mean.shape == cpu.mean.shape == (4, 14)
    assert torch.isfinite(mean).all() and (var >= 0).all()
    # Two independent MC means of the same distribution: difference ~ N(0, 2 var / T); 5 sigma + fp16 error.
    bound = 5 * torch.sqrt(2 * cpu.variance / samples) + 3e-2
    assert ((mean - cpu.mean).abs() <= bound).all(), (mean - cpu.mean).abs().max()
    # The variances agree in scale: dropout is really stochastic on the GPU, not constant.
    ratio = var.sum() / cpu.variance.sum()
    assert 0.5 < ratio.item() < 2.0, ratio


def test_predictor_on_cuda_uses_autocast_and_its_heatmaps_match_cpu(demo) -> None:  # type: ignore[no-untyped-def]
    model, spec = demo
    cpu_model, _ = load_checkpoint(DEMO)
    cpu = Predictor(cpu_model.float(), spec, device=torch.device("cpu"), autocast="off")
    gpu = Predictor(model, spec, device=CUDA, autocast="auto")
    try:
        assert gpu._autocast_dtype == torch.float16
        gpu.warmup()
        labels = tuple(range(len(spec.labels)))
        requests = [InferenceRequest(preprocess(film(seed), spec), 100, labels) for seed in (7, 8)]
        want, got = cpu.run(requests), gpu.run(requests)
    finally:
        model.to("cpu")
    for a, b in zip(want, got, strict=True):
        bound = 5 * np.sqrt(2 * a.variance / 100) + 3e-2
        assert (np.abs(a.mean - b.mean) <= bound).all()
        assert a.cams.keys() == b.cams.keys() == set(labels)
        for k in labels:
            x, y = a.cams[k], b.cams[k]
            assert x.shape == y.shape and np.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
            if x.std() > 1e-3 and y.std() > 1e-3:  # a flat map has no shape to compare
                assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.95, spec.labels[k]


def test_graphed_trunk_reproduces_eager_for_every_captured_size_and_new_inputs(demo) -> None:  # type: ignore[no-untyped-def]
    model, spec = demo
    model.to(CUDA).to(memory_format=torch.channels_last)
    try:
        graphed = GraphedTrunk(model, (1, 2, 4), autocast=torch.float16)
        assert graphed.batch_sizes == (1, 2, 4)
        for size in (1, 4, 3, 4):  # 3 has no graph (eager); 4 twice: the static input really is refilled
            x = torch.stack([preprocess(film(size * 10 + i), spec) for i in range(size)]).to(CUDA)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                got = graphed(x).float().clone()
                with torch.autocast("cuda", dtype=torch.float16):
                    want = model.forward_features(x).float()
            assert got.shape == want.shape
            assert (got - want).abs().max() <= 1e-2 * want.abs().max(), size
    finally:
        model.to("cpu").to(memory_format=torch.contiguous_format)


def test_predictor_with_cuda_graphs_gives_the_eager_predictors_answers(demo) -> None:  # type: ignore[no-untyped-def]
    model, spec = demo
    eager_model, _ = load_checkpoint(DEMO)
    graphed = Predictor(model, spec, device=CUDA, max_batch=4)
    eager = Predictor(eager_model.float(), spec, device=CUDA, max_batch=4, cuda_graphs=False)
    try:
        graphed.warmup()
        eager.warmup()
        assert graphed.graphed and not eager.graphed and graphed.buckets == (1, 2, 4)
        labels = tuple(range(len(spec.labels)))
        assert graphed.stage(preprocess(film(0), spec)).is_pinned()  # decode threads hand over page-locked images
        for n in (1, 3, 4):  # padded to 1, 4, 4; staged (pinned) images for one predictor, pageable for the other
            tensors = [preprocess(film(40 + n + i), spec) for i in range(n)]
            pinned = [InferenceRequest(graphed.stage(t), 100, labels) for t in tensors]
            pageable = [InferenceRequest(t, 100, labels) for t in tensors]
            for a, b in zip(eager.run(pageable), graphed.run(pinned), strict=True):
                assert (np.abs(a.mean - b.mean) <= 5 * np.sqrt(2 * a.variance / 100) + 1e-2).all()
                for k in labels:  # Grad-CAM is deterministic given the trunk: graphs must not change it
                    if a.cams[k].std() > 1e-3:  # a flat map is all rounding once normalised
                        assert np.corrcoef(a.cams[k].ravel(), b.cams[k].ravel())[0, 1] > 0.999, spec.labels[k]
    finally:
        model.to("cpu").to(memory_format=torch.contiguous_format)


def test_service_starts_on_cuda_and_answers_a_prediction() -> None:
    from tests.service.live import live_server, tiny_settings

    buffer = io.BytesIO()
    Image.fromarray(film(3)).save(buffer, format="PNG")
    with live_server(tiny_settings(DEMO, device="cuda", max_batch_images=16)) as live, live.client() as client:
        assert live.state.predictor.device.type == "cuda"  # type: ignore[attr-defined]
        assert live.state.predictor.buckets == (1, 2, 4, 8, 16)  # type: ignore[attr-defined]  # padded, warmed up
        assert live.state.predictor.graphed  # type: ignore[attr-defined]  # the trunk replays CUDA graphs
        response = client.post("/v1/predict?cams=all", files={"file": ("cxr.png", buffer.getvalue(), "image/png")})
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body["predictions"]) == set(load_spec(DEMO).trained_labels) and body["mc_samples"] == 20
        assert all(0 <= p["conf"] <= 1 and p["uncertainty"] >= 0 for p in body["predictions"].values())
        assert body["gradcam"]
        metrics = client.get("/metrics").text
        assert "cxr_images_processed_total" in metrics


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_training_with_mixed_precision_on_cuda_learns(amp: str, tmp_path: Path) -> None:
    root = tmp_path / "synth"
    generate(root, n=600, seed=0, image_size=128, prevalence=0.3)
    config = FitConfig(
        train_csv=root / "train.csv",
        valid_csv=root / "valid.csv",
        out=tmp_path / "run",
        arch="test_efficientnet",
        init="none",
        epochs=8,
        batch_size=32,
        lr=3e-3,
        image_size=128,
        workers=2,
        progress=False,
        patience=10,
        amp=amp,  # type: ignore[arg-type]
        device="cuda",
    )
    result = fit(config)
    assert all(math.isfinite(h["train_loss"]) for h in result.history), result.history
    assert result.best_auc >= 0.9, result.history
    model, _ = load_checkpoint(tmp_path / "run" / "best")
    assert all(torch.isfinite(p).all() for p in model.parameters())
