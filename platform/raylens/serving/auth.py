"""The API key: who may call the ``/v1`` routes. Pure: no Ray, no web framework.

When ``api_key_env`` names an environment variable that holds a non-empty key, every
``/v1`` request must carry it, as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``
(a Bearer header wins when both are sent); it is compared in constant time. Without a key
the API is open (liveness, readiness and the docs are always open).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping

from raylens.serving.errors import RequestError


def api_key(env_name: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """The key every request must carry; ``""`` when none is set (no auth). Read on every
    request, so a key set in the replica's environment takes effect without a restart."""
    return environ.get(env_name, "") if env_name else ""


def presented_key(headers: Mapping[str, str]) -> str:
    """The key a request carries. ``headers``: case-insensitive (Starlette's ``Headers``)
    or with lowercase names."""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key", "")


def authorized(headers: Mapping[str, str], key: str) -> bool:
    """True when no key is set, or the request carries it (constant-time comparison)."""
    if not key:
        return True
    return hmac.compare_digest(presented_key(headers).encode(), key.encode())


def check_api_key(headers: Mapping[str, str], key: str) -> None:
    """Raises a 401 :class:`RequestError` unless :func:`authorized`."""
    if not authorized(headers, key):
        raise RequestError(
            401,
            "unauthorized",
            "missing or wrong API key (Authorization: Bearer <key> or X-API-Key)",
            {"WWW-Authenticate": "Bearer"},
        )
