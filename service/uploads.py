"""One uploaded image's bytes, with their sha256 computed at most once, on the thread that suits the request.

The audit trail records every upload's sha256. Hashing it in a thread of its own cost each request one more
trip between the event loop and a thread pool (a task, a future and two wake-ups) for about 0.1 ms of hashing
a 512 px PNG. So the routes wrap the bytes in an :class:`Upload` that both the auditor and the prediction
pipeline see: for an upload of up to :data:`INLINE_HASH_BYTES` the auditor asks for the digest to be taken in
the decode thread right after decoding (:attr:`Upload.hash_when_decoded`), and reads it when the prediction
is done; a bigger upload (a multi-megabyte DICOM, whose hash takes milliseconds) is still hashed beside the
prediction, so it adds no latency. Anything that fails before decoding is hashed afterwards, off the loop.
"""

from __future__ import annotations

import hashlib

__all__ = ["INLINE_HASH_BYTES", "Upload", "as_upload"]

#: Uploads up to this size are hashed in the decode thread (about 1 ms of sha256 on the development CPU);
#: larger ones beside the prediction, in a thread of their own.
INLINE_HASH_BYTES = 1 << 20


class Upload:
    """An upload's ``data`` and its sha256 (hex), computed once by whichever thread asks first.

    Two threads asking at the same moment both compute the same digest; nothing else is shared, so no lock.
    """

    __slots__ = ("_sha256", "data", "hash_when_decoded")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.hash_when_decoded = False  # set by the auditor before the prediction starts
        self._sha256: str | None = None

    @property
    def hashed(self) -> bool:
        return self._sha256 is not None

    def sha256(self) -> str:
        digest = self._sha256
        if digest is None:
            digest = self._sha256 = hashlib.sha256(self.data).hexdigest()
        return digest

    def __len__(self) -> int:
        return len(self.data)


def as_upload(data: bytes | Upload) -> Upload:
    return data if isinstance(data, Upload) else Upload(data)
