"""Image inputs → image bytes, or a :class:`RequestError` naming what is wrong (a 4xx).

Every check the server makes before an image reaches a model: body size, base64 and data
URIs, URIs under an allow-list (never anything else: no server-side request forgery),
and a header-only probe of the image (format, mode, pixel count: the decompression-bomb
guard) so a bad image is refused without decoding it. Pure: no Ray, no web framework.
"""

from __future__ import annotations

import base64
import binascii
import posixpath
import re

from raylens.data.images import ImageInfo, ImageRejected, open_image
from raylens.serving.errors import RequestError
from raylens.serving.settings import FETCHED_SCHEMES
from raylens.storage import Storage, split_uri

# Rejection reasons of raylens.data.images → HTTP status and error code.
_REJECTED = {
    "zero_bytes": (400, "empty_image"),
    "too_large": (413, "image_too_large"),
    "undecodable": (415, "not_an_image"),
    "unsupported_mode": (415, "unsupported_image_mode"),
}

_DATA_URI = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I
)


def probe_image(data: bytes, what: str, *, max_pixels: int, max_bytes: int) -> ImageInfo:
    """Reads the image header only: refuses non-images, unsupported modes and images over
    ``max_pixels`` (a decompression bomb is never decoded). Truncated pixel data is
    caught later, when the model replica decodes (its result then carries the error)."""
    if len(data) > max_bytes:
        raise RequestError(413, "request_too_large", f"{what}: {len(data)} bytes > {max_bytes}")
    try:
        img = open_image(data, max_pixels)
    except ImageRejected as rej:
        status, code = _REJECTED.get(rej.reason, (415, "not_an_image"))
        if rej.reason == "undecodable":
            detail = f"{what}: not a decodable image (expected PNG, JPEG, WebP, ...)"
        else:
            detail = f"{what}: {rej.detail}"
        raise RequestError(status, code, detail) from None
    return ImageInfo(img.size[0], img.size[1], img.mode, img.format or "unknown")


def decode_base64(value: object, what: str, *, max_bytes: int) -> bytes:
    """Plain base64 or a ``data:image/...;base64,`` URI → bytes."""
    if not isinstance(value, str) or not value:
        raise RequestError(422, "invalid_field", f"{what}: expected a base64 string")
    text = value.strip()
    m = _DATA_URI.match(text)
    if m:
        mime = (m.group("mime") or "").lower()
        if not m.group("b64"):
            raise RequestError(422, "invalid_field", f"{what}: a data URI must be ;base64")
        if mime and not mime.startswith("image/"):
            raise RequestError(
                415, "unsupported_media_type", f"{what}: data URI of {mime!r}, expected image/*"
            )
        text = text[m.end() :]
    if len(text) * 3 // 4 > max_bytes:
        raise RequestError(
            413, "request_too_large", f"{what}: decodes to more than {max_bytes} bytes"
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, "invalid_base64", f"{what}: not valid base64") from None


def check_uri(uri: object, what: str, prefixes: list[str]) -> str:
    """``uri`` when it lies under an allowed prefix; else 403 (the server fetches nothing
    else: no http(s), no path traversal out of a prefix)."""
    if not isinstance(uri, str) or "://" not in uri:
        raise RequestError(
            422, "invalid_field", f"{what}: expected a URI such as s3://bucket/key.png"
        )
    scheme, path = uri.split("://", 1)
    if not prefixes:
        raise RequestError(
            403, "uri_not_allowed", f"{what}: this server fetches no URIs (no allowed prefixes)"
        )
    if scheme.lower() not in FETCHED_SCHEMES:
        raise RequestError(403, "uri_not_allowed", f"{what}: scheme {scheme!r} is never fetched")
    if any(part in ("..", ".") for part in path.split("/")) or "\\" in path or "\x00" in path:
        raise RequestError(403, "uri_not_allowed", f"{what}: '.'/'..' segments are not allowed")
    norm = f"{scheme.lower()}://{posixpath.normpath(path)}"
    for p in prefixes:
        if norm.startswith(p if p.endswith("/") else p + "/") or norm == p.rstrip("/"):
            return norm
    raise RequestError(  # neither the URI nor the prefixes: a detail shows no locations
        403, "uri_not_allowed", f"{what}: outside the prefixes this server may fetch from"
    )


def fetch_uri(storage: Storage, uri: str, what: str, *, max_bytes: int) -> bytes:
    """Reads an allow-listed object (checked by :func:`check_uri`)."""
    scheme, _ = split_uri(uri)
    try:
        fs, path = storage.resolve(uri)
        info = fs.get_file_info(path)
        if info.size is not None and info.size > max_bytes:
            raise RequestError(413, "request_too_large", f"{what}: {info.size} bytes > {max_bytes}")
        return storage.read_bytes(uri)
    except FileNotFoundError:
        raise RequestError(404, "uri_not_found", f"{what}: no object at that URI") from None
    except RequestError:
        raise
    except Exception as err:  # credentials or network: say which, never the secret
        raise RequestError(
            502,
            "uri_unreadable",
            storage.scrub(f"{what}: {scheme} read failed: {type(err).__name__}"),
        ) from None
