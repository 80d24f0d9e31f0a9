"""Where a lone request's wall-clock time goes: ``python bench/timeline.py [--requests 40] [--cams auto|none]``.

bench/stages.py accounts CPU per image under load; this answers the other question, the one the p50 target
at one client asks (docs/benchmarks.md): in what order, and for how long, is a single request waited on. It
starts the server through this same file (as bench/serve.py's ``start_server`` launcher: with
``CXR_TIMELINE_OUT`` set, this file is ``python -m service`` with wall-clock events on its stages), posts
``--requests`` raw-body 512 px PNG radiographs one at a time on a keep-alive connection, a few milliseconds
apart, and prints, per segment of a request, the median and quartiles over the requests:

    client send -> ASGI call -> body read -> decode thread -> ... -> response sent -> client has it

Every event is a ``time.perf_counter_ns`` read (CLOCK_MONOTONIC, the same clock in both processes), so
client and server segments add up to the client's latency; what the segments do not cover is printed as
"not covered". The audit trail is a new SQLite file (bench/serve.py's ``start_server``). A wrapped function a
tree does not have is skipped, so older commits can be timed too (segments that need it print as n/a).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Event = tuple[str, int, int]  # label, start ns, end ns

#: (module, attribute path, label): functions whose calls become events. Coroutine functions are awaited.
TARGETS: tuple[tuple[str, str, str], ...] = (
    ("service.runtime.pipeline", "decode_for_model", "decode"),
    ("service.runtime.predictor", "Predictor.run", "inference"),
    ("service.runtime.pipeline", "encode_heatmaps", "heatmaps"),
    ("service.runtime.pipeline", "build_response", "response objects"),
    ("service.runtime.pipeline", "PredictionPipeline.predict", "pipeline"),
    ("service.audit.recorder", "Auditor._durable", "audit durable"),
    ("service.audit.store", "AuditStore.insert", "audit insert"),
    ("fastapi.routing", "serialize_response", "serialise"),
)

#: (segment, from event edge, to event edge): an edge is (label, "start" | "end"). In request order.
SEGMENTS: tuple[tuple[str, tuple[str, str], tuple[str, str]], ...] = (
    ("client send -> ASGI call", ("client", "start"), ("asgi", "start")),
    ("ASGI call -> body read", ("asgi", "start"), ("body", "end")),
    ("body read -> decode thread starts", ("body", "end"), ("decode", "start")),
    ("decode + preprocess (decode thread)", ("decode", "start"), ("decode", "end")),
    ("decoded -> inference thread starts", ("decode", "end"), ("inference", "start")),
    ("trunk + MC head + Grad-CAM grids", ("inference", "start"), ("inference", "end")),
    ("inferred -> heatmaps start", ("inference", "end"), ("heatmaps", "start")),
    ("heatmap PNGs", ("heatmaps", "start"), ("heatmaps", "end")),
    ("heatmaps -> response objects start", ("heatmaps", "end"), ("response objects", "start")),
    ("response objects", ("response objects", "start"), ("response objects", "end")),
    ("built -> audit record submitted", ("response objects", "end"), ("audit durable", "start")),
    ("audit: wait until durable", ("audit durable", "start"), ("audit durable", "end")),
    ("  of which the insert + commit", ("audit insert", "start"), ("audit insert", "end")),
    ("durable -> serialisation", ("audit durable", "end"), ("serialise", "start")),
    ("serialisation (pydantic -> JSON)", ("serialise", "start"), ("serialise", "end")),
    ("serialised -> response sent", ("serialise", "end"), ("sent", "end")),
    ("response sent -> client has it", ("sent", "end"), ("client", "end")),
)


# --- server side (the launcher) ---------------------------------------------------------------------------

_events: list[Event] = []  # appended from several threads: list.append is atomic under the GIL


def _record(label: str, start: int, end: int) -> None:
    _events.append((label, start, end))


def _wrap(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    if asyncio.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter_ns()
            try:
                return await fn(*args, **kwargs)
            finally:
                _record(label, start, time.perf_counter_ns())

        return timed_async

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            _record(label, start, time.perf_counter_ns())

    return timed


def _install() -> list[str]:
    from stage_timer import wrap_targets  # this file's folder is on sys.path: it is the script run

    wrapped = wrap_targets(TARGETS, lambda label, fn: _wrap(fn, label))
    app_module = importlib.import_module("service.api.app")
    create_app = app_module.create_app

    def create_traced_app(*args: Any, **kwargs: Any) -> Any:
        app = create_app(*args, **kwargs)

        async def traced(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
            if scope["type"] != "http" or scope["path"] != "/v1/predict":
                return await app(scope, receive, send)
            called = time.perf_counter_ns()
            _record("asgi", called, called)

            async def timed_receive() -> Any:
                message = await receive()
                if message["type"] == "http.request" and not message.get("more_body"):
                    _record("body", called, time.perf_counter_ns())
                return message

            async def timed_send(message: dict[str, Any]) -> None:
                start = time.perf_counter_ns()
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    _record("sent", start, time.perf_counter_ns())

            return await app(scope, timed_receive, timed_send)

        # uvicorn checks the app's state after start-up (service/__main__.py reads app.state): keep it reachable.
        traced.state = app.state  # type: ignore[attr-defined]
        return traced

    app_module.create_app = create_traced_app
    return wrapped


def _dump_on_signal(path: Path) -> None:
    """Write the events to ``path`` whenever SIGUSR1 arrives (a thread waits for it: no handler in the loop)."""

    def wait() -> None:
        while True:
            signal.sigwait({signal.SIGUSR1})
            path.write_text(json.dumps(list(_events)))
            path.with_suffix(".done").touch()

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # before any other thread exists: they inherit it
    threading.Thread(target=wait, name="timeline-dump", daemon=True).start()


def serve() -> int:
    _dump_on_signal(Path(os.environ["CXR_TIMELINE_OUT"]))
    from stage_timer import limit_openmp_spin  # this file's folder is on sys.path: it is the script run

    limit_openmp_spin()  # before _install imports torch
    wrapped = _install()
    print(f"timeline events on: {', '.join(wrapped)}", file=sys.stderr, flush=True)
    from service.__main__ import main as service_main

    return service_main([])


# --- client side ---------------------------------------------------------------------------------------------


def _edge(events: dict[str, Event], label: str, side: str) -> float:
    event = events.get(label)
    if event is None:
        return math.nan
    return float(event[1] if side == "start" else event[2])


def segments(client: list[tuple[int, int]], server: list[Event]) -> dict[str, list[float]]:
    """Milliseconds per segment per request; a request's server events are those inside its client span."""
    server = sorted(server, key=lambda e: e[1])
    rows: dict[str, list[float]] = {name: [] for name, _, _ in SEGMENTS}
    rows["not covered"] = []
    rows["client latency"] = []
    for sent, received in client:
        events = {label: (label, start, end) for label, start, end in server if sent <= start <= received}
        events["client"] = ("client", sent, received)
        covered = 0.0
        for name, (a_label, a_side), (b_label, b_side) in SEGMENTS:
            ms = (_edge(events, b_label, b_side) - _edge(events, a_label, a_side)) / 1e6
            rows[name].append(ms)
            if not name.startswith(" ") and not math.isnan(ms):
                covered += ms
        total = (received - sent) / 1e6
        rows["client latency"].append(total)
        rows["not covered"].append(total - covered)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--cams", default="auto")
    parser.add_argument("--gap-ms", type=float, default=5.0, help="pause between requests (the client is idle)")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from loadgen import KeepAliveConnection, raw_request
    from serve import REPO, free_port, radiographs, start_server

    model = args.model or REPO / "models" / "demo"
    films = radiographs(32)
    port = free_port()
    scratch = Path(os.environ.get("TMPDIR", "/tmp"))
    out = scratch / f"bench-timeline-{port}.json"
    out.unlink(missing_ok=True)
    out.with_suffix(".done").unlink(missing_ok=True)
    server = start_server(
        port,
        model,
        args.device,
        scratch / f"bench-timeline-{port}.log",
        {"CXR_TIMELINE_OUT": str(out)},
        launcher=Path(__file__).resolve(),
    )
    client: list[tuple[int, int]] = []
    try:
        requests = [
            raw_request("/v1/predict", f"127.0.0.1:{port}", "image/png", film, query=f"cams={args.cams}")
            for film in films
        ]

        async def post_one_at_a_time() -> None:
            async with KeepAliveConnection("127.0.0.1", port) as connection:
                for i in range(args.requests + 5):  # the first 5 warm the server up and are not counted
                    await asyncio.sleep(args.gap_ms / 1e3)
                    sent = time.perf_counter_ns()
                    response = await connection.send(requests[i % len(requests)])
                    received = time.perf_counter_ns()
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}: {response.body[:300]!r}")
                    if i >= 5:
                        client.append((sent, received))

        asyncio.run(post_one_at_a_time())
        server.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while not out.with_suffix(".done").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        events: list[Event] = [tuple(e) for e in json.loads(out.read_text())]  # type: ignore[misc]
    finally:
        server.terminate()
        server.wait(timeout=60)
    rows = segments(client, events)
    print(f"one client, {len(client)} requests, cams={args.cams}, raw 512 px PNG uploads, {args.gap_ms:g} ms apart")
    print(f"    {'segment':<42}{'median':>8}{'p25':>8}{'p75':>8}  ms")
    for name, values in rows.items():
        known = sorted(v for v in values if not math.isnan(v))
        if not known:
            print(f"    {name:<42}{'n/a':>8}")
            continue
        q = statistics.quantiles(known, n=4) if len(known) > 1 else [known[0]] * 3
        print(f"    {name:<42}{statistics.median(known):>8.2f}{q[0]:>8.2f}{q[2]:>8.2f}")
    return 0


if __name__ == "__main__":
    if os.environ.get("CXR_TIMELINE_OUT"):  # started by start_server as the launcher: the server side
        sys.path.insert(0, os.getcwd())  # the tree being measured, as `python -m service` would find it
        sys.exit(serve())
    sys.exit(main())
