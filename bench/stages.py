"""Where the server's CPU goes per image: exact stage timers where they can be placed, a py-spy profile elsewhere.

Starts the server (the demo model unless ``--model``) through bench/stage_timer.py, which is ``python -m
service`` with thread-CPU timers around the functions of each stage (decoding, the conversion to the model's
input, the trunk, the MC head, the heatmaps, the response objects, the upload's hash), warms it, then loads it
with ``--clients`` keep-alive clients posting 512x512 PNG radiographs while py-spy samples it (``record
--threads --nonblocking``: the server is never stopped). Every thread's CPU time comes from the kernel
(utime + stime, ``/proc/PID/task/TID/stat``) over the load. Per thread:

* the timed stages get exactly what their timers measured;
* the rest of a decode-pool or inference thread is thread plumbing (pool and future hand-offs, wake-ups and
  the glue around the timed calls), and the audit writer thread's time is the audit trail;
* the rest of the event-loop thread, which has no timers of its own, is split between its stages in
  proportion to its py-spy samples (each sample sorted by walking its stack from the leaf to the first frame
  that names a stage: :func:`stage_of`), leaving out samples inside timed stages.

The second column repeats the previous method, py-spy alone (every thread split by its samples), for
comparison: on a busy 2-core machine it put decode-thread time under hand-offs (1.3-2.1 core-ms per image
against the timers' 0.4-0.6) and so overstated host work by 0.4-0.8 core-ms.
``--no-timers`` starts plain ``python -m service`` and reports only the sampled split.

    python bench/stages.py [--upload multipart|raw] [--cams auto|none] [--clients 16] [--requests-per-client 25]
    python bench/stages.py --no-timers ...             # py-spy alone (the method of the 2026-12-02 tables)
    python bench/stages.py --profile FILE --images N   # re-sort a saved raw profile

The line "host work outside the model and the upload decoder" is what issue #16's <= 4 core-ms target counts:
everything but the trunk, the MC head/Grad-CAM on the inference thread and the PNG/JPEG/DICOM decoder.
Needs ``py-spy`` (``pip install py-spy``) and permission to read the server's memory (root, or
``kernel.yama.ptrace_scope`` 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from serve import free_port, load, radiographs, start_server
from stage_timer import AUDIT, DECODER, HEAD, HEATMAPS, PREPROCESS, RESPONSE, TRUNK

REPO = Path(__file__).resolve().parents[1]

# Stages in print order (the timed ones are named in bench/stage_timer.py). "Model" and "decoder" rows are
# excluded from the host-work sum.
HANDOFF = "thread hand-offs (pools, futures, wake-ups)"
MULTIPART = "event loop: multipart parsing"
SERIALISE = "event loop: response validation and JSON"
HTTP = "event loop: HTTP, ASGI, routing, middleware"
OTHER = "other"
STAGES = (TRUNK, HEAD, DECODER, PREPROCESS, HEATMAPS, RESPONSE, HANDOFF, AUDIT, MULTIPART, SERIALISE, HTTP, OTHER)
NOT_HOST = frozenset({TRUNK, HEAD, DECODER})
TIMED = frozenset({TRUNK, HEAD, DECODER, PREPROCESS, HEATMAPS, RESPONSE})  # (and the hash, within AUDIT)

# Library frames that name an event-loop stage when no project frame is nearer the leaf.
_LIBRARY_HINTS = (
    ("python_multipart/", MULTIPART),
    ("starlette/formparsers.py", MULTIPART),
    ("pydantic", SERIALISE),
    ("serialize_response", SERIALISE),
    ("fastapi/_compat", SERIALISE),
    ("jsonable_encoder", SERIALISE),
    ("json/", SERIALISE),
    ("orjson", SERIALISE),
)
# Thread plumbing: a sample whose nearest named frame is one of these is a hand-off between threads.
_PLUMBING = (
    "concurrent/futures/",
    "asyncio/futures.py",
    "asyncio/threads.py",
    "threading.py",
    "queue.py",
    "run_in_executor",
    "call_soon_threadsafe",
    "_off_loop",
    "service/runtime/batcher.py",
)
_PROJECT_RULES = (
    ("service/audit/", AUDIT),
    ("service/runtime/heatmap_png.py", HEATMAPS),
    ("GridCams.", HEATMAPS),  # Grad-CAM maps resampled to the input size where they are read (decode threads)
    ("encode_heatmaps@service/runtime/heatmaps.py", HEATMAPS),
    ("build_response@", RESPONSE),
    ("_pillow_to_gray", PREPROCESS),
    ("_to_unit_float@", PREPROCESS),  # inside _pillow_to_gray: the samples to float in [0, 1]
    ("luminance", PREPROCESS),
    ("bayesnet/preprocess.py", PREPROCESS),
    ("check_radiograph_geometry", PREPROCESS),
    ("decode_for_model", PREPROCESS),
    ("bayesnet/imaging/", DECODER),
    ("bayesnet/gradcam.py", HEAD),
    ("bayesnet/mc.py", HEAD),
    ("bayesnet/ood.py", HEAD),
    ("bayesnet/referral.py", HEAD),
    ("bayesnet/decision.py", HEAD),
    ("forward_head", HEAD),
    ("Predictor.run@", TRUNK),  # the trunk's call: torch frames below it are skipped
    ("Predictor.", HEAD),
    ("bayesnet/", HEAD),
)


def _frame_key(frame: str) -> str:
    """``func (path:line)`` -> ``func@path:line`` (one string to match rules against)."""
    name, _, where = frame.partition(" (")
    return f"{name}@{where.rstrip(')')}"


def stage_of(thread: str, frames: list[str]) -> str:
    """The stage of one sample: ``frames`` root first, as py-spy's raw format writes them."""
    hint = None
    for frame in reversed(frames):
        key = _frame_key(frame)
        for rule, stage in _PROJECT_RULES:
            if rule in key:
                return stage
        if any(rule in key for rule in _PLUMBING):
            return HANDOFF
        if ("service/" in key or "bayesnet/" in key) and thread == "MainThread":
            return hint or HTTP  # the route or a middleware: the library frame below it says what it was doing
        if hint is None:
            hint = next((stage for rule, stage in _LIBRARY_HINTS if rule in key), None)
    if thread == "MainThread":
        return hint or HTTP  # uvloop / httptools native code under Runner.run
    if thread.startswith("inference"):
        return TRUNK
    return OTHER


def sort_profile(path: Path) -> dict[int, Counter[str]]:
    """Samples per stage and thread id in a py-spy ``--format raw --threads`` file."""
    counts: dict[int, Counter[str]] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        head, _, thread = frames[0].partition(": ")
        tid = int("".join(ch for ch in head if ch.isdigit()) or 0)
        counts.setdefault(tid, Counter())[stage_of(thread.rstrip("0123456789_"), frames[1:])] += int(count)
    return counts


def thread_cpu_ms(pid: int) -> dict[int, float]:
    """CPU time (user + system) of each thread of ``pid`` so far, in ms, from the kernel's accounting."""
    tick_ms = 1e3 / os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) * tick_ms  # utime, stime (fields 14, 15)
    return out


def stage_ms(counts: dict[int, Counter[str]], cpu_ms: dict[int, float] | None, rate: int) -> Counter[str]:
    """CPU ms per stage, py-spy alone: each thread's kernel CPU time split by its samples (or samples / rate)."""
    total: Counter[str] = Counter()
    for tid, per_stage in counts.items():
        samples = sum(per_stage.values())
        thread_ms = cpu_ms.get(tid, 0.0) if cpu_ms is not None else samples / rate * 1e3
        for stage, n in per_stage.items():
            total[stage] += thread_ms * n / samples
    if cpu_ms is not None:  # threads py-spy never caught running: their time is real but unattributed
        total[OTHER] += sum(ms for tid, ms in cpu_ms.items() if tid not in counts)
    return total


def timed_stage_ms(
    counts: dict[int, Counter[str]],
    cpu_ms: dict[int, float],
    timers_ms: dict[int, dict[str, float]],
    names: dict[int, str],
) -> Counter[str]:
    """CPU ms per stage: the timers' exact figures, each thread's remainder attributed as the module docstring says."""
    total: Counter[str] = Counter()
    for tid, thread_ms in cpu_ms.items():
        name = names.get(tid, "")
        if name == "stage-timer":
            continue  # the benchmark's own snapshot thread
        timed = timers_ms.get(tid, {})
        for stage, ms in timed.items():
            total[stage] += ms
        rest = max(0.0, thread_ms - sum(timed.values()))
        if name.startswith(("decode", "inference")):
            total[HANDOFF] += rest
        elif name == "audit-writer":
            total[AUDIT] += rest
        else:
            sampled = Counter({stage: n for stage, n in counts.get(tid, Counter()).items() if stage not in TIMED})
            samples = sum(sampled.values())
            if samples == 0:
                total[OTHER] += rest
                continue
            for stage, n in sampled.items():
                total[stage] += rest * n / samples
    return total


def report(columns: dict[str, Counter[str]], images: int, title: str) -> float:
    """Print core-ms per image per stage, one column per method; returns the first column's host-work sum."""
    per_image = {label: {stage: ms[stage] / images for stage in STAGES} for label, ms in columns.items()}
    print(title)
    print(f"    {'stage':<76}" + "".join(f"{label:>16}" for label in columns))
    for stage in STAGES:
        values = [column[stage] for column in per_image.values()]
        if max(values) >= 0.005:
            print(f"    {stage:<76}" + "".join(f"{v:>16.2f}" for v in values))
    totals = [sum(column.values()) for column in per_image.values()]
    hosts = [sum(v for stage, v in column.items() if stage not in NOT_HOST) for column in per_image.values()]
    print(f"    {'total':<76}" + "".join(f"{v:>16.2f}" for v in totals))
    host_label = "host work outside the model and the upload decoder (#16 target <= 4)"
    print(f"    {host_label:<76}" + "".join(f"{v:>16.2f}" for v in hosts))
    # The trunk's work is the same whatever the service does around it, so its time measures how fast the
    # (shared, noisy) machine ran during this profile: compare host work between runs as this ratio.
    trunks = [column[TRUNK] for column in per_image.values()]
    ratios = [host / trunk if trunk > 0 else float("nan") for host, trunk in zip(hosts, trunks, strict=True)]
    print(
        f"    {'host work / trunk time (compare runs by this: the trunk is the same work)':<76}"
        + "".join(f"{v:>16.3f}" for v in ratios)
    )
    return hosts[0]


def timer_snapshot(fifo: Path, out: Path, previous: int) -> dict[str, Any]:
    """Ask bench/stage_timer.py for a snapshot and wait for it (the ``previous + 1``-th line of ``out``)."""
    with fifo.open("w") as request:
        request.write("snapshot\n")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = out.read_text().splitlines() if out.is_file() else []
        if len(lines) > previous:
            try:
                return dict(json.loads(lines[previous]))
            except json.JSONDecodeError:
                pass  # still being written
        time.sleep(0.05)
    raise SystemExit("the stage timers wrote no snapshot within 30 s")


def timer_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[int, dict[str, float]]:
    """ms per stage per thread between two snapshots."""
    delta: dict[int, dict[str, float]] = {}
    for tid, stages in after["stages"].items():
        old = before["stages"].get(tid, {})
        delta[int(tid)] = {stage: (ns - old.get(stage, 0)) / 1e6 for stage, ns in stages.items()}
    return delta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "demo")
    parser.add_argument("--upload", choices=("multipart", "raw"), default="multipart")
    parser.add_argument("--device", default="cpu", help="the server's CXR_DEVICE (cpu, cuda)")
    parser.add_argument("--cams", default="auto")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=25)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second per thread")
    parser.add_argument("--profile", type=Path, default=None, help="sort this saved raw profile instead of running")
    parser.add_argument("--images", type=int, default=0, help="with --profile: how many images it covered")
    parser.add_argument("--keep", type=Path, default=None, help="copy the raw profile here")
    parser.add_argument("--no-timers", action="store_true", help="plain python -m service, py-spy alone")
    args = parser.parse_args()
    if args.profile is not None:
        ms = stage_ms(sort_profile(args.profile), None, args.rate)
        report({"sampled": ms}, args.images, f"{args.profile}, {args.images} images (py-spy sample counts only)")
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    scratch = Path(tempfile.mkdtemp(prefix="bench-stages-"))
    fifo, timer_out = scratch / "timer.fifo", scratch / "timers.jsonl"
    launcher, timer_env = None, None
    if not args.no_timers:
        os.mkfifo(fifo)
        timer_env = {"CXR_STAGE_TIMER_FIFO": str(fifo), "CXR_STAGE_TIMER_OUT": str(timer_out)}
        launcher = Path(__file__).resolve().parent / "stage_timer.py"
    port = free_port()
    server = start_server(port, args.model, args.device, scratch / "server.log", timer_env, launcher=launcher)
    try:
        images = radiographs(32)
        asyncio.run(load(port, images, 4, 4, args.cams, upload=args.upload))  # warm-up, outside the profile
        raw = scratch / "profile.txt"
        command = [spy, "record", "--pid", str(server.pid), "--threads", "--nonblocking", "--rate", str(args.rate)]
        recorder = subprocess.Popen(
            [*command, "--format", "raw", "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        time.sleep(1.5)  # py-spy attaches; the server is idle meanwhile, and py-spy drops idle samples
        timers_before = timer_snapshot(fifo, timer_out, 0) if launcher else None
        cpu_before = thread_cpu_ms(server.pid)
        result = asyncio.run(load(port, images, args.clients, args.requests_per_client, args.cams, upload=args.upload))
        cpu_after = thread_cpu_ms(server.pid)
        timers_after = timer_snapshot(fifo, timer_out, 1) if launcher else None
        recorder.send_signal(signal.SIGINT)
        _, err = recorder.communicate(timeout=60)
        if not raw.is_file():
            raise SystemExit(f"py-spy wrote no profile: {err.decode(errors='replace')[-800:]}")
    finally:
        server.terminate()
        server.wait(timeout=60)
    served = args.clients * args.requests_per_client
    if args.keep is not None:
        shutil.copyfile(raw, args.keep)
    print(
        f"{served} images, {args.upload} uploads, cams={args.cams}, {args.clients} clients: "
        f"{result.images_per_s:.1f} images/s, p50 {result.p50_ms:.1f} ms, {result.errors} errors; "
        f"py-spy at {args.rate} Hz on pid {server.pid} ({os.cpu_count()} cores)"
    )
    cpu_ms = {tid: ms - cpu_before.get(tid, 0.0) for tid, ms in cpu_after.items()}
    counts = sort_profile(raw)
    sampled = stage_ms(counts, cpu_ms, args.rate)
    if timers_before is None or timers_after is None:
        report({"sampled": sampled}, served, "CPU per image by stage (kernel CPU time split by py-spy samples):")
        return
    names = {int(tid): name for tid, name in timers_after["threads"].items()}
    timed = timed_stage_ms(counts, cpu_ms, timer_delta(timers_before, timers_after), names)
    report(
        {"timed": timed, "py-spy alone": sampled},
        served,
        "CPU per image by stage (kernel CPU time; 'timed': stage timers + the rest of each thread, see the docstring):",
    )


if __name__ == "__main__":
    main()
