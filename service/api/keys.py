"""API keys: the key a request offers, and a constant-time check against the configured ones.

Used by the prediction routes (``CXR_API_KEYS``) and the audit read API (``CXR_ADMIN_API_KEYS``), so that both
read the same headers the same way.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from pydantic import SecretStr
from starlette.requests import Request

__all__ = ["key_matches", "offered_api_key"]


def offered_api_key(request: Request) -> str:
    """The key in ``X-API-Key``, else in ``Authorization: Bearer``, without surrounding spaces and tabs (RFC 9110
    5.5: they are not part of a field value, though the server hands them over); "" when none is offered."""
    offered = request.headers.get("x-api-key", "").strip(" \t")
    auth = request.headers.get("authorization", "").strip(" \t")
    if not offered and auth[:7].lower() == "bearer ":
        offered = auth[7:].strip(" \t")
    return offered


def key_matches(offered: str, keys: Iterable[SecretStr]) -> bool:
    """Whether ``offered`` is one of ``keys``: compared with every key (no early exit), in constant time per key;
    an empty offer never matches."""
    offered_bytes = offered.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(offered_bytes, key.get_secret_value().encode())
    return matched and bool(offered_bytes)
