"""Reliability run (``make reliability``): load, overload, faults and hostile input against a fresh server.

Starts ``python -m service`` in its own process (the shipped demo model unless ``--model``), then in order:

1. capacity: closed-loop clients for a few seconds -> successful predictions per second (``cams=auto``, the
   API's default, as in the load, burst and recovery phases);
2. load: an open-loop steady rate (half the capacity unless ``--rate``) for ``--duration-s`` (60 s), with the
   server's RSS after warm-up and at the end (growth must stay within ``--rss-tolerance-mib`` or 10 %);
3. overload: a burst at 4 x capacity: every answer is 200 or 503 + Retry-After, the 503s come faster than
   the accepted answers, nothing is lost; then the queue drains and a half-capacity rate is served again with
   a median latency within 2 x the load phase's (recovery);
4. disconnects: clients hanging up mid-upload and mid-inference while others are served: the others all
   succeed, abandoned images are dropped before the model, connections and descriptors return to baseline;
5. hostile input: every case of ``tests/reliability/hostile_corpus.py``: never a 5xx, always the expected answer;
6. slow clients (``tests/reliability/attacks.py``): 70 uploads trickled at 2 bytes/s cut with 408 while a client
   keeps predicting, dripped headers 408, huge headers 431, raw-body hang-ups counted as 499 (no 5xx), and 20
   parallel previews of a 7000 x 7000 RLE DICOM: the server's RSS rises by at most one preview's bound
   (``bayesnet.decode_memory_bytes``) and predictions stay within 2 s of their pace alone;
7. SIGTERM under load: requests accepted before the signal all succeed, new connections are refused, the
   process exits 0 within the grace period.

Prints each phase, then one summary table, and exits 1 if any requirement fails (requests lost, any 5xx on bad
input or outside overload shedding, RSS growth, no recovery). ``--quick`` shortens every phase (about 1 min).
The machine may be shared: read latencies as ratios within this run, not as absolute numbers.

    python bench/reliability.py [--quick] [--duration-s 60] [--rate R] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the harness and the hostile corpus live with the tests

from serve import radiographs  # noqa: E402

from bayesnet import decode_memory_bytes  # noqa: E402
from tests.reliability.attacks import (  # noqa: E402
    SLOW_CLIENTS,
    Timings,
    drip_headers,
    hang_up_mid_body,
    heavy_dicom,
    metric,
    predict_every,
    server_errors,
    trickle_upload,
    unfinished_huge_header,
)
from tests.reliability.harness import (  # noqa: E402
    MIB,
    LoadReport,
    ServerProcess,
    hang_up_mid_upload,
    measure_capacity,
    metric_value,
    send_then_hang_up,
    steady_load,
    wait_idle,
)
from tests.reliability.hostile_corpus import build_corpus, check_response, send_case  # noqa: E402

DEFAULT_MODEL = REPO / "models" / "demo"
MAX_UPLOAD_BYTES = 32 * MIB  # the service's default (service.settings.DEFAULT_MAX_UPLOAD_BYTES)
RECOVERY_LATENCY_RATIO = 2.0
FLOOD = 20  # previews sent at once
#: Capacity, load, burst and recovery send what a client that names nothing gets: the API's default, heatmaps
#: for the positive and uncertain findings included.
QUERY = {"cams": "auto"}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


class Run:
    """The checks gathered across phases, plus the counters of the summary table."""

    def __init__(self) -> None:
        self.checks: list[Check] = []
        self.lost = 0
        self.unexpected_5xx = 0
        self.faults_tried = 0
        self.faults_survived = 0
        self.bad_inputs = 0
        self.bad_inputs_ok = 0

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, ok, detail))
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
        return ok

    def count(self, report: LoadReport, *, shedding: bool = False) -> None:
        self.lost += report.lost
        self.unexpected_5xx += report.server_errors + (0 if shedding else report.statuses[503])

    def fault(self, survived: bool) -> None:
        self.faults_tried += 1
        self.faults_survived += survived


def phase_load(
    server: ServerProcess, images: list[bytes], rate: float, duration_s: float, rss_tolerance_mib: float, run: Run
) -> LoadReport:
    print(f"load: {rate:.1f} requests/s for {duration_s:.0f} s", flush=True)
    rss_start = server.rss_bytes()
    report = asyncio.run(
        steady_load(server.url, images, rate_per_s=rate, duration_s=duration_s, name="load", params=QUERY)
    )
    rss_end = server.rss_bytes()
    print(f"  {report.summary()}")
    run.count(report)
    run.check("load: every request answered 200", report.failed == 0 and report.lost == 0, report.summary())
    run.check(
        "load: rate held",
        report.throughput_per_s >= 0.9 * rate,
        f"{report.throughput_per_s:.1f} ok/s for {rate:.1f} offered",
    )
    growth = rss_end - rss_start
    tolerance = max(rss_tolerance_mib * MIB, 0.10 * rss_start)
    run.check(
        "load: no memory growth (RSS)",
        growth <= tolerance,
        f"RSS {rss_start / MIB:.0f} MiB -> {rss_end / MIB:.0f} MiB ({growth / MIB:+.0f} MiB, "
        f"tolerance {tolerance / MIB:.0f} MiB)",
    )
    return report


def server_latency_buckets(url: str, route: str = "/v1/predict") -> dict[str, dict[float, float]]:
    """Cumulative counts of the server's own request-duration histogram for ``route``, by status: {status: {le: n}}."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "cxr_http_request_duration_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("route") == route:
                out.setdefault(sample.labels["status"], {})[float(sample.labels["le"])] = sample.value
    return out


def server_quantile_ms(
    before: dict[str, dict[float, float]], after: dict[str, dict[float, float]], status: str, q: float
) -> float:
    """Upper bound (bucket edge) of the server-side ``q`` quantile of requests answered ``status`` in between."""
    counts = {le: n - before.get(status, {}).get(le, 0.0) for le, n in after.get(status, {}).items()}
    total = counts.get(float("inf"), 0.0)
    if total <= 0:
        return float("nan")
    for le in sorted(counts):
        if counts[le] >= q * total:
            return le * 1e3
    return float("inf")


def phase_overload(
    server: ServerProcess, images: list[bytes], capacity: float, burst_s: float, baseline: LoadReport, run: Run
) -> None:
    rate = 4 * capacity
    print(f"overload: {rate:.1f} requests/s (4 x capacity) for {burst_s:.0f} s", flush=True)
    buckets_before = server_latency_buckets(server.url)
    burst = asyncio.run(
        steady_load(server.url, images, rate_per_s=rate, duration_s=burst_s, name="burst", lean=True, params=QUERY)
    )
    buckets_after = server_latency_buckets(server.url)
    shed_p95_ms = server_quantile_ms(buckets_before, buckets_after, "503", 0.95)
    ok_p50_ms = server_quantile_ms(buckets_before, buckets_after, "200", 0.50)
    print(
        f"  {burst.summary()}; 503 p50/p95 {burst.percentile_ms(50, busy=True):.0f}/"
        f"{burst.percentile_ms(95, busy=True):.0f} ms at the client (lean raw-socket generator, same 2 cores)"
    )
    print(f"  server side (its latency histogram): 503 p95 <= {shed_p95_ms:.0f} ms, 200 p50 <= {ok_p50_ms:.0f} ms")
    run.count(burst, shedding=True)
    shed = burst.statuses[503]
    shed_ok = run.check(
        "overload: excess shed with 503 + Retry-After, accepted ones all 200",
        set(burst.statuses) <= {200, 503} and shed > 0 and burst.busy_without_retry_after == 0 and burst.lost == 0,
        f"{burst.statuses[200]} ok, {shed} shed, {burst.busy_without_retry_after} without Retry-After, "
        f"{burst.lost} lost",
    )
    # Judged at the client (the burst uses the lean raw-socket generator, so its own queueing stays small on the
    # shared 2 cores) and by the server's own histogram, from the request reaching the app to its answer.
    client_shed_p95_ms, client_ok_p50_ms = burst.percentile_ms(95, busy=True), burst.percentile_ms(50)
    fast_ok = run.check(
        "overload: 503s answered faster than accepted requests (client and server side)",
        shed > 0 and shed_p95_ms < ok_p50_ms and client_shed_p95_ms < client_ok_p50_ms,
        f"503 p95 {client_shed_p95_ms:.0f} ms vs 200 p50 {client_ok_p50_ms:.0f} ms at the client; server histogram "
        f"503 p95 <= {shed_p95_ms:.0f} ms vs 200 p50 <= {ok_p50_ms:.0f} ms (bucket edges)",
    )
    asyncio.run(wait_idle(server.url))
    after = asyncio.run(
        steady_load(
            server.url, images, rate_per_s=capacity / 2, duration_s=max(5.0, burst_s), name="recovery", params=QUERY
        )
    )
    print(f"  {after.summary()}")
    run.count(after)
    ratio = after.percentile_ms(50) / baseline.percentile_ms(50)
    recovered = run.check(
        "overload: recovers to normal latency",
        after.failed == 0 and after.lost == 0 and ratio <= RECOVERY_LATENCY_RATIO,
        f"p50 {after.percentile_ms(50):.0f} ms after the burst vs {baseline.percentile_ms(50):.0f} ms before "
        f"({ratio:.2f} x, limit {RECOVERY_LATENCY_RATIO} x); {after.failed} failed",
    )
    run.fault(shed_ok and fast_ok and recovered)


def phase_disconnects(server: ServerProcess, images: list[bytes], run: Run) -> None:
    print("disconnects: clients hanging up mid-upload and mid-inference while others are served", flush=True)
    asyncio.run(wait_idle(server.url))
    before_fds, before_conns = server.open_fds(), server.connections()
    before_images = metric_value(httpx.get(f"{server.url}/metrics").text, "cxr_images_processed_total")
    quitters = 8
    others_n = 16

    async def others() -> LoadReport:
        return await steady_load(server.url, images, rate_per_s=50.0, duration_s=others_n / 50.0, name="others")

    threads = [threading.Thread(target=hang_up_mid_upload, args=(server.port, images[i])) for i in range(quitters)]
    threads += [
        threading.Thread(target=send_then_hang_up, args=(server.port, images[i]), kwargs={"after_s": 0.05})
        for i in range(quitters)
    ]
    for thread in threads:
        thread.start()
    report = asyncio.run(others())
    for thread in threads:
        thread.join(timeout=60)
    asyncio.run(wait_idle(server.url))
    run.count(report)
    processed = metric_value(httpx.get(f"{server.url}/metrics").text, "cxr_images_processed_total") - before_images
    dropped = report.succeeded + quitters - processed
    _settle(lambda: server.connections() <= before_conns and server.open_fds() <= before_fds, timeout_s=15)
    fds, conns = server.open_fds(), server.connections()
    ok_others = run.check("disconnects: others unaffected", report.failed == 0 and report.lost == 0, report.summary())
    ok_dropped = run.check(
        "disconnects: abandoned work dropped before the model",
        dropped > 0,
        f"the model saw {processed:.0f} images for {report.succeeded} answered requests and {quitters} complete "
        f"uploads abandoned while queued: {dropped:.0f} of those were dropped before inference",
    )
    ok_leaks = run.check(
        "disconnects: nothing leaks",
        fds <= before_fds and conns <= before_conns,
        f"open descriptors {before_fds} -> {fds}, TCP connections {before_conns} -> {conns}",
    )
    run.fault(ok_others and ok_dropped and ok_leaks)


def phase_hostile(server: ServerProcess, run: Run) -> None:
    corpus = build_corpus(MAX_UPLOAD_BYTES)
    print(f"hostile input: {len(corpus)} cases", flush=True)

    async def send_all() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120.0) as client:
            for case in corpus:
                run.bad_inputs += 1
                try:
                    response = await send_case(client, case)
                    await response.aread()
                except (TimeoutError, httpx.HTTPError) as err:
                    run.lost += 1
                    print(f"  [FAIL] {case.name}: no answer ({err!r})")
                    continue
                if response.status_code >= 500:
                    run.unexpected_5xx += 1
                problem = check_response(case, response)
                run.bad_inputs_ok += problem is None
                if problem is not None:
                    print(f"  [FAIL] {case.name}: {problem}")

    asyncio.run(send_all())
    ready = httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    run.check(
        "hostile input: every case answered as expected, service still ready",
        run.bad_inputs_ok == run.bad_inputs and ready,
        f"{run.bad_inputs_ok}/{run.bad_inputs} as expected; ready afterwards: {ready}",
    )


def phase_slow_clients(server: ServerProcess, images: list[bytes], run: Run) -> None:
    """Issue #28's attacks on the server itself (no nginx): trickled uploads, dripped headers, a huge header,
    raw-body hang-ups and a flood of worst-case previews, each while a client keeps predicting."""
    print("slow clients: trickled uploads, dripped headers, huge headers, hang-ups, heavy previews", flush=True)
    asyncio.run(wait_idle(server.url))
    film = images[0]
    errors_before = server_errors(server.url)
    baseline = asyncio.run(predict_every(server.url, film, until=time.monotonic() + 3.0, every_s=0.2))

    async def trickled() -> tuple[list[tuple[int | None, float]], Timings]:
        slow = [asyncio.create_task(trickle_upload(server.port, film)) for _ in range(SLOW_CLIENTS)]
        await asyncio.sleep(0.5)
        real = await predict_every(server.url, film, until=time.monotonic() + 9.0, every_s=0.2)
        return list(await asyncio.gather(*slow)), real

    slow, real = asyncio.run(trickled())
    cut = sum(1 for status, _ in slow if status == 408)
    ok_slow = run.check(
        f"slow clients: {SLOW_CLIENTS} uploads at 2 bytes/s cut with 408, real predictions answered meanwhile",
        cut == SLOW_CLIENTS and set(real.statuses) == {200} and real.slowest_s < baseline.slowest_s + 2.0,
        f"{cut}/{SLOW_CLIENTS} cut with 408 after {min(s for _, s in slow):.1f}-{max(s for _, s in slow):.1f} s; "
        f"{len(real.results)} predictions meanwhile, all 200: {set(real.statuses) == {200}}, median "
        f"{real.median_s() * 1e3:.0f} ms, slowest {real.slowest_s * 1e3:.0f} ms (alone: median "
        f"{baseline.median_s() * 1e3:.0f} ms, slowest {baseline.slowest_s * 1e3:.0f} ms)",
    )

    async def headers() -> tuple[list[tuple[int | None, float]], list[int | None]]:
        drips = [asyncio.create_task(drip_headers(server.port, every_s=1.0)) for _ in range(20)]
        huge = [asyncio.create_task(unfinished_huge_header(server.port)) for _ in range(20)]
        return list(await asyncio.gather(*drips)), list(await asyncio.gather(*huge))

    drips, huge = asyncio.run(headers())
    big = httpx.get(f"{server.url}/readyz", headers={"X-Big": "a" * (8 * MIB)}, timeout=30).status_code
    ok_headers = run.check(
        "slow clients: dripped headers 408, 8 MB and unfinished 16 MB headers 431",
        all(status == 408 for status, _ in drips) and big == 431 and huge == [431] * 20,
        f"dripped: {sorted({status for status, _ in drips}, key=str)} after {max(s for _, s in drips):.1f} s at most; "
        f"8 MB header: {big}; 20 unfinished 16 MB headers: {sorted(set(huge), key=str)}",
    )

    async def hang_ups() -> None:
        for path, kind in (
            ("/v1/predict", "image/png"),
            ("/v1/preview", "image/png"),
            ("/dicomweb/studies", 'multipart/related; type="application/dicom"; boundary=x'),
        ):
            await asyncio.gather(*(hang_up_mid_body(server.port, path, kind) for _ in range(4)))

    gone = r'cxr_http_requests_total\{[^}]*status="499"[^}]*\}'
    gone_before = metric(server.url, gone)
    asyncio.run(hang_ups())
    _settle(lambda: metric(server.url, gone) >= gone_before + 12, timeout_s=15)
    counted, new_5xx = metric(server.url, gone) - gone_before, server_errors(server.url) - errors_before
    ok_gone = run.check(
        "slow clients: raw-body hang-ups are 499s, no 5xx",
        counted == 12 and new_5xx == 0,
        f"499s counted {counted:.0f}/12; new 5xx {new_5xx:.0f}",
    )

    heavy = heavy_dicom(7000)
    bound = decode_memory_bytes(heavy, max_pixels=50_000_000)
    # One decode at a time, plus the uploads themselves: all 20 arrive at once and each is held (at most twice,
    # while its chunks are joined) until it is decoded or refused.
    budget = bound + 2 * FLOOD * len(heavy)
    asyncio.run(wait_idle(server.url))
    rss_before = server.rss_bytes()

    async def previews() -> tuple[list[int], Timings, int]:
        peak = rss_before
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, server.rss_bytes())
                await asyncio.sleep(0.02)

        async def preview(client: httpx.AsyncClient) -> int:
            response = await client.post("/v1/preview", content=heavy, headers={"Content-Type": "application/dicom"})
            return response.status_code

        sampler = asyncio.create_task(sample())
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            flood = asyncio.gather(*(preview(client) for _ in range(FLOOD)))
            await asyncio.sleep(0.1)
            meanwhile = await predict_every(server.url, film, until=time.monotonic() + 8.0, every_s=0.2)
            statuses = list(await flood)
        done.set()
        await sampler
        return statuses, meanwhile, peak

    statuses, meanwhile, peak = asyncio.run(previews())
    rise = peak - rss_before
    ok_previews = run.check(
        "slow clients: 20 parallel 7000 x 7000 RLE DICOM previews bounded, predictions not starved",
        set(statuses) <= {200, 503}
        and set(meanwhile.statuses) == {200}
        and meanwhile.slowest_s < baseline.slowest_s + 2.0
        and rise <= budget,
        f"previews {statuses.count(200)} x 200, {statuses.count(503)} x 503; server RSS +{rise / MIB:.0f} MiB "
        f"(budget {budget / MIB:.0f} MiB: one preview's decode bound {bound / MIB:.0f} MiB, decoded one at a time, "
        f"plus the {FLOOD} uploads, twice); {len(meanwhile.results)} predictions meanwhile, median "
        f"{meanwhile.median_s() * 1e3:.0f} ms, slowest {meanwhile.slowest_s * 1e3:.0f} ms",
    )
    ready = httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    run.fault(ok_slow and ok_headers and ok_gone and ok_previews and ready)


def phase_sigterm(server: ServerProcess, images: list[bytes], grace_s: float, run: Run) -> None:
    print("SIGTERM under load", flush=True)
    inflight = 24
    results: list[httpx.Response | BaseException] = []

    def post(image: bytes) -> None:
        try:
            results.append(
                httpx.post(
                    f"{server.url}/v1/predict",
                    params={"cams": "none"},
                    files={"file": ("cxr.png", image, "image/png")},
                    timeout=grace_s + 30,
                )
            )
        except httpx.HTTPError as err:
            results.append(err)

    threads = [threading.Thread(target=post, args=(images[i % len(images)],)) for i in range(inflight)]
    for thread in threads:
        thread.start()
    _settle(lambda: httpx.get(f"{server.url}/readyz", timeout=5).json()["queue_depth"] >= inflight // 2, 60)
    server.sigterm()
    signalled = time.monotonic()
    refused = _settle(lambda: _refuses(server.port), timeout_s=10)
    for thread in threads:
        thread.join(timeout=grace_s + 60)
    try:
        code: int | None = server.wait(timeout_s=grace_s + 10)
    except Exception:
        code = None
    exited_s = time.monotonic() - signalled
    ok = [r for r in results if isinstance(r, httpx.Response) and r.status_code == 200]
    lost = len(results) - len(ok)
    run.lost += lost
    survived = run.check(
        "SIGTERM: accepted requests complete, new ones refused, exit 0 in the grace period",
        lost == 0 and refused and code == 0 and exited_s <= grace_s,
        f"{len(ok)}/{inflight} accepted answered 200; new connections refused: {refused}; "
        f"exit status {code} after {exited_s:.1f} s (grace {grace_s:.0f} s)",
    )
    run.fault(survived)


def _refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def _settle(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``condition`` until true or ``timeout_s``: whether it became true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def print_summary(run: Run, load: LoadReport, capacity: float) -> None:
    rows = [
        (
            "load held",
            f"{load.throughput_per_s:.1f}/{load.offered_rate_per_s:.1f} ok/s, p50/p95/p99 "
            f"{load.percentile_ms(50):.0f}/{load.percentile_ms(95):.0f}/{load.percentile_ms(99):.0f} ms "
            f"(capacity {capacity:.1f}/s)",
        ),
        ("faults survived", f"{run.faults_survived}/{run.faults_tried} (overload, disconnects, slow clients, SIGTERM)"),
        ("bad inputs tried", f"{run.bad_inputs} ({run.bad_inputs_ok} answered as expected)"),
        ("5xx seen", f"{run.unexpected_5xx} (besides 503 load shedding)"),
        ("requests lost", f"{run.lost} (must be 0)"),
    ]
    failed = [c for c in run.checks if not c.ok]
    width = max(len(name) for name, _ in rows)
    print()
    print(f"{'check'.ljust(width)} | result")
    print(f"{'-' * width}-+-{'-' * 60}")
    for name, value in rows:
        print(f"{name.ljust(width)} | {value}")
    print(f"{'requirements'.ljust(width)} | {len(run.checks) - len(failed)}/{len(run.checks)} passed")
    for check in failed:
        print(f"  FAILED: {check.name}: {check.detail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint directory (default: demo)")
    parser.add_argument("--quick", action="store_true", help="short phases (about a minute in all)")
    parser.add_argument("--duration-s", type=float, default=None, help="steady load duration (default 60, quick 10)")
    parser.add_argument("--rate", type=float, default=None, help="steady rate per second (default: capacity / 2)")
    parser.add_argument("--rss-tolerance-mib", type=float, default=64.0, help="allowed RSS growth (or 10 %%)")
    parser.add_argument("--grace-s", type=float, default=60.0, help="graceful-shutdown limit (CXR_REQUEST_TIMEOUT_S)")
    args = parser.parse_args()
    duration_s = args.duration_s or (10.0 if args.quick else 60.0)
    burst_s = 5.0 if args.quick else 15.0
    images = radiographs(32)
    run = Run()
    with tempfile.TemporaryDirectory(prefix="reliability-") as log_dir:
        env = {"CXR_REQUEST_TIMEOUT_S": str(args.grace_s), "CXR_LOG_LEVEL": "WARNING"}
        server = ServerProcess(args.model, Path(log_dir), env=env)
        with server:
            started = time.monotonic()
            server.start()
            print(f"server pid {server.pid} ready in {time.monotonic() - started:.1f} s ({args.model})")
            # Warm-up at full concurrency: the first batch of each size is slow (kernel selection, allocator).
            asyncio.run(measure_capacity(server.url, images, clients=16, duration_s=3.0, params=QUERY))
            capacity = asyncio.run(
                measure_capacity(server.url, images, clients=16, duration_s=5.0 if args.quick else 10.0, params=QUERY)
            )
            print(f"capacity: {capacity:.1f} predictions/s (16 closed-loop clients, cams={QUERY['cams']})", flush=True)
            load = phase_load(server, images, args.rate or capacity / 2, duration_s, args.rss_tolerance_mib, run)
            phase_overload(server, images, capacity, burst_s, load, run)
            phase_disconnects(server, images, run)
            phase_hostile(server, run)
            phase_slow_clients(server, images, run)
            phase_sigterm(server, images, args.grace_s, run)
            run.check("no request lost", run.lost == 0, f"{run.lost} requests got no answer")
            run.check("no unexpected 5xx", run.unexpected_5xx == 0, f"{run.unexpected_5xx} seen")
        print_summary(run, load, capacity)
    return 0 if all(c.ok for c in run.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
