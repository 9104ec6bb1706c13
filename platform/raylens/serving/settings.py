"""The Serve application's settings: the ``args`` of ``serve/config.yaml``, checked strictly.

An unknown or mistyped key is an error naming it (and the nearest valid key), before any
replica starts. Replica counts, autoscaling, CPUs/GPUs per replica and queue limits are
Serve's own per-deployment options (the ``deployments:`` list of ``serve/config.yaml``);
these settings are what Serve cannot express: which runs to serve, batching, input limits.
Pure: no Ray.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from raylens import config as C
from raylens.config import ConfigError, opt
from raylens.schema import StorageConfig
from raylens.serving.errors import ModelNotFound
from raylens.storage import join

FETCHED_SCHEMES = ("s3", "gs", "file")  # the URI schemes a server may fetch images from
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class ModelEntry:
    id: str = opt("", "Model id clients use (the `model` field or serve_multiplexed_model_id).")
    run: str = opt("", "Run dir (local, s3://, gs://): a fine-tuned classifier or a metric run.")
    backbone: str = opt("", "Instead of a run: a bare backbone (embeddings only), e.g. vgg_s32.")
    checkpoint: str | None = opt(None, "Run dirs: checkpoint dir; default: the best one.")


@dataclass
class BatchingConfig:
    enabled: bool = opt(
        True,
        "Dynamic batching (@serve.batch) while other images are in flight on the replica (one "
        "alone runs at once); false: one forward per request.",
    )
    max_batch_size: int = opt(32, "Most images in one model forward.")
    batch_wait_timeout_s: float = opt(0.005, "Longest wait for a batch to fill.")


@dataclass
class LimitsConfig:
    max_request_bytes: int = opt(16 * 2**20, "Largest request body accepted (413 above).")
    max_image_pixels: int = opt(
        40_000_000, "Decompression-bomb guard: width x height above this is refused (413)."
    )
    max_images: int = opt(64, "Most images in one request (/v1/enroll, /v1/embeddings).")
    max_inflight: int = opt(
        256, "Requests one ingress replica works on at once; above: 429 with Retry-After."
    )
    retry_after_s: int = opt(1, "Retry-After seconds sent with 429 and 503.")
    request_timeout_s: float = opt(60.0, "A model call slower than this answers 504.")


@dataclass
class ServeConfig:
    models: list[ModelEntry] = opt([], "Models served (at least one, unless runs_root is set).")
    default_model: str | None = opt(None, "Model used when a request names none; default: first.")
    runs_root: str | None = opt(
        None, "Also serve any run dir <runs_root>/<id> on demand (ids: letters, digits, ._-)."
    )
    storage: StorageConfig = opt(StorageConfig, "Endpoints and credentials for run dirs and URIs.")
    allowed_uri_prefixes: list[str] = opt(
        [], "Image URIs the server may fetch ({'uri': ...}); empty: none (no fetching at all)."
    )
    api_key_env: str | None = opt(
        None, "Name of an env var holding the API key; set and non-empty: every /v1 route needs it."
    )
    top_k: int = opt(5, "Labels returned by /v1/classify (single-label and NCM).")
    max_models_per_replica: int = opt(4, "Models one replica keeps loaded (LRU eviction).")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "Model device; auto: cuda if assigned.")
    amp: Literal["off", "bf16", "fp16"] = opt("off", "Autocast for the forward; off: exact fp32.")
    batching: BatchingConfig = opt(BatchingConfig, "Dynamic batching of model forwards.")
    topology: Literal["auto", "one_hop", "split"] = opt(
        "auto",
        "one_hop: the model deployment is itself the HTTP ingress (one hop fewer); split: an "
        "Ingress deployment calls the model deployment through handles (model-aware routing "
        "of several models). auto: one_hop for exactly one model and no runs_root, else split.",
    )
    limits: LimitsConfig = opt(LimitsConfig, "Input safety and overload limits.")

    def validate(self) -> None:
        if not self.models and not self.runs_root:
            raise ConfigError("config key 'models': expected at least one model (or runs_root)")
        seen: set[str] = set()
        for i, m in enumerate(self.models):
            key = f"models[{i}]"
            if not MODEL_ID.match(m.id):
                raise ConfigError(
                    f"config key '{key}.id': {m.id!r} is not a model id "
                    "(1-128 letters, digits, '.', '_' or '-', starting with a letter or digit)"
                )
            if m.id in seen:
                raise ConfigError(f"config key '{key}.id': {m.id!r} is listed twice")
            seen.add(m.id)
            if bool(m.run) == bool(m.backbone):
                raise ConfigError(f"config key '{key}': set exactly one of 'run' or 'backbone'")
        if self.default_model is not None and self.default_model not in seen:
            raise ConfigError(
                f"config key 'default_model': {self.default_model!r} is not one of the "
                f"models {sorted(seen)}"
            )
        for p in self.allowed_uri_prefixes:
            if "://" not in p or p.endswith("://"):
                raise ConfigError(
                    f"config key 'allowed_uri_prefixes': {p!r} is not a URI prefix such as "
                    "s3://bucket/images/ or gs://bucket/prefix/"
                )
            scheme = p.split("://", 1)[0].lower()
            if scheme in ("http", "https"):
                raise ConfigError(
                    f"config key 'allowed_uri_prefixes': {p!r}: http(s) URLs are never "
                    "fetched (server-side request forgery); use s3://, gs:// or file://"
                )
            if scheme not in FETCHED_SCHEMES:
                raise ConfigError(
                    f"config key 'allowed_uri_prefixes': {p!r}: scheme {scheme!r} is never "
                    f"fetched; expected one of {', '.join(f'{s}://' for s in FETCHED_SCHEMES)}"
                )
        b, lim = self.batching, self.limits
        for key, value in (
            ("batching.max_batch_size", b.max_batch_size),
            ("limits.max_request_bytes", lim.max_request_bytes),
            ("limits.max_image_pixels", lim.max_image_pixels),
            ("limits.max_images", lim.max_images),
            ("limits.max_inflight", lim.max_inflight),
            ("top_k", self.top_k),
            ("max_models_per_replica", self.max_models_per_replica),
        ):
            if value < 1:
                raise ConfigError(f"config key '{key}': expected >= 1, got {value}")
        if b.batch_wait_timeout_s < 0:
            raise ConfigError("config key 'batching.batch_wait_timeout_s': expected >= 0")

    @property
    def default_id(self) -> str | None:
        if self.default_model:
            return self.default_model
        return self.models[0].id if self.models else None

    @property
    def one_hop(self) -> bool:
        """Whether the model deployment is the ingress (:attr:`topology`, ``auto`` resolved).
        Split keeps Serve's model-aware routing: a request naming one of several models (or
        any run under ``runs_root``) goes to a replica that has it loaded."""
        if self.topology == "auto":
            return len(self.models) == 1 and not self.runs_root
        return self.topology == "one_hop"

    @property
    def ids(self) -> list[str]:
        """The configured model ids, in order (runs under ``runs_root`` aside)."""
        return [m.id for m in self.models]

    def entry(self, model_id: str) -> ModelEntry:
        """The model ``model_id``: a configured one, else the run dir
        ``<runs_root>/<model_id>`` when ``runs_root`` is set (its existence is the loader's
        question). Raises :class:`ModelNotFound`."""
        for m in self.models:
            if m.id == model_id:
                return m
        if self.runs_root and MODEL_ID.match(model_id):
            return ModelEntry(id=model_id, run=join(self.runs_root, model_id))
        raise ModelNotFound(model_id)


def run_name(location: str) -> str:
    """A run dir's or checkpoint's name (its last part: ``runs/fm`` -> ``fm``), for a
    message or an id that must not show where it lies."""
    return location.rstrip("/").rsplit("/", 1)[-1] or location


def load_settings(args: Mapping[str, Any] | None) -> ServeConfig:
    """``serve/config.yaml``'s application ``args`` → a validated :class:`ServeConfig`."""
    cfg = C.merge(ServeConfig(), dict(args or {}))
    cfg.validate()
    return cfg
