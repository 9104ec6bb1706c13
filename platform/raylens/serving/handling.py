"""Every ``/v1`` request, around its route's work: the API key, then the in-flight limit,
then the work; its dict is the answer, and every refusal or failure becomes the one JSON
error shape. Pure: no Ray, no web framework (the route turns an :class:`Answer` into its
HTTP response and counts it).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from raylens.serving.auth import check_api_key
from raylens.serving.errors import RequestError, internal_error
from raylens.serving.throttle import Throttle

log = logging.getLogger("ray.serve")


@dataclass
class Answer:
    status: int
    body: dict
    headers: dict[str, str] = field(default_factory=dict)
    refused: str | None = None  # a refusal's error code (not set for 200 or 500)


async def handle(
    work: Callable[[], Awaitable[dict]],
    *,
    headers: Mapping[str, str],
    key: str,
    throttle: Throttle,
    route: str,
) -> Answer:
    """Runs ``work()`` for a request carrying ``key`` (when one is set; else 401) while
    ``throttle`` has room (else 429). A :class:`RequestError` answers its status and body;
    any other exception answers 500 with an id to find its traceback in the log, and
    nothing of the exception itself."""
    try:
        check_api_key(headers, key)
        with throttle.slot():
            return Answer(200, await work())
    except RequestError as err:
        return Answer(err.status, err.body(), err.headers, err.error)
    except Exception:
        rid = uuid.uuid4().hex[:12]
        log.exception("request %s on %s failed", rid, route)
        return Answer(500, internal_error(rid))
