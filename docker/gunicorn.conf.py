"""Gunicorn for the service, as the original project ran it (behind nginx on 127.0.0.1:8000).

Each worker is a separate process holding its own model and micro-batcher. Batching works within a
worker, so more workers split the traffic into smaller batches. On a GPU host run several workers on the
one GPU (one per 2-4 cores; CUDA MPS where its daemon can run): on an H200 one process's decoding, heatmaps
and HTTP were the limit while the GPU sat mostly idle, and each worker costs another copy of the model and a
CUDA context (~0.5 GB); the rows that size it (bench/gpu_session.sh, feed-*) have not run on a GPU yet. On a
CPU run one worker: on 2 cores two workers never beat one (about equal throughput with one torch thread each,
a slower lone request, twice the memory; docs/benchmarks.md).
With several workers each one's torch thread team gets its share of the cores (CXR_TORCH_THREADS =
cores // workers unless set: service/openmp.py).
Environment: CXR_BIND (127.0.0.1:8000), CXR_WORKERS (1), plus the app's own CXR_* settings.
"""

import os

from service.openmp import share_cores

wsgi_app = "service.asgi:app_from_env()"
bind = os.environ.get("CXR_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("CXR_WORKERS", "1"))
share_cores(workers)  # the workers inherit the environment when they are forked
# uvicorn-worker's worker, with a shutdown that serves connections accepted just before it (service/gunicorn_worker.py).
worker_class = "service.gunicorn_worker.DrainingUvicornWorker"
# A worker loads the model and warms up before it serves: allow for it before the arbiter kills it.
timeout = int(os.environ.get("CXR_WORKER_TIMEOUT_S", "180"))
# On SIGTERM/HUP a worker stops accepting and finishes accepted requests (the app drains its batcher);
# longer than CXR_REQUEST_TIMEOUT_S (60) so no accepted request is cut.
graceful_timeout = int(os.environ.get("CXR_GRACEFUL_TIMEOUT_S", "90"))
keepalive = 5
# Logs are the app's JSON lines on stdout; gunicorn's own access log would duplicate them.
accesslog = None
errorlog = "-"
loglevel = os.environ.get("CXR_LOG_LEVEL", "INFO").lower()
# Recycle workers now and then to bound memory growth from fragmentation (jitter avoids all at once).
max_requests = int(os.environ.get("CXR_MAX_REQUESTS", "0"))
max_requests_jitter = max(1, max_requests // 10) if max_requests else 0
forwarded_allow_ips = "127.0.0.1"
