"""``python -m service.archive``: the command lives in ``service.archive.cli``; this file only starts it."""

import sys

from service.archive.cli import main

if __name__ == "__main__":
    sys.exit(main())
