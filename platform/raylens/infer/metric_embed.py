"""``jobs.embed`` for a metric-learning run: its fusion model over its frozen backbones'
cached features of any prepared dataset, written as the embed job's Parquet output.

    plan = plan_metric_embed(cfg, storage)    # checks the run, backbones, output; no Ray
    manifest = run_metric_embed(plan, storage)
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raylens.checkpoint import load_checkpoint
from raylens.infer.embed import FORMAT, STAGING_PREFIX, WRITER, commit
from raylens.infer.features import ensure_cache, load_features, plan_cache
from raylens.models.fusion import embed_all, l2_concat
from raylens.predict import is_run_dir_spec
from raylens.rundir import METRIC, RunDir, local_path
from raylens.schema import RunConfig
from raylens.storage import Storage, join
from raylens.tasks.metric import build_fusion


def is_metric_run(spec: str, storage: Storage) -> bool:
    """A run dir written by metric learning (:mod:`raylens.train.metric`)."""
    if not spec or not is_run_dir_spec(spec):
        return False
    return RunDir(spec, storage).kind() == METRIC


@dataclasses.dataclass
class MetricEmbedPlan:
    cfg: RunConfig  # the run's config over the dataset to embed (its backbones and cache)
    run: str
    checkpoint: str
    output: str
    splits: list[str]
    entries: list


def plan_metric_embed(cfg: RunConfig, storage: Storage) -> MetricEmbedPlan:
    """``jobs.embed`` with a metric run as ``embed.model``: checks the run, its backbones
    over ``data.dataset`` and the output (no Ray work). The embedding is the run's fusion
    model over its frozen backbones' cached features of that dataset."""
    e = cfg.embed
    e.validate()
    if not e.output:
        raise ValueError("config key 'embed.output' is required: where to write the Parquet")
    if e.include_logits:
        raise ValueError(
            f"config key 'embed.include_logits': {e.model!r} is a metric-learning run "
            "(an embedding, no classifier head); set embed.include_logits=false"
        )
    rd = RunDir(e.model, storage)
    run = rd.uri
    rcfg = rd.config()
    ck = rd.checkpoint(e.checkpoint, hint="set embed.checkpoint=checkpoints/epoch=N")
    dataset = cfg.data.dataset
    if not dataset:
        raise ValueError("config key 'data.dataset' is required: the images to embed")
    output = local_path(e.output)
    ds = local_path(dataset)
    if output in (ds, run) or output.startswith(ds.rstrip("/") + "/"):
        raise ValueError(
            f"config key 'embed.output': {output!r} is (inside) the dataset or the run dir; "
            "write embeddings to a directory of their own"
        )
    over = dataclasses.replace(
        rcfg,
        data=dataclasses.replace(rcfg.data, dataset=dataset),
        storage=cfg.storage,
        source=cfg.source,
        prepare=cfg.prepare,
        ray=cfg.ray,
    )
    entries = plan_cache(over, storage)
    wanted = list(e.splits) or ["train", "val", "test"]
    return MetricEmbedPlan(over, run, ck, output, wanted, entries)


def run_metric_embed(plan: MetricEmbedPlan, storage: Storage) -> dict[str, Any]:
    """Fills the run's feature cache for the dataset, applies the fusion model, writes the
    embed job's output (same columns as the cache: id, split, source, labels, metadata;
    ``embedding`` = the run's L2-normalized embedding) and commits it atomically."""
    t0 = time.time()
    entries = ensure_cache(plan.cfg, storage)
    table = load_features(entries, storage)
    x = l2_concat([torch.from_numpy(b) for b in table.blocks]).numpy()
    labels = RunDir(plan.run, storage).labels()
    model = build_fusion(plan.cfg, table.dims, len(labels["classes"]))
    if table.dims != labels.get("dims", table.dims):
        raise ValueError(
            f"feature sizes {table.dims} differ from the run's {labels['dims']}: "
            "its backbones changed since it was trained"
        )
    model.load_state_dict(load_checkpoint(storage, plan.checkpoint, with_optimizer=False)["model"])
    keep = np.isin(table.split, plan.splits)
    emb = embed_all(model, x[keep]).numpy()
    # every other column from the first backbone's cache, aligned by id
    fs, path = storage.resolve(entries[0].uri)
    base = pq.read_table(path, filesystem=fs).sort_by("id")
    base = base.filter(pa.array(keep))
    assert base.column("id").to_pylist() == list(table.ids[keep])
    col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])
    out = base.set_column(base.schema.get_field_index("embedding"), "embedding", col)
    run_id = uuid.uuid4().hex[:12]
    storage.write_text(join(plan.output, WRITER), json.dumps({"run": run_id}))
    with tempfile.TemporaryDirectory() as tmp:
        local = f"{tmp}/part.parquet"
        pq.write_table(out, local)
        staging = join(plan.output, f"{STAGING_PREFIX}{run_id}")
        staged = join(staging, "part.parquet")
        with open(local, "rb") as f:
            storage.write_bytes(staged, f.read())
    counts = {s: int((table.split[keep] == s).sum()) for s in plan.splits}
    manifest = {
        "format": FORMAT,
        "rows": out.num_rows,
        "rows_per_split": {s: c for s, c in counts.items() if c},
        "dropped": [],
        "model": plan.checkpoint,
        "model_kind": "metric_run",
        "backbones": table.backbones,
        "dim": int(emb.shape[1]),
        "normalize": True,
        "logits": False,
        "classes": labels["classes"],
        "dataset": plan.cfg.data.dataset,
        "dataset_classes": table.classes,
        "splits": plan.splits,
        "feature_caches": [e.uri for e in entries],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - t0, 2),
    }
    try:
        return commit(storage, plan.output, [staged], manifest, writer=run_id)
    finally:
        storage.delete_tree(staging)
