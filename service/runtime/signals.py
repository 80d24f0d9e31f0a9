"""The load signals: what the pipeline tells the batcher and the audit writer about work about to reach them.

Two waits in the service are worth making only when more work is certainly on its way:

* the batcher holds a partial batch open (up to ``max_wait_ms``) while uploads are being decoded, since each
  one will be queued within milliseconds (``uploads_coming``);
* the audit writer holds a transaction open (up to ``CXR_AUDIT_GROUP_COMMIT_MS``) while inferred images have
  their answers built, since each answer submits its record right after (``answers_coming``).

One ``LoadSignals`` is made by whoever assembles the service and handed to the pipeline (which counts) and to
the batcher and the writer (which read) when each is constructed. The counters change on the event loop only;
the batcher's worker and the writer's thread read them without a lock. They are hints: a read that is a
moment stale makes a wait end one step early or late, never loses or reorders work.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["LoadSignals"]


class LoadSignals:
    """Counts of uploads being decoded and of answers being built, with the questions their readers ask."""

    __slots__ = ("answers", "uploads")

    def __init__(self) -> None:
        self.uploads = 0  #: uploads between arrival and the batcher's queue (decoding, preprocessing)
        self.answers = 0  #: images whose inference is done and whose answer is not yet returned

    def uploads_coming(self) -> bool:
        """Whether uploads are being decoded now: the batcher's reason to hold a partial batch."""
        return self.uploads > 0

    def answers_coming(self) -> bool:
        """Whether answers are being built now: the audit writer's reason to hold a transaction open."""
        return self.answers > 0

    @contextmanager
    def decoding(self) -> Iterator[None]:
        """Counts one upload while it is decoded (on the event loop)."""
        self.uploads += 1
        try:
            yield
        finally:
            self.uploads -= 1

    @contextmanager
    def answering(self) -> Iterator[None]:
        """Counts one answer while it is built (on the event loop)."""
        self.answers += 1
        try:
            yield
        finally:
            self.answers -= 1
