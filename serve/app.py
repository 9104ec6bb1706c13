"""raylens on Ray Serve: classification, embedding and class-enrolment HTTP endpoints.

    serve run serve/config.yaml          # local Ray, http://127.0.0.1:8000/docs
    serve deploy serve/config.yaml       # a running cluster (see README)

Three deployments:

- ``Ingress``: FastAPI (OpenAPI page at ``/docs``). Parses and checks every input (body
  size, content type, JSON, base64, URI allow-list, image header and pixel count), answers
  bad requests with a 4xx JSON ``{"error", "detail"}``, overload with 429/503 and
  Retry-After, and calls the model deployment with the request's model id.
- ``ModelServer``: holds loaded models (Serve model multiplexing, LRU eviction), batches
  images of one model into one forward (``@serve.batch``); preprocessing is the run's own
  eval transform (:mod:`raylens.serving.models`).
- ``Prototypes``: one replica owning every metric run's Nearest-Class-Mean prototypes
  (:mod:`raylens.serving.prototypes`), so an enrolled class is seen by every model replica
  at once and survives restarts (persisted in the run dir).

The application ``args`` are :class:`raylens.serving.settings.ServeConfig`; replicas,
autoscaling, CPUs/GPUs and queue limits are each deployment's Serve options.
"""

import asyncio
import base64
import hmac
import logging
import os
import time
import uuid
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from raylens.serving.inputs import (
    RequestError,
    check_uri,
    decode_base64,
    fetch_uri,
    probe_image,
)
from raylens.serving.models import ServedModel, load_served_model
from raylens.serving.prototypes import PrototypeStore, check_class_name
from raylens.serving.settings import MODEL_ID, ModelEntry, ServeConfig, load_settings
from raylens.storage import Storage, join
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ray.serve")
MODEL_HEADER = "serve_multiplexed_model_id"
VERSION = "v1"


class ModelNotFound(LookupError):
    """No model with this id (or its run dir is missing)."""


class ModelLoadError(RuntimeError):
    """The model exists but does not load (a broken run dir); the message says why."""


def model_entry(cfg: ServeConfig, model_id: str) -> ModelEntry:
    for m in cfg.models:
        if m.id == model_id:
            return m
    if cfg.runs_root and MODEL_ID.match(model_id):
        return ModelEntry(id=model_id, run=join(cfg.runs_root, model_id))
    raise ModelNotFound(model_id)


def _threads() -> int:
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:
        cpus = 1.0
    return max(1, int(cpus))


# ----------------------------------------------------------------------------- models


@serve.deployment(
    name="ModelServer",
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=64,
    max_queued_requests=512,
    health_check_period_s=10,
)
class ModelServer:
    """Loaded models (multiplexed by model id, LRU) and their batched forward."""

    def __init__(self, settings: dict):
        import torch

        self.cfg = load_settings(settings)
        self.storage = Storage(self.cfg.storage)
        gpu = torch.cuda.is_available() and self.cfg.device != "cpu"
        self.device = "cuda" if gpu else "cpu"
        if not gpu:
            torch.set_num_threads(_threads())
        self.loaded: dict[str, dict] = {}

        async def load(model_id: str) -> ServedModel:
            return await self._load(model_id)

        self._model = serve.multiplexed(max_num_models_per_replica=self.cfg.max_models_per_replica)(
            load
        )
        b = self.cfg.batching
        self._batched.set_max_batch_size(b.max_batch_size)
        self._batched.set_batch_wait_timeout_s(b.batch_wait_timeout_s)
        self.batch_sizes = serve.metrics.Histogram(
            "raylens_batch_size",
            description="Images per model forward.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
            tag_keys=("model",),
        )
        self.loads = serve.metrics.Counter(
            "raylens_model_loads", description="Models loaded.", tag_keys=("model", "result")
        )

    async def _load(self, model_id: str) -> ServedModel:
        try:
            entry = model_entry(self.cfg, model_id)
        except ModelNotFound:
            raise ModelNotFound(f"unknown model {model_id!r}") from None
        t0 = time.perf_counter()
        try:
            model = await asyncio.to_thread(
                load_served_model,
                entry,
                self.storage,
                device=self.device,
                amp=self.cfg.amp,
                max_pixels=self.cfg.limits.max_image_pixels,
            )
        except FileNotFoundError as err:
            self.loads.inc(tags={"model": model_id, "result": "not_found"})
            raise ModelNotFound(self.storage.scrub(str(err))) from None
        except Exception as err:
            self.loads.inc(tags={"model": model_id, "result": "error"})
            log.exception("model %s failed to load", model_id)
            raise ModelLoadError(
                self.storage.scrub(f"model {model_id!r} does not load: {type(err).__name__}: {err}")
            ) from None
        self.loads.inc(tags={"model": model_id, "result": "ok"})
        self.loaded[model_id] = model.describe()
        log.info("loaded %s (%s) in %.2fs", model_id, model.kind, time.perf_counter() - t0)
        return model

    async def describe(self) -> dict:
        model = await self._model(serve.get_multiplexed_model_id())
        return model.describe()

    async def infer(self, image: bytes) -> dict:
        """One image of the request's model → ``{"embedding", "probs", "error"}``."""
        if self.cfg.batching.enabled:
            return await self._batched(image)
        model = await self._model(serve.get_multiplexed_model_id())
        self.batch_sizes.observe(1, tags={"model": model.id})
        return (await asyncio.to_thread(self._run, model, [image]))[0]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, images: list[bytes]) -> list[dict]:
        # Serve splits batches by multiplexed model id: one model per batch.
        model = await self._model(serve.get_multiplexed_model_id())
        self.batch_sizes.observe(len(images), tags={"model": model.id})
        return await asyncio.to_thread(self._run, model, images)

    @staticmethod
    def _run(model: ServedModel, images: list[bytes]) -> list[dict]:
        return [
            {"embedding": o.embedding, "probs": o.probs, "error": o.error}
            for o in model.infer(images)
        ]

    def check_health(self) -> None:
        if not self.cfg.models and not self.cfg.runs_root:
            raise RuntimeError("no models configured")


# ----------------------------------------------------------------------------- prototypes


@serve.deployment(name="Prototypes", num_replicas=1, ray_actor_options={"num_cpus": 0})
class Prototypes:
    """Every metric run's NCM prototypes; enrolment persists to the run dir."""

    def __init__(self, settings: dict):
        self.cfg = load_settings(settings)
        self.storage = Storage(self.cfg.storage)
        self.stores: dict[str, PrototypeStore] = {}

    def _store(self, model_id: str, run: str, dim: int) -> PrototypeStore:
        store = self.stores.get(model_id)
        if store is None or store.run != run or store.dim != dim:
            store = PrototypeStore(self.storage, run, dim).load()
            self.stores[model_id] = store
        return store

    def nearest(self, model_id: str, run: str, dim: int, embeddings: np.ndarray, k: int):
        return self._store(model_id, run, dim).nearest(embeddings, k)

    def enroll(self, model_id: str, run: str, dim: int, name: str, emb: np.ndarray, replace: bool):
        return self._store(model_id, run, dim).enroll(name, emb, replace=replace)

    def delete(self, model_id: str, run: str, dim: int, name: str) -> bool:
        return self._store(model_id, run, dim).delete(name)

    def classes(self, model_id: str, run: str, dim: int) -> dict:
        store = self._store(model_id, run, dim)
        return {"classes": store.list(), "source": store.source}


# ----------------------------------------------------------------------------- ingress

api = FastAPI(
    title="raylens",
    version="1.0",
    description=(
        "Classification, embeddings and class enrolment for raylens runs. Images come as raw "
        "bytes (`Content-Type: image/*`), a multipart upload (field `image`), or JSON "
        '`{"image_b64": ...}` / `{"uri": "s3://..."}` (allow-listed prefixes only). Pick the '
        "model with the `model` field or query parameter, or the `serve_multiplexed_model_id` "
        'header. Errors are JSON `{"error": ..., "detail": ...}`.'
    ),
)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and methods answer in the same JSON shape as every other error."""
    codes = {404: "not_found", 405: "method_not_allowed"}
    return JSONResponse(
        {"error": codes.get(exc.status_code, "http_error"), "detail": str(exc.detail)},
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    where = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
    )
    return JSONResponse({"error": "invalid_request", "detail": where[:500]}, status_code=422)


def _object(properties: dict, required: tuple[str, ...] = ()) -> dict:
    schema = {"type": "object", "properties": properties}
    return {"schema": {**schema, "required": list(required)} if required else schema}


def _body(content: dict) -> dict:
    """``openapi_extra`` for a route that reads its body itself (several content types)."""
    return {"requestBody": {"required": True, "content": content}}


STRING, BINARY = {"type": "string"}, {"type": "string", "format": "binary"}
IMAGE_BODY = _body(
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
ENROLL_BODY = _body(
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
EMBEDDINGS_BODY = _body(
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


@serve.deployment(
    name="Ingress",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=512,
    max_queued_requests=1024,
)
@serve.ingress(api)
class Ingress:
    def __init__(self, models: DeploymentHandle, prototypes: DeploymentHandle, settings: dict):
        self.cfg = load_settings(settings)
        self.storage = Storage(self.cfg.storage)
        self.models, self.prototypes = models, prototypes
        self.inflight = 0
        self.kinds: dict[str, dict] = {}  # model id → describe() (kind, run, dim, classes)
        self.requests = serve.metrics.Counter(
            "raylens_requests",
            description="HTTP requests by route and status.",
            tag_keys=("route", "status"),
        )
        self.rejects = serve.metrics.Counter(
            "raylens_rejects",
            description="Refused requests by reason.",
            tag_keys=("route", "error"),
        )
        self.latency = serve.metrics.Histogram(
            "raylens_request_latency_ms",
            description="Request latency in the ingress.",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000],
            tag_keys=("route",),
        )

    # ------------------------------------------------------------------ plumbing

    def _key_ok(self, request: Request) -> bool:
        name = self.cfg.api_key_env
        key = os.environ.get(name, "") if name else ""
        if not key:
            return True
        given = request.headers.get("x-api-key", "")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), key.encode())

    async def _handle(self, route: str, request: Request, work) -> JSONResponse:
        t0 = time.perf_counter()
        status = 200
        try:
            if not self._key_ok(request):
                raise RequestError(
                    401,
                    "unauthorized",
                    "missing or wrong API key (Authorization: Bearer <key> or X-API-Key)",
                    {"WWW-Authenticate": "Bearer"},
                )
            lim = self.cfg.limits
            if self.inflight >= lim.max_inflight:
                raise RequestError(
                    429,
                    "overloaded",
                    f"{self.inflight} requests in progress on this replica (limit "
                    f"{lim.max_inflight}); retry later",
                    {"Retry-After": str(lim.retry_after_s)},
                )
            self.inflight += 1
            try:
                body = await work()
            finally:
                self.inflight -= 1
            return JSONResponse(body)
        except RequestError as err:
            status = err.status
            self.rejects.inc(tags={"route": route, "error": err.error})
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        except Exception:
            status = 500
            rid = uuid.uuid4().hex[:12]
            log.exception("request %s on %s failed", rid, route)
            return JSONResponse(
                {
                    "error": "internal_error",
                    "detail": f"the server failed on this request (id {rid}); see its log",
                },
                status_code=500,
            )
        finally:
            self.requests.inc(tags={"route": route, "status": str(status)})
            self.latency.observe((time.perf_counter() - t0) * 1000, tags={"route": route})

    async def _body(self, request: Request) -> bytes:
        limit = self.cfg.limits.max_request_bytes
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

    async def _json(self, request: Request) -> dict:
        import json

        raw = await self._body(request)
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise RequestError(400, "malformed_json", f"request body is not JSON: {err}") from None
        if not isinstance(data, dict):
            raise RequestError(400, "malformed_json", "expected a JSON object at the top level")
        return data

    async def _form(self, request: Request) -> tuple[dict, list[tuple[bytes, str]]]:
        lim = self.cfg.limits
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

    def _image(self, data: bytes, what: str) -> bytes:
        lim = self.cfg.limits
        probe_image(data, what, max_pixels=lim.max_image_pixels, max_bytes=lim.max_request_bytes)
        return data

    async def _resolve(self, item: Any, what: str) -> bytes:
        """A JSON image reference: base64 / data URI string, or {"image_b64"|"uri": ...}."""
        lim = self.cfg.limits
        if isinstance(item, dict):
            if "image_b64" in item:
                item = item["image_b64"]
            elif "uri" in item:
                return await self._fetch(item["uri"], what)
            else:
                raise RequestError(422, "invalid_field", f"{what}: expected image_b64 or uri")
        if isinstance(item, str) and "://" in item[:16] and not item.startswith("data:"):
            return await self._fetch(item, what)
        return self._image(decode_base64(item, what, max_bytes=lim.max_request_bytes), what)

    async def _fetch(self, uri: Any, what: str) -> bytes:
        uri = check_uri(uri, what, self.cfg.allowed_uri_prefixes)
        data = await asyncio.to_thread(
            fetch_uri, self.storage, uri, what, max_bytes=self.cfg.limits.max_request_bytes
        )
        return self._image(data, what)

    async def _single(self, request: Request) -> tuple[dict, bytes]:
        """One image from a raw, multipart or JSON body, and the request's other fields."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        fields: dict = dict(request.query_params)
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            return fields, self._image(await self._body(request), "request body")
        if ctype == "multipart/form-data":
            form, files = await self._form(request)
            fields.update(form)
            if len(files) != 1:
                raise RequestError(
                    422,
                    "invalid_field",
                    f"multipart: expected one file (field 'image'), got {len(files)}",
                )
            return fields, self._image(*files[0])
        if ctype == "application/json":
            data = await self._json(request)
            fields.update(data)
            if "image_b64" in data:
                return fields, await self._resolve(data["image_b64"], "image_b64")
            if "uri" in data:
                return fields, await self._fetch(data["uri"], "uri")
            raise RequestError(422, "invalid_field", "JSON body: expected 'image_b64' or 'uri'")
        raise RequestError(
            415,
            "unsupported_media_type",
            f"Content-Type {ctype or 'missing'!r}: expected image/*, multipart/form-data "
            "or application/json",
        )

    def _model_id(self, request: Request, fields: dict) -> str:
        mid = request.headers.get(MODEL_HEADER) or fields.get("model") or self.cfg.default_id
        if not mid:
            raise RequestError(422, "invalid_field", "no model given and no default model")
        if not isinstance(mid, str) or not MODEL_ID.match(mid):
            raise RequestError(404, "unknown_model", f"model {mid!r} is not a model id")
        try:
            model_entry(self.cfg, mid)
        except ModelNotFound:
            raise RequestError(
                404, "unknown_model", f"unknown model {mid!r}; served: {self._ids()}"
            ) from None
        return mid

    def _ids(self) -> list[str]:
        return [m.id for m in self.cfg.models]

    async def _call(self, model_id: str, method: str, *args) -> Any:
        """A model deployment call: backpressure → 503, a dead replica → one retry."""
        lim = self.cfg.limits
        retry = {"Retry-After": str(lim.retry_after_s)}
        for attempt in (0, 1):
            handle = self.models.options(multiplexed_model_id=model_id)
            try:
                return await asyncio.wait_for(
                    getattr(handle, method).remote(*args), lim.request_timeout_s
                )
            except BackPressureError:
                raise RequestError(
                    503, "overloaded", "model queue is full; retry later", retry
                ) from None
            except asyncio.TimeoutError:  # noqa: UP041 (a distinct class on Python 3.10)
                raise RequestError(
                    504, "timeout", f"model {model_id!r} took over {lim.request_timeout_s}s"
                ) from None
            except ModelNotFound as err:
                raise RequestError(404, "unknown_model", str(err)) from None
            except ModelLoadError as err:
                raise RequestError(503, "model_unavailable", str(err), retry) from None
            except (ray.exceptions.RayActorError, DeploymentUnavailableError):
                if attempt:  # inference is idempotent: retried once on a replica death
                    raise RequestError(
                        503, "model_unavailable", "model replica unavailable; retry", retry
                    ) from None
                log.warning("model replica died during a request; retrying once")
        raise AssertionError("unreachable")

    async def _describe(self, model_id: str) -> dict:
        if model_id not in self.kinds:
            self.kinds[model_id] = await self._call(model_id, "describe")
        return self.kinds[model_id]

    async def _infer(self, model_id: str, images: list[tuple[bytes, str]]) -> list[dict]:
        outs = await asyncio.gather(*(self._call(model_id, "infer", d) for d, _ in images))
        for out, (_, what) in zip(outs, images, strict=True):
            if out["error"]:
                reason = out["error"].split(":", 1)[0]
                code = "image_too_large" if reason == "too_large" else "not_an_image"
                raise RequestError(
                    413 if reason == "too_large" else 415,
                    code,
                    f"{what}: the image does not decode ({out['error'][:200]})",
                )
        return outs

    async def _one(self, request: Request, option) -> tuple[str, dict, dict, Any]:
        """A one-image request through its model: ``(model id, its description, the
        result, option(fields))``; the option is checked before the model runs."""
        fields, image = await self._single(request)
        mid = self._model_id(request, fields)
        value = option(fields)
        desc = await self._describe(mid)
        (out,) = await self._infer(mid, [(image, "image")])
        return mid, desc, out, value

    async def _labels(self, model_id: str, desc: dict, out: dict, k: int) -> dict:
        kind = desc["kind"]
        if kind == "backbone":
            raise RequestError(
                422, "not_a_classifier", f"model {model_id!r} is a bare backbone: use /v1/embed"
            )
        if kind == "metric":
            near = await self.prototypes.nearest.remote(
                model_id, desc["run"], desc["dim"], out["embedding"][None], k
            )
            labels = [{"label": n, "score": round(s, 6)} for n, s in near[0]]
            return {"labels": labels, "score": "cosine_similarity"}
        probs = out["probs"]
        classes = desc["classes"]
        if kind == "multilabel":
            t = desc.get("threshold", 0.5)
            idx = [int(i) for i in np.argsort(-probs, kind="stable") if probs[i] >= t]
            labels = [{"label": classes[i], "score": round(float(probs[i]), 6)} for i in idx]
            return {"labels": labels, "score": "probability", "threshold": t}
        top = np.argsort(-probs, kind="stable")[:k]
        labels = [{"label": classes[i], "score": round(float(probs[i]), 6)} for i in top]
        return {"labels": labels, "score": "probability"}

    @staticmethod
    def _int(fields: dict, key: str, default: int, lo: int, hi: int) -> int:
        value = fields.get(key, default)
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise RequestError(422, "invalid_field", f"{key}: expected an integer") from None
        if not lo <= value <= hi:
            raise RequestError(422, "invalid_field", f"{key}: expected {lo}..{hi}, got {value}")
        return value

    @staticmethod
    def _bool(fields: dict, key: str) -> bool:
        value = fields.get(key, False)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "false", "0", ""):
            return value.lower() in ("true", "1")
        raise RequestError(422, "invalid_field", f"{key}: expected true or false")

    # ------------------------------------------------------------------ routes

    @api.get("/healthz", summary="Liveness: the ingress answers")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: every configured model is loaded")
    async def readyz(self) -> JSONResponse:
        async def one(mid: str) -> tuple[str, str | None]:
            try:  # asks a model replica every time (loads the model if it must)
                self.kinds[mid] = await self._call(mid, "describe")
                return mid, None
            except RequestError as err:
                return mid, err.detail
            except Exception as err:
                return mid, type(err).__name__

        results = await asyncio.gather(*(one(m.id) for m in self.cfg.models))
        failed = {m: e for m, e in results if e}
        body = {"ready": not failed, "models": {m: e or "loaded" for m, e in results}}
        return JSONResponse(body, status_code=503 if failed else 200)

    @api.get(f"/{VERSION}/models", summary="The models this server serves")
    async def list_models(self, request: Request) -> JSONResponse:
        async def work():
            return {
                "models": [
                    {"id": m.id, "run": m.run or None, "backbone": m.backbone or None}
                    for m in self.cfg.models
                ],
                "default": self.cfg.default_id,
                "runs_root": self.cfg.runs_root,
            }

        return await self._handle("models", request, work)

    @api.post(f"/{VERSION}/classify", summary="Top-k labels of one image", openapi_extra=IMAGE_BODY)
    async def classify(self, request: Request) -> JSONResponse:
        async def work():
            top_k = lambda f: self._int(f, "top_k", self.cfg.top_k, 1, 1000)  # noqa: E731
            mid, desc, out, k = await self._one(request, top_k)
            return {"model": mid, "kind": desc["kind"], **await self._labels(mid, desc, out, k)}

        return await self._handle("classify", request, work)

    @api.post(f"/{VERSION}/embed", summary="Embedding of one image", openapi_extra=IMAGE_BODY)
    async def embed(self, request: Request) -> JSONResponse:
        async def work():
            mid, desc, out, normalize = await self._one(
                request, lambda f: self._bool(f, "normalize")
            )
            e = out["embedding"]
            if normalize:
                e = e / max(float(np.linalg.norm(e)), 1e-12)
            return {
                "model": mid,
                "model_id": desc["checkpoint"] or desc["run"],
                "dim": int(e.shape[0]),
                "normalized": normalize or desc["kind"] == "metric",
                "embedding": e.astype(np.float32).tolist(),
            }

        return await self._handle("embed", request, work)

    @api.post(
        f"/{VERSION}/embeddings",
        summary="OpenAI-style embeddings of images",
        openapi_extra=EMBEDDINGS_BODY,
    )
    async def embeddings(self, request: Request) -> JSONResponse:
        async def work():
            data = await self._json(request)
            mid = self._model_id(request, data)
            items = data.get("input")
            if isinstance(items, str):
                items = [items]
            if not isinstance(items, list) or not items:
                raise RequestError(
                    422, "invalid_field", "input: expected a string or a non-empty list of them"
                )
            if len(items) > self.cfg.limits.max_images:
                raise RequestError(
                    413, "too_many_images", f"input: {len(items)} > {self.cfg.limits.max_images}"
                )
            fmt = data.get("encoding_format", "float")
            if fmt not in ("float", "base64"):
                raise RequestError(422, "invalid_field", "encoding_format: 'float' or 'base64'")
            images = [
                (await self._resolve(x, f"input[{i}]"), f"input[{i}]") for i, x in enumerate(items)
            ]
            outs = await self._infer(mid, images)
            rows = []
            for i, out in enumerate(outs):
                e = out["embedding"].astype("<f4")
                value = base64.b64encode(e.tobytes()).decode() if fmt == "base64" else e.tolist()
                rows.append({"object": "embedding", "index": i, "embedding": value})
            return {
                "object": "list",
                "data": rows,
                "model": mid,
                "usage": {"prompt_tokens": 0, "total_tokens": 0},
            }

        return await self._handle("embeddings", request, work)

    async def _metric_model(self, mid: str) -> dict:
        desc = await self._describe(mid)
        if desc["kind"] != "metric":
            raise RequestError(
                409,
                "not_a_metric_model",
                f"model {mid!r} is a {desc['kind']}: classes can be enrolled only in a "
                "metric-learning run (task.name=metric)",
            )
        return desc

    @api.post(
        f"/{VERSION}/enroll",
        summary="Add or update a class from a few images (metric runs)",
        openapi_extra=ENROLL_BODY,
    )
    async def enroll(self, request: Request) -> JSONResponse:
        async def work():
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            fields: dict = dict(request.query_params)
            if ctype == "multipart/form-data":
                form, images = await self._form(request)
                fields.update(form)
                images = [self._image(d, w) for d, w in images]
                named = [(d, f"images[{i}]") for i, d in enumerate(images)]
            elif ctype == "application/json":
                data = await self._json(request)
                fields.update(data)
                items = data.get("images")
                if not isinstance(items, list):
                    raise RequestError(422, "invalid_field", "images: expected a list")
                if len(items) > self.cfg.limits.max_images:
                    raise RequestError(
                        413, "too_many_images", f"images: over {self.cfg.limits.max_images}"
                    )
                named = [
                    (await self._resolve(x, f"images[{i}]"), f"images[{i}]")
                    for i, x in enumerate(items)
                ]
            else:
                raise RequestError(
                    415,
                    "unsupported_media_type",
                    f"Content-Type {ctype or 'missing'!r}: expected application/json or "
                    "multipart/form-data",
                )
            try:
                name = check_class_name(fields.get("name"))
            except ValueError as err:
                raise RequestError(422, "invalid_field", f"name: {err}") from None
            if not named:
                raise RequestError(422, "invalid_field", "images: at least one image needed")
            replace = self._bool(fields, "replace")
            mid = self._model_id(request, fields)
            desc = await self._metric_model(mid)
            outs = await self._infer(mid, named)
            emb = np.stack([o["embedding"] for o in outs])
            info = await self.prototypes.enroll.remote(
                mid, desc["run"], desc["dim"], name, emb, replace
            )
            return {"model": mid, **info, "images": len(named)}

        return await self._handle("enroll", request, work)

    @api.get(f"/{VERSION}/classes", summary="Classes of a metric run's prototypes")
    async def classes(self, request: Request) -> JSONResponse:
        async def work():
            fields = dict(request.query_params)
            mid = self._model_id(request, fields)
            desc = await self._describe(mid)
            if desc["kind"] != "metric":
                return {"model": mid, "kind": desc["kind"], "classes": desc["classes"]}
            got = await self.prototypes.classes.remote(mid, desc["run"], desc["dim"])
            return {"model": mid, "kind": "metric", **got}

        return await self._handle("classes", request, work)

    @api.delete(f"/{VERSION}/classes/{{name}}", summary="Remove a class's prototype")
    async def delete_class(self, name: str, request: Request) -> JSONResponse:
        async def work():
            fields = dict(request.query_params)
            mid = self._model_id(request, fields)
            desc = await self._metric_model(mid)
            if not await self.prototypes.delete.remote(mid, desc["run"], desc["dim"], name):
                raise RequestError(404, "unknown_class", f"model {mid!r} has no class {name!r}")
            return {"model": mid, "deleted": name}

        return await self._handle("delete_class", request, work)


# ----------------------------------------------------------------------------- builders


def make_app(
    settings: dict,
    *,
    model_options: dict | None = None,
    ingress_options: dict | None = None,
):
    """The application, with optional Serve options per deployment (Python callers;
    ``serve/config.yaml`` sets them in its ``deployments:`` list)."""
    load_settings(settings)  # a bad key fails here, naming it, before any replica starts
    models = ModelServer.options(**(model_options or {})).bind(settings)
    prototypes = Prototypes.bind(settings)
    return Ingress.options(**(ingress_options or {})).bind(models, prototypes, settings)


def build_app(args: dict):
    """``import_path: serve.app:build_app`` (``serve run`` / ``serve deploy``)."""
    return make_app(dict(args))
