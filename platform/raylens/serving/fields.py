"""A request's fields (query parameters, form fields, JSON keys) → checked values.

Each function returns the value or raises a :class:`RequestError` that names the field
and what it expects (422; 404 for a model that is not served; 413 for too many images).
Pure: no Ray, no web framework.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from raylens.serving.errors import ModelNotFound, RequestError
from raylens.serving.prototypes import check_class_name
from raylens.serving.settings import MODEL_ID, ServeConfig

MODEL_HEADER = "serve_multiplexed_model_id"  # Serve's multiplexing header
ENCODINGS = ("float", "base64")  # /v1/embeddings encoding_format


def int_field(fields: Mapping, key: str, default: int, lo: int, hi: int) -> int:
    """``fields[key]`` (default ``default``) as an int in ``lo..hi``; strings such as
    ``"3"`` (query and form fields) count."""
    value = fields.get(key, default)
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise RequestError(422, "invalid_field", f"{key}: expected an integer") from None
    if not lo <= value <= hi:
        raise RequestError(422, "invalid_field", f"{key}: expected {lo}..{hi}, got {value}")
    return value


def bool_field(fields: Mapping, key: str) -> bool:
    """``fields[key]`` (default false): a JSON bool, or ``true``/``1``/``false``/``0``/``""``
    in any case (query and form fields)."""
    value = fields.get(key, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "false", "0", ""):
        return value.lower() in ("true", "1")
    raise RequestError(422, "invalid_field", f"{key}: expected true or false")


def model_id(cfg: ServeConfig, header: str | None, fields: Mapping) -> str:
    """The model a request names: the multiplexing header, else its ``model`` field, else
    the default model; 404 unless it is served (configured, or a run under ``runs_root``)."""
    mid = header or fields.get("model") or cfg.default_id
    if not mid:
        raise RequestError(422, "invalid_field", "no model given and no default model")
    if not isinstance(mid, str) or not MODEL_ID.match(mid):
        raise RequestError(404, "unknown_model", f"model {mid!r} is not a model id")
    try:
        cfg.entry(mid)
    except ModelNotFound:
        raise RequestError(
            404, "unknown_model", f"unknown model {mid!r}; served: {cfg.ids}"
        ) from None
    return mid


def class_name(fields: Mapping) -> str:
    """The ``name`` of a class to enrol (see :func:`~raylens.serving.prototypes.check_class_name`)."""
    try:
        return check_class_name(fields.get("name"))
    except ValueError as err:
        raise RequestError(422, "invalid_field", f"name: {err}") from None


def image_list(value: Any, key: str, max_images: int) -> list:
    """A JSON list of image references under ``key`` (``/v1/enroll``'s ``images``):
    at most ``max_images`` (413 above). Emptiness is the caller's check."""
    if not isinstance(value, list):
        raise RequestError(422, "invalid_field", f"{key}: expected a list")
    if len(value) > max_images:
        raise RequestError(413, "too_many_images", f"{key}: over {max_images}")
    return value


def embeddings_input(value: Any, max_images: int) -> list:
    """``/v1/embeddings``'s ``input``: one string or a non-empty list, at most
    ``max_images`` (413 above)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise RequestError(
            422, "invalid_field", "input: expected a string or a non-empty list of them"
        )
    if len(items) > max_images:
        raise RequestError(413, "too_many_images", f"input: {len(items)} > {max_images}")
    return items


def encoding_format(fields: Mapping) -> str:
    """``/v1/embeddings``'s ``encoding_format``: ``float`` (default) or ``base64``."""
    fmt = fields.get("encoding_format", "float")
    if fmt not in ENCODINGS:
        raise RequestError(422, "invalid_field", "encoding_format: 'float' or 'base64'")
    return fmt
