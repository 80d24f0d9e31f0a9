"""How the service's torch threads use the cores: the idle OpenMP spin, set before torch loads; the share of each
Gunicorn worker.

torch's CPU kernels run on GNU OpenMP (libgomp). After each parallel region its worker threads spin-wait for the
next one, by default for 300,000 iterations (``OMP_WAIT_POLICY`` unset), before they sleep. Inside one forward pass
that keeps the regions' hand-offs cheap; after the last region it keeps a core busy doing nothing for several
milliseconds, and with one image at a time on a small machine that is the core the request's event loop, decode
thread, heatmaps and audit writer need (``bench/timeline.py`` shows the wait; docs/benchmarks.md the effect on
latency, and that throughput under load is unchanged).

libgomp reads the variable once, when it is loaded, so the service's entry points (``python -m service`` and
``service.process.asgi`` for Gunicorn) call :func:`limit_openmp_spin` before anything imports torch. An operator's
own ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` is left alone. This module must not import torch.

Several worker processes on one host (Gunicorn, ``CXR_WORKERS``) each have a model thread whose OpenMP team would
by default take every core: N workers then run N x cores threads, and a lone image in one worker competes with the
others' work. :func:`cores_per_worker` gives each worker's team its share instead, as ``torchrun`` does for its
processes; ``service.process.asgi.app_from_env`` applies it to the worker's settings.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

__all__ = ["SPIN_COUNT", "cores_per_worker", "limit_openmp_spin"]

#: libgomp's ``GOMP_SPINCOUNT`` for the service (chosen with bench/timeline.py; docs/benchmarks.md).
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


def cores_per_worker(workers: int, *, cores: int | None = None) -> int | None:
    """Torch threads for each of ``workers`` processes on this host: ``cores // workers``, at least 1; None for a
    single worker (it keeps torch's default, every core). ``cores``: the CPUs this process may run on
    (``os.sched_getaffinity``, which honours a container's cpuset)."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers == 1:
        return None
    available = len(os.sched_getaffinity(0)) if cores is None else cores
    return max(1, available // workers)
