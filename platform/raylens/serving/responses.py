"""The success bodies of the routes that are more than a pass-through. Pure: numpy only.

(``/v1/classify``'s labels: :func:`raylens.serving.labels.labels_body`.)
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import numpy as np

from raylens.rundir import METRIC
from raylens.serving.settings import ServeConfig, run_name


def models_body(cfg: ServeConfig) -> dict:
    """``/v1/models``: the configured models (each run by its name, never its location),
    the default, and whether other runs are served on demand (``runs_root``)."""
    return {
        "models": [
            {"id": m.id, "run": run_name(m.run) if m.run else None, "backbone": m.backbone or None}
            for m in cfg.models
        ],
        "default": cfg.default_id,
        "on_demand": bool(cfg.runs_root),
    }


def readiness(results: Sequence[tuple[str, str | None]]) -> tuple[dict, int]:
    """``/readyz`` from each model's ``(id, why it did not load or None)``: the body, and
    200 when every model loaded, else 503."""
    failed = {m: e for m, e in results if e}
    body = {"ready": not failed, "models": {m: e or "loaded" for m, e in results}}
    return body, 503 if failed else 200


def embed_body(model_id: str, desc: dict, embedding: np.ndarray, normalize: bool) -> dict:
    """``/v1/embed``: the embedding (``[D]``, L2-normalized when asked; a metric run's
    always is), and what produced it: ``model_id``, an id such as ``fm@epoch=7``
    (:attr:`raylens.serving.models.ServedModel.model_id`; ``desc`` is the model's
    ``describe()``), never a path."""
    e = embedding
    if normalize:
        e = e / max(float(np.linalg.norm(e)), 1e-12)
    return {
        "model": model_id,
        "model_id": desc["model_id"],
        "dim": int(e.shape[0]),
        "normalized": normalize or desc["kind"] == METRIC,
        "embedding": e.astype(np.float32).tolist(),
    }


def embeddings_body(model_id: str, embeddings: Sequence[np.ndarray], encoding: str) -> dict:
    """``/v1/embeddings`` (OpenAI's shape): one row per input, as floats or as base64 of
    little-endian float32 (``encoding``: ``float`` or ``base64``)."""
    rows = []
    for i, emb in enumerate(embeddings):
        e = emb.astype("<f4")
        value = base64.b64encode(e.tobytes()).decode() if encoding == "base64" else e.tolist()
        rows.append({"object": "embedding", "index": i, "embedding": value})
    return {
        "object": "list",
        "data": rows,
        "model": model_id,
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }
