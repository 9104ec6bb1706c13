"""Frozen-backbone feature cache for metric learning (Ray Data batch inference).

For a dataset and a list of frozen backbones, each backbone's pooled features of every
image are computed once by the embed job (:mod:`raylens.infer.embed`: actor pool, each
backbone at its own input size and normalization) and kept on storage::

    <metric.cache>/<backbone slug>-<key>/part-NNNNN.parquet + _manifest.json

``key`` hashes everything the features depend on: the dataset's fingerprint (its
version), the backbone (name, or a run dir's checkpoint with its files' sizes and state,
or a weights file with its size; the init seed for a randomly initialized one), the
preprocessing (size, crop, interpolation, mean, std), the autocast mode and the cache
format. A cache dir is used only when its manifest (written last, atomically) records the
same key and every image; anything that changes the features gives another key, so it is
recomputed, never silently reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from raylens.infer.embed import EmbedPlan, load_manifest, plan_embed, run_embed
from raylens.models.backbones import parse_backbone_spec
from raylens.schema import RunConfig
from raylens.storage import Storage, join

CACHE_FORMAT = "raylens.features/1"


def _say(message: str) -> None:
    sys.stdout.write(f"[features] {message}\n")
    sys.stdout.flush()


@dataclass
class CacheEntry:
    backbone: str  # the metric.backbones entry
    uri: str  # the cache dir
    key: str
    dim: int
    plan: EmbedPlan
    identity: dict[str, Any]
    hit: bool = False


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec.rstrip("/")).strip("_")[-48:] or "backbone"


def _file_identity(storage: Storage, uri: str) -> list[list]:
    """[[relative path, size, mtime ns], ...] of the files under ``uri`` (a file or a dir):
    a rewritten weights file or checkpoint changes it even at the same size."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    elif info.type == pafs.FileType.File:
        infos = [info]
    else:
        raise FileNotFoundError(f"no weights at {uri!r}")
    root = path.rstrip("/")
    return sorted(
        [i.path[len(root) :].lstrip("/"), i.size, i.mtime_ns]
        for i in infos
        if i.type == pafs.FileType.File
    )


def model_identity(plan: EmbedPlan, storage: Storage) -> dict[str, Any]:
    """What identifies the backbone's weights (no weights are read)."""
    m = plan.model
    ident: dict[str, Any] = {"model": m.model_id, "kind": m.kind, "dim": m.dim}
    if m.kind == "run":
        ident["files"] = _file_identity(storage, str(m.checkpoint))
        state = join(str(m.checkpoint), "state.json")
        if storage.exists(state):
            ident["state_sha1"] = hashlib.sha1(storage.read_bytes(state)).hexdigest()
    elif m.model.weights:
        ident["files"] = _file_identity(storage, m.model.weights)
    elif not m.model.pretrained:
        ident["init_seed"] = m.seed  # random init: the seed decides the weights
    return ident


def cache_key(plan: EmbedPlan, storage: Storage) -> tuple[str, dict[str, Any]]:
    ident = {
        "format": CACHE_FORMAT,
        "dataset_fingerprint": plan.fingerprint,
        "splits": sorted(plan.splits),
        "model": model_identity(plan, storage),
        "transform": {
            "image_size": plan.model.data.image_size,
            "eval_crop_pct": plan.model.data.eval_crop_pct,
            "interpolation": plan.model.data.interpolation,
            "mean": list(plan.model.data.mean),
            "std": list(plan.model.data.std),
        },
        "amp": plan.cfg.embed.amp,
    }
    text = json.dumps(ident, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16], ident


def plan_cache(cfg: RunConfig, storage: Storage | None = None) -> list[CacheEntry]:
    """One entry per ``metric.backbones`` item: checks the backbone (no weights read), the
    dataset, and whether a valid cache exists. Raises naming the bad backbone."""
    storage = storage or Storage(cfg.storage)
    m = cfg.metric
    if not m.backbones:
        raise ValueError("config key 'metric.backbones': expected at least one frozen backbone")
    entries = []
    for spec in m.backbones:
        name, weights = parse_backbone_spec(spec)
        embed = dataclasses.replace(
            cfg.embed,
            model=name,
            checkpoint=None,
            output=join(m.cache, "_planning"),
            normalize=False,
            include_logits=False,
            splits=[],
            image_size=m.image_size,
            batch_size=m.cache_batch_size,
            concurrency=m.cache_concurrency,
            num_cpus=m.cache_num_cpus,
            num_gpus=m.cache_num_gpus,
        )
        model = dataclasses.replace(cfg.model, backbone=name, weights=weights)
        ecfg = dataclasses.replace(cfg, embed=embed, model=model)
        try:
            plan = plan_embed(ecfg, storage)
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"config key 'metric.backbones': {spec!r}: {err}") from None
        key, ident = cache_key(plan, storage)
        plan.output = join(plan.output.rsplit("/", 1)[0], f"{_slug(name)}-{key}")
        entry = CacheEntry(spec, plan.output, key, plan.model.dim, plan, ident)
        manifest = load_manifest(storage, plan.output)
        entry.hit = bool(
            manifest
            and manifest.get("cache_key") == key
            and manifest.get("rows", -1) + len(manifest.get("dropped", [])) == plan.input_rows
        )
        entries.append(entry)
    return entries


def ensure_cache(cfg: RunConfig, storage: Storage | None = None) -> list[CacheEntry]:
    """Computes the missing caches (Ray must be initialized); returns every entry."""
    storage = storage or Storage(cfg.storage)
    entries = plan_cache(cfg, storage)
    for e in entries:
        if e.hit:
            _say(f"{e.backbone}: cached features reused ({e.uri}, key {e.key})")
            continue
        _say(f"{e.backbone}: no valid cache for key {e.key}; computing {e.uri}")
        run_embed(e.plan, storage, extra={"cache_key": e.key, "cache_identity": e.identity})
    return entries


@dataclass
class FeatureTable:
    """Every cached image's features, aligned by id across backbones."""

    ids: np.ndarray  # (n,) str
    split: np.ndarray  # (n,) str
    label: np.ndarray  # (n,) int
    blocks: list[np.ndarray]  # per backbone (n, dim_b) float32
    classes: list[str]
    backbones: list[str]

    @property
    def dims(self) -> list[int]:
        return [b.shape[1] for b in self.blocks]


def load_features(entries: list[CacheEntry], storage: Storage) -> FeatureTable:
    """Reads the caches and aligns them by id; fails naming a backbone whose cache
    disagrees (other images, a different embedding size than its manifest)."""
    base: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    blocks = []
    classes: list[str] = []
    for e in entries:
        manifest = load_manifest(storage, e.uri) or {}
        if manifest.get("cache_key") != e.key:
            raise FileNotFoundError(f"feature cache {e.uri!r} of {e.backbone!r} is missing")
        if manifest.get("multi_label"):
            raise ValueError("metric learning needs a single-label dataset")
        fs, path = storage.resolve(e.uri)
        table = pq.read_table(
            path, filesystem=fs, columns=["id", "split", "label", "embedding"]
        ).sort_by("id")
        emb = table.column("embedding").combine_chunks()
        dim = emb.type.list_size
        if dim != e.dim or manifest.get("dim") != e.dim:
            raise ValueError(
                f"feature cache of {e.backbone!r} has embedding size {dim}, expected {e.dim} "
                f"(the backbone's num_features); delete {e.uri!r} to recompute it"
            )
        x = emb.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
        ids = np.asarray(table.column("id").to_pylist(), dtype=object)
        if base is None:
            base = (
                ids,
                np.asarray(table.column("split").to_pylist(), dtype=object),
                table.column("label").to_numpy(),
            )
            classes = list(manifest.get("dataset_classes", []))
        elif len(ids) != len(base[0]) or not np.array_equal(ids, base[0]):
            raise ValueError(
                f"feature caches disagree: {entries[0].backbone!r} has {len(base[0])} images, "
                f"{e.backbone!r} has {len(ids)} (or other ids); they must cover the same images"
            )
        blocks.append(x)
    assert base is not None
    return FeatureTable(
        base[0], base[1], base[2].astype(np.int64), blocks, classes, [e.backbone for e in entries]
    )
