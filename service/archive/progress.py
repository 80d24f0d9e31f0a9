"""Progress of an archive run: a tqdm bar on an interactive terminal, else periodic log lines with the rate and the
time left (a hospital archive takes hours; a log collector shows when it will end).

The scorer reports each written batch through the small ``Progress`` interface, so it neither knows nor
cares whether a person or a log collector is watching.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Protocol

__all__ = ["LOG_EVERY_S", "LogProgress", "Progress", "TqdmProgress", "format_eta", "make_progress"]

log = logging.getLogger("service.archive")  # the command's one logger name, whichever module writes the line

LOG_EVERY_S = 10.0


class Progress(Protocol):
    def update(self, scored: int, failed: int) -> None: ...

    def close(self) -> None: ...


class LogProgress:
    """Periodic log lines with the rate (used when tqdm is missing, as in the serve-only image, or no TTY)."""

    def __init__(self, total: int, every_s: float = LOG_EVERY_S) -> None:
        self.total, self.every_s = total, every_s
        self.scored = self.failed = 0
        self.started = self.last = time.perf_counter()

    def update(self, scored: int, failed: int) -> None:
        self.scored += scored
        self.failed += failed
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self._log(now)

    def _log(self, now: float) -> None:
        done = self.scored + self.failed
        rate = done / max(now - self.started, 1e-9)
        left = format_eta((self.total - done) / rate) if rate > 0 and done < self.total else "-"
        log.info("%d/%d files (%d failed), %.1f images/s, %s left", done, self.total, self.failed, rate, left)

    def close(self) -> None:
        self._log(time.perf_counter())


def format_eta(seconds: float) -> str:
    """``1 h 05 min``, ``4 min 10 s``, ``12 s``: the time left, as precise as it is useful."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


class TqdmProgress:
    """A tqdm bar counting images, with the failures so far as its postfix."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="img", dynamic_ncols=True)
        self.failed = 0

    def update(self, scored: int, failed: int) -> None:
        self.failed += failed
        if failed:
            self.bar.set_postfix(failed=self.failed)
        self.bar.update(scored + failed)

    def close(self) -> None:
        self.bar.close()


def make_progress(total: int) -> Progress:
    """A tqdm bar on an interactive terminal when tqdm is installed, else periodic log lines."""
    if sys.stderr.isatty():
        try:
            return TqdmProgress(total)
        except ImportError:
            pass
    return LogProgress(total)
