"""Batch inference with Ray Data: a dataset and a model → embeddings in Parquet.

    plan = plan_embed(cfg, storage)       # checks model, dataset, output; no Ray yet
    manifest = run_embed(plan, storage)   # the Ray Data job below, then the commit

One Ray Data graph over every selected split::

    read (prepared Parquet shards with all their columns; a raw folder/manifest: its listing)
      → decode + eval transform            uint8 pixels (as training's ingest); without GPUs
                                           fused into the model actors, else CPU tasks
      → model forward                      actor pool: embed.concurrency actors, each loads
                                           the model once (embed.num_cpus / num_gpus each)
      → write_parquet                      <output>/_staging-<run id>/
      → commit                             old _manifest.json removed, staged files moved to
                                           <output>/part-NNNNN.parquet, files of an earlier
                                           run deleted, _manifest.json written last

Output rows: ``id``, ``split``, ``source``, ``embedding`` (fixed_size_list<float32>[D]),
optional ``logits`` / ``probs`` (fixed_size_list<float32>[C]), ``label`` | ``labels``, then
every other input column (``width``, ``height``, ``mode``, metadata such as lat/lon) with
its Arrow type.

``pd.read_parquet(output)`` and ``pq.read_table(output)`` skip ``_``- and ``.``-prefixed
names, so the staging dir and the manifest are never read as data. The manifest is the
commit marker: a run that fails before the commit leaves the previous output as it was; a
crash during the commit (moves and deletes, seconds) leaves an output without a manifest,
which the next run repairs. Re-running replaces the output: one row per image, always.
Two runs on one output at once: the later one started (``_writer.json``) wins; the
earlier one commits nothing.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raylens.config import ConfigError
from raylens.data.prepare import CARD, fingerprint, infer_meta_schema, load_card, splits_for
from raylens.data.sources import SPLITS, label_space, open_source
from raylens.data.transforms import ImageTransform, decode_and_transform
from raylens.predict import ModelSource, Predictor, resolve_model
from raylens.rundir import RunDir, local_path
from raylens.runtime.ingest import read_shards, reading_context
from raylens.schema import EmbedConfig, RunConfig, SourceConfig, StorageConfig
from raylens.storage import Storage, join, split_uri

FORMAT = "raylens.embeddings/1"
MANIFEST = "_manifest.json"
WRITER = "_writer.json"  # the run writing this output now: a later run supersedes it
STAGING_PREFIX = "_staging-"
PIXELS = "_pixels"  # decoded uint8 [3, s, s] between the decode and model stages
FIRST = ("id", "split", "source")


class NotCommitted(RuntimeError):
    """The run's output was not committed (superseded by a later run, or inconsistent)."""


def _say(message: str) -> None:
    sys.stdout.write(f"[embed] {message}\n")
    sys.stdout.flush()


@dataclass
class EmbedPlan:
    """What :func:`run_embed` does, checked on the driver before any Ray work."""

    cfg: RunConfig
    model: ModelSource
    dataset: str
    output: str
    splits: list[str]
    classes: list[str]  # the dataset's classes (``label`` indexes these)
    multi_label: bool
    fingerprint: str
    input_rows: int
    shards: list[str] | None = None  # prepared input: Parquet files to read
    raw: pa.Table | None = None  # raw input: one row per image (no pixels unless IDX)


def _check_output(output: str, dataset: str, model: ModelSource, storage: Storage) -> None:
    """Refuses outputs whose stale-file cleanup could delete a dataset's or a run's files."""
    inside = output == dataset or output.startswith(dataset.rstrip("/") + "/")
    if inside or storage.exists(join(output, CARD)):
        raise ValueError(
            f"config key 'embed.output': {output!r} is (inside) a prepared dataset; "
            "write embeddings to a directory of their own"
        )
    if output == model.name or RunDir(output, storage).is_run():
        raise ValueError(
            f"config key 'embed.output': {output!r} is a run dir; write embeddings to a "
            "directory of their own"
        )


def plan_embed(cfg: RunConfig, storage: Storage | None = None) -> EmbedPlan:
    """Checks the config, the model (no weights read), the dataset and the output.

    Raises:
        ConfigError, ValueError, FileNotFoundError: naming the key or path at fault.
    """
    storage = storage or Storage(cfg.storage)
    e: EmbedConfig = cfg.embed
    e.validate()
    if not cfg.data.dataset:
        raise ValueError(
            "config key 'data.dataset' is required: a prepared dataset dir "
            "(or a raw folder / manifest)"
        )
    if not e.output:
        raise ValueError("config key 'embed.output' is required: where to write the Parquet")
    model = resolve_model(
        e.model,
        storage,
        model_cfg=cfg.model,
        checkpoint=e.checkpoint,
        image_size=e.image_size,
        seed=cfg.run.seed,
    )
    if e.include_logits and not model.is_classifier:
        raise ValueError(
            f"config key 'embed.include_logits': {e.model!r} is a bare backbone without a "
            "classifier head; give a run dir as embed.model, or set embed.include_logits=false"
        )
    dataset, output = local_path(cfg.data.dataset), local_path(e.output)
    _check_output(output, dataset, model, storage)
    wanted = list(e.splits) or list(SPLITS)
    plan = EmbedPlan(cfg, model, dataset, output, wanted, [], False, "", 0)
    card = load_card(storage, dataset)  # a damaged card is named
    if card is not None:
        plan.splits = [s for s in wanted if card["splits"][s]["count"]]
        plan.shards = [join(dataset, f) for s in plan.splits for f in card["splits"][s]["files"]]
        plan.classes, plan.multi_label = card["classes"], card["task"] == "multi_label"
        plan.fingerprint = card.get("fingerprint", "")
        plan.input_rows = sum(card["splits"][s]["count"] for s in plan.splits)
    else:
        _plan_raw(plan, storage)
    if not plan.input_rows:
        raise ValueError(f"dataset {cfg.data.dataset!r} has no images in split(s) {wanted}")
    return plan


def _plan_raw(plan: EmbedPlan, storage: Storage) -> None:
    """A raw folder / manifest read directly: splits as ``jobs.prepare`` would assign them."""
    cfg = plan.cfg
    src_cfg = SourceConfig(**{**cfg.source.__dict__, "uri": cfg.data.dataset})
    source = open_source(src_cfg, storage)
    records = sorted(source.records(), key=lambda r: r.id)
    classes, multi = label_space(source, records)
    index = {c: i for i, c in enumerate(classes)}
    splits = splits_for(records, cfg.prepare, cfg.run.seed)
    records = [r for r in records if splits[r.id] in plan.splits]
    meta = infer_meta_schema(source, records)
    label = pa.field("labels", pa.list_(pa.int32())) if multi else pa.field("label", pa.int32())
    fields = [pa.field(c, pa.string()) for c in FIRST] + [label]
    with_bytes = any(r.data is not None for r in records)  # IDX: pixels come in the listing
    if with_bytes:
        fields.append(pa.field("image", pa.binary()))
    schema = pa.schema(fields + [f for f in meta if f.name not in {x.name for x in fields}])
    rows = []
    for r in records:
        row = {"id": r.id, "split": splits[r.id], "source": r.uri, **r.meta}
        row[label.name] = [index[x] for x in r.labels] if multi else index[r.label]
        if with_bytes:
            row["image"] = r.data
        rows.append(row)
    plan.raw = pa.Table.from_pylist(rows, schema=schema)
    plan.splits = [s for s in plan.splits if any(splits[r.id] == s for r in records)]
    plan.classes, plan.multi_label = classes, multi
    plan.fingerprint = fingerprint(source, src_cfg, cfg.prepare, cfg.run.seed)
    plan.input_rows = len(rows)


# ----------------------------------------------------------------------------- stages


def _decode_batch(table: pa.Table, *, transform: ImageTransform, storage: Storage) -> pa.Table:
    """Ray Data task: encoded images (or their URIs) → ``_pixels`` uint8 ``[3, s, s]``.

    Undecodable rows are dropped and printed (the manifest lists them, by id)."""
    from ray.data.extensions import ArrowTensorArray

    if "image" in table.column_names:
        images = table.column("image").to_pylist()
        table = table.drop_columns(["image"])
    else:  # raw folder / manifest: one GET per image
        uris = table.column("source").to_pylist()
        with ThreadPoolExecutor(8) as pool:
            images = list(pool.map(lambda u: _fetch(storage, u), uris))
    pixels, kept, failures = decode_and_transform(
        [b"" if b is None else b for b in images], transform, None
    )
    if failures:
        ids = table.column("id").to_pylist()
        for row, reason in failures[:20]:
            _say(f"dropped {ids[row]!r}: {reason}")
        table = table.take(pa.array(kept, pa.int64()))
    return table.append_column(PIXELS, ArrowTensorArray.from_numpy(pixels))


def _fetch(storage: Storage, uri: str) -> bytes | None:
    try:
        return storage.read_bytes(uri)
    except OSError:
        return None  # reported as a decode failure


def _fixed_list(values: np.ndarray) -> pa.FixedSizeListArray:
    """``float32 [n, d]`` → ``fixed_size_list<float32>[d]``."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


class EmbedBatch:
    """Ray Data actor UDF: loads the model once, then pixels → embedding (+ logits, probs)."""

    def __init__(self, model: ModelSource, storage_cfg: StorageConfig, embed: EmbedConfig):
        import torch

        gpu = embed.num_gpus > 0 and torch.cuda.is_available()
        if not gpu:  # Ray sets OMP_NUM_THREADS; torch follows the actor's CPU reservation
            torch.set_num_threads(max(1, int(embed.num_cpus)))
        self.pred = Predictor.from_source(
            model, Storage(storage_cfg), device="cuda" if gpu else "cpu", amp=embed.amp
        )
        self.normalize, self.logits = embed.normalize, embed.include_logits
        self.rows, self.t0, self.last = 0, time.perf_counter(), time.perf_counter()

    def __call__(self, table: pa.Table) -> pa.Table:
        import torch

        column = table.column(PIXELS)
        chunks = [c.to_numpy() for c in column.chunks]
        pixels = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        x = self.pred.normalize(torch.from_numpy(np.ascontiguousarray(pixels)))
        if self.logits:
            feats, logits = self.pred.embed_and_logits(x)
        else:
            feats, logits = self.pred.embed(x), None
        if self.normalize:
            feats = torch.nn.functional.normalize(feats, dim=1)
        names, arrays = [], []
        for name in FIRST:
            if name in table.column_names:
                names.append(name)
                arrays.append(table.column(name))
        names.append("embedding")
        arrays.append(_fixed_list(feats.numpy()))
        if logits is not None:
            names += ["logits", "probs"]
            arrays += [_fixed_list(logits.numpy()), _fixed_list(self.pred.probs(logits).numpy())]
        for name in table.column_names:
            if name not in names and name != PIXELS:
                names.append(name)
                arrays.append(table.column(name))
        self._progress(table.num_rows)
        return pa.Table.from_arrays(arrays, names=names)

    def _progress(self, rows: int) -> None:
        self.rows += rows
        now = time.perf_counter()
        if now - self.last >= 10:
            self.last = now
            _say(f"actor: {self.rows:,} images, {self.rows / (now - self.t0):,.0f} images/s")


# ----------------------------------------------------------------------------- run


def check_resources(e: EmbedConfig, resources: dict[str, float]) -> None:
    """Refuses an actor pool that would leave Ray Data no CPU to read and decode (a hang)."""
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if e.concurrency * e.num_cpus > cpus - 1:
        raise ConfigError(
            f"config keys 'embed.concurrency' x 'embed.num_cpus' = {e.concurrency} x "
            f"{e.num_cpus:g} CPU leave Ray Data less than 1 of the cluster's {cpus:g} CPUs for "
            "reading and decoding (it would hang); lower them or give Ray more CPUs "
            "(ray.local_num_cpus)"
        )
    if e.num_gpus and e.concurrency * e.num_gpus > gpus:
        raise ConfigError(
            f"config keys 'embed.concurrency' x 'embed.num_gpus' = {e.concurrency} x "
            f"{e.num_gpus:g} GPU, but the cluster has {gpus:g} GPU(s)"
        )


def build_dataset(plan: EmbedPlan, storage: Storage) -> ray.data.Dataset:
    """The Ray Data graph: read → decode (tasks) → model (actor pool). Lazy."""
    e = plan.cfg.embed
    rows_per_batch = plan.model.data.decode_rows()
    if plan.shards is not None:
        ds = read_shards(plan.shards, storage)
    else:
        table = plan.raw
        with reading_context():
            ds = ray.data.from_arrow(
                [table.slice(i, rows_per_batch) for i in range(0, table.num_rows, rows_per_batch)]
            )
    # Without a GPU the decode asks for the actors' CPUs, so Ray Data fuses it into them:
    # each actor decodes its own batches (no pixel hop through the object store, no extra
    # process competing for the cores). With GPUs it stays a CPU task stage of its own,
    # so the GPU actors only run the model.
    ds = ds.map_batches(
        _decode_batch,
        batch_size=rows_per_batch,
        batch_format="pyarrow",
        fn_kwargs={"transform": plan.model.transform(), "storage": storage},
        num_cpus=e.num_cpus if not e.num_gpus else 1,
    )
    return ds.map_batches(
        EmbedBatch,
        fn_constructor_kwargs={"model": plan.model, "storage_cfg": storage.cfg, "embed": e},
        batch_size=e.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=e.concurrency),
        num_cpus=e.num_cpus,
        num_gpus=e.num_gpus,
    )


def run_embed(
    plan: EmbedPlan, storage: Storage | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Runs the Ray Data job and commits the output; returns the manifest (``extra``
    fields added to it, e.g. a feature cache's key)."""
    storage = storage or Storage(plan.cfg.storage)
    e = plan.cfg.embed
    check_resources(e, ray.cluster_resources())
    t0 = time.time()
    _say(
        f"{plan.input_rows:,} images ({', '.join(plan.splits)}) of {plan.cfg.data.dataset} "
        f"with {plan.model.model_id} (dim {plan.model.dim}, "
        f"{plan.model.data.image_size} px) -> {plan.output}; "
        f"{e.concurrency} actor(s) x {e.num_cpus:g} CPU"
        + (f" + {e.num_gpus:g} GPU" if e.num_gpus else "")
    )
    run_id = uuid.uuid4().hex[:12]
    writer = {"run": run_id, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_text(join(plan.output, WRITER), json.dumps(writer))
    # leftovers of a run that crashed (or was superseded)
    storage.delete_dirs_named(plan.output, STAGING_PREFIX)
    staging = join(plan.output, f"{STAGING_PREFIX}{run_id}")
    try:
        fs, path = storage.resolve(staging)
        build_dataset(plan, storage).write_parquet(
            path,
            filesystem=fs,
            min_rows_per_file=e.rows_per_file,
            max_rows_per_file=e.rows_per_file,
        )
        seconds = time.time() - t0
        staged = [f.uri for f in storage.list_files(staging) if f.uri.endswith(".parquet")]
        counts, dropped = _check_rows(plan, storage, staged)
        rows = sum(counts.values())
        _say(f"wrote {rows:,} rows in {seconds:.1f} s ({rows / max(seconds, 1e-9):,.0f} images/s)")
        manifest = {
            "format": FORMAT,
            "rows": rows,
            "rows_per_split": counts,
            "dropped": dropped,
            "model": plan.model.model_id,
            "model_kind": plan.model.kind,
            "dim": plan.model.dim,
            "normalize": e.normalize,
            "logits": e.include_logits,
            "classes": list(plan.model.classes),
            "multi_label": plan.model.multi_label,
            "dataset": plan.cfg.data.dataset,
            "dataset_fingerprint": plan.fingerprint,
            "dataset_classes": plan.classes,
            "splits": plan.splits,
            "transform": {
                "image_size": plan.model.data.image_size,
                "eval_crop_pct": plan.model.data.eval_crop_pct,
                "interpolation": plan.model.data.interpolation,
                "mean": list(plan.model.data.mean),
                "std": list(plan.model.data.std),
            },
            "amp": e.amp,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(seconds, 2),
            **(extra or {}),
        }
        return commit(storage, plan.output, staged, manifest, writer=run_id)
    finally:
        storage.delete_tree(staging)


def _check_rows(
    plan: EmbedPlan, storage: Storage, files: list[str]
) -> tuple[dict[str, int], list[str]]:
    """Rows per split of the written files; input ids missing from them (undecodable).

    Raises:
        NotCommitted: when an id was written twice (never expected; nothing is committed).
    """
    written: list[str] = []
    counts: Counter = Counter()
    for f in files:
        fs, path = storage.resolve(f)
        t = pq.read_table(path, filesystem=fs, columns=["id", "split"])
        written += t.column("id").to_pylist()
        counts.update(t.column("split").to_pylist())
    if len(set(written)) != len(written):
        dup = next(i for i, n in Counter(written).items() if n > 1)
        raise NotCommitted(f"embedding output has duplicate rows (e.g. id {dup!r}); not committed")
    if len(written) == plan.input_rows:
        return {s: counts.get(s, 0) for s in plan.splits}, []
    if plan.raw is not None:
        inputs = plan.raw.column("id").to_pylist()
    else:
        inputs = []
        for f in plan.shards or []:
            fs, path = storage.resolve(f)
            inputs += pq.read_table(path, filesystem=fs, columns=["id"]).column("id").to_pylist()
    have = set(written)
    return {s: counts.get(s, 0) for s in plan.splits}, sorted(i for i in inputs if i not in have)


# ----------------------------------------------------------------------------- commit


def commit(
    storage: Storage, output: str, staged: list[str], manifest: dict, *, writer: str | None = None
) -> dict:
    """Moves staged files into ``output`` as ``part-NNNNN.parquet``, deletes files of an
    earlier run, and writes ``_manifest.json`` last; returns the manifest written.

    Raises:
        NotCommitted: ``writer`` (this run's id) no longer owns ``_writer.json``: a later
            run started on the same output; its result wins and this one commits nothing.
    """
    if writer is not None:
        owner = _writer(storage, output)
        if owner != writer:
            raise NotCommitted(
                f"another jobs.embed run started writing to {output!r} after this one "
                f"(run {owner or '?'}); this run's result is not committed"
            )
    previous = load_manifest(storage, output)
    if split_uri(output)[0] == "file":  # renames need the folder; object stores have none
        fs, path = storage.resolve(output)
        fs.create_dir(path, recursive=True)
    storage.delete(join(output, MANIFEST))  # from here until the end: not committed
    names = [f"part-{i:05d}.parquet" for i in range(len(staged))]
    for src, name in zip(sorted(staged), names, strict=True):
        _move(storage, src, join(output, name))
    keep = set(names)
    stale = {
        f.uri
        for f in storage.list_files(output, recursive=False)
        if f.uri.endswith(".parquet") and f.uri.rsplit("/", 1)[-1] not in keep
    }
    stale |= {join(output, f) for f in (previous or {}).get("files", []) if f not in keep}
    for uri in sorted(stale):
        storage.delete(uri)
    manifest = {**manifest, "files": names}
    storage.write_text(join(output, MANIFEST), json.dumps(manifest, indent=1))
    storage.delete(join(output, WRITER))
    _say(
        f"committed {manifest['rows']:,} rows in {len(names)} file(s) to {output}"
        + (f"; removed {len(stale)} file(s) of an earlier run" if stale else "")
    )
    return manifest


def load_manifest(storage: Storage, output: str) -> dict | None:
    """The committed manifest of an embeddings output, or None (none yet, or incomplete)."""
    uri = join(output, MANIFEST)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_text(uri))


def _writer(storage: Storage, output: str) -> str | None:
    try:
        return json.loads(storage.read_text(join(output, WRITER)))["run"]
    except FileNotFoundError:
        return None


def _move(storage: Storage, src: str, dst: str) -> None:
    """A file move: a rename on local disk, a server-side copy + delete on object stores."""
    fs, src_path = storage.resolve(src)
    _, dst_path = storage.resolve(dst)
    fs.move(src_path, dst_path)


def embed(cfg: RunConfig, storage: Storage | None = None) -> dict[str, Any]:
    """:func:`plan_embed` + :func:`run_embed` (Ray must be initialized)."""
    storage = storage or Storage(cfg.storage)
    return run_embed(plan_embed(cfg, storage), storage)
