"""Baseline (c) of benchmarks/serve_load.py: the same model in one FastAPI + uvicorn process.

No Ray, no batching: each request decodes its image and runs its own forward, with the same
preprocessing and response as the Serve app's ``POST /v1/classify`` (raw image bytes).

    RAYLENS_RUN=runs/fashion-mnist-vgg uvicorn benchmarks.plain_app:app --port 8100
"""

from __future__ import annotations

import os

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from raylens.serving.models import load_served_model
from raylens.serving.settings import ModelEntry
from raylens.storage import Storage

# RAYLENS_DEVICE=cuda: the model on the GPU (benchmarks/gpu.py)
MODEL = load_served_model(
    ModelEntry(id="plain", run=os.environ["RAYLENS_RUN"]),
    Storage(),
    device=os.environ.get("RAYLENS_DEVICE", "cpu"),
)
app = FastAPI()


@app.post("/v1/classify")
async def classify_raw(request: Request) -> JSONResponse:
    import anyio

    data = await request.body()
    (out,) = await anyio.to_thread.run_sync(MODEL.infer, [data])
    if out.error:
        return JSONResponse({"error": "not_an_image", "detail": out.error}, status_code=415)
    top = np.argsort(-out.probs, kind="stable")[:5]
    labels = [{"label": MODEL.classes[i], "score": round(float(out.probs[i]), 6)} for i in top]
    return JSONResponse({"model": "plain", "kind": MODEL.kind, "labels": labels})
