"""``python -m service [--host --port --model DIR]``: run the API with uvicorn.

Settings come from ``CXR_*`` environment variables; these flags override the most common ones.
For several worker processes behind nginx use Gunicorn with uvicorn workers (see docker/).

Exit status, for the supervisor (systemd ``Restart=on-failure``, Kubernetes, a shell): 0 after a graceful
shutdown (SIGTERM or SIGINT: accepted requests finished first), 3 when a setting is invalid or the model cannot
be loaded or warmed up (one line on stderr names the variable or file and the problem; nothing was ever served),
70 when the inference worker died (the process stopped being ready and exited so that a fresh one takes over).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from service.process import EXIT_STARTUP_FAILED, EXIT_WORKER_DIED
from service.process.threads import limit_openmp_spin


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", help="interface to bind (default 127.0.0.1, CXR_HOST)")
    parser.add_argument("--port", type=int, help="TCP port (default 8000, CXR_PORT)")
    parser.add_argument("--model", type=Path, help="checkpoint directory (default models/demo, CXR_MODEL_PATH)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N (CXR_DEVICE)")
    args = parser.parse_args(argv)
    limit_openmp_spin()  # before torch is imported (by service.api.app, below): libgomp reads it once

    from service.settings import InvalidSettingsError, load_settings

    flags = {"host": "--host", "port": "--port", "model_path": "--model", "device": "--device"}
    given = {"host": args.host, "port": args.port, "model_path": args.model, "device": args.device}
    try:  # before the heavy imports below: a bad setting is reported at once
        settings = load_settings({key: value for key, value in given.items() if value is not None}, flags=flags)
    except InvalidSettingsError as err:
        print(f"bayesnet-cxr: {err}", file=sys.stderr)
        return EXIT_STARTUP_FAILED

    from service.api.app import create_app
    from service.process.logs import configure_logging
    from service.process.server import DrainingServer, server_config

    configure_logging(settings.log_level, json_lines=settings.log_json)
    app = create_app(settings)
    server = DrainingServer(
        server_config(
            app,
            settings,
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=int(settings.request_timeout_s),
        )
    )
    # uvicorn re-raises the signal that stopped it once it has shut down, so that the default handler would
    # end the process "killed by SIGTERM" (status -15) after a clean drain. A graceful stop is a success:
    # these handlers, restored by uvicorn when it finishes, absorb that re-raised signal.
    for handled in (signal.SIGTERM, signal.SIGINT):
        signal.signal(handled, _already_handled)
    started = True
    try:
        server.run()
    except SystemExit:  # uvicorn's "could not start": the lifespan failed (model) or the port is taken
        started = False
    state = app.state.service
    if not started or not server.started:
        reason = state.fatal_error or "the server did not start (see the log above)"
        print(f"bayesnet-cxr: cannot start: {reason}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    if state.fatal_error is not None:
        print(f"bayesnet-cxr: exiting after a fatal error: {state.fatal_error!r}", file=sys.stderr)
        return EXIT_WORKER_DIED
    return 0


def _already_handled(signum: int, frame: FrameType | None) -> None:
    """Swallow the stop signal uvicorn re-raises after its own graceful shutdown (see :func:`main`)."""


if __name__ == "__main__":
    sys.exit(main())
