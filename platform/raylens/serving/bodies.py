"""Request bodies → a request's fields and its image bytes, every limit checked.

An image comes as raw bytes (``Content-Type: image/*`` or ``application/octet-stream``), a
multipart upload, or JSON: base64 / a data URI (``image_b64``), or a URI under an allowed
prefix (``uri``), fetched by the server. Bodies are read against ``max_request_bytes``
while they stream (a lying or missing Content-Length cannot get past it); every image is
probed (:func:`~raylens.serving.inputs.probe_image`) before it goes to a model. A
request's fields are its query parameters updated by its form or JSON fields.

No Ray: works on a Starlette ``Request`` (what FastAPI routes receive), and is
unit-tested on requests built in memory.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import Request

from raylens.serving.errors import RequestError
from raylens.serving.fields import image_list
from raylens.serving.inputs import check_uri, decode_base64, fetch_uri, probe_image
from raylens.serving.settings import ServeConfig
from raylens.storage import Storage

Named = list[tuple[bytes, str]]  # image bytes, and how an error names it ("images[2]")


def content_type(request: Request) -> str:
    """The media type, lowercase, without parameters (``""`` when there is none)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


class BodyReader:
    """Reads request bodies under one server's limits; fetches URIs with its storage."""

    def __init__(self, cfg: ServeConfig, storage: Storage):
        self.cfg, self.storage = cfg, storage
        self.limits = cfg.limits

    # ------------------------------------------------------------------ bodies

    async def raw(self, request: Request) -> bytes:
        """The whole body, refused (413) as soon as it is over ``max_request_bytes``."""
        limit = self.limits.max_request_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise RequestError(413, "request_too_large", f"body of {length} bytes > {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, "request_too_large", f"body over {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def json(self, request: Request) -> dict:
        """A JSON object body (400 ``malformed_json`` otherwise)."""
        raw = await self.raw(request)
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:  # its str says "line 1 column 15": frame-like
            raise RequestError(
                400, "malformed_json", f"request body is not JSON: {err.msg} at byte {err.pos}"
            ) from None
        except (ValueError, UnicodeDecodeError) as err:
            raise RequestError(400, "malformed_json", f"request body is not JSON: {err}") from None
        if not isinstance(data, dict):
            raise RequestError(400, "malformed_json", "expected a JSON object at the top level")
        return data

    async def form(self, request: Request) -> tuple[dict, Named]:
        """A multipart body → its plain fields, and its files (at most ``max_images``)."""
        lim = self.limits
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > lim.max_request_bytes:
            raise RequestError(413, "request_too_large", f"body of {length} bytes > limit")
        try:
            form = await request.form(max_files=lim.max_images, max_fields=32)
        except Exception as err:
            raise RequestError(400, "malformed_multipart", f"multipart body: {err}") from None
        fields, files = {}, []
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                data = await value.read(lim.max_request_bytes + 1)
                files.append((data, f"file {value.filename or key!r}"))
            else:
                fields[key] = value
        if sum(len(d) for d, _ in files) > lim.max_request_bytes:
            raise RequestError(413, "request_too_large", "uploaded files over the body limit")
        return fields, files

    # ------------------------------------------------------------------ images

    def image(self, data: bytes, what: str) -> bytes:
        """``data`` once its header probes as an image under the limits."""
        lim = self.limits
        probe_image(data, what, max_pixels=lim.max_image_pixels, max_bytes=lim.max_request_bytes)
        return data

    async def fetch(self, uri: Any, what: str) -> bytes:
        """An image at an allow-listed URI (403 for any other)."""
        uri = check_uri(uri, what, self.cfg.allowed_uri_prefixes)
        data = await asyncio.to_thread(
            fetch_uri, self.storage, uri, what, max_bytes=self.limits.max_request_bytes
        )
        return self.image(data, what)

    async def resolve(self, item: Any, what: str) -> bytes:
        """A JSON image reference: a base64 / data URI string, a URI string, or
        ``{"image_b64": ...}`` / ``{"uri": ...}``."""
        if isinstance(item, dict):
            if "image_b64" in item:
                item = item["image_b64"]
            elif "uri" in item:
                return await self.fetch(item["uri"], what)
            else:
                raise RequestError(422, "invalid_field", f"{what}: expected image_b64 or uri")
        if isinstance(item, str) and "://" in item[:16] and not item.startswith("data:"):
            return await self.fetch(item, what)
        max_bytes = self.limits.max_request_bytes
        return self.image(decode_base64(item, what, max_bytes=max_bytes), what)

    async def resolve_all(self, items: list, key: str) -> Named:
        """Each reference of a JSON list, named ``key[i]``, in order."""
        return [(await self.resolve(x, f"{key}[{i}]"), f"{key}[{i}]") for i, x in enumerate(items)]

    # ------------------------------------------------------------------ requests

    async def single(self, request: Request) -> tuple[dict, bytes]:
        """One image from a raw, multipart (one file) or JSON (``image_b64`` or ``uri``)
        body, and the request's fields."""
        ctype = content_type(request)
        fields: dict = dict(request.query_params)
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            return fields, self.image(await self.raw(request), "request body")
        if ctype == "multipart/form-data":
            form, files = await self.form(request)
            fields.update(form)
            if len(files) != 1:
                raise RequestError(
                    422,
                    "invalid_field",
                    f"multipart: expected one file (field 'image'), got {len(files)}",
                )
            return fields, self.image(*files[0])
        if ctype == "application/json":
            data = await self.json(request)
            fields.update(data)
            if "image_b64" in data:
                return fields, await self.resolve(data["image_b64"], "image_b64")
            if "uri" in data:
                return fields, await self.fetch(data["uri"], "uri")
            raise RequestError(422, "invalid_field", "JSON body: expected 'image_b64' or 'uri'")
        raise RequestError(
            415,
            "unsupported_media_type",
            f"Content-Type {ctype or 'missing'!r}: expected image/*, multipart/form-data "
            "or application/json",
        )

    async def several(self, request: Request, key: str = "images") -> tuple[dict, Named]:
        """Several images (``/v1/enroll``): multipart files, or a JSON list under ``key``
        (at most ``max_images``); and the request's fields. The list may be empty."""
        ctype = content_type(request)
        fields: dict = dict(request.query_params)
        if ctype == "multipart/form-data":
            form, files = await self.form(request)
            fields.update(form)
            images = [self.image(d, w) for d, w in files]
            return fields, [(d, f"{key}[{i}]") for i, d in enumerate(images)]
        if ctype == "application/json":
            data = await self.json(request)
            fields.update(data)
            items = image_list(data.get(key), key, self.limits.max_images)
            return fields, await self.resolve_all(items, key)
        raise RequestError(
            415,
            "unsupported_media_type",
            f"Content-Type {ctype or 'missing'!r}: expected application/json or "
            "multipart/form-data",
        )
