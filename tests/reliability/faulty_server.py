"""``python -m service`` with a fault injected, for the process-level reliability tests.

    python tests/reliability/faulty_server.py [--slow-batch-s S] [--kill-worker-on-batch N]

``--slow-batch-s`` makes every batch take S seconds longer (a slow device), so that requests are provably in
flight when the test sends SIGTERM. ``--kill-worker-on-batch N`` breaks the batcher's worker loop after its
N-th batch (the same injection as ``tests/service/test_batcher.py``), to exercise the worker-death policy.
The service itself is unchanged: settings from ``CXR_*`` variables, exit status from ``service.__main__``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from service.__main__ import main
from service.runtime.batcher import MicroBatcher
from service.runtime.predictor import InferenceRequest, InferenceResult, Predictor


def inject(slow_batch_s: float, kill_worker_on_batch: int) -> None:
    if slow_batch_s > 0:
        original_run = Predictor.run

        def slow_run(self: Predictor, requests: Sequence[InferenceRequest]) -> list[InferenceResult]:
            time.sleep(slow_batch_s)
            return original_run(self, requests)

        Predictor.run = slow_run  # type: ignore[method-assign]
    if kill_worker_on_batch > 0:
        original_settle = MicroBatcher._settle
        batches = {"n": 0}

        def settle_then_break(self: MicroBatcher[Any, Any], live: Any, results: Any) -> None:
            batches["n"] += 1
            if batches["n"] >= kill_worker_on_batch:
                raise RuntimeError("injected fault: the inference worker loop is broken")
            original_settle(self, live, results)

        MicroBatcher._settle = settle_then_break  # type: ignore[method-assign]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slow-batch-s", type=float, default=0.0)
    parser.add_argument("--kill-worker-on-batch", type=int, default=0)
    args = parser.parse_args()
    inject(args.slow_batch_s, args.kill_worker_on_batch)
    sys.exit(main([]))
