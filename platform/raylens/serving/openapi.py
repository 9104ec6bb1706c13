"""The API's OpenAPI description: title, overview, and the request bodies of the routes
that read their body themselves (an image comes in several content types, which FastAPI
cannot infer from a signature). Pure: plain dicts.
"""

from __future__ import annotations

TITLE = "raylens"
VERSION = "1.0"
DESCRIPTION = (
    "Classification, embeddings and class enrolment for raylens runs. Images come as raw "
    "bytes (`Content-Type: image/*`), a multipart upload (field `image`), or JSON "
    '`{"image_b64": ...}` / `{"uri": "s3://..."}` (allow-listed prefixes only). Pick the '
    "model with the `model` field or query parameter, or the `serve_multiplexed_model_id` "
    'header. Errors are JSON `{"error": ..., "detail": ...}`.'
)


def _object(properties: dict, required: tuple[str, ...] = ()) -> dict:
    schema = {"type": "object", "properties": properties}
    return {"schema": {**schema, "required": list(required)} if required else schema}


def _body(content: dict) -> dict:
    """``openapi_extra`` for a route that reads its body itself (several content types)."""
    return {"requestBody": {"required": True, "content": content}}


STRING, BINARY = {"type": "string"}, {"type": "string", "format": "binary"}

IMAGE_BODY = _body(  # /v1/classify, /v1/embed
    {
        "image/*": {"schema": BINARY},
        "multipart/form-data": _object({"image": BINARY, "model": STRING}, ("image",)),
        "application/json": _object(
            {
                "image_b64": {"type": "string", "description": "base64 or data URI"},
                "uri": {"type": "string", "description": "allow-listed s3:// gs://"},
                "model": STRING,
                "top_k": {"type": "integer"},
                "normalize": {"type": "boolean"},
            }
        ),
    }
)

ENROLL_BODY = _body(  # /v1/enroll
    {
        "application/json": _object(
            {
                "model": STRING,
                "name": STRING,
                "images": {
                    "type": "array",
                    "items": {"type": "string", "description": "base64, data URI or URI"},
                },
                "replace": {"type": "boolean"},
            },
            ("name", "images"),
        ),
        "multipart/form-data": _object(
            {"name": STRING, "model": STRING, "images": {"type": "array", "items": BINARY}},
            ("name", "images"),
        ),
    }
)

EMBEDDINGS_BODY = _body(  # /v1/embeddings
    {
        "application/json": _object(
            {
                "model": STRING,
                "input": {
                    "oneOf": [STRING, {"type": "array", "items": STRING}],
                    "description": "data:image/...;base64, URIs or allow-listed URIs",
                },
                "encoding_format": {"type": "string", "enum": ["float", "base64"]},
            },
            ("input",),
        )
    }
)
