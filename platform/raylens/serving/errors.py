"""What the server answers when it refuses a request: one JSON shape everywhere.

Every error body is ``{"error": <short code>, "detail": <what was wrong, what was
expected>}``: a refused input (:class:`RequestError`, 4xx), an unknown route or method, a
request the framework's own validation refuses, an image the model replica could not
decode, and an unexpected failure (500, with an id to find it in the log and nothing of
the exception itself). Pure: no Ray, no web framework.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass
class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx/5xx) and a JSON body."""

    status: int
    error: str  # a short code, e.g. "not_an_image"
    detail: str  # what was wrong and what was expected
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict:
        return {"error": self.error, "detail": self.detail}

    def __str__(self) -> str:
        return f"{self.status} {self.error}: {self.detail}"


class ModelNotFound(LookupError):
    """No model with this id (or its run dir is missing)."""


class ModelLoadError(RuntimeError):
    """The model exists but does not load (a broken run dir); the message says why."""


def retry_after(seconds: int) -> dict[str, str]:
    """The headers of an answer that asks the client to come back (429, 503)."""
    return {"Retry-After": str(seconds)}


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def http_error(status: int, detail: object) -> dict:
    """The body for the framework's own HTTP errors (an unknown route or method)."""
    return {"error": _HTTP_CODES.get(status, "http_error"), "detail": str(detail)}


def validation_error(errors: Iterable[Mapping]) -> dict:
    """The body (422) for the framework's request validation errors, each
    ``{"loc": (...), "msg": ...}``: where and what, at most 500 characters."""
    where = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors
    )
    return {"error": "invalid_request", "detail": where[:500]}


def internal_error(request_id: str) -> dict:
    """The body (500) of an unexpected failure: an id to find it in the server's log."""
    return {
        "error": "internal_error",
        "detail": f"the server failed on this request (id {request_id}); see its log",
    }


def undecodable_image(error: str, what: str) -> RequestError:
    """A model replica's per-image error (``"<reason>: <detail>"``, from
    :meth:`raylens.serving.models.ServedModel.infer`) as the request's answer: 413 for an
    image over the pixel limit, 415 for anything else that does not decode."""
    too_large = error.split(":", 1)[0] == "too_large"
    return RequestError(
        413 if too_large else 415,
        "image_too_large" if too_large else "not_an_image",
        f"{what}: the image does not decode ({error[:200]})",
    )
