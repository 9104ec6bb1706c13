"""The sparse teacher-target store of fast distillation (pure: pyarrow + numpy).

Layout (local, ``s3://`` or ``gs://``)::

    <store>/store.json                     # written last: a store without it is incomplete
    <store>/epoch=0000/part-00000.parquet  # one file per augmentation epoch
    ...

Rows: ``id`` (string), ``epoch`` (int16), ``seed`` (uint32, the sample's augmentation
seed in that epoch), ``idx`` (k uint16 class indices, highest probability first) and
``prob`` (their k float16 probabilities), the last two as ``fixed_size_binary(2k)`` so
Parquet keeps exactly 2k bytes each with no list overhead. Per sample and epoch that is
``4 + 4k`` bytes besides the id (zstd may shrink it). Any number of readers can load any
epoch: nothing depends on the world size that wrote it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylens.storage import Storage, join

FORMAT = "raylens.teacher_topk/1"
CARD = "store.json"


def epoch_file(store: str, epoch: int) -> str:
    return join(store, f"epoch={epoch:04d}", "part-00000.parquet")


def encode(ids: list[str], epoch: int, seeds, idx, prob) -> pa.Table:
    """A store table from ``idx`` int [n, k] and ``prob`` float [n, k]."""
    idx = np.ascontiguousarray(np.asarray(idx, dtype=np.uint16))
    prob = np.ascontiguousarray(np.asarray(prob, dtype=np.float16))
    n, k = idx.shape
    width = 2 * k
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "epoch": pa.array(np.full(n, epoch, dtype=np.int16)),
            "seed": pa.array(np.asarray(seeds, dtype=np.uint32)),
            "idx": pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(width), n, [None, pa.py_buffer(idx.tobytes())]
            ),
            "prob": pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(width), n, [None, pa.py_buffer(prob.tobytes())]
            ),
        }
    )


def _fixed(col: pa.ChunkedArray, dtype, k: int) -> np.ndarray:
    arr = col.combine_chunks()
    buf = arr.buffers()[1]
    start = arr.offset * 2 * k
    raw = np.frombuffer(buf, dtype=np.uint8)[start : start + len(arr) * 2 * k]
    return raw.view(dtype).reshape(len(arr), k)


@dataclass
class EpochTargets:
    """One epoch's targets, sorted by id for lookup."""

    ids: np.ndarray  # str, sorted
    seeds: np.ndarray  # uint32
    idx: np.ndarray  # int64 [n, k]
    prob: np.ndarray  # float32 [n, k]

    @classmethod
    def from_table(cls, table: pa.Table, k: int) -> EpochTargets:
        ids = np.asarray(table.column("id").to_pylist(), dtype=object)
        order = np.argsort(ids, kind="stable")
        return cls(
            ids=ids[order],
            seeds=table.column("seed").to_numpy()[order],
            idx=_fixed(table.column("idx"), np.uint16, k).astype(np.int64)[order],
            prob=_fixed(table.column("prob"), np.float16, k).astype(np.float32)[order],
        )

    def rows(self, ids) -> np.ndarray:
        """Positions of ``ids``; KeyError naming the first id the store lacks."""
        ids = np.asarray(list(ids), dtype=object)
        pos = np.searchsorted(self.ids, ids)
        pos = np.minimum(pos, len(self.ids) - 1)
        missing = self.ids[pos] != ids if len(self.ids) else np.ones(len(ids), bool)
        if missing.any():
            raise KeyError(f"teacher store has no targets for sample {ids[missing][0]!r}")
        return pos


def write_epoch(storage: Storage, store: str, table: pa.Table) -> int:
    """Writes one epoch's table (zstd); returns the file's bytes."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", use_dictionary=["id", "epoch"])
    data = buf.getvalue()
    storage.write_bytes(epoch_file(store, int(table.column("epoch")[0].as_py())), data)
    return len(data)


def read_epoch(storage: Storage, store: str, epoch: int, k: int) -> EpochTargets:
    data = storage.read_bytes(epoch_file(store, epoch))
    return EpochTargets.from_table(pq.read_table(io.BytesIO(data)), k)


def read_ids(storage: Storage, store: str, epoch: int) -> set[str]:
    data = storage.read_bytes(epoch_file(store, epoch))
    return set(pq.read_table(io.BytesIO(data), columns=["id"]).column("id").to_pylist())


def column_bytes(storage: Storage, store: str, epoch: int) -> dict[str, int]:
    """Compressed bytes per column of one epoch file (from the Parquet footer)."""
    meta = pq.ParquetFile(io.BytesIO(storage.read_bytes(epoch_file(store, epoch)))).metadata
    out: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            out[col.path_in_schema] = out.get(col.path_in_schema, 0) + col.total_compressed_size
    return out


def load_card(storage: Storage, store: str) -> dict[str, Any]:
    uri = join(store, CARD)
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"teacher store {store!r} has no {CARD}: run jobs.teacher_logits first "
            "(or it was interrupted)"
        )
    return json.loads(storage.read_text(uri))


AUG_KEYS = ("image_size", "rrc_scale", "rrc_ratio", "hflip", "augment")


def check_compatible(
    card: dict[str, Any],
    *,
    dataset_card: dict[str, Any],
    data: dict[str, Any],
    topk: int,
    num_classes: int,
    seed: int,
    aug_epochs: int,
) -> None:
    """Raises ValueError naming the first way a store does not fit a student's run."""
    store = card.get("store", "the teacher store")
    if card.get("format") != FORMAT:
        raise ValueError(f"{store}: format {card.get('format')!r}, expected {FORMAT!r}")
    if card["dataset_fingerprint"] != dataset_card.get("fingerprint"):
        raise ValueError(
            f"{store} was written for another version of the dataset "
            f"(fingerprint {card['dataset_fingerprint'][:12]}, dataset has "
            f"{str(dataset_card.get('fingerprint'))[:12]}): re-run jobs.teacher_logits"
        )
    if card["k"] < topk:  # top-k is stored highest first: any k' <= k is its first k' columns
        raise ValueError(f"config key 'distill.topk': {topk}, but {store} keeps only k={card['k']}")
    if card["num_classes"] != num_classes:
        raise ValueError(
            f"{store} has {card['num_classes']} classes, the student's head {num_classes}"
        )
    if card["epochs"] < aug_epochs:
        raise ValueError(
            f"config key 'distill.aug_epochs': {aug_epochs}, but {store} holds "
            f"{card['epochs']} epochs"
        )
    if card["seed"] != seed:
        raise ValueError(
            f"config key 'run.seed': {seed}, but {store} was augmented with seed {card['seed']}"
        )
    for key in AUG_KEYS:
        stored = card["augmentation"].get(key)
        mine = data.get(key)
        if (list(mine) if isinstance(mine, (list, tuple)) else mine) != stored:
            raise ValueError(
                f"config key 'data.{key}': {mine!r}, but {store} was made with {stored!r} "
                "(the student must see the teacher's augmentation)"
            )
