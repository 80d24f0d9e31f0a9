"""Process plumbing: the server's guarded protocol, the Gunicorn entry point and worker, thread sharing, logs.

The exit statuses below are what ``python -m service`` and a Gunicorn worker end with, so that a supervisor
(systemd, Kubernetes, the Gunicorn arbiter) can tell a bad configuration from a crash.
"""

EXIT_STARTUP_FAILED = 3  # what uvicorn and the Gunicorn arbiter use for a worker that could not boot
EXIT_WORKER_DIED = 70  # EX_SOFTWARE: an internal error; the supervisor should start a fresh process
