"""End-to-end serving benchmark: the physical limit, the service over HTTP, and the naive design, in ONE run.

Prints
  (a) raw model throughput: images/s of ``model(x)`` (deterministic, one pass) at the best batch size;
  (b) the service over HTTP on loopback (a separate server process started here), concurrent clients
      posting 512x512 PNG radiographs, T=20 MC samples, with ``cams=none`` and ``cams=auto``;
  (c) the naive design: each image replicated T times through the whole network;
with p50/p95/p99 latency and the ratios b/a, b/c, 16-vs-1-client throughput, and p50 at one client
against one single-image forward pass. Targets (2-core CPU): b(auto) >= 0.6 a, b >= 10 c,
p50(1 client) <= 2 x single forward, 16 clients >= 1.5 x the throughput of 1 client.

    python bench/serve.py [--model DIR] [--device cpu|cuda] [--requests-per-client 6]

Without --model the service runs an untrained EfficientNet-B0 placeholder: the same compute as a
trained one. Absolute numbers depend on the machine; read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from loadgen import KeepAliveConnection, multipart_request
from PIL import Image
from timing import median_seconds

from bayesnet import DropoutMasks, ModelSpec, build_model, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHARED_IMAGES = REPO.parent / "shared" / "data" / "nih-cxr14-sample" / "images"


def radiographs(n: int) -> list[bytes]:
    """512x512 PNG radiographs: the real NIH sample when present, else synthetic films."""
    files = sorted(SHARED_IMAGES.glob("*.png"))[:n] if SHARED_IMAGES.is_dir() else []
    if files:
        return [f.read_bytes() for f in files]
    from train.synthetic import PLANTED_FINDINGS, render_sample

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        image, _ = render_sample(rng, {label: float(rng.random() < 0.3) for label in PLANTED_FINDINGS}, 512)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def model_limits(spec: ModelSpec, model_dir: Path | None, device: torch.device, samples: int) -> dict[str, float]:
    model = load_checkpoint(model_dir)[0] if model_dir else build_model(spec)
    model = model.to(device).eval()
    size = model.spec.image_size
    best = 0.0
    best_batch = 1
    per_batch = {}
    for batch in (1, 4, 8, 16, 32):
        x = torch.randn(batch, model.spec.in_chans, size, size, device=device)

        def fwd(x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                model(x)

        seconds = median_seconds(fwd, 5, device, warmup=True)
        per_batch[batch] = seconds
        if batch / seconds > best:
            best, best_batch = batch / seconds, batch
    x8 = torch.randn(8, model.spec.in_chans, size, size, device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    def naive() -> None:
        with torch.inference_mode():
            for _ in range(samples):  # T separate full passes: the cheaper of the two naive forms on a CPU
                model(x8, DropoutMasks(generator))

    naive_s = median_seconds(naive, 3, device, warmup=True)
    return {
        "raw_images_per_s": best,
        "raw_best_batch": best_batch,
        "single_forward_ms": per_batch[1] * 1e3,
        "naive_images_per_s": 8 / naive_s,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(port: int, model_dir: Path | None, device: str, log_path: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CXR_PORT": str(port),
        "CXR_DEVICE": device,
        "CXR_MAX_BATCH_IMAGES": "16",
        "CXR_MAX_WAIT_MS": "5",
        "CXR_MAX_QUEUE": "256",
        "CXR_LOG_LEVEL": "WARNING",
    }
    if model_dir is not None:
        env["CXR_MODEL_PATH"] = str(model_dir)
    log = log_path.open("wb")
    process = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"server did not start; see {log_path}")


@dataclass
class LoadResult:
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int
    client_cpu_share: float  # CPU time of this (load generator) process / wall time / cores


async def load(port: int, images: list[bytes], clients: int, per_client: int, cams: str) -> LoadResult:
    """``clients`` keep-alive connections, each posting ``per_client`` radiographs back to back."""
    host = f"127.0.0.1:{port}"
    requests = [
        multipart_request("/v1/predict", host, "file", "cxr.png", "image/png", data, query=f"cams={cams}")
        for data in images
    ]
    latencies: list[float] = []
    errors = 0

    async def client(index: int) -> None:
        nonlocal errors
        async with KeepAliveConnection("127.0.0.1", port) as connection:
            for i in range(per_client):
                start = time.perf_counter()
                response = await connection.send(requests[(index * per_client + i) % len(requests)])
                latencies.append(time.perf_counter() - start)
                if response.status != 200 or b'"predictions"' not in response.body:
                    errors += 1

    cpu_started, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - started
    cpu_share = (time.process_time() - cpu_started) / wall / (os.cpu_count() or 1)
    q = np.percentile(np.array(latencies) * 1e3, [50, 95, 99])
    return LoadResult(len(latencies) / wall, float(q[0]), float(q[1]), float(q[2]), errors, cpu_share)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--requests-per-client", type=int, default=6)
    parser.add_argument("--single-client-requests", type=int, default=20)
    args = parser.parse_args()

    device = torch.device(args.device)
    limits = model_limits(ModelSpec(), args.model, device, args.samples)
    images = radiographs(32)
    port = free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-serve-{port}.log"
    server = start_server(port, args.model, args.device, log_path)
    try:
        asyncio.run(load(port, images, 4, 2, "auto"))  # warm the server's allocator and thread pools
        runs = {
            ("none", 1): asyncio.run(load(port, images, 1, args.single_client_requests, "none")),
            ("auto", 1): asyncio.run(load(port, images, 1, args.single_client_requests, "auto")),
            ("none", 16): asyncio.run(load(port, images, 16, args.requests_per_client, "none")),
            ("auto", 16): asyncio.run(load(port, images, 16, args.requests_per_client, "auto")),
        }
    finally:
        server.terminate()
        server.wait(timeout=60)

    a = limits["raw_images_per_s"]
    c = limits["naive_images_per_s"]
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, T={args.samples}, 512x512 PNG uploads")
    print(
        f"(a) raw model(x): {a:.1f} images/s at batch {limits['raw_best_batch']:.0f}; "
        f"single-image forward {limits['single_forward_ms']:.1f} ms"
    )
    print(f"(c) naive (each image x T through the whole network): {c:.2f} images/s")
    print("(b) service over HTTP:")
    print(
        f"    {'cams':<6}{'clients':>8}{'images/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
        f"{'errors':>8}{'b/a':>7}{'b/c':>8}{'client CPU':>12}"
    )
    for (cams, clients), r in runs.items():
        print(
            f"    {cams:<6}{clients:>8}{r.images_per_s:>10.1f}{r.p50_ms:>9.1f}{r.p95_ms:>9.1f}{r.p99_ms:>9.1f}"
            f"{r.errors:>8}{r.images_per_s / a:>7.2f}{r.images_per_s / c:>8.1f}{r.client_cpu_share:>11.0%}"
        )
    auto16, auto1, none16 = runs[("auto", 16)], runs[("auto", 1)], runs[("none", 16)]
    checks = {
        "b(cams=auto, 16 clients) >= 0.6 x a": auto16.images_per_s >= 0.6 * a,
        "b >= 10 x c": none16.images_per_s >= 10 * c and auto16.images_per_s >= 10 * c,
        "p50 at 1 client <= 2 x single forward": auto1.p50_ms <= 2 * limits["single_forward_ms"],
        "16 clients >= 1.5 x 1 client throughput": auto16.images_per_s >= 1.5 * auto1.images_per_s,
    }
    for name, ok in checks.items():
        print(f"target {name}: {'PASS' if ok else 'FAIL'}")
    print(
        f"(p50 at 1 client = {auto1.p50_ms / limits['single_forward_ms']:.2f} x single forward; "
        f"16/1 client throughput = {auto16.images_per_s / auto1.images_per_s:.2f}x)"
    )


if __name__ == "__main__":
    main()
