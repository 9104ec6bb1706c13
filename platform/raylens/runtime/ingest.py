"""Ray Data ingest: prepared Parquet (or a raw folder/manifest) → decoded, transformed batches.

    ds, info = build_split(cfg, "train", storage, train=True)
    # on a Ray Train worker:
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=64, collate_fn=TorchCollate(cfg.data)):
        batch["image"]  # float32 [b, 3, s, s], normalized
        batch["label"]  # int64 [b]   (multi-label: batch["labels"] float32 [b, C])

Decoding runs in Ray Data tasks and ships uint8 pixels; normalization to float happens in
the collate function on the consumer. A row that fails to decode is dropped and recorded
(see :func:`ingest_failures`), never crashing the run.

Stored-target distillation with ``mix`` on mixes at decode time instead: the train split is
then a dataset of mixing units (a prepared shard's row groups, :mod:`raylens.data.mix`),
each decoded, augmented and mixed by one call, whatever the number of workers; its rows
add ``mix_partner``, ``mix_lam`` and ``mix_label``.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.data.collate_fn import NumpyBatchCollateFn

from raylens.config import ConfigError
from raylens.data.prepare import CARD, load_card
from raylens.data.sources import SPLITS, label_space, open_source
from raylens.data.transforms import (
    ImageTransform,
    decode_and_transform,
    normalize,
    sample_seed,
)
from raylens.schema import (
    DataConfig,
    MixConfig,
    PrepareConfig,
    RunConfig,
    SourceConfig,
    StorageConfig,
)
from raylens.storage import Storage, join, split_uri

FAILURES_ACTOR = "raylens_ingest_failures"
# read_parquet of the exact files a card lists, whatever their keys hold. Ray Data's
# defaults would drop a file whose key has '?' before its suffix (its extension filter
# cuts paths at '?': "list index out of range") and add a column per 'k=v' folder of the
# path (hive partitioning); prepared datasets are neither filtered nor partitioned.
EXACT_FILES: dict[str, Any] = {"file_extensions": None, "partitioning": None}
# Below this much object store (Ray's default is 30 % of RAM; a deliberately small store,
# or a tiny machine), Ray 2.60 Data's per-operator reservation deadlocks raylens's
# pipelines: jobs.embed over a dataset 4x an 80 MB store stalled with the read holding
# ~95 MB of blocks and the model stage never starting a task (budget 3.3 MB), until Ray
# Data's 30-min no-progress timeout (tests/test_pressure.py). Neither smaller blocks
# (target_max_block_size 8 MB) nor Ray's liveness allowance
# (object_store_memory_pressure_fraction 0.8) moved it; without the reservation
# (DataContext.op_resource_reservation_enabled, which Ray calls a kill-switch it may
# remove) the same job spilled and finished in 35 s. The test fails if that goes.
SMALL_OBJECT_STORE = 1 << 30
# A raw (unprepared) train split is read in units of this many files, in a seeded order
# per pass (a prepared one in Parquet row groups).
RAW_UNIT_ROWS = 64
# raylens.data.mix (torch + timm: ~3 CPU-s to import) is imported where decode-time mixing
# is used, not here: every Ray Data process that unpickles a plan holding _DecodeBatch
# (split coordinators, Train's dataset manager, decode workers) imports this module.


@contextlib.contextmanager
def reading_context():
    """The DataContext raylens builds its datasets under (each Dataset keeps a copy of the
    context it was created with); restored afterwards."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.use_datasource_v2, ctx.op_resource_reservation_enabled
    # Ray 2.60's default (V2) Parquet reader starts 32 footer-reader actors per execution
    # and packs a whole shard into one block, so decode runs as one task on one CPU: 0.43x
    # the in-memory decode limit on 2 CPUs vs 0.71x with the V1 reader, which splits shards
    # by row group (benchmarks/RESULTS.md). If V1 is removed, read row groups ourselves
    # (dataset.json lists the shards).
    ctx.use_datasource_v2 = False
    if 0 < ray.cluster_resources().get("object_store_memory", 0) < SMALL_OBJECT_STORE:
        ctx.op_resource_reservation_enabled = False
    try:
        yield ctx
    finally:
        ctx.use_datasource_v2, ctx.op_resource_reservation_enabled = saved


def read_shards(
    files: list[str], storage: Storage, columns: list[str] | None = None
) -> ray.data.Dataset:
    """A Ray Dataset over exactly these Parquet shard URIs (one filesystem)."""
    fs, _ = storage.resolve(files[0])
    with reading_context():
        return ray.data.read_parquet(
            [split_uri(f)[1] for f in files], filesystem=fs, columns=columns, **EXACT_FILES
        )


@dataclass(frozen=True)
class DatasetInfo:
    """What a consumer needs to know about a dataset's labels."""

    classes: list[str]
    task: str  # "single_label" | "multi_label"
    num_rows: dict[str, int]
    per_class: dict[str, dict[str, int]] | None = None  # split -> class -> images

    @property
    def multi_label(self) -> bool:
        return self.task == "multi_label"

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> DatasetInfo:
        return cls(
            card["classes"],
            card["task"],
            {s: card["splits"][s]["count"] for s in SPLITS},
            {s: dict(card["splits"][s].get("per_class", {})) for s in SPLITS},
        )

    def select(self, names: list[str]) -> tuple[DatasetInfo, dict[int, int]]:
        """The info of a class subset (labels renumbered in ``names`` order) and the
        old -> new label map; fails naming unknown classes."""
        unknown = [n for n in names if n not in self.classes]
        if unknown:
            raise ValueError(
                f"config key 'data.classes': unknown class(es) {unknown}; "
                f"the dataset has {self.classes}"
            )
        if len(set(names)) != len(names):
            raise ValueError("config key 'data.classes': a class is listed twice")
        if self.multi_label:
            raise ValueError("config key 'data.classes': only single-label datasets can be subset")
        per = self.per_class or {}
        rows = {s: sum(per.get(s, {}).get(n, 0) for n in names) for s in SPLITS}
        sub = {s: {n: per.get(s, {}).get(n, 0) for n in names} for s in SPLITS}
        remap = {self.classes.index(n): i for i, n in enumerate(names)}
        return DatasetInfo(list(names), self.task, rows, sub), remap


# ----------------------------------------------------------------------------- failures


@ray.remote(num_cpus=0)
class _Failures:
    def __init__(self):
        self.items: list[dict[str, str]] = []

    def add(self, items: list[dict[str, str]]) -> None:
        self.items.extend(items)

    def get(self) -> list[dict[str, str]]:
        return list(self.items)

    def clear(self) -> None:
        self.items.clear()


def _failures_actor():
    return _Failures.options(
        name=FAILURES_ACTOR, get_if_exists=True, lifetime="detached", namespace="raylens"
    ).remote()


def ingest_failures() -> list[dict[str, str]]:
    """Rows dropped at decode time in this Ray cluster: ``[{id, reason}]``."""
    return ray.get(_failures_actor().get.remote())


def clear_ingest_failures() -> None:
    ray.get(_failures_actor().clear.remote())


# ----------------------------------------------------------------------------- distillation


@ray.remote(num_cpus=0)
class EpochClock:
    """The training epoch, set by the train loop before each epoch and read by the decode
    tasks, which derive each sample's augmentation seed (and teacher targets) from it."""

    def __init__(self):
        self.epoch = -1

    def set(self, epoch: int) -> None:
        self.epoch = epoch

    def get(self) -> int:
        return self.epoch


@dataclass(frozen=True)
class TeacherTargets:
    """Where a student's decode tasks find the teacher's stored top-k targets."""

    clock: str  # EpochClock actor name (namespace "raylens")
    store: str
    storage: StorageConfig
    k: int  # the student's k: the first k columns of the store's top-k (highest first)
    seed: int  # the store's augmentation base seed
    epochs: int  # E: student epoch e replays stored epoch e % E
    store_k: int = 0  # the k the store was written with (0: the same as k)


_TARGETS_CACHE: dict[tuple[str, int], Any] = {}


def _epoch_targets(spec: TeacherTargets, epoch: int):
    from raylens.data import teacher_store as TS

    key = (spec.store, epoch)
    if key not in _TARGETS_CACHE:
        _TARGETS_CACHE.clear()  # one epoch at a time per process
        _TARGETS_CACHE[key] = TS.read_epoch(
            Storage(spec.storage), spec.store, epoch, spec.store_k or spec.k
        )
    return _TARGETS_CACHE[key]


# ----------------------------------------------------------------------------- reading


def is_prepared(dataset: str, storage: Storage) -> bool:
    return storage.exists(join(dataset, CARD))


def _prepared_files(dataset: str, split: str, storage: Storage) -> tuple[list[str], DatasetInfo]:
    """The shard files (relative to ``dataset``) of one split and the dataset's info."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    card = load_card(storage, dataset)  # a damaged card is named
    if card is None:
        raise FileNotFoundError(f"no prepared dataset ({CARD}) at {dataset!r}")
    files = list(card["splits"][split]["files"])
    info = DatasetInfo.from_card(card)
    if not info.classes:
        rejected = len(card.get("rejected", []))
        raise ValueError(
            f"dataset {dataset!r} has zero classes (no usable labelled images; "
            f"{rejected} rejected, skipped {card.get('skipped', {})}: see its {CARD})"
        )
    if not files:
        raise ValueError(f"dataset {dataset!r} has no rows in split {split!r}")
    return files, info


def read_prepared(
    dataset: str, split: str, storage: Storage
) -> tuple[ray.data.Dataset, DatasetInfo]:
    """The rows of one split of a prepared dataset (only the shards its card lists)."""
    files, info = _prepared_files(dataset, split, storage)
    label_col = "labels" if info.multi_label else "label"
    ds = read_shards([join(dataset, f) for f in files], storage, columns=["id", "image", label_col])
    return ds, info


def _raw_items(
    source_cfg: SourceConfig, split: str, storage: Storage, prepare_cfg: PrepareConfig, seed: int
) -> tuple[list[dict[str, Any]], DatasetInfo]:
    """The rows (``id``, ``uri``, ``label``/``labels``) of one split of a raw source."""
    from raylens.data.prepare import splits_for

    source = open_source(source_cfg, storage)
    records = sorted(source.records(), key=lambda r: r.id)
    classes, multi = label_space(source, records)
    index = {c: i for i, c in enumerate(classes)}
    splits = splits_for(records, prepare_cfg, seed)
    counts = {s: sum(1 for r in records if splits[r.id] == s) for s in SPLITS}
    items = [
        {
            "id": r.id,
            "uri": r.uri,
            **({"labels": [index[x] for x in r.labels]} if multi else {"label": index[r.label]}),
        }
        for r in records
        if splits[r.id] == split
    ]
    per_class = None
    if not multi:
        per_class = {s: {c: 0 for c in classes} for s in SPLITS}
        for r in records:
            per_class[splits[r.id]][r.label] += 1
    info = DatasetInfo(classes, "multi_label" if multi else "single_label", counts, per_class)
    return items, info


def _fetch_raw(batch: dict[str, np.ndarray], storage: Storage) -> dict[str, Any]:
    """The bytes of each row's ``uri`` as ``image``; unreadable rows dropped and recorded."""
    images, kept, failures = [], [], []
    for i, (rid, uri) in enumerate(zip(batch["id"], batch["uri"], strict=True)):
        try:
            images.append(storage.read_bytes(str(uri)))
            kept.append(i)
        except OSError as err:  # unreadable: dropped and recorded, like a decode failure
            failures.append({"id": str(rid), "reason": f"unreadable: {err}"})
    _record_failures(failures)
    out = {k: np.asarray(v)[kept] for k, v in batch.items() if k != "uri"}
    out["image"] = np.array(images, dtype=object)
    return out


def read_raw(
    source_cfg: SourceConfig,
    split: str,
    storage: Storage,
    *,
    prepare_cfg: PrepareConfig,
    seed: int = 0,
):
    """A raw folder or manifest read directly (no prepare step): same columns as prepared.

    Splits come from the source or a seeded stratified split, as in prepare. Unreadable
    files are dropped at decode time and recorded like any other decode failure.
    """
    items, info = _raw_items(source_cfg, split, storage, prepare_cfg, seed)
    with reading_context():
        ds = ray.data.from_items(items).map_batches(
            _fetch_raw, batch_size=RAW_UNIT_ROWS, fn_kwargs={"storage": storage}
        )
    return ds, info


# ----------------------------------------------------------------------------- transform


def execution_index() -> int:
    """Which pass over its dataset the calling Ray Data task belongs to (0, 1, ...): the
    index Ray Data itself reseeds ``randomize_block_order`` with, carried to each task in
    its DataContext. Ray Train runs one pass per epoch (a resumed run counts from 0 again)."""
    idx = getattr(ray.data.DataContext.get_current(), "_execution_idx", None)
    if not isinstance(idx, int):  # a private field: fail loudly if Ray renames it
        raise RuntimeError(
            "ray.data.DataContext has no integer _execution_idx in this Ray version: "
            "per-epoch augmentation seeds need it (pass build_split(epoch=...))"
        )
    return idx


def _replay_epoch(targets: TeacherTargets) -> int:
    """The stored epoch a distillation decode task replays: train epoch ``e % E``."""
    clock = ray.get_actor(targets.clock, namespace="raylens")
    train_epoch = ray.get(clock.get.remote())
    if train_epoch < 0:
        raise RuntimeError("distillation: the train loop did not set the epoch clock")
    return train_epoch % targets.epochs


def _add_targets(
    out: dict[str, np.ndarray], targets: TeacherTargets, replay: int
) -> dict[str, np.ndarray]:
    """Adds the stored teacher targets of ``out``'s rows, after checking that the store
    recorded the same augmentation seeds (and, when mixing, the same partners and lambdas)
    as this decode derived."""
    stored = _epoch_targets(targets, replay)
    ids = [str(i) for i in out["id"]]
    rows = stored.rows(ids)
    if not np.array_equal(stored.seeds[rows].astype(np.int64), out["aug_seed"]):
        raise RuntimeError(
            f"teacher store {targets.store!r}: stored augmentation seeds differ "
            "from the replayed ones (a store from another run.seed?)"
        )
    if "mix_lam" in out:
        partners = [str(p) for p in out["mix_partner"]]
        if list(stored.partners[rows]) != partners or not np.array_equal(
            stored.lams[rows], out["mix_lam"]
        ):
            raise RuntimeError(
                f"teacher store {targets.store!r}: stored mix partners or lambdas differ from "
                "the replayed ones (a store made with other mix.* or data.* settings?)"
            )
    k = targets.k  # a store keeps top-k highest first: use the first k' <= k
    out["teacher_idx"] = np.ascontiguousarray(stored.idx[rows][:, :k])
    out["teacher_prob"] = np.ascontiguousarray(stored.prob[rows][:, :k])
    out["aug_epoch"] = np.full(len(ids), replay, dtype=np.int64)
    return out


def _record_failures(failures: list[dict[str, str]]) -> None:
    if failures:
        _failures_actor().add.remote(failures)


class _DecodeBatch:
    """Ray Data UDF: bytes → uint8 pixels; drops undecodable rows and records them."""

    def __init__(
        self,
        transform: ImageTransform,
        seed: int,
        epoch: int | None,
        num_classes: int,
        multi_label: bool,
        targets: TeacherTargets | None = None,
    ):
        self.transform, self.seed, self.epoch = transform, seed, epoch
        self.num_classes, self.multi_label = num_classes, multi_label
        self.targets = targets

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["id"]]
        replay = None
        if self.targets is not None:  # distillation: replay the teacher's epoch
            replay = _replay_epoch(self.targets)
            seeds = np.array(
                [sample_seed(self.targets.seed, i, replay) for i in ids], dtype=np.int64
            )
        elif not self.transform.train:
            seeds = np.zeros(len(ids), dtype=np.int64)
        else:
            epoch = execution_index() if self.epoch is None else self.epoch
            seeds = np.array([sample_seed(self.seed, i, epoch) for i in ids], dtype=np.int64)
        pixels, kept, failures = decode_and_transform(
            list(batch["image"]), self.transform, seeds if self.transform.train else None
        )
        _record_failures([{"id": ids[i], "reason": r} for i, r in failures])
        out = {
            "id": np.array([ids[i] for i in kept], dtype=object),
            "image": pixels,
            "aug_seed": seeds[kept],
        }
        if replay is not None:
            out = _add_targets(out, self.targets, replay)
        if self.multi_label:
            hot = np.zeros((len(kept), self.num_classes), dtype=np.float32)
            for row, i in enumerate(kept):
                hot[row, np.asarray(batch["labels"][i], dtype=np.int64)] = 1.0
            out["labels"] = hot
        else:
            out["label"] = np.asarray(batch["label"], dtype=np.int64)[kept]
        return out


class DecodeUnits:
    """Ray Data UDF over mixing units (``{"file", "row_group"}`` rows): reads each row group,
    decodes, augments and mixes it (:func:`raylens.data.mix.decode_unit`), yields its rows in
    batches of at most ``batch_rows``.

    Everything a row gets derives from ``(seed, epoch, unit, id)``, so a unit mixes the same
    in any task, process or split of units over workers. ``targets``: the student of a
    stored distillation, replaying (and checking) the teacher's epoch ``e % E``.
    """

    def __init__(
        self,
        dataset: str,
        storage: StorageConfig,
        transform: ImageTransform,
        mix: MixConfig,
        seed: int,
        epoch: int | None,
        remap: dict[int, int] | None = None,
        targets: TeacherTargets | None = None,
        batch_rows: int = 1024,
    ):
        self.dataset, self.storage = dataset, Storage(storage)
        self.transform, self.mix, self.seed, self.epoch = transform, mix, seed, epoch
        self.remap, self.targets, self.batch_rows = remap, targets, batch_rows

    def __call__(self, batch: dict[str, np.ndarray]):
        from raylens.data.mix import decode_unit
        from raylens.data.units import Unit, read_unit

        replay = None
        if self.targets is not None:
            replay = _replay_epoch(self.targets)
            seed, epoch = self.targets.seed, replay
        else:
            seed = self.seed
            epoch = execution_index() if self.epoch is None else self.epoch
        for file, group in zip(batch["file"], batch["row_group"], strict=True):
            unit = Unit(str(file), int(group))
            table = read_unit(self.storage, self.dataset, unit, remap=self.remap)
            out, failures = decode_unit(
                table.column("id").to_pylist(),
                table.column("image").to_pylist(),
                table.column("label").to_numpy(),
                transform=self.transform,
                mix=self.mix,
                seed=seed,
                epoch=epoch,
                unit=unit,
            )
            _record_failures([{"id": i, "reason": r} for i, r in failures])
            if replay is not None:
                out = _add_targets(out, self.targets, replay)
            for start in range(0, len(out["id"]), self.batch_rows):
                yield {k: v[start : start + self.batch_rows] for k, v in out.items()}


def pass_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order one pass (epoch) reads a train split's ``n`` read units in: a permutation
    seeded by ``(run.seed, epoch)``, the same in every process that asks."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class _ReadInPassOrder:
    """Ray Data UDF over slots (``{"slot": i}`` rows, one block each): slot ``i`` of a pass
    reads read unit ``pass_order(seed, epoch)[i]`` (a prepared dataset's row group, or
    :data:`RAW_UNIT_ROWS` raw files), then decodes it ``decode_rows`` rows at a time.

    So each pass (epoch) reads the split in its own seeded order with nothing that waits
    for the whole read: ``randomize_block_order`` is an all-to-all step that held every
    block of the split (a split's encoded bytes, in the object store) before the first
    batch. Reading inside the decode task also keeps encoded bytes out of the object store.
    Augmentation seeds come from ``(run.seed, id, epoch)`` (:class:`_DecodeBatch`), never
    from the order.
    """

    def __init__(
        self,
        units: list[Any],
        read: Any,
        decode: _DecodeBatch,
        *,
        seed: int,
        epoch: int | None,
        decode_rows: int,
        remap: dict[int, int] | None = None,
    ):
        self.units, self.read, self.decode = units, read, decode
        self.seed, self.epoch, self.decode_rows = seed, epoch, decode_rows
        self.select = _SelectClasses(remap) if remap else None

    def __call__(self, batch: dict[str, np.ndarray]):
        epoch = execution_index() if self.epoch is None else self.epoch
        order = pass_order(self.seed, epoch, len(self.units))
        for slot in batch["slot"]:
            rows = self.read(self.units[order[int(slot)]])
            if self.select is not None:
                rows = self.select(rows)
            n = len(rows["id"])
            for start in range(0, n, self.decode_rows):
                out = self.decode({k: v[start : start + self.decode_rows] for k, v in rows.items()})
                if len(out["id"]):
                    yield out


class _RowGroupReader:
    """A prepared dataset's row group as numpy columns (read inside the decode task)."""

    def __init__(self, dataset: str, storage: StorageConfig, columns: list[str]):
        self.dataset, self.storage, self.columns = dataset, storage, columns

    def __call__(self, unit: Any) -> dict[str, np.ndarray]:
        from raylens.data.units import read_unit

        table = read_unit(Storage(self.storage), self.dataset, unit, self.columns)
        return {c: table.column(c).to_numpy(zero_copy_only=False) for c in self.columns}


class _RawReader:
    """A chunk of a raw split's rows, fetched (unreadable files dropped and recorded)."""

    def __init__(self, storage: StorageConfig):
        self.storage = storage

    def __call__(self, unit: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        cols = {k: np.array([r[k] for r in unit], dtype=object) for k in unit[0]}
        if "label" in cols:
            cols["label"] = cols["label"].astype(np.int64)
        return _fetch_raw(cols, Storage(self.storage))


def _ordered_split(
    cfg: RunConfig,
    split: str,
    storage: Storage,
    *,
    epoch: int | None,
    targets: TeacherTargets | None,
) -> tuple[ray.data.Dataset, DatasetInfo]:
    """A split augmented and read in a seeded order per pass (:class:`_ReadInPassOrder`)."""
    data = cfg.data
    if is_prepared(data.dataset, storage):
        from raylens.data.units import list_units

        files, info = _prepared_files(data.dataset, split, storage)
        units: list[Any] = list_units(storage, data.dataset, files)
        cols = ["id", "image", "labels" if info.multi_label else "label"]
        read: Any = _RowGroupReader(data.dataset, storage.cfg, cols)
    else:
        raw = SourceConfig(**{**cfg.source.__dict__, "uri": data.dataset})
        items, info = _raw_items(raw, split, storage, cfg.prepare, cfg.run.seed)
        units = [items[i : i + RAW_UNIT_ROWS] for i in range(0, len(items), RAW_UNIT_ROWS)]
        read = _RawReader(storage.cfg)
    if not units:
        raise ValueError(f"dataset {data.dataset!r} has no rows in split {split!r}")
    remap = None
    if data.classes:
        info, remap = info.select(list(data.classes))
    reader = _ReadInPassOrder(
        units,
        read,
        _decode_udf(cfg, info, True, epoch, targets),
        seed=cfg.run.seed,
        epoch=epoch,
        decode_rows=data.decode_rows(),
        remap=remap,
    )
    slots = [{"slot": i} for i in range(len(units))]
    with reading_context() as ctx:
        # One output block per decode batch (~16 MiB at any size): Ray Data otherwise
        # buffers a task's output up to target_max_block_size (128 MiB, ~850 images at
        # 224 px) before the consumer sees any of it, which delays the first batch.
        keep = ctx.target_max_block_size
        rows_bytes = data.decode_rows() * 3 * data.image_size**2
        if keep is None or rows_bytes < keep:
            ctx.target_max_block_size = rows_bytes
        try:
            ds = ray.data.from_items(slots, override_num_blocks=len(units))
        finally:
            ctx.target_max_block_size = keep
    return ds.map_batches(reader, batch_size=1, batch_format="numpy"), info


class _UnitsInPassOrder:
    """Ray Data UDF: slot ``i`` of a pass → the ``{"file", "row_group"}`` row of mixing unit
    ``pass_order(seed, epoch)[i]`` (decode-time mixing reads units in the same order per
    pass as :class:`_ReadInPassOrder`)."""

    def __init__(self, units: list[Any], seed: int, epoch: int | None):
        self.units, self.seed, self.epoch = units, seed, epoch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        epoch = execution_index() if self.epoch is None else self.epoch
        order = pass_order(self.seed, epoch, len(self.units))
        picked = [self.units[order[int(slot)]] for slot in batch["slot"]]
        return {
            "file": np.array([u.file for u in picked], dtype=object),
            "row_group": np.array([u.row_group for u in picked], dtype=np.int64),
        }


class _SelectClasses:
    """Keeps the rows of the selected classes, labels renumbered (``data.classes``)."""

    def __init__(self, remap: dict[int, int]):
        self.old = np.array(sorted(remap), dtype=np.int64)
        self.new = np.array([remap[o] for o in sorted(remap)], dtype=np.int64)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        label = np.asarray(batch["label"]).astype(np.int64)
        keep = np.isin(label, self.old)
        out = {k: np.asarray(v)[keep] for k, v in batch.items()}
        out["label"] = self.new[np.searchsorted(self.old, label[keep])].astype(np.int32)
        return out


def build_split(
    cfg: RunConfig,
    split: str,
    storage: Storage,
    *,
    train: bool | None = None,
    epoch: int | None = None,
    targets: TeacherTargets | None = None,
    mix_units: bool | None = None,
) -> tuple[ray.data.Dataset, DatasetInfo]:
    """The decoded, transformed dataset of one split.

    Args:
        train: augment (default: ``split == "train"``).
        epoch: derive each sample's augmentation seed from ``(run.seed, id, epoch)``; None
            uses the pass over the dataset (:func:`execution_index`) as the epoch, so each
            training epoch augments differently and a rerun augments the same (recorded in
            ``aug_seed`` either way).
        targets: distillation: each pass reads the epoch from ``targets.clock``, replays the
            teacher's augmentation of epoch ``e % E`` and adds ``teacher_idx``,
            ``teacher_prob`` and ``aug_epoch`` columns from the store.
        mix_units: mix ``cfg.mix`` at decode time, per row group (:mod:`raylens.data.mix`);
            default: for the train split of a stored distillation with mixing on
            (:func:`raylens.data.mix.decode_time_mixing`). The teacher pass sets it.
    """
    train = split == "train" if train is None else train
    data = cfg.data
    if not data.dataset:
        raise ValueError(
            "config key 'data.dataset' is required: a prepared dataset dir "
            "(or a raw folder / manifest)"
        )
    if mix_units is None:
        from raylens.data.mix import decode_time_mixing

        mix_units = decode_time_mixing(cfg) and split == "train" and train
    if mix_units:
        return _unit_split(cfg, split, storage, epoch=epoch, targets=targets)
    if train:
        # Each pass (epoch) reads in its own seeded order, streaming (_ReadInPassOrder): an
        # int-seeded order would repeat every epoch, so a run capped by
        # train.max_steps_per_epoch saw the same rows each epoch. Rows also reshuffle in
        # each worker's local buffer.
        return _ordered_split(cfg, split, storage, epoch=epoch, targets=targets)
    if is_prepared(data.dataset, storage):
        ds, info = read_prepared(data.dataset, split, storage)
    else:
        raw = SourceConfig(**{**cfg.source.__dict__, "uri": data.dataset})
        ds, info = read_raw(raw, split, storage, prepare_cfg=cfg.prepare, seed=cfg.run.seed)
    if data.classes:
        info, remap = info.select(list(data.classes))
        ds = ds.map_batches(_SelectClasses(remap), batch_format="numpy")
    udf = _decode_udf(cfg, info, False, epoch, targets)
    ds = ds.map_batches(udf, batch_size=data.decode_rows(), batch_format="numpy")
    return ds, info


def _decode_udf(
    cfg: RunConfig,
    info: DatasetInfo,
    train: bool,
    epoch: int | None,
    targets: TeacherTargets | None,
) -> _DecodeBatch:
    return _DecodeBatch(
        ImageTransform.from_config(cfg.data, train),
        cfg.run.seed,
        epoch,
        len(info.classes),
        info.multi_label,
        targets,
    )


def _unit_split(
    cfg: RunConfig,
    split: str,
    storage: Storage,
    *,
    epoch: int | None,
    targets: TeacherTargets | None,
) -> tuple[ray.data.Dataset, DatasetInfo]:
    """A split mixed at decode time: one item (and block) per row group, one UDF call each."""
    data = cfg.data
    if not cfg.mix.enabled:
        raise ValueError("decode-time mixing needs mix.* on (mix.mixup_alpha or mix.cutmix_*)")
    if not is_prepared(data.dataset, storage):
        raise ValueError(
            f"config key 'data.dataset': {data.dataset!r} is not a prepared dataset; mixing "
            "for stored distillation mixes the row groups of a prepared one (run jobs.prepare)"
        )
    card = load_card(storage, data.dataset)
    info = DatasetInfo.from_card(card)
    if info.multi_label:
        raise ValueError(
            f"decode-time mixing (stored distillation) needs single labels; "
            f"{data.dataset!r} is multi-label"
        )
    remap = None
    if data.classes:
        info, remap = info.select(list(data.classes))
    from raylens.data.units import list_units

    units = list_units(storage, data.dataset, card["splits"][split]["files"])
    if not units:
        raise ValueError(f"dataset {data.dataset!r} has no rows in split {split!r}")
    # the units in a seeded order per pass (pass_order), as the ordinary train split reads
    slots = [{"slot": i} for i in range(len(units))]
    with reading_context():
        ds = ray.data.from_items(slots, override_num_blocks=len(units))
    ds = ds.map_batches(
        _UnitsInPassOrder(units, cfg.run.seed, epoch), batch_size=1, batch_format="numpy"
    )
    udf = DecodeUnits(
        data.dataset,
        storage.cfg,
        ImageTransform.from_config(data, True),
        cfg.mix,
        cfg.run.seed,
        epoch,
        remap,
        targets,
        data.decode_rows(),
    )
    return ds.map_batches(udf, batch_size=1, batch_format="numpy"), info


class TorchCollate(NumpyBatchCollateFn):
    """``iter_torch_batches`` collate: numpy batch → normalized float tensors + ids.

    ``channels_last``: lay the image tensor out as the model wants it (``model.channels_last``),
    so the loop's ``contiguous(memory_format=channels_last)`` is free."""

    def __init__(self, data: DataConfig, device: str | None = None, *, channels_last: bool = False):
        super().__init__()
        for key in ("mean", "std"):
            if getattr(data, key) is None:
                raise ConfigError(
                    f"config key 'data.{key}' is null: resolve preprocessing from the backbone "
                    "first (raylens.preprocess.resolve_preprocess), or set it"
                )
        self.mean, self.std, self.device = tuple(data.mean), tuple(data.std), device
        self.channels_last = channels_last

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        image = np.ascontiguousarray(batch["image"])
        with warnings.catch_warnings():  # Ray's batches are read-only; only read (copy_) here
            warnings.filterwarnings("ignore", message=".*not writable.*")
            pixels = torch.from_numpy(image)
        if self.device:
            pixels = pixels.to(self.device, non_blocking=True)
        out: dict[str, Any] = {
            # uint8 → float32 in one preallocated tensor, normalized in place
            "image": normalize(pixels, self.mean, self.std, channels_last=self.channels_last),
            "aug_seed": torch.from_numpy(np.array(batch["aug_seed"])),
            "id": list(batch["id"]),
        }
        for key in (
            "label",
            "labels",
            "teacher_idx",
            "teacher_prob",
            "aug_epoch",
            "mix_lam",
            "mix_label",
        ):
            if key in batch:
                out[key] = torch.from_numpy(np.array(batch[key]))
        if "mix_partner" in batch:  # decode-time mixing: each row's partner id
            out["mix_partner"] = list(batch["mix_partner"])
        return out
