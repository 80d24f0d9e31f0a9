"""``python bench/stage_timer.py [service args]``: ``python -m service`` with exact CPU timers on its stages.

bench/stages.py starts the server through this launcher. It wraps the functions that make up the stages of a
request (decoding, the conversion to the model's input, the trunk, the heatmaps, the response objects, the
upload's hash) so that each call adds its own thread's CPU time (``time.thread_time_ns``: the kernel's
per-thread clock, user + system) to ``(thread, stage)``. Nested timed calls are exclusive: the gray conversion
inside a decode counts as conversion, not decoding. Sampling could not do this reliably: in the same runs
py-spy's split put 1.3-2.1 core-ms per image under thread hand-offs where these timers leave 0.4-0.6, and
0.3-0.5 less than they measure in the Pillow decoder (docs/benchmarks.md).

Nothing in the service changes but these wrappers (two clock reads of about 0.5 us per timed call, about ten
timed calls per image). A function a tree does not
have is skipped, so the same launcher times older commits. On each line written to the FIFO named by
``CXR_STAGE_TIMER_FIFO`` it appends one JSON snapshot to ``CXR_STAGE_TIMER_OUT``: the threads' names and
the nanoseconds per stage per thread (native thread ids) so far; the benchmark takes one before and one after
its load and subtracts.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Stage names: the same strings as bench/stages.py's rows.
TRUNK = "inference thread: trunk"
HEAD = "inference thread: MC head, OOD, summaries, Grad-CAM maps, batch assembly"
DECODER = "upload decoding (Pillow/zlib, pydicom)"
PREPROCESS = "gray conversion, resize to the model's size, normalisation"
HEATMAPS = "heatmap PNGs"
RESPONSE = "response objects, validation and JSON"
AUDIT = "audit trail (hash, record, writer thread)"

#: (module, attribute path, stage): the callables wrapped. Module attributes are replaced where the caller
#: looks them up (e.g. ``service.runtime.decoding.decode_image``, the name decode_for_model calls).
TARGETS: tuple[tuple[str, str, str], ...] = (
    ("service.runtime.decoding", "decode_image", DECODER),
    ("bayesnet.imaging.raster", "_pillow_to_gray", PREPROCESS),
    ("service.runtime.decoding", "check_radiograph_geometry", PREPROCESS),
    ("service.runtime.decoding", "preprocess", PREPROCESS),
    ("service.runtime.pipeline", "encode_heatmaps", HEATMAPS),
    ("service.runtime.pipeline", "build_response", RESPONSE),
    ("service.audit.recorder", "_sha256", AUDIT),
    ("service.runtime.predictor", "Predictor.run", HEAD),
)

_threads: dict[int, dict[str, int]] = {}  # native thread id -> stage -> ns (each dict written by its thread only)
_local = threading.local()


def _account(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` adding its exclusive thread CPU time to ``stage`` for the calling thread."""

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        stack: list[list[int]] | None = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
            _threads[threading.get_native_id()] = _local.totals = {}
        frame = [0]  # CPU ns of timed calls nested in this one
        stack.append(frame)
        started = time.thread_time_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed = time.thread_time_ns() - started
            stack.pop()
            totals: dict[str, int] = _local.totals
            totals[stage] = totals.get(stage, 0) + elapsed - frame[0]
            if stack:
                stack[-1][0] += elapsed

    return timed


def wrap_targets(
    targets: tuple[tuple[str, str, str], ...], wrap: Callable[[str, Callable[..., Any]], Callable[..., Any]]
) -> list[str]:
    """Replace each ``(module, attribute path, label)`` callable this tree has with ``wrap(label, callable)``,
    where its callers look it up; returns the ``module.path`` of those replaced (bench/timeline.py uses it too)."""
    wrapped = []
    for module_name, path, label in targets:
        try:
            owner: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent, None)
        if owner is None or not callable(getattr(owner, name, None)):
            continue
        setattr(owner, name, wrap(label, getattr(owner, name)))
        wrapped.append(f"{module_name}.{path}")
    return wrapped


def _install() -> list[str]:
    """Wrap every target this tree has; returns the ones wrapped."""
    wrapped = wrap_targets(TARGETS, _account)
    # The trunk: whatever Predictor._trunk is when a batch starts (eager, the frozen graph, CUDA graphs: it is
    # replaced during warm-up) is timed as the trunk, inside Predictor.run and so exclusive of it.
    predictor_class = getattr(importlib.import_module("service.runtime.predictor"), "Predictor", None)
    if predictor_class is not None and hasattr(predictor_class, "run"):
        timed_run = predictor_class.run

        @functools.wraps(timed_run)
        def run_with_timed_trunk(self: Any, *args: Any, **kwargs: Any) -> Any:
            trunk = getattr(self, "_trunk", None)
            if trunk is not None and not getattr(trunk, "stage_timed", False):
                timed_trunk = _account(TRUNK, trunk)
                timed_trunk.stage_timed = True  # type: ignore[attr-defined]
                self._trunk = timed_trunk
            return timed_run(self, *args, **kwargs)

        predictor_class.run = run_with_timed_trunk
        wrapped.append("service.runtime.predictor.Predictor._trunk")
    return wrapped


def _snapshot() -> dict[str, Any]:
    return {
        "threads": {str(t.native_id): t.name for t in threading.enumerate() if t.native_id is not None},
        "stages": {str(tid): dict(totals) for tid, totals in list(_threads.items())},
    }


def _serve_snapshots(fifo: Path, out: Path) -> None:
    """Append a snapshot to ``out`` for every line written to ``fifo`` (a daemon thread; EOF reopens it)."""
    while True:
        with fifo.open() as requests:
            for _ in requests:
                with out.open("a") as sink:
                    sink.write(json.dumps(_snapshot()) + "\n")


def limit_openmp_spin() -> None:
    """What ``python -m service`` does first (service/process/threads.py, where the tree has it): a launcher must do it
    too, before wrapping the targets imports torch, or the server it starts runs with libgomp's default spin."""
    try:
        from service.process.threads import limit_openmp_spin as limit
    except ImportError:  # an older tree
        return
    limit()


def main() -> int:
    limit_openmp_spin()
    wrapped = _install()
    fifo, out = os.environ.get("CXR_STAGE_TIMER_FIFO"), os.environ.get("CXR_STAGE_TIMER_OUT")
    if fifo and out:
        threading.Thread(target=_serve_snapshots, args=(Path(fifo), Path(out)), name="stage-timer", daemon=True).start()
    print(f"stage timers on: {', '.join(wrapped)}", file=sys.stderr, flush=True)
    from service.__main__ import main as serve

    return serve(sys.argv[1:])


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())  # the tree being measured, as `python -m service` would find it
    sys.exit(main())
