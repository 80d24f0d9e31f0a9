"""``python -m service [--host --port --model DIR]``: run the API with uvicorn.

Settings come from ``CXR_*`` environment variables; these flags override the most common ones.
For several worker processes behind nginx use Gunicorn with uvicorn workers (see docker/).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", help="interface to bind (default 127.0.0.1, CXR_HOST)")
    parser.add_argument("--port", type=int, help="TCP port (default 8000, CXR_PORT)")
    parser.add_argument("--model", type=Path, help="checkpoint directory (default models/demo, CXR_MODEL_PATH)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N (CXR_DEVICE)")
    args = parser.parse_args(argv)

    import uvicorn

    from service.app import create_app
    from service.logs import configure_logging
    from service.settings import Settings

    overrides = {
        key: value
        for key, value in {
            "host": args.host,
            "port": args.port,
            "model_path": args.model,
            "device": args.device,
        }.items()
        if value is not None
    }
    settings = Settings(**overrides)
    configure_logging(settings.log_level, json_lines=settings.log_json)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.request_timeout_s),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
