"""Batch padding (on by default on CUDA): the network sees a few fixed batch sizes, the answers do not change.

cuDNN pays seconds the first time it meets an input shape (docs/benchmarks.md, measured on an H200), so on
a GPU the predictor pads each batch with blank images up to a bucket size and warms every bucket up. These
tests force padding on the CPU, where the arithmetic is the same, and check both halves of that promise.
"""

from __future__ import annotations

import pytest
import torch

from bayesnet import ModelSpec, build_model
from service.runtime.heatmaps import AUTO
from service.runtime.predictor import InferenceRequest, Predictor, batch_buckets

CPU = torch.device("cpu")


def stem_batch_sizes(predictor: Predictor) -> list[int]:
    sizes: list[int] = []
    predictor.model.conv_stem.register_forward_hook(lambda _m, inputs, _o: sizes.append(inputs[0].shape[0]))
    return sizes


@pytest.mark.parametrize(
    ("max_batch", "buckets"),
    [(1, (1,)), (2, (1, 2)), (4, (1, 2, 4)), (6, (1, 2, 4, 6)), (32, (1, 2, 4, 8, 16, 32))],
)
def test_buckets_are_powers_of_two_up_to_the_batch_limit(max_batch: int, buckets: tuple[int, ...]) -> None:
    assert batch_buckets(max_batch) == buckets


def test_padding_is_off_on_the_cpu_unless_asked_for() -> None:
    spec = ModelSpec(arch="test_efficientnet", image_size=64)
    assert Predictor(build_model(spec), spec, device=CPU, max_batch=8).buckets == ()
    assert Predictor(build_model(spec), spec, device=CPU, max_batch=8, pad_batches=True).buckets == (1, 2, 4, 8)


@pytest.mark.parametrize("mc_dropout_blocks", [0, 1], ids=["head-only", "stochastic-blocks"])
def test_padded_batches_give_the_unpadded_answers(mc_dropout_blocks: int) -> None:
    spec = ModelSpec(arch="test_efficientnet", image_size=64, mc_dropout_blocks=mc_dropout_blocks)
    torch.manual_seed(0)
    model = build_model(spec)
    x = torch.rand(3, 1, 64, 64)
    requests = [InferenceRequest(x[0], 8, AUTO), InferenceRequest(x[1], 4, (0, 5)), InferenceRequest(x[2], 8, ())]
    plain = Predictor(model, spec, device=CPU)
    padded = Predictor(model, spec, device=CPU, max_batch=8, pad_batches=True)
    sizes = stem_batch_sizes(padded)
    torch.manual_seed(1)
    want = plain.run(requests)
    sizes.clear()
    torch.manual_seed(1)
    got = padded.run(requests)
    assert sizes[0] == 4  # 3 images ran as a batch of 4
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(torch.from_numpy(b.mean), torch.from_numpy(a.mean), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.from_numpy(b.variance), torch.from_numpy(a.variance), atol=1e-6, rtol=0)
        assert a.decisions == b.decisions
        assert a.cams.keys() == b.cams.keys()
        for k in a.cams:
            torch.testing.assert_close(torch.from_numpy(b.cams[k]), torch.from_numpy(a.cams[k]), atol=1e-4, rtol=0)
    assert got[1].cams.keys() == {0, 5}


def test_warm_up_runs_every_bucket_size_once_so_live_batches_meet_no_new_shape() -> None:
    spec = ModelSpec(arch="test_efficientnet", image_size=64)
    predictor = Predictor(build_model(spec), spec, device=CPU, max_batch=6, pad_batches=True)
    sizes = stem_batch_sizes(predictor)
    predictor.warmup()
    assert set(sizes) == {1, 2, 4, 6}
    sizes.clear()
    x = torch.rand(1, 64, 64)
    for n in range(1, 7):
        predictor.run([InferenceRequest(x, 2, ())] * n)
    assert sizes == [1, 2, 4, 4, 6, 6]


def test_the_model_thread_count_follows_the_batch_size_on_cpu() -> None:
    """A lone image runs on every thread (latency); several queued images on ``busy_threads`` (throughput)."""
    from service.runtime.pipeline import Job, batch_processor

    seen: list[int] = []

    class Recorder:
        def run(self, requests: list[InferenceRequest]) -> list[object]:
            seen.append(torch.get_num_threads())
            return [object() for _ in requests]

    before = torch.get_num_threads()
    process = batch_processor(Recorder(), threads=2, busy_threads=1)  # type: ignore[arg-type]
    job = Job(InferenceRequest(torch.zeros(1, 8, 8), 2, ()), 0.0)
    try:
        for n in (1, 3, 1, 4):
            assert len(process([job] * n)) == n
        assert seen == [2, 1, 2, 1]
        untouched = batch_processor(Recorder())  # type: ignore[arg-type]
        torch.set_num_threads(3)
        untouched([job])
        assert seen[-1] == 3
    finally:
        torch.set_num_threads(before)


def test_staging_is_identity_on_the_cpu_and_a_batch_must_share_one_shape() -> None:
    spec = ModelSpec(arch="test_efficientnet", image_size=64)
    predictor = Predictor(build_model(spec), spec, device=CPU, max_batch=2, pad_batches=True)
    image = torch.zeros(3, 64, 64)
    assert predictor.stage(image) is image
    with pytest.raises(ValueError, match="differ in shape"):
        predictor.run([InferenceRequest(image, 2, ()), InferenceRequest(torch.zeros(3, 32, 32), 2, ())])


def test_staging_falls_back_to_pageable_memory_when_page_locking_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spec = ModelSpec(arch="test_efficientnet", image_size=64)
    predictor = Predictor(build_model(spec), spec, device=CPU)
    predictor.device = torch.device("cuda")  # only stage() looks at it here
    calls: list[int] = []

    def refuse(self: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        raise RuntimeError("cannot lock memory")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    image = torch.zeros(3, 64, 64)
    assert predictor.stage(image) is image and predictor.stage(image) is image
    assert len(calls) == 1  # tried once, then pageable for good
    assert "page-locked staging unavailable" in caplog.text
