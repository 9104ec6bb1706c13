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

Format 2 (``raylens.teacher_topk/2``) adds the decode-time mix of each sample
(:mod:`raylens.data.mix`): ``partner`` (string: the id mixed into it, null when unmixed)
and ``lam`` (float32: the weight of its own image, 1 when unmixed); the targets are the
teacher's on the mixed image. A store made without mixing has neither column (it is a
format-1 table), and stores of format 1 are still read, as unmixed. The card records the
``mix.*`` settings (null: not mixed).

The card's ``augmentation`` also records ``data.decode_reduce`` and ``data.decode_reduce_gap``
(reduced-scale JPEG decoding changes pixels, so the student must decode as the teacher did;
a card without them was made decoding in full), and ``decoder`` the libjpeg-turbo version
that decoded (scaled decoding's pixels may differ between builds: flagged, not refused).
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raylens.data.images import decoder_version
from raylens.storage import Storage, join

FORMAT = "raylens.teacher_topk/2"
READABLE = (FORMAT, "raylens.teacher_topk/1")
CARD = "store.json"


def epoch_file(store: str, epoch: int) -> str:
    return join(store, f"epoch={epoch:04d}", "part-00000.parquet")


def encode(ids: list[str], epoch: int, seeds, idx, prob, partners=None, lams=None) -> pa.Table:
    """A store table from ``idx`` int [n, k] and ``prob`` float [n, k]; with ``partners``
    (ids; the own id or None when unmixed) and ``lams`` float [n] when the samples were
    mixed (else the table has no ``partner``/``lam`` columns)."""
    idx = np.ascontiguousarray(np.asarray(idx, dtype=np.uint16))
    prob = np.ascontiguousarray(np.asarray(prob, dtype=np.float16))
    n, k = idx.shape
    width = 2 * k
    columns = {
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
    if partners is not None or lams is not None:
        if partners is None or lams is None:
            raise ValueError("a mixed store needs both partners and lams")
        columns["partner"] = pa.array(
            [
                None if p is None or str(p) == i else str(p)
                for i, p in zip(ids, partners, strict=True)
            ],
            pa.string(),
        )
        columns["lam"] = pa.array(np.asarray(lams, dtype=np.float32))
    return pa.table(columns)


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
    partners: np.ndarray  # str: the id mixed in, the own id when unmixed
    lams: np.ndarray  # float32: weight of the own image, 1 when unmixed

    @classmethod
    def from_table(cls, table: pa.Table, k: int) -> EpochTargets:
        ids = np.asarray(table.column("id").to_pylist(), dtype=object)
        order = np.argsort(ids, kind="stable")
        if "partner" in table.column_names:  # format 2
            stored = table.column("partner").to_pylist()
            partners = np.asarray([p or i for i, p in zip(ids, stored, strict=True)], dtype=object)
            lams = table.column("lam").to_numpy().astype(np.float32)
        else:
            partners, lams = ids.copy(), np.ones(len(ids), dtype=np.float32)
        return cls(
            ids=ids[order],
            seeds=table.column("seed").to_numpy()[order],
            idx=_fixed(table.column("idx"), np.uint16, k).astype(np.int64)[order],
            prob=_fixed(table.column("prob"), np.float16, k).astype(np.float32)[order],
            partners=partners[order],
            lams=lams[order],
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


def read_epoch(
    storage: Storage, store: str, epoch: int, k: int, ids: Sequence[str] | None = None
) -> EpochTargets:
    """One epoch's targets; ``ids``: only these samples' (the others are not loaded)."""
    data = storage.read_bytes(epoch_file(store, epoch))
    flt = None if ids is None else pc.field("id").isin(list(ids))
    return EpochTargets.from_table(pq.read_table(io.BytesIO(data), filters=flt), k)


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


AUG_KEYS = (
    "image_size",
    "rrc_scale",
    "rrc_ratio",
    "hflip",
    "augment",
    "interpolation",
    "auto_augment",
    "color_jitter",
    "reprob",
    "remode",
    "recount",
    "mean",
    "std",
    "decode_reduce",
    "decode_reduce_gap",
)
# mean/std shape pixels only through RandAugment's fill colour and random erasing's fills
# (ImageTransform normalizes with them there); elsewhere normalization is the consumer's.
_PIXEL_STATS = ("mean", "std")
# What a format-1 store (made before these keys existed) did: bilinear, no extra ops.
_AUG_BEFORE_KEYS = {
    "interpolation": "bilinear",
    "auto_augment": None,
    "color_jitter": None,
    "reprob": 0.0,
    "remode": "pixel",
    "recount": 1,
}


# What a store made before reduced-scale decoding existed did (any format): full decodes.
_DECODE_BEFORE_KEYS = {"decode_reduce": False, "decode_reduce_gap": None}
_DECODE_KEYS = tuple(_DECODE_BEFORE_KEYS)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _same_augmentation(key: str, mine: Any, stored: Any) -> bool:
    if key == "interpolation":  # null resizes bilinearly (ImageTransform's default)
        mine, stored = mine or "bilinear", stored or "bilinear"
    if key == "decode_reduce":  # absent: the full decode raylens did before
        mine, stored = bool(mine), bool(stored)
    return _plain(mine) == _plain(stored)


def check_decode(card: dict[str, Any], data: dict[str, Any], decoder: str | None) -> str | None:
    """Raises ValueError when ``data`` (a run's ``data.*`` settings) decodes images otherwise
    than the store's teacher pass did (``data.decode_reduce`` and, when both reduce,
    ``data.decode_reduce_gap``); returns a note when this process's libjpeg-turbo
    (``decoder``, :func:`raylens.data.images.decoder_version`) differs from the store's
    while reducing (its pixels may then differ slightly; rerun the check to see), else None.
    """
    store = card.get("store", "the teacher store")
    stored = {**_DECODE_BEFORE_KEYS, **card.get("augmentation", {})}
    reduce = bool(stored["decode_reduce"])
    for key in _DECODE_KEYS if reduce or data.get("decode_reduce") else ():
        if not _same_augmentation(key, data.get(key), stored[key]):
            raise ValueError(
                f"config key 'data.{key}': {data.get(key)!r}, but {store} was made with "
                f"{stored[key]!r} (the student must decode images as the teacher pass did)"
            )
    if reduce and card.get("decoder") != decoder:
        return (
            f"{store} was decoded with libjpeg-turbo {card.get('decoder')}, this process has "
            f"{decoder}: reduced-scale decodes may differ slightly (jobs.teacher_logits "
            "--check measures it)"
        )
    return None


def check_compatible(
    card: dict[str, Any],
    *,
    dataset_card: dict[str, Any],
    data: dict[str, Any],
    topk: int,
    num_classes: int,
    seed: int,
    aug_epochs: int,
    mix: dict[str, Any] | None = None,
) -> None:
    """Raises ValueError naming the first way a store does not fit a student's run.

    ``mix``: the student's ``mix.*`` settings (:func:`raylens.data.mix.mix_settings`; None:
    not mixing), which must be the store's. A libjpeg-turbo other than the store's is only
    warned about (:func:`check_decode`).
    """
    store = card.get("store", "the teacher store")
    if card.get("format") not in READABLE:
        raise ValueError(f"{store}: format {card.get('format')!r}, expected one of {READABLE}")
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
    augmentation = card["augmentation"]
    if card["format"] != FORMAT:
        augmentation = {**_AUG_BEFORE_KEYS, **augmentation}
    uses_stats = bool(augmentation.get("auto_augment")) or (augmentation.get("reprob") or 0) > 0
    for key in AUG_KEYS:
        stored, mine = augmentation.get(key), data.get(key)
        if (key in _PIXEL_STATS and not uses_stats) or key in _DECODE_KEYS:
            continue  # decoding: check_decode below
        if not _same_augmentation(key, mine, stored):
            raise ValueError(
                f"config key 'data.{key}': {mine!r}, but {store} was made with {stored!r} "
                "(the student must see the teacher's augmentation)"
            )
    note = check_decode(card, data, decoder_version())
    if note:
        warnings.warn(note, stacklevel=2)
    check_mix(card, mix)


def check_mix(card: dict[str, Any], mix: dict[str, Any] | None) -> None:
    """Raises ValueError naming the first ``mix.*`` key where ``mix`` (a run's settings, None
    when not mixing) differs from the store's."""
    store = card.get("store", "the teacher store")
    stored = card.get("mix")
    if (stored is None) != (mix is None):
        mine = "mixes" if mix is not None else "does not mix"
        theirs = f"with mix {stored}" if stored is not None else "without mixing"
        raise ValueError(
            f"config key 'mix': this run {mine}, but {store} was made {theirs} "
            "(the student must see the teacher's mixed images)"
        )
    for key in sorted(stored or {}):
        if _plain(mix.get(key)) != _plain(stored[key]):
            raise ValueError(
                f"config key 'mix.{key}': {mix.get(key)!r}, but {store} was made with "
                f"{stored[key]!r} (the student must see the teacher's mixed images)"
            )
