"""Gunicorn for the service, as the original project ran it (behind nginx on 127.0.0.1:8000).

Each worker is a separate process holding its own model and micro-batcher. Batching works within a worker, so
more workers split the traffic into smaller batches. On a GPU host run several workers on the one GPU (one per
2-4 cores; CUDA MPS where its daemon can run): one process's decoding, heatmaps and HTTP can be the limit while
the GPU waits, and each worker costs another copy of the model and a CUDA context. On a CPU run one worker
(docs/benchmarks.md has the measurements behind both). With several workers each one's torch thread team gets
its share of the cores (service/process/threads.py).

Everything this file reads is validated first (service.settings: GunicornSettings for CXR_BIND, CXR_WORKERS...,
Settings for the app's own variables), so an invalid variable stops the arbiter with one line before any worker
forks; docs/settings.md lists them.
"""

import sys

from service.settings import InvalidSettingsError, load_gunicorn_settings, load_settings

try:
    process = load_gunicorn_settings()
    app_settings = load_settings()
except InvalidSettingsError as err:
    sys.stderr.write(f"bayesnet-cxr: {err}\n")
    raise SystemExit(3) from None

wsgi_app = f"service.process.asgi:app_from_env(workers={process.workers})"
bind = process.bind
workers = process.workers
# uvicorn-worker's worker, with a shutdown that serves connections accepted just before it
# (service/process/gunicorn_worker.py).
worker_class = "service.process.gunicorn_worker.DrainingUvicornWorker"
# A worker loads the model and warms up before it serves: allow for it before the arbiter kills it.
timeout = process.worker_timeout_s
# On SIGTERM/HUP a worker stops accepting and finishes accepted requests (the app drains its batcher);
# longer than CXR_REQUEST_TIMEOUT_S so no accepted request is cut.
graceful_timeout = process.graceful_timeout_s
keepalive = 5
# Logs are the app's JSON lines on stdout; gunicorn's own access log would duplicate them.
accesslog = None
errorlog = "-"
loglevel = app_settings.log_level.lower()
# Recycle workers now and then to bound memory growth from fragmentation (jitter avoids all at once).
max_requests = process.max_requests
max_requests_jitter = max(1, max_requests // 10) if max_requests else 0
forwarded_allow_ips = "127.0.0.1"
