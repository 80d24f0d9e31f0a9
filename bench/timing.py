"""Timing helpers shared by the benchmark scripts (wall time, CUDA-synchronised)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device, *, warmup: bool = False) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls (after one untimed call when ``warmup``)."""
    return statistics.median(wall_times(fn, repeats, device, warmup=warmup))


def timed_for(fn: Callable[[], object], seconds: float, device: torch.device, *, min_calls: int = 5) -> list[float]:
    """Wall time of each call of ``fn``, calling it for about ``seconds`` (at least ``min_calls``, one warm-up)."""
    times = wall_times(fn, min_calls, device, warmup=True)
    while sum(times) < seconds:
        times += wall_times(fn, 1, device)
    return times


def wall_times(fn: Callable[[], object], repeats: int, device: torch.device, *, warmup: bool = False) -> list[float]:
    """Wall time of each of ``repeats`` calls of ``fn`` (after one untimed call when ``warmup``)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times
