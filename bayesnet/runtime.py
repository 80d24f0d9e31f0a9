"""Process-level tuning for CPU inference and training: keep glibc from returning activation memory each call.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves blocks above a dynamic
"mmap threshold" (starting at 128 KiB) with a fresh ``mmap`` and returns them to the kernel on ``free``,
and trims the top of the heap once more than a "trim threshold" is free. An EfficientNet forward pass
allocates and frees megabyte-sized activations hundreds of times, so with the defaults every call pays
for page faults on memory it just gave back. With the thresholds below those blocks stay in the heap and are
reused: forwards are faster at the same peak resident memory (measured with the demo model, see
docs/benchmarks.md). Allocators such as jemalloc or tcmalloc achieve the same through ``LD_PRELOAD``; this
needs nothing installed.

Entry points call :func:`tune_allocator` once at start-up (the service's lifespan, the archive scorer,
``train fit``, the benchmarks). Importing this module changes nothing.

The second trap is OpenMP (PyTorch's CPU thread pool on Linux). Every thread that runs a parallel tensor
operation becomes the master of its own OpenMP team, and libgomp stops spin-waiting between parallel
regions as soon as its teams hold more threads than there are cores: every one of the hundreds of small
regions in a forward pass then pays a sleep and a wake-up, so a server that preprocesses in a few pool
threads and runs the model in another slows every forward (docs/benchmarks.md has the figures).
So exactly one thread per process (the one running the model) may use several intra-op threads; the
others start with :func:`single_threaded_torch`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import torch

log = logging.getLogger(__name__)

#: glibc ``mallopt`` parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks below this come from the heap and are reused; glibc caps the value at 32 MiB on 64-bit.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
#: Free memory kept at the top of the heap before giving it back to the kernel.
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024

#: Variables by which a user or an image already chose malloc settings: those win.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


def tune_allocator(
    *, mmap_threshold_bytes: int = MMAP_THRESHOLD_BYTES, trim_threshold_bytes: int = TRIM_THRESHOLD_BYTES
) -> bool:
    """Raise glibc's mmap and trim thresholds for this process; ``True`` when applied.

    Does nothing (and says why at debug level) when the C library is not glibc, or when the environment
    already configures the allocator (``MALLOC_*_``, ``GLIBC_TUNABLES``, an ``LD_PRELOAD``ed allocator).
    """
    chosen = [name for name in _USER_SETTINGS if os.environ.get(name)]
    if chosen:
        log.debug("allocator left as configured by %s", ", ".join(chosen))
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        log.debug("no C library found; allocator not tuned")
        return False
    libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)
    gnu_version = getattr(libc, "gnu_get_libc_version", None)
    if mallopt is None or gnu_version is None:  # musl and others: different allocators, no such knobs
        log.debug("C library %s is not glibc; allocator not tuned", name)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold_bytes)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold_bytes)
    )
    log.debug(
        "glibc malloc: mmap threshold %d, trim threshold %d bytes (%s)",
        mmap_threshold_bytes,
        trim_threshold_bytes,
        "applied" if applied else "refused",
    )
    return applied


def single_threaded_torch() -> None:
    """Thread initializer for threads that do light tensor work beside the model's thread (decoding,
    preprocessing, loading): their operations run inline, so they never create an OpenMP team of their own.
    """
    torch.set_num_threads(1)


def model_thread(intraop_threads: int) -> None:
    """Thread initializer for the one thread that runs the model: its OpenMP team gets ``intraop_threads``."""
    torch.set_num_threads(intraop_threads)
