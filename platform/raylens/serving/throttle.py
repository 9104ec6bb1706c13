"""Overload protection in the ingress: a bounded number of requests in progress.

Each ingress replica works on at most ``max_inflight`` requests at once; one more is
answered at once with 429 and ``Retry-After`` instead of queueing (a client backs off
rather than timing out). Serve's own ``max_queued_requests`` bounds the model replicas'
queues behind it (full: 503, see :mod:`raylens.serving.calls`). Pure: no Ray; one
replica's requests share one event loop, so the counter needs no lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from raylens.serving.errors import RequestError, retry_after


class Throttle:
    """Counts the requests in progress and refuses those over the limit."""

    def __init__(self, max_inflight: int, retry_after_s: int):
        self.max_inflight = max_inflight
        self.retry_after_s = retry_after_s
        self.inflight = 0

    def check(self) -> None:
        """Raises the 429 :class:`RequestError` when no request may start now."""
        if self.inflight >= self.max_inflight:
            raise RequestError(
                429,
                "overloaded",
                f"{self.inflight} requests in progress on this replica (limit "
                f"{self.max_inflight}); retry later",
                retry_after(self.retry_after_s),
            )

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Holds one place while the block runs (refused with 429 when none is free)."""
        self.check()
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1
