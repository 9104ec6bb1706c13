"""raylens on Ray Serve: classification, embedding and class-enrolment HTTP endpoints.

    serve run serve/config.yaml          # local Ray, http://127.0.0.1:8000/docs
    serve deploy serve/config.yaml       # a running cluster (see README)

The routes (:class:`Routes`, FastAPI; OpenAPI page at ``/docs``) check every input, answer a
bad one with a 4xx JSON ``{"error", "detail"}`` and overload with 429/503 + Retry-After, and
delegate to :mod:`raylens.serving` (plain, unit-tested Python: auth, throttle, bodies,
fields, calls, labels, responses, openapi). Two topologies (setting ``topology``), the same
routes, bodies and errors:

- one-hop (one model, no ``runs_root``): ``ModelServer`` is itself the HTTP ingress; the
  HTTP proxy hands a request to the replica that decodes the image (in a thread, at reduced
  scale for large JPEGs) and runs the model (``@serve.batch``).
- split (several models, or ``runs_root``): ``Ingress`` calls ``ModelServer`` through
  deployment handles with the request's model id, so Serve's model multiplexing routes it
  to a replica that has that model loaded (LRU eviction).

``ModelServer`` batches the images of one model into one forward through the run's eval
transform; ``Prototypes`` is one replica owning every metric run's Nearest-Class-Mean
prototypes, so an enrolled class is seen by every model replica at once and survives
restarts.

The application ``args`` are :class:`raylens.serving.settings.ServeConfig`; replicas,
autoscaling, CPUs/GPUs and queue limits are each deployment's Serve options.
"""

import asyncio
import logging
import time

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from raylens.serving import fields, handling, labels, openapi, responses
from raylens.serving.api import make_api
from raylens.serving.auth import api_key
from raylens.serving.bodies import BodyReader
from raylens.serving.calls import ModelCalls, failure
from raylens.serving.errors import ModelLoadError, ModelNotFound, RequestError
from raylens.serving.loading import load_model
from raylens.serving.models import ServedModel
from raylens.serving.prototypes import PrototypeStore, require_metric
from raylens.serving.settings import load_settings
from raylens.serving.throttle import Throttle
from raylens.storage import Storage

log = logging.getLogger("ray.serve")
V1 = "/v1"  # the API version prefix
IMAGE = openapi.IMAGE_BODY


def _threads() -> int:
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:
        cpus = 1.0
    return max(1, int(cpus))


class ModelCore:
    """Loaded models (multiplexed by model id, LRU) and their batched forward: the model
    deployment's work in either topology."""

    def _init_models(self, settings: dict) -> None:
        import torch

        self.cfg = load_settings(settings)
        self.storage = Storage(self.cfg.storage)
        gpu = torch.cuda.is_available() and self.cfg.device != "cpu"
        self.device = "cuda" if gpu else "cpu"
        if not gpu:
            torch.set_num_threads(_threads())

        async def load(model_id: str) -> ServedModel:  # a function: Serve caches on it
            return await self._load(model_id)

        self._inflight = 0  # images between _infer's start and end on this replica
        per_replica = self.cfg.max_models_per_replica
        self._model = serve.multiplexed(max_num_models_per_replica=per_replica)(load)
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
        t0 = time.perf_counter()
        try:
            model = await asyncio.to_thread(
                load_model, self.cfg, self.storage, model_id, device=self.device
            )
        except (ModelNotFound, ModelLoadError) as err:
            result = "not_found" if isinstance(err, ModelNotFound) else "error"
            self.loads.inc(tags={"model": model_id, "result": result})
            raise
        self.loads.inc(tags={"model": model_id, "result": "ok"})
        log.info("loaded %s (%s) in %.2fs", model_id, model.kind, time.perf_counter() - t0)
        return model

    async def _describe(self, model_id: str) -> dict:
        return (await self._model(model_id)).describe()

    async def _infer(self, model_id: str, image: bytes) -> dict:
        """One image of model ``model_id`` → ``{"embedding", "probs", "error"}``. The image
        decodes in a worker thread (the event loop keeps serving; decodes of concurrent
        requests overlap), then joins a batch of the model's forward."""
        self._inflight += 1
        try:
            model = await self._model(model_id)
            pixels = await asyncio.to_thread(model.preprocess, image)
            if isinstance(pixels, str):
                return {"embedding": None, "probs": None, "error": pixels}
            # A request alone on the replica runs at once: waiting batch_wait_timeout_s for
            # company that is not coming would only add to its latency.
            if self.cfg.batching.enabled and self._inflight > 1:
                return await self._batched(pixels, model_id)
            self.batch_sizes.observe(1, tags={"model": model.id})
            return (await asyncio.to_thread(self._outputs, model, [pixels]))[0]
        finally:
            self._inflight -= 1

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _batched(self, pixels: list, model_ids: list[str]) -> list[dict]:
        # one forward per model in the batch (the split topology's batches hold one model:
        # Serve splits them by multiplexed model id)
        outs: list[dict] = [{}] * len(pixels)
        for mid in dict.fromkeys(model_ids):
            rows = [i for i, m in enumerate(model_ids) if m == mid]
            model = await self._model(mid)
            self.batch_sizes.observe(len(rows), tags={"model": model.id})
            got = await asyncio.to_thread(self._outputs, model, [pixels[i] for i in rows])
            for i, out in zip(rows, got, strict=True):
                outs[i] = out
        return outs

    @staticmethod
    def _outputs(model: ServedModel, pixels: list) -> list[dict]:
        outs = model.forward(pixels)
        return [{"embedding": o.embedding, "probs": o.probs, "error": o.error} for o in outs]

    def check_health(self) -> None:
        if not self.cfg.models and not self.cfg.runs_root:
            raise RuntimeError("no models configured")


MODEL_OPTIONS = {  # the model deployment's Serve options, in either topology
    "name": "ModelServer",
    "ray_actor_options": {"num_cpus": 1},
    "max_ongoing_requests": 64,
    "max_queued_requests": 512,
    "health_check_period_s": 10,
}


@serve.deployment(**MODEL_OPTIONS)
class ModelServer(ModelCore):
    """The split topology's model deployment, called through handles by ``Ingress``."""

    def __init__(self, settings: dict):
        self._init_models(settings)

    async def describe(self) -> dict:
        return await self._describe(serve.get_multiplexed_model_id())

    async def infer(self, image: bytes) -> dict:
        """One image of the request's model → ``{"embedding", "probs", "error"}``."""
        return await self._infer(serve.get_multiplexed_model_id(), image)


@serve.deployment(name="Prototypes", num_replicas=1, ray_actor_options={"num_cpus": 0})
class Prototypes:
    """Every metric run's NCM prototypes; enrolment persists to the run dir."""

    def __init__(self, settings: dict):
        self.storage = Storage(load_settings(settings).storage)
        self.stores: dict[str, PrototypeStore] = {}

    def _store(self, model: dict) -> PrototypeStore:
        """The prototypes of ``model`` (a metric run's ``describe()``)."""
        mid, run, dim = model["id"], model["run"], model["dim"]
        store = self.stores.get(mid)
        if store is None or store.run != run or store.dim != dim:
            store = self.stores[mid] = PrototypeStore(self.storage, run, dim).load()
        return store

    def similarities(self, model: dict, embedding: np.ndarray) -> tuple[list[str], np.ndarray]:
        """The class names, and the cosine similarity of ``embedding [D]`` to each."""
        store = self._store(model)
        return list(store.names), store.similarities(embedding[None])[0]

    def enroll(self, model: dict, name: str, embeddings: np.ndarray, replace: bool) -> dict:
        return self._store(model).enroll(name, embeddings, replace=replace)

    def delete(self, model: dict, name: str) -> bool:
        return self._store(model).delete(name)

    def classes(self, model: dict) -> dict:
        store = self._store(model)
        return {"classes": store.list(), "source": store.origin}


class Routes:
    """The HTTP routes, in either topology: the deployment class sets ``cfg``, ``models``
    (:class:`~raylens.serving.calls.ModelCalls`) and ``prototypes`` (the ``Prototypes``
    handle) through :meth:`_init_routes`; Serve builds the FastAPI app per replica
    (:meth:`__serve_build_asgi_app__`, ``@serve.ingress()`` without an app)."""

    def _init_routes(self, cfg, models: ModelCalls, prototypes: DeploymentHandle) -> None:
        self.cfg, self.models, self.prototypes = cfg, models, prototypes
        lim = cfg.limits
        self.bodies = BodyReader(cfg, Storage(cfg.storage))
        self.throttle = Throttle(lim.max_inflight, lim.retry_after_s)
        metrics = serve.metrics
        self.requests = metrics.Counter(
            "raylens_requests",
            description="HTTP requests by route and status.",
            tag_keys=("route", "status"),
        )
        self.rejects = metrics.Counter(
            "raylens_rejects",
            description="Refused requests by reason.",
            tag_keys=("route", "error"),
        )
        self.latency = metrics.Histogram(
            "raylens_request_latency_ms",
            description="Request latency in the ingress.",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000],
            tag_keys=("route",),
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The FastAPI app of this replica: every route calls this object's method. (Built
        here, not with ``@serve.ingress(api)`` on each class: one route table for both
        topologies' classes.)"""
        api = make_api()

        def guarded(route: str, work):
            """A ``/v1`` route: the API key, the in-flight limit, and its dict (or any
            refusal or failure, in the one error shape) as the JSON answer."""
            return lambda request, **params: self._handle(
                route, request, lambda: work(request, **params)
            )

        models_route = guarded("models", self.list_models)
        classify_route = guarded("classify", self.classify)
        embed_route = guarded("embed", self.embed)
        embeddings_route = guarded("embeddings", self.embeddings)
        enroll_route = guarded("enroll", self.enroll)
        classes_route = guarded("classes", self.classes)
        delete_route = guarded("delete_class", self.delete_class)

        @api.get("/healthz", summary="Liveness: the ingress answers")
        async def healthz() -> dict:
            return {"status": "ok"}

        @api.get("/readyz", summary="Readiness: every configured model is loaded")
        async def readyz() -> JSONResponse:
            return await self.readyz()

        @api.get(f"{V1}/models", summary="The models this server serves")
        async def list_models(request: Request):
            return await models_route(request)

        @api.post(f"{V1}/classify", summary="Top-k labels of one image", openapi_extra=IMAGE)
        async def classify(request: Request):
            return await classify_route(request)

        @api.post(f"{V1}/embed", summary="Embedding of one image", openapi_extra=IMAGE)
        async def embed(request: Request):
            return await embed_route(request)

        @api.post(
            f"{V1}/embeddings",
            summary="OpenAI-style embeddings of images",
            openapi_extra=openapi.EMBEDDINGS_BODY,
        )
        async def embeddings(request: Request):
            return await embeddings_route(request)

        @api.post(
            f"{V1}/enroll",
            summary="Add or update a class from a few images (metric runs)",
            openapi_extra=openapi.ENROLL_BODY,
        )
        async def enroll(request: Request):
            return await enroll_route(request)

        @api.get(f"{V1}/classes", summary="Classes of a metric run's prototypes")
        async def classes(request: Request):
            return await classes_route(request)

        @api.delete(f"{V1}/classes/{{name}}", summary="Remove a class's prototype")
        async def delete_class(name: str, request: Request):
            return await delete_route(request, name=name)

        return api

    async def _handle(self, route: str, request: Request, work) -> JSONResponse:
        t0, key = time.perf_counter(), api_key(self.cfg.api_key_env)
        a = await handling.handle(
            work, headers=request.headers, key=key, throttle=self.throttle, route=route
        )
        if a.refused:
            self.rejects.inc(tags={"route": route, "error": a.refused})
        self.requests.inc(tags={"route": route, "status": str(a.status)})
        self.latency.observe((time.perf_counter() - t0) * 1000, tags={"route": route})
        return JSONResponse(a.body, status_code=a.status, headers=a.headers)

    def _model_id(self, request: Request, given: dict) -> str:
        return fields.model_id(self.cfg, request.headers.get(fields.MODEL_HEADER), given)

    async def _single(self, request: Request) -> tuple[dict, str, bytes]:
        """A one-image request: its fields, its model id and the image."""
        given, image = await self.bodies.single(request)
        return given, self._model_id(request, given), image

    async def _run(self, mid: str, image: bytes) -> tuple[dict, dict]:
        """The model's description, and its result on the image."""
        desc = await self.models.describe(mid)
        (out,) = await self.models.infer(mid, [(image, "image")])
        return desc, out

    async def _metric_model(self, mid: str) -> dict:
        desc = await self.models.describe(mid)
        require_metric(mid, desc["kind"])
        return desc

    async def readyz(self) -> JSONResponse:
        # asks a model replica every time (which loads the model if it must)
        why = await asyncio.gather(
            *(failure(self.models.describe(m, fresh=True)) for m in self.cfg.ids)
        )
        body, status = responses.readiness(list(zip(self.cfg.ids, why, strict=True)))
        return JSONResponse(body, status_code=status)

    async def list_models(self, request: Request) -> dict:
        return responses.models_body(self.cfg)

    async def classify(self, request: Request) -> dict:
        given, mid, image = await self._single(request)
        k = fields.int_field(given, "top_k", self.cfg.top_k, 1, 1000)
        desc, out = await self._run(mid, image)
        kind = desc["kind"]
        labels.require_labels(mid, kind)
        if kind == labels.METRIC:  # scores: cosine similarities to the class prototypes
            names, scores = await self.prototypes.similarities.remote(desc, out["embedding"])
        else:
            names, scores = desc["classes"], out["probs"]
        threshold = desc.get("threshold", 0.5)
        got = labels.labels_body(scores, kind=kind, classes=names, k=k, threshold=threshold)
        return {"model": mid, "kind": kind, **got}

    async def embed(self, request: Request) -> dict:
        given, mid, image = await self._single(request)
        normalize = fields.bool_field(given, "normalize")
        desc, out = await self._run(mid, image)
        return responses.embed_body(mid, desc, out["embedding"], normalize)

    async def embeddings(self, request: Request) -> dict:
        data = await self.bodies.json(request)
        mid = self._model_id(request, data)
        items = fields.embeddings_input(data.get("input"), self.cfg.limits.max_images)
        encoding = fields.encoding_format(data)
        outs = await self.models.infer(mid, await self.bodies.resolve_all(items, "input"))
        return responses.embeddings_body(mid, [o["embedding"] for o in outs], encoding)

    async def enroll(self, request: Request) -> dict:
        given, named = await self.bodies.several(request, "images")
        name = fields.class_name(given)
        if not named:
            raise RequestError(422, "invalid_field", "images: at least one image needed")
        replace = fields.bool_field(given, "replace")
        mid = self._model_id(request, given)
        desc = await self._metric_model(mid)
        emb = np.stack([o["embedding"] for o in await self.models.infer(mid, named)])
        info = await self.prototypes.enroll.remote(desc, name, emb, replace)
        return {"model": mid, **info, "images": len(named)}

    async def classes(self, request: Request) -> dict:
        mid = self._model_id(request, dict(request.query_params))
        desc = await self.models.describe(mid)
        if desc["kind"] != labels.METRIC:
            return {"model": mid, "kind": desc["kind"], "classes": desc["classes"]}
        got = await self.prototypes.classes.remote(desc)
        return {"model": mid, "kind": labels.METRIC, **got}

    async def delete_class(self, request: Request, name: str) -> dict:
        mid = self._model_id(request, dict(request.query_params))
        desc = await self._metric_model(mid)
        if not await self.prototypes.delete.remote(desc, name):
            raise RequestError(404, "unknown_class", f"model {mid!r} has no class {name!r}")
        return {"model": mid, "deleted": name}


@serve.deployment(
    name="Ingress",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=512,
    max_queued_requests=1024,
)
@serve.ingress()
class Ingress(Routes):
    """The split topology's HTTP ingress: model calls go through ``ModelServer``'s handle."""

    def __init__(self, models: DeploymentHandle, prototypes: DeploymentHandle, settings: dict):
        cfg = load_settings(settings)
        calls = ModelCalls(
            lambda mid: models.options(multiplexed_model_id=mid),
            cfg.limits,
            queue_full=(BackPressureError,),
            replica_lost=(ray.exceptions.RayActorError, DeploymentUnavailableError),
        )
        self._init_routes(cfg, calls, prototypes)


@serve.deployment(**MODEL_OPTIONS)
@serve.ingress()
class OneHopModelServer(ModelCore, Routes):
    """The one-hop topology: the model deployment is the HTTP ingress (deployed under the
    name ``ModelServer``, so ``serve/config.yaml``'s options for it apply either way)."""

    def __init__(self, prototypes: DeploymentHandle, settings: dict):
        self._init_models(settings)
        calls = ModelCalls(None, self.cfg.limits, queue_full=(), replica_lost=(), send=self._send)
        self._init_routes(self.cfg, calls, prototypes)

    def _send(self, model_id: str, method: str, *args):
        # the same calls as the split topology's handle, to this replica's own model
        return self._describe(model_id) if method == "describe" else self._infer(model_id, *args)


def make_app(
    settings: dict,
    *,
    model_options: dict | None = None,
    ingress_options: dict | None = None,
):
    """The application, with optional Serve options per deployment (Python callers;
    ``serve/config.yaml`` sets them in its ``deployments:`` list). One-hop (settings
    ``topology``) deploys ``ModelServer`` as the ingress, with ``model_options`` only."""
    cfg = load_settings(settings)  # a bad key fails here, naming it, before any replica starts
    prototypes = Prototypes.bind(settings)
    if cfg.one_hop:  # no Ingress deployment: ingress_options are not used
        return OneHopModelServer.options(**(model_options or {})).bind(prototypes, settings)
    models = ModelServer.options(**(model_options or {})).bind(settings)
    return Ingress.options(**(ingress_options or {})).bind(models, prototypes, settings)


def build_app(args: dict):
    """``import_path: serve.app:build_app`` (``serve run`` / ``serve deploy``)."""
    return make_app(dict(args))
