"""How long the model thread's idle OpenMP worker spins before it sleeps: set before torch is imported.

torch's CPU kernels run on GNU OpenMP (libgomp). After each parallel region its worker threads spin-wait for
the next one, by default for 300,000 iterations (``OMP_WAIT_POLICY`` unset), before they sleep. Inside one
forward pass that keeps the regions' hand-offs cheap; after the last region it keeps a core busy doing
nothing for several milliseconds. With one image at a time on a 2-core machine that is the core the request's
event loop, decode thread, heatmaps and audit writer need: ``bench/timeline.py`` showed the answer waiting
2.5-3.4 ms for a core right after inference in half the runs. At 10,000 spins one client's median latency
(60 requests, 4 interleaved rounds) was 15.9-16.3 ms against 18.7-19.4 at the default, the inference itself
unchanged (8.5-8.7 ms against 8.6-10.3), and 16 clients' throughput unchanged (busy batches run one model
thread and so have no OpenMP team; docs/benchmarks.md).

libgomp reads the variable once, when it is loaded, so the service's entry points (``python -m service`` and
``service.asgi`` for Gunicorn) call :func:`limit_openmp_spin` before anything imports torch. An operator's own
``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` is left alone. This module must not import torch.

Several worker processes on one host (Gunicorn, ``CXR_WORKERS``) each have a model thread whose OpenMP team
would by default take every core: N workers then run N x cores threads, and a lone image in one worker
competes with the others' work. :func:`share_cores` gives each worker's team its share instead
(``CXR_TORCH_THREADS``), as ``torchrun`` does for its processes. Two workers on the 2-core CPU, 3 interleaved
rounds: 111.2, 109.4, 92.1 images/s at 16 clients and a one-client p50 of 18.1-18.6 ms with one thread each,
against 109.8, 50.2, 91.6 images/s and 19.2-27.9 ms with the default (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

__all__ = ["SPIN_COUNT", "limit_openmp_spin", "share_cores"]

#: libgomp's ``GOMP_SPINCOUNT`` for the service (measured on the 2-core CPU; see the module docstring).
SPIN_COUNT = "10000"


def limit_openmp_spin(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set ``GOMP_SPINCOUNT`` to :data:`SPIN_COUNT` unless the environment already says how OpenMP threads wait.

    Returns whether the setting was made and can still take effect: False when the operator set
    ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` (theirs is kept), or when torch is already imported (libgomp has
    read its environment; nothing is changed then).
    """
    env = os.environ if environ is None else environ
    if "GOMP_SPINCOUNT" in env or "OMP_WAIT_POLICY" in env:
        return False
    if "torch" in sys.modules:
        return False
    env["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True


def share_cores(
    workers: int, environ: MutableMapping[str, str] | None = None, *, cores: int | None = None
) -> int | None:
    """Give each of ``workers`` processes on this host ``cores // workers`` torch threads (at least 1).

    Sets ``CXR_TORCH_THREADS`` (the service's ``torch_threads`` setting, which the worker processes inherit) and
    returns the value; returns None and changes nothing for a single worker or when the operator set it.
    ``cores``: the CPUs this process may run on (``os.sched_getaffinity``, which honours a container's cpuset).
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    env = os.environ if environ is None else environ
    if workers == 1 or env.get("CXR_TORCH_THREADS"):
        return None
    available = len(os.sched_getaffinity(0)) if cores is None else cores
    threads = max(1, available // workers)
    env["CXR_TORCH_THREADS"] = str(threads)
    return threads
