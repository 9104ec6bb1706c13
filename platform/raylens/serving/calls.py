"""Calls from the ingress to the model deployment, and what their failures answer.

- the model queue is full (Serve's backpressure): 503 ``overloaded`` with Retry-After;
- slower than ``request_timeout_s``: 504 ``timeout``;
- no such model (:class:`~raylens.serving.errors.ModelNotFound` raised by the replica): 404;
- a configured model whose run is missing or does not load
  (:class:`~raylens.serving.errors.ModelLoadError`): 503;
- the replica died during the call: retried once (inference is idempotent), then 503.

The replica's own exceptions arrive wrapped by Ray (``RayTaskError(ModelLoadError)``,
whose text is the remote traceback); an answer says only the replica's message, in one
line without paths (:func:`~raylens.serving.errors.remote_message`).

A model's description (kind, run, dim, classes) is asked once per model and kept; an
image the replica could not decode answers 413/415 naming it. Pure: the caller passes a
function returning the deployment handle for a model id and the framework's exception
classes for "queue full" and "replica lost", so this module imports no Ray and its
decisions are unit-tested.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from raylens.serving.errors import (
    ModelLoadError,
    ModelNotFound,
    RequestError,
    remote_cause,
    remote_message,
    retry_after,
    undecodable_image,
)
from raylens.serving.settings import LimitsConfig

log = logging.getLogger("ray.serve")

Errors = tuple[type[BaseException], ...]


async def call_model(
    call: Callable[[], Awaitable[Any]],
    *,
    model_id: str,
    timeout_s: float,
    retry_after_s: int,
    queue_full: Errors,
    replica_lost: Errors,
) -> Any:
    """``await call()`` (a fresh call each attempt), its failures as :class:`RequestError`.

    Args:
        call: makes the deployment call (e.g. ``handle.infer.remote(image)``).
        queue_full: exceptions meaning the model's queue is full (Serve's
            ``BackPressureError``).
        replica_lost: exceptions meaning the replica died or is gone (``RayActorError``,
            ``DeploymentUnavailableError``): the call is retried once.
    """
    retry = retry_after(retry_after_s)
    for attempt in (0, 1):
        try:
            return await asyncio.wait_for(call(), timeout_s)
        except queue_full:
            raise RequestError(
                503, "overloaded", "model queue is full; retry later", retry
            ) from None
        except asyncio.TimeoutError:  # noqa: UP041 (a distinct class on Python 3.10)
            raise RequestError(
                504, "timeout", f"model {model_id!r} took over {timeout_s}s"
            ) from None
        except Exception as err:
            # Ray's wrapper is usually also an instance of the replica's class; its cause
            # is matched too, for when Ray could not build that dual class.
            cause = remote_cause(err)
            if isinstance(cause, ModelNotFound):
                raise RequestError(404, "unknown_model", remote_message(err)) from None
            if isinstance(cause, ModelLoadError):
                raise RequestError(503, "model_unavailable", remote_message(err), retry) from None
            if not isinstance(err, replica_lost):
                raise  # the route's 500: its traceback goes to the log only
            if attempt:
                raise RequestError(
                    503, "model_unavailable", "model replica unavailable; retry", retry
                ) from None
            log.warning("model replica died during a request; retrying once")
    raise AssertionError("unreachable")


async def failure(call: Awaitable[Any]) -> str | None:
    """Awaits ``call``: ``None`` when it succeeds, else why it failed (a
    :class:`RequestError`'s detail, or only the type of what the replica raised: no
    internals; the server's log has the rest)."""
    try:
        await call
        return None
    except RequestError as err:
        return err.detail
    except Exception as err:
        log.warning("readiness check failed", exc_info=True)
        return f"the model replica failed ({type(remote_cause(err)).__name__}); see the server log"


class ModelCalls:
    """The routes' calls to the model: through the model deployment's handle (one per model
    id; the split topology), or ``send`` to the model in this very replica (one-hop), with
    the same answers to the same failures either way."""

    def __init__(
        self,
        handle_for: Callable[[str], Any] | None,
        limits: LimitsConfig,
        *,
        queue_full: Errors,
        replica_lost: Errors,
        send: Callable[..., Awaitable[Any]] | None = None,
    ):
        """``send(model_id, method, *args)``, when given, replaces the handle's
        ``getattr(handle_for(model_id), method).remote(*args)``."""
        if send is None:
            if handle_for is None:
                raise ValueError("ModelCalls needs handle_for or send")

            def send(model_id: str, method: str, *args: Any) -> Awaitable[Any]:
                return getattr(handle_for(model_id), method).remote(*args)

        self.send, self.limits = send, limits
        self.queue_full, self.replica_lost = queue_full, replica_lost
        self.described: dict[str, dict] = {}  # model id → its describe()

    async def call(self, model_id: str, method: str, *args: Any) -> Any:
        """``method(*args)`` on a replica holding ``model_id`` (see :func:`call_model`)."""
        return await call_model(
            lambda: self.send(model_id, method, *args),
            model_id=model_id,
            timeout_s=self.limits.request_timeout_s,
            retry_after_s=self.limits.retry_after_s,
            queue_full=self.queue_full,
            replica_lost=self.replica_lost,
        )

    async def describe(self, model_id: str, *, fresh: bool = False) -> dict:
        """The model's ``describe()`` (kind, run, dim, classes, ...), asked once unless
        ``fresh`` (which also loads the model on a replica if it must)."""
        if fresh or model_id not in self.described:
            self.described[model_id] = await self.call(model_id, "describe")
        return self.described[model_id]

    async def infer(self, model_id: str, images: list[tuple[bytes, str]]) -> list[dict]:
        """Each ``(image, name)`` through the model, concurrently (the replica batches):
        ``{"embedding", "probs", "error"}`` each; the first image that did not decode
        answers for the request (413/415, named)."""
        outs = await asyncio.gather(*(self.call(model_id, "infer", d) for d, _ in images))
        for out, (_, what) in zip(outs, images, strict=True):
            if out["error"]:
                raise undecodable_image(out["error"], what)
        return outs
