"""What the server answers when it refuses a request: one JSON shape everywhere.

Every error body is ``{"error": <short code>, "detail": <what was wrong, what was
expected>}``: a refused input (:class:`RequestError`, 4xx), an unknown route or method, a
request the framework's own validation refuses, an image the model replica could not
decode, a model that is missing or does not load (503, naming it), and an unexpected
failure (500, with an id to find it in the log and nothing of the exception itself).

A ``detail`` is one short sentence: never a traceback, a Ray repr, a server path or a
credential. What a model replica raised reaches the ingress wrapped by Ray
(:func:`remote_cause` unwraps it) and is told in one line with every path reduced to its
last part (:func:`one_line`). Pure: no Ray, no web framework.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

MAX_DETAIL = 240  # characters of a server-side message kept in an error body


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
    """No such model: an id that is not configured, or no run under ``runs_root`` (404)."""


class ModelLoadError(RuntimeError):
    """A served model that cannot serve (503): its configured run is missing, or it does
    not load (a broken config, an unknown backbone, a corrupt checkpoint); the message
    names the model and says why, in one line without paths."""


def remote_cause(err: BaseException) -> BaseException:
    """The exception a model replica raised, from the one its caller's ``await`` raised.

    Ray re-raises a remote exception as ``RayTaskError(<its class>)``
    (``RayTaskError.as_instanceof_cause()``): an instance of both ``RayTaskError`` and
    the original class, so ``except ModelLoadError`` still matches it, but its ``str()``
    is the remote traceback (the ``ray::ServeReplica...`` process title, the frames with
    the server's paths) ending in the original message. The original exception is its
    ``cause`` attribute (also on a plain ``RayTaskError``). Duck-typed here: this layer
    imports no Ray."""
    for _ in range(4):  # a cause may itself be wrapped (a replica calling another)
        cause = getattr(err, "cause", None)
        if not isinstance(cause, BaseException) or cause is err:
            break
        err = cause
    return err


_TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\s*File \"", re.M)
# A URI, or a path with at least one "/" (absolute, ~/, ./, ../ or relative): the run dirs,
# checkpoints and installed files a server-side message may name.
_PATH = re.compile(
    r"(?:\b[A-Za-z][A-Za-z0-9+.-]*://|~|\.{1,2}(?=/))?"  # scheme://, ~, . or ..
    r"/?(?:[^\s'\"`/,;()\[\]{}<>|]+/+)+[^\s'\"`/,;()\[\]{}<>|]*"
)
# A parser's position in a file the client never sees (safetensors: "at line 1 column 0").
_POSITION = re.compile(r",? at line \d+,? column \d+")


def _last_part(m: re.Match) -> str:
    parts = [p for p in m.group(0).split("/") if p and not p.endswith(":")]
    return parts[-1] if parts else "..."


def one_line(text: str, limit: int = MAX_DETAIL) -> str:
    """A server-side message as an error body's ``detail``: one line (the last line of a
    traceback, which holds the exception's message), every URI or path in it reduced to
    its last part (``s3://b/runs/fm/checkpoints/epoch=3`` -> ``epoch=3``), no parser
    positions in the server's files, at most ``limit`` characters. A client never learns
    the server's layout from it. (Ray and the standard library have no such scrubber.)"""
    lines = [x.strip() for x in str(text).strip().splitlines() if x.strip()]
    if _TRACEBACK.search(str(text)) and lines:
        lines = lines[-1:]
    line = " ".join(" ".join(lines).split())
    line = _POSITION.sub("", _PATH.sub(_last_part, line))
    return line if len(line) <= limit else line[: limit - 3].rstrip() + "..."


def remote_message(err: BaseException) -> str:
    """What a model replica's exception says, as an error body's ``detail``:
    :func:`one_line` of :func:`remote_cause`'s message (its class name when it has none)."""
    cause = remote_cause(err)
    return one_line(str(cause) or type(cause).__name__)


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
