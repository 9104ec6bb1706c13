"""A request's way into the server, without a server: the API key, the in-flight limit,
bodies (raw, JSON, multipart, base64, allow-listed URIs), fields, and the one error shape
every refusal and failure answers with. Requests are Starlette requests built in memory.
Pure: no Ray, no HTTP server."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging

import httpx
import numpy as np
import pytest
from PIL import Image
from raylens.serving import fields, responses
from raylens.serving.api import make_api
from raylens.serving.auth import api_key, authorized, check_api_key
from raylens.serving.bodies import BodyReader
from raylens.serving.errors import RequestError, http_error, validation_error
from raylens.serving.handling import handle
from raylens.serving.openapi import EMBEDDINGS_BODY, ENROLL_BODY, IMAGE_BODY
from raylens.serving.settings import load_settings
from raylens.serving.throttle import Throttle
from raylens.storage import Storage
from starlette.requests import Request
from starlette.testclient import TestClient

from tests.test_serving_calls import assert_clean

KEY = "k-3f9a"


def _png(size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, 128).save(buf, format="PNG")
    return buf.getvalue()


def _request(body: bytes = b"", headers: dict | None = None, query: str = "", chunk=None):
    """A Starlette request whose body arrives in chunks of ``chunk`` bytes."""
    size = chunk or max(len(body), 1)
    parts = [body[i : i + size] for i in range(0, len(body), size)] or [b""]

    async def receive():
        part = parts.pop(0) if parts else b""
        return {"type": "http.request", "body": part, "more_body": bool(parts)}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    return Request(scope, receive)


def _multipart(files, data=None) -> tuple[bytes, dict]:
    req = httpx.Request("POST", "http://x/", files=files, data=data or {})
    return req.read(), {"content-type": req.headers["content-type"]}


def _refused(coro_or_call, status: int, error: str) -> RequestError:
    with pytest.raises(RequestError) as err:
        result = coro_or_call()
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    assert (err.value.status, err.value.error) == (status, error), err.value
    return err.value


def _settings(tmp_path=None, **kw) -> dict:
    args = {
        "models": [{"id": "fm", "run": "runs/fm"}, {"id": "bb", "backbone": "vgg_s8"}],
        "limits": {"max_request_bytes": 10_000, "max_image_pixels": 1_000, "max_images": 3},
    }
    if tmp_path is not None:
        args["allowed_uri_prefixes"] = [f"file://{tmp_path}/allowed/"]
    return {**args, **kw}


# ----------------------------------------------------------------------------- auth


def test_api_key_accepts_bearer_or_header_and_refuses_anything_else():
    assert api_key("RL_KEY", {"RL_KEY": KEY}) == KEY
    assert api_key("RL_KEY", {}) == "" and api_key(None, {"RL_KEY": KEY}) == ""
    assert authorized({}, "")  # no key set: open
    assert authorized({"authorization": f"Bearer {KEY}"}, KEY)
    assert authorized({"authorization": f"bearer  {KEY} "}, KEY)
    assert authorized({"x-api-key": KEY}, KEY)
    assert authorized({"authorization": f"Bearer {KEY}", "x-api-key": "nope"}, KEY)
    for headers in (
        {},
        {"authorization": ""},
        {"authorization": "Bearer nope"},
        {"authorization": KEY},  # not a Bearer header
        {"x-api-key": KEY[:-1]},
        {"authorization": "Bearer nope", "x-api-key": KEY},  # the Bearer header wins
    ):
        assert not authorized(headers, KEY), headers
    err = _refused(lambda: check_api_key({"x-api-key": "x"}, KEY), 401, "unauthorized")
    assert err.headers == {"WWW-Authenticate": "Bearer"} and KEY not in err.detail
    assert "Authorization: Bearer <key> or X-API-Key" in err.detail
    # Starlette's headers are case-insensitive
    assert authorized(_request(headers={"X-Api-Key": KEY}).headers, KEY)


# ----------------------------------------------------------------------------- throttle


def test_throttle_refuses_over_the_limit_and_frees_its_places():
    t = Throttle(max_inflight=2, retry_after_s=3)
    with t.slot(), t.slot():
        assert t.inflight == 2
        err = _refused(lambda: t.slot().__enter__(), 429, "overloaded")
        assert err.headers == {"Retry-After": "3"}
        assert err.detail == "2 requests in progress on this replica (limit 2); retry later"
    assert t.inflight == 0
    with pytest.raises(KeyError), t.slot():  # a failing request frees its place too
        raise KeyError("x")
    assert t.inflight == 0
    t.check()


# ----------------------------------------------------------------------------- fields


def test_int_and_bool_fields():
    assert fields.int_field({"top_k": "3"}, "top_k", 5, 1, 10) == 3
    assert fields.int_field({}, "top_k", 5, 1, 10) == 5
    err = _refused(
        lambda: fields.int_field({"top_k": "x"}, "top_k", 5, 1, 10), 422, "invalid_field"
    )
    assert err.detail == "top_k: expected an integer"
    err = _refused(lambda: fields.int_field({"top_k": 0}, "top_k", 5, 1, 10), 422, "invalid_field")
    assert err.detail == "top_k: expected 1..10, got 0"
    _refused(lambda: fields.int_field({"top_k": None}, "top_k", 5, 1, 10), 422, "invalid_field")
    for value, want in ((True, True), ("TRUE", True), ("1", True), ("0", False), ("", False)):
        assert fields.bool_field({"normalize": value}, "normalize") is want, value
    assert fields.bool_field({}, "normalize") is False
    for bad in ("yes", 1, None, [True]):
        err = _refused(lambda b=bad: fields.bool_field({"n": b}, "n"), 422, "invalid_field")
        assert err.detail == "n: expected true or false"


def test_the_model_a_request_names():
    cfg = load_settings(_settings())
    assert fields.model_id(cfg, None, {}) == "fm"  # the default: the first model
    assert fields.model_id(cfg, None, {"model": "bb"}) == "bb"
    assert fields.model_id(cfg, "bb", {"model": "fm"}) == "bb"  # the header wins
    err = _refused(lambda: fields.model_id(cfg, None, {"model": "nope"}), 404, "unknown_model")
    assert err.detail == "unknown model 'nope'; served: ['fm', 'bb']"
    for bad in ("../fm", "a/b", 3, ["fm"]):
        err = _refused(lambda b=bad: fields.model_id(cfg, None, {"model": b}), 404, "unknown_model")
        assert "is not a model id" in err.detail
    roots = load_settings({"runs_root": "/runs"})  # any run there, by id; no default
    assert fields.model_id(roots, None, {"model": "run-7"}) == "run-7"
    assert roots.entry("run-7").run == "/runs/run-7"
    err = _refused(lambda: fields.model_id(roots, None, {}), 422, "invalid_field")
    assert err.detail == "no model given and no default model"


def test_list_fields_and_class_names():
    assert fields.embeddings_input("a", 3) == ["a"]
    assert fields.embeddings_input(["a", "b"], 3) == ["a", "b"]
    for bad in ([], None, 3, {"a": 1}):
        err = _refused(lambda b=bad: fields.embeddings_input(b, 3), 422, "invalid_field")
        assert err.detail == "input: expected a string or a non-empty list of them"
    err = _refused(lambda: fields.embeddings_input(["a"] * 4, 3), 413, "too_many_images")
    assert err.detail == "input: 4 > 3"
    assert fields.encoding_format({}) == "float"
    assert fields.encoding_format({"encoding_format": "base64"}) == "base64"
    _refused(lambda: fields.encoding_format({"encoding_format": "hex"}), 422, "invalid_field")
    assert fields.image_list([], "images", 3) == []
    _refused(lambda: fields.image_list("x", "images", 3), 422, "invalid_field")
    err = _refused(lambda: fields.image_list([1] * 4, "images", 3), 413, "too_many_images")
    assert err.detail == "images: over 3"
    assert fields.class_name({"name": "trousers"}) == "trousers"
    err = _refused(lambda: fields.class_name({"name": " x\n"}), 422, "invalid_field")
    assert err.detail.startswith("name: ")
    _refused(lambda: fields.class_name({}), 422, "invalid_field")


# ----------------------------------------------------------------------------- bodies


def test_raw_and_json_bodies_within_the_limit(tmp_path):
    reader = BodyReader(load_settings(_settings()), Storage())
    body = b"x" * 10_001
    err = _refused(  # a declared length over the limit: refused before reading
        lambda: reader.raw(_request(body, {"content-length": "10001"})), 413, "request_too_large"
    )
    assert err.detail == "body of 10001 bytes > 10000"
    err = _refused(  # no (or a lying) length: refused while streaming
        lambda: reader.raw(_request(body, {"content-length": "5"}, chunk=4096)),
        413,
        "request_too_large",
    )
    assert err.detail == "body over 10000 bytes"
    assert asyncio.run(reader.raw(_request(b"y" * 10_000, chunk=999))) == b"y" * 10_000
    assert asyncio.run(reader.json(_request(b'{"a": 1}'))) == {"a": 1}
    for bad in (b'{"a": ', b"\xff\xfe", b""):
        err = _refused(lambda b=bad: reader.json(_request(b)), 400, "malformed_json")
        assert err.detail.startswith("request body is not JSON")
        assert_clean(err.detail)  # no "line 1 column 7": that reads like a stack frame
    err = _refused(lambda: reader.json(_request(b"[1, 2]")), 400, "malformed_json")
    assert err.detail == "expected a JSON object at the top level"


def test_one_image_from_raw_json_or_multipart(tmp_path):
    reader = BodyReader(load_settings(_settings(tmp_path)), Storage())
    png = _png()
    b64 = base64.b64encode(png).decode()
    fields_, image = asyncio.run(
        reader.single(_request(png, {"content-type": "image/png"}, query="model=bb&top_k=2"))
    )
    assert image == png and fields_ == {"model": "bb", "top_k": "2"}
    raw = _request(png, {"content-type": "application/octet-stream"})
    assert asyncio.run(reader.single(raw))[1] == png
    body = f'{{"image_b64": "data:image/png;base64,{b64}", "top_k": 3}}'.encode()
    fields_, image = asyncio.run(
        reader.single(_request(body, {"content-type": "application/json; charset=utf-8"}))
    )
    assert image == png and fields_["top_k"] == 3
    content, headers = _multipart({"image": ("a.png", png, "image/png")}, {"model": "bb"})
    fields_, image = asyncio.run(reader.single(_request(content, headers)))
    assert image == png and fields_ == {"model": "bb"}
    # a URI under the allowed prefix is fetched; any other is refused, unread
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed/a.png").write_bytes(png)
    (tmp_path / "secret.png").write_bytes(png)
    ok = f'{{"uri": "file://{tmp_path}/allowed/a.png"}}'.encode()
    assert asyncio.run(reader.single(_request(ok, {"content-type": "application/json"})))[1] == png
    bad = {
        "wrong media type": (
            _request(png, {"content-type": "text/plain"}),
            415,
            "unsupported_media_type",
        ),
        "no media type": (_request(png), 415, "unsupported_media_type"),
        "not an image": (
            _request(b"GIF89a-no", {"content-type": "image/png"}),
            415,
            "not_an_image",
        ),
        "oversized body": (
            _request(b"\x89PNG" + b"x" * 10_000, {"content-type": "image/png"}, chunk=4096),
            413,
            "request_too_large",
        ),
        "too many pixels": (
            _request(_png((100, 100)), {"content-type": "image/png"}),
            413,
            "image_too_large",
        ),
        "json without an image": (
            _request(b'{"model": "fm"}', {"content-type": "application/json"}),
            422,
            "invalid_field",
        ),
        "bad base64": (
            _request(b'{"image_b64": "@@"}', {"content-type": "application/json"}),
            422,
            "invalid_base64",
        ),
        "uri outside": (
            _request(
                f'{{"uri": "file://{tmp_path}/secret.png"}}'.encode(),
                {"content-type": "application/json"},
            ),
            403,
            "uri_not_allowed",
        ),
        "missing object": (
            _request(
                f'{{"uri": "file://{tmp_path}/allowed/none.png"}}'.encode(),
                {"content-type": "application/json"},
            ),
            404,
            "uri_not_found",
        ),
        "two files": (
            _request(*_multipart([("image", ("a.png", png, "image/png"))] * 2)),
            422,
            "invalid_field",
        ),
    }
    for what, (req, status, error) in bad.items():
        with pytest.raises(RequestError) as err:
            asyncio.run(reader.single(req))
        assert (err.value.status, err.value.error) == (status, error), (what, err.value)
        # one short sentence; neither the server's allowed prefixes nor the URI's path
        assert_clean(json.dumps(err.value.body()), tmp_path)
    err = _refused(lambda: reader.single(_request(png)), 415, "unsupported_media_type")
    assert err.detail == (
        "Content-Type 'missing': expected image/*, multipart/form-data or application/json"
    )


def test_several_images_from_json_or_multipart(tmp_path):
    reader = BodyReader(load_settings(_settings(tmp_path)), Storage())
    png = _png()
    b64 = base64.b64encode(png).decode()
    body = f'{{"name": "x", "images": ["{b64}", {{"image_b64": "{b64}"}}]}}'.encode()
    fields_, named = asyncio.run(
        reader.several(_request(body, {"content-type": "application/json"}, query="model=fm"))
    )
    assert fields_ == {"model": "fm", "name": "x", "images": [b64, {"image_b64": b64}]}
    assert named == [(png, "images[0]"), (png, "images[1]")]
    files = [("images", (f"{i}.png", png, "image/png")) for i in range(2)]
    fields_, named = asyncio.run(reader.several(_request(*_multipart(files, {"name": "x"}))))
    assert fields_ == {"name": "x"} and named == [(png, "images[0]"), (png, "images[1]")]
    json_ = {"content-type": "application/json"}
    err = _refused(
        lambda: reader.several(_request(b'{"images": [{}]}', json_)), 422, "invalid_field"
    )
    assert err.detail == "images[0]: expected image_b64 or uri"
    _refused(lambda: reader.several(_request(b'{"images": "x"}', json_)), 422, "invalid_field")
    many = ("[" + ",".join([f'"{b64}"'] * 4) + "]").encode()
    _refused(
        lambda: reader.several(_request(b'{"images": ' + many + b"}", json_)),
        413,
        "too_many_images",
    )
    err = _refused(
        lambda: reader.several(_request(b"x", {"content-type": "image/png"})),
        415,
        "unsupported_media_type",
    )
    assert "expected application/json or multipart/form-data" in err.detail
    files = [("images", (f"{i}.png", png, "image/png")) for i in range(4)]  # max_images 3
    _refused(lambda: reader.several(_request(*_multipart(files))), 400, "malformed_multipart")


# ----------------------------------------------------------------------------- handling


def test_every_request_answers_its_body_or_the_one_error_shape(caplog):
    throttle, ran = Throttle(1, 2), []

    async def ok():
        ran.append(1)
        return {"labels": []}

    async def refuse():
        raise RequestError(404, "unknown_model", "unknown model 'x'")

    async def crash():
        raise RuntimeError("secret internals /srv/run")

    def answer(work, headers=None, key=""):
        return asyncio.run(
            handle(work, headers=headers or {}, key=key, throttle=throttle, route="classify")
        )

    a = answer(ok)
    assert (a.status, a.body, a.refused) == (200, {"labels": []}, None) and ran == [1]
    a = answer(refuse)
    assert (a.status, a.body, a.refused) == (
        404,
        {"error": "unknown_model", "detail": "unknown model 'x'"},
        "unknown_model",
    )
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        a = answer(crash)
    assert a.status == 500 and a.refused is None and a.body["error"] == "internal_error"
    assert "secret" not in str(a.body) and "RuntimeError" not in str(a.body)
    rid = a.body["detail"].split("(id ")[1].split(")")[0]
    assert rid in caplog.text and "secret internals" in caplog.text  # in the log only
    a = answer(ok, {"authorization": "Bearer nope"}, key=KEY)  # refused before the work runs
    assert (a.status, a.refused, a.headers) == (401, "unauthorized", {"WWW-Authenticate": "Bearer"})
    assert ran == [1]
    with throttle.slot():
        a = answer(ok)
    assert (a.status, a.refused, a.headers) == (429, "overloaded", {"Retry-After": "2"})
    assert ran == [1] and throttle.inflight == 0
    assert answer(ok, {"x-api-key": KEY}, key=KEY).status == 200


def test_error_bodies_and_the_api_object():
    assert http_error(404, "Not Found") == {"error": "not_found", "detail": "Not Found"}
    assert http_error(405, "x")["error"] == "method_not_allowed"
    assert http_error(418, "x")["error"] == "http_error"
    errors_ = [{"loc": ("query", "top_k"), "msg": "bad"}, {"msg": "worse"}]
    assert validation_error(errors_) == {
        "error": "invalid_request",
        "detail": "query.top_k: bad; : worse",
    }
    assert len(validation_error([{"loc": ("x",), "msg": "m" * 900}])["detail"]) == 500
    client = TestClient(make_api())  # in-process ASGI: no server
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json() == {"error": "not_found", "detail": "Not Found"}
    doc = client.get("/openapi.json").json()
    assert doc["info"]["title"] == "raylens" and "multipart upload" in doc["info"]["description"]
    assert set(IMAGE_BODY["requestBody"]["content"]) == {
        "image/*",
        "multipart/form-data",
        "application/json",
    }
    enroll = ENROLL_BODY["requestBody"]["content"]["application/json"]["schema"]
    assert enroll["required"] == ["name", "images"]
    emb = EMBEDDINGS_BODY["requestBody"]["content"]["application/json"]["schema"]
    assert emb["properties"]["encoding_format"]["enum"] == ["float", "base64"]


def test_response_bodies():
    cfg = load_settings(_settings(runs_root="/runs"))
    assert responses.models_body(cfg) == {  # runs by name: no server path in a response
        "models": [
            {"id": "fm", "run": "fm", "backbone": None},
            {"id": "bb", "run": None, "backbone": "vgg_s8"},
        ],
        "default": "fm",
        "on_demand": True,
    }
    assert not responses.models_body(load_settings(_settings()))["on_demand"]
    assert responses.readiness([("a", None), ("b", None)]) == (
        {"ready": True, "models": {"a": "loaded", "b": "loaded"}},
        200,
    )
    body, status = responses.readiness([("a", None), ("b", "model 'b' does not load")])
    assert status == 503 and body == {
        "ready": False,
        "models": {"a": "loaded", "b": "model 'b' does not load"},
    }
    e = np.array([3.0, 4.0], np.float32)
    desc = {
        "kind": "classify",
        "model_id": "fm@epoch=2",
        "checkpoint": "/srv/runs/fm/checkpoints/epoch=2",
        "run": "/srv/runs/fm",
    }
    body = responses.embed_body("fm", desc, e, normalize=True)
    assert body == {  # the model's id, never its checkpoint's location
        "model": "fm",
        "model_id": "fm@epoch=2",
        "dim": 2,
        "normalized": True,
        "embedding": [pytest.approx(0.6), pytest.approx(0.8)],
    }
    body = responses.embed_body("m", {**desc, "kind": "metric"}, e, False)
    assert body["normalized"] and body["embedding"] == [3.0, 4.0]
    assert "/srv" not in str(body)
    body = responses.embeddings_body("fm", [e, e * 2], "base64")
    assert [d["index"] for d in body["data"]] == [0, 1] and body["object"] == "list"
    np.testing.assert_array_equal(
        np.frombuffer(base64.b64decode(body["data"][1]["embedding"]), "<f4"), [6, 8]
    )
    assert responses.embeddings_body("fm", [e], "float")["data"][0]["embedding"] == [3.0, 4.0]
