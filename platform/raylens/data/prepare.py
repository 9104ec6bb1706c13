"""Source → prepared dataset: validated image bytes in Parquet shards plus ``dataset.json``.

Layout of a prepared dataset (local, ``s3://`` or ``gs://``)::

    <output>/dataset.json              # written last: a dataset without it is incomplete
    <output>/<split>/part-00000.parquet

Rows: ``id`` (str), ``image`` (encoded bytes, as in the source), ``label`` (int32) or
``labels`` (list<int32>), ``split``, ``source`` (the input URI), ``width``, ``height``,
``mode``, then the source's metadata columns. ``dataset.json`` holds the classes, counts
per split and class, every rejected input with its reason, inputs whose pixel format is
converted at decode, manifest rows dropped as exact repeats (``duplicates``), classes
missing from a split (``warnings``), and a fingerprint of source + settings that makes
re-runs idempotent.

Every input is read and decoded before any split is drawn, and the seeded, stratified
split is drawn over the inputs that passed, so a class with >= 3 valid images gets at
least one val and one test image however many of its files were bad.
With ``prepare.mosaic_grid`` the rows are multi-label mosaics of the source's images
(:mod:`raylens.data.mosaic`), with a ``members`` column naming the source ids per cell.
With ``prepare.clutter_canvas`` each image is pasted on a cluttered canvas
(:mod:`raylens.data.clutter`); ``members`` names the images its fragments come from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from raylens.data import fashion_mnist
from raylens.data.clutter import build_clutter, compose_clutter
from raylens.data.images import (
    SHRINK_JPEG_QUALITY,
    ImageRejected,
    decoded_nbytes,
    inspect_image,
    shrink_to_fit,
)
from raylens.data.mosaic import build_mosaics, compose
from raylens.data.sources import (
    SPLITS,
    FolderSource,
    IdxSource,
    ManifestSource,
    Record,
    Source,
    label_space,
    open_source,
)
from raylens.schema import PrepareConfig, SourceConfig
from raylens.storage import Storage, join

FORMAT = "raylens.dataset/1"
CARD = "dataset.json"
# Cards record that their split was drawn over the images that passed validation. A card
# without it (prepared before) whose inputs all passed has the same split; one with
# rejected inputs is prepared again, not reported up to date.
SPLIT_OVER = "valid_images"


# ----------------------------------------------------------------------------- splits


def assign_splits(
    records: list[Record], *, train: float, val: float, test: float, seed: int
) -> dict[str, str]:
    """Stratified, seeded split: ``{record id: split}``.

    Records that already carry a split keep it. When the source has train/test but no val,
    val is carved from train with fraction ``val / (train + val)``. Multi-label records are
    stratified by their rarest label. Every class with enough samples gets at least one
    val/test sample when its fraction is non-zero.
    """
    given = {r.id: r.split for r in records if r.split}
    if given and len(given) != len(records):
        missing = next(r.id for r in records if not r.split)
        raise ValueError(
            f"some records have a split and some don't (e.g. {missing!r}); "
            "give every record a split, or none"
        )
    present = set(given.values())
    if given and "val" in present:
        return given
    if given:
        pool = [r for r in records if r.split == "train"]
        fracs = {"train": train / (train + val) if train + val else 1.0, "val": 0.0, "test": 0.0}
        fracs["val"] = 1.0 - fracs["train"]
        out = dict(given)
    else:
        pool = list(records)
        fracs = {"train": train, "val": val, "test": test}
        out = {}
    label_freq = Counter(lbl for r in pool for lbl in (r.labels or [r.label]))
    groups: dict[str, list[str]] = defaultdict(list)
    for r in pool:
        key = min(r.labels, key=lambda x: (label_freq[x], x)) if r.labels else r.label
        groups[str(key)].append(r.id)
    rng = np.random.default_rng(seed)
    for key in sorted(groups):
        ids = sorted(groups[key])
        rng.shuffle(ids)
        n = len(ids)
        n_val = int(round(n * fracs["val"]))
        n_test = int(round(n * fracs["test"]))
        if n >= 3:
            n_val = max(n_val, 1 if fracs["val"] > 0 else 0)
            n_test = max(n_test, 1 if fracs["test"] > 0 else 0)
        n_val = min(n_val, n)
        n_test = min(n_test, n - n_val)
        for i, rid in enumerate(ids):
            out[rid] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return out


def splits_for(records: list[Record], cfg: PrepareConfig, seed: int) -> dict[str, str]:
    """:func:`assign_splits` with the fractions of ``cfg``."""
    return assign_splits(
        records, train=cfg.train_fraction, val=cfg.val_fraction, test=cfg.test_fraction, seed=seed
    )


def promised_splits(records: list[Record], cfg: PrepareConfig) -> list[str]:
    """The splits every class should appear in: those the source gives (plus val when it is
    carved from train), or those with a non-zero fraction when prepare draws them."""
    given = {r.split for r in records if r.split}
    if not given:
        fractions = {
            "train": cfg.train_fraction,
            "val": cfg.val_fraction,
            "test": cfg.test_fraction,
        }
        return [s for s in SPLITS if fractions[s] > 0]
    if "val" not in given and cfg.val_fraction > 0 and "train" in given:
        given.add("val")
    return [s for s in SPLITS if s in given]


def split_warnings(
    counts: dict[str, Counter], classes: list[str], promised: list[str], *, drawn: bool
) -> list[dict[str, Any]]:
    """One warning per class with no image in a promised split: ``{class, images (valid,
    all splits; label occurrences when multi-label), per_split, missing, message}``.
    ``drawn``: prepare drew the splits (the source gave none), which the message hints at.

    Such a class cannot be evaluated there: it is absent from that split's metrics (see
    :mod:`raylens.tasks.classification`), not scored 0.
    """
    out = []
    for c in classes:
        per_split = {s: counts[s].get(c, 0) for s in SPLITS}
        missing = [s for s in promised if per_split[s] == 0]
        if not missing:
            continue
        images = sum(per_split.values())
        message = (
            f"class {c!r} has {images} valid image(s) ("
            + ", ".join(f"{s} {n}" for s, n in per_split.items())
            + f"): none in {', '.join(missing)}"
        )
        if drawn:
            message += "; a class needs >= 3 valid images to get one in each of train, val, test"
        out.append(
            {
                "class": c,
                "images": images,
                "per_split": per_split,
                "missing": missing,
                "message": message,
            }
        )
    return out


# ----------------------------------------------------------------------------- validation


@dataclasses.dataclass
class Checked:
    record: Record
    data: bytes | None = None
    width: int = 0
    height: int = 0
    mode: str = ""
    conversion: str | None = None
    reason: str | None = None
    detail: str = ""
    digest: bytes = b""  # of the bytes judged, to tell whether a re-read returns the same
    source_size: tuple[int, int] | None = None  # (w, h) before prepare.max_side shrank it


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class ByteBudget:
    """Bytes that threads may hold at once (here: decoded pixels). :meth:`hold` waits until
    ``n`` more fit, except when nothing is held (an item larger than the whole budget
    still goes, alone). A semaphore counted in bytes, which the standard library lacks."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, n: int):
        with self._cond:
            while self.used and self.used + n > self.limit:
                self._cond.wait()
            self.used += n
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


class Decoder:
    """Where prepare decodes images: on at most one thread per core, with at most ``limit``
    bytes of decoded pixels at once (sized from the headers).

    Reading stays on ``prepare.num_threads`` threads (I/O bound); decoding is CPU bound, so
    more threads than cores gain nothing, and every thread that ever decoded keeps its own
    malloc arena of decode buffers: decoding on all of them made peak RSS grow with the
    thread count. Used as a context manager (its threads end on exit).
    """

    def __init__(self, limit: int, threads: int):
        self.budget = ByteBudget(limit)
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(threads, os.cpu_count() or 1)))

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def run(self, data: bytes, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """``fn(*args, **kw)`` on a decoding thread, once the pixels of ``data`` fit."""
        with self.budget.hold(decoded_nbytes(data)):
            return self.pool.submit(fn, *args, **kw).result()


def _decode(decoder: Decoder | None, data: bytes, fn: Callable[..., Any], *args, **kw) -> Any:
    return decoder.run(data, fn, *args, **kw) if decoder else fn(*args, **kw)


# Allocations from this size on get pages of their own (mmap), given back when freed.
# Measured (benchmarks/RESULTS.md, jobs.prepare peak memory: 16 threads, 32 MiB shards): 256 KiB held the
# least (+33 MiB) but mapping every encoded image cost ~3.5 ms of system CPU per image;
# 4 MiB: +40 MiB at ~0.8 ms; glibc's default (a threshold that rises): +56-62 MiB.
MMAP_THRESHOLD = 4 * 2**20


def return_freed_buffers() -> bool:
    """Makes this process give large freed buffers (encoded images, decode buffers) back
    to the OS at once; returns whether it could (glibc only; a no-op elsewhere).

    For a process that runs :func:`prepare` (``jobs.prepare`` calls it): glibc otherwise
    raises its mmap and trim thresholds after the first freed image-sized buffer and
    serves later ones from per-thread arenas, which keep what they freed. Every reading
    or decoding thread then holds its own high-water mark, and peak RSS grew with
    num_threads past the shard-sized bounds prepare keeps. Fixing the threshold
    (``mallopt(M_MMAP_THRESHOLD)``, which Python does not expose: ctypes) turns the
    rise off, and arenas are trimmed again. Process-wide, so the job sets it, not the
    library.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_mmap_threshold = -3  # glibc's malloc.h
    return bool(mallopt(ctypes.c_int(m_mmap_threshold), ctypes.c_int(MMAP_THRESHOLD)))


def check_record(
    record: Record, storage: Storage, cfg: PrepareConfig, decoder: Decoder | None = None
) -> Checked:
    """Reads and fully decodes one input; never raises for bad input. ``decoder``: where
    to decode (bounded threads and bytes), else on the calling thread."""
    try:
        if record.parts is not None and record.canvas:
            data = compose_clutter(record, storage, cfg)
        elif record.parts is not None:
            data = compose(record, storage, cfg.max_image_pixels)
        else:
            data = record.data if record.data is not None else storage.read_bytes(record.uri)
    except FileNotFoundError as err:
        return Checked(record, reason="missing_file", detail=str(err))
    except ImageRejected as rej:  # a mosaic member or clutter layer that does not decode
        return Checked(record, reason=rej.reason, detail=rej.detail)
    return _inspect(record, data, cfg, decoder)


def _inspect(
    record: Record, data: bytes, cfg: PrepareConfig, decoder: Decoder | None = None
) -> Checked:
    try:
        if len(data) > cfg.max_file_bytes:  # before the budget is sized from the header
            raise ImageRejected("too_large", f"{len(data)} bytes > limit {cfg.max_file_bytes}")
        info = _decode(
            decoder,
            data,
            inspect_image,
            data,
            max_pixels=cfg.max_image_pixels,
            max_bytes=cfg.max_file_bytes,
        )
    except ImageRejected as rej:
        return Checked(record, reason=rej.reason, detail=rej.detail)
    return Checked(
        record,
        data=data,
        width=info.width,
        height=info.height,
        mode=info.mode,
        conversion=info.conversion,
        digest=_digest(data),
    )


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    """A progress bar on stderr (images), at most one redraw every 2 s."""
    return tqdm(
        total=total, desc=desc, unit="img", disable=not progress, mininterval=2.0, file=sys.stderr
    )


def validate(
    records: list[Record], storage: Storage, cfg: PrepareConfig, *, progress: bool
) -> dict[str, Checked]:
    """:func:`check_record` of every record, in parallel: ``{id: Checked}`` without the
    image bytes (memory stays bounded: :func:`reload` reads them again to write them)."""
    out: dict[str, Checked] = {}
    bar = _bar(len(records), "check", progress)
    # Decoded pixels held at once: memory follows prepare.shard_bytes, not num_threads.
    decoder = Decoder(max(1, cfg.shard_bytes // DECODE_DIVISOR), cfg.num_threads)

    def check(r: Record) -> Checked:
        return dataclasses.replace(check_record(r, storage, cfg, decoder), data=None)

    with decoder, ThreadPoolExecutor(max_workers=cfg.num_threads) as pool:
        for checked in _ordered_map(pool, check, records, window=cfg.num_threads * 64):
            bar.update(1)
            out[checked.record.id] = checked
    bar.close()
    return out


def reload(
    record: Record,
    first: Checked | None,
    storage: Storage,
    cfg: PrepareConfig,
    decoder: Decoder | None = None,
) -> Checked:
    """The bytes of a record :func:`validate` passed, with its decode facts (no second
    decode); judged afresh if they changed since. Composites (mosaics, clutter canvases),
    which ``first`` is None for, are composed and checked here."""
    if first is None:
        return check_record(record, storage, cfg, decoder)
    try:
        data = record.data if record.data is not None else storage.read_bytes(record.uri)
    except FileNotFoundError as err:
        return Checked(record, reason="missing_file", detail=str(err))
    if _digest(data) == first.digest:
        return dataclasses.replace(first, data=data)
    return _inspect(record, data, cfg, decoder)


def fit(checked: Checked, max_side: int | None, decoder: Decoder | None = None) -> Checked:
    """``checked`` with its image shrunk to ``max_side`` (``prepare.max_side``) when its
    longer side exceeds it (:func:`~raylens.data.images.shrink_to_fit`); width and height
    then describe the stored image, ``source_size`` the original."""
    if not max_side or checked.reason or max(checked.width, checked.height) <= max_side:
        return checked
    try:
        # the budget is the full decode's: at most, a reduced decode takes less
        small = _decode(
            decoder, checked.data, shrink_to_fit, checked.data, max_side, max_pixels=2**62
        )  # its size passed prepare.max_image_pixels already
    except ImageRejected as rej:
        return Checked(checked.record, reason=rej.reason, detail=rej.detail)
    if small is None:
        return checked
    return dataclasses.replace(
        checked,
        data=small.data,
        width=small.width,
        height=small.height,
        source_size=(checked.width, checked.height),
    )


# ----------------------------------------------------------------------------- writing


# Rows per row group (at most): a row group is also a mixing unit of decode-time mixing
# (raylens.data.mix) and the unit Parquet readers fetch.
ROW_GROUP_ROWS = 1024
# A row group also holds at most shard_bytes / this many bytes of images, and prepare reads
# at most shard_bytes / READ_AHEAD_DIVISOR bytes of images ahead of the writer: together
# with the row group in flight (as rows, then as an Arrow table) that keeps the write
# phase's memory under one shard's bytes, whatever the image size.
ROW_GROUP_DIVISOR = 8
READ_AHEAD_DIVISOR = 4
# Validation decodes at most shard_bytes / this many bytes of pixels at once (all threads).
DECODE_DIVISOR = 2


class ShardWriter:
    """Streams rows of one split into ``part-NNNNN.parquet`` files, one row group at a time
    (at most :data:`ROW_GROUP_ROWS` rows and ``max_bytes / ROW_GROUP_DIVISOR`` bytes of
    images), so a shard is never held in memory whole. A shard is written through
    :meth:`Storage.open_atomic`: it appears under its name complete, or not at all."""

    def __init__(
        self,
        storage: Storage,
        output: str,
        split: str,
        schema: pa.Schema,
        max_rows: int,
        max_bytes: int,
    ):
        self.storage, self.output, self.split, self.schema = storage, output, split, schema
        self.max_rows, self.max_bytes = max_rows, max_bytes
        self.group_bytes = max(1, max_bytes // ROW_GROUP_DIVISOR)
        self.rows: list[dict[str, Any]] = []  # the row group being filled
        self.rows_nbytes = 0
        self.shard_rows = 0  # rows and image bytes in the open shard
        self.nbytes = 0
        self.total = 0
        self.files: list[str] = []
        self._file: contextlib.AbstractContextManager | None = None
        self._writer: pq.ParquetWriter | None = None

    def add(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            self._open()
        self.rows.append(row)
        self.total += 1
        self.shard_rows += 1
        size = len(row["image"])
        self.nbytes += size
        self.rows_nbytes += size
        if len(self.rows) >= ROW_GROUP_ROWS or self.rows_nbytes >= self.group_bytes:
            self._write_group()
        if self.shard_rows >= self.max_rows or self.nbytes >= self.max_bytes:
            self.flush()

    def _open(self) -> None:
        name = f"{self.split}/part-{len(self.files):05d}.parquet"
        self._file = self.storage.open_atomic(join(self.output, name))
        sink = self._file.__enter__()
        # Images are already compressed: don't spend CPU compressing them again.
        self._writer = pq.ParquetWriter(
            sink,
            self.schema,
            compression={f.name: ("NONE" if f.name == "image" else "ZSTD") for f in self.schema},
        )

    def _write_group(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        self.rows, self.rows_nbytes = [], 0  # the bytes now live in the table only
        self._writer.write_table(table, row_group_size=len(table))

    def flush(self) -> None:
        """Ends the open shard: its last row group, the footer, then it is put in place."""
        if self._writer is None:
            return
        self._write_group()
        name = f"{self.split}/part-{len(self.files):05d}.parquet"
        writer, file = self._writer, self._file
        self._writer, self._file = None, None
        self.shard_rows, self.nbytes = 0, 0
        writer.close()
        file.__exit__(None, None, None)
        self.files.append(name)

    def abort(self) -> None:
        """Drops the open shard (a failed prepare): nothing appears under its name."""
        writer, file = self._writer, self._file
        self._writer, self._file, self.rows = None, None, []
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
            err = RuntimeError("prepare failed")
            with contextlib.suppress(Exception):
                file.__exit__(RuntimeError, err, None)


def shard_schema(multi_label: bool, meta_schema: pa.Schema) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("labels", pa.list_(pa.int32())) if multi_label else pa.field("label", pa.int32()),
        pa.field("split", pa.string()),
        pa.field("source", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("mode", pa.string()),
    ]
    return pa.schema(fields + [f for f in meta_schema if f.name not in {x.name for x in fields}])


def infer_meta_schema(source: Source, records: list[Record]) -> pa.Schema:
    keys = list(dict.fromkeys(k for r in records for k in r.meta))
    known = {f.name: f for f in source.meta_schema}
    fields = []
    for k in keys:
        if k in known:
            fields.append(known[k])
        else:
            fields.append(pa.field(k, pa.array([r.meta.get(k) for r in records]).type))
    return pa.schema(fields)


# ----------------------------------------------------------------------------- prepare


def fingerprint(source: Source, source_cfg: SourceConfig, cfg: PrepareConfig, seed: int) -> str:
    h = hashlib.sha256()
    settings = {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in ("overwrite", "output", "num_threads")
    }
    if settings.get("max_side") is None:
        # off: left out, so datasets prepared before the key existed stay up to date
        settings.pop("max_side", None)
    h.update(
        json.dumps(
            {
                "format": FORMAT,
                "kind": source.kind,
                "prepare": settings,
                "seed": seed,
                "source": {k: v for k, v in dataclasses.asdict(source_cfg).items()},
            },
            sort_keys=True,
            default=str,
        ).encode()
    )
    for part in source.fingerprint_parts():
        h.update(part.encode())
        h.update(b"\n")
    return h.hexdigest()


def _order_key(seed: int, rid: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{rid}".encode(), digest_size=8).digest()


# What every reader of a card relies on (DatasetInfo, the Parquet readers, embed, teacher).
CARD_KEYS = ("format", "classes", "task", "splits", "fingerprint")
TASKS = ("single_label", "multi_label")


def load_card(storage: Storage, output: str, *, strict: bool = True) -> dict[str, Any] | None:
    """The card (``dataset.json``) of the prepared dataset at ``output``; None when there
    is none (not prepared, or an unfinished prepare: the card is written last).

    Raises:
        ValueError: (``strict``) the file is there but is not a card: empty, not JSON, or
            lacking what readers need; the message names the file and what is wrong.
            Without ``strict`` such a card reads as None (prepare then rewrites it).
    """
    uri = join(output, CARD)
    if not storage.exists(uri):
        return None
    try:
        return check_card(storage.read_bytes(uri), uri)
    except ValueError:
        if strict:
            raise
        return None


def check_card(data: bytes, uri: str) -> dict[str, Any]:
    """The card parsed from ``data`` (the bytes of ``uri``), checked for what its readers use.

    Raises:
        ValueError: naming ``uri`` and what is wrong (no decoder internals), then the way
            out.
    """
    fix = "re-run jobs.prepare (it rewrites a damaged card)"
    if not data.strip():
        raise ValueError(f"dataset card {uri!r} is empty; {fix}")
    try:
        card = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"dataset card {uri!r} is not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}"
        raise ValueError(f"dataset card {uri!r} is not valid JSON (at {where}); {fix}") from None
    if not isinstance(card, dict):
        raise ValueError(f"dataset card {uri!r} is not a JSON object; {fix}")
    problems = [f"no {k!r}" for k in CARD_KEYS if k not in card]
    if not problems:
        if card["format"] != FORMAT:
            problems.append(f"format {card['format']!r}, expected {FORMAT!r}")
        if not isinstance(card["classes"], list):
            problems.append("'classes' is not a list")
        if card["task"] not in TASKS:
            problems.append(f"'task' is {card['task']!r}, expected one of {list(TASKS)}")
        splits = card["splits"] if isinstance(card["splits"], dict) else {}
        for split in SPLITS:
            entry = splits.get(split)
            if not isinstance(entry, dict):
                problems.append(f"no split {split!r}")
            elif not isinstance(entry.get("count"), int) or not isinstance(
                entry.get("files"), list
            ):
                problems.append(f"split {split!r} lacks its 'count' or 'files' list")
    if problems:
        raise ValueError(
            f"dataset card {uri!r} is not a raylens dataset card: {'; '.join(problems)}; {fix}"
        )
    return card


def check_dataset(
    dataset: str,
    source: SourceConfig,
    storage: Storage,
    *,
    raw_kinds: Collection[str] = ("folder", "manifest", "yolo", "idx"),
    why_prepared: str = "",
) -> dict[str, Any] | None:
    """Checks ``data.dataset`` before any cluster work: the card of a prepared dataset, or
    None for a raw source of one of ``raw_kinds`` (read with ``source.*``) that holds
    labelled images. Cheap: one card read, or a listing (and a manifest read).

    Args:
        raw_kinds: the raw layouts the caller reads directly; empty: only a prepared
            dataset will do, ``why_prepared`` saying why.

    Raises:
        ValueError: no ``data.dataset``; a damaged card (:func:`load_card`); a raw source the
            caller cannot read, or one without labelled images.
        FileNotFoundError: no card and nothing usable at ``dataset``, naming what is missing.
    """
    if not dataset:
        raise ValueError(
            "config key 'data.dataset' is required: a prepared dataset dir "
            "(or a raw folder / manifest)"
        )
    card = load_card(storage, dataset)
    if card is not None:
        return card
    where = f"config key 'data.dataset': no prepared dataset ({CARD}) at {dataset!r}"
    if not raw_kinds:
        raise FileNotFoundError(f"{where}; {why_prepared} (run jobs.prepare)")
    if dataset not in fashion_mnist.ALIASES and not storage.exists(dataset):
        raise FileNotFoundError(f"{where}, and nothing else is there (no such file or folder)")
    shards = [e.uri for s in SPLITS for e in storage.list_files(join(dataset, s), False)]
    if any(u.endswith(".parquet") for u in shards):
        raise FileNotFoundError(
            f"{where}, only shards: an unfinished jobs.prepare (the card is written last); "
            "re-run it"
        )
    src = open_source(SourceConfig(**{**source.__dict__, "uri": dataset}), storage)
    what = f"a raw {src.kind} source"
    if source.kind != "auto":
        what += f" (source.kind={source.kind})"
    try:
        _probe_raw(src, raw_kinds)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"{where}, nor is it {what}: {err}") from None
    return None


def _probe_raw(src: Source, raw_kinds: Collection[str]) -> None:
    """Fails unless ``src`` is of a kind the caller reads and holds what it needs, without
    reading images (IDX: its four files; folder, manifest: labelled records)."""
    if src.kind not in raw_kinds:
        raise ValueError(
            f"{src.kind} files are read only by jobs.prepare; this job reads a raw "
            f"{' / '.join(sorted(raw_kinds))} source"
        )
    if isinstance(src, IdxSource):
        missing = [
            f"{name}[.gz]"
            for name in fashion_mnist.FILES.values()
            if not any(src.storage.exists(join(src.uri, name + gz)) for gz in (".gz", ""))
        ]
        if missing:
            raise FileNotFoundError(f"missing {', '.join(missing)}")
    elif isinstance(src, (FolderSource, ManifestSource)) and not src.records():
        dropped = {**Counter(r["reason"] for r in src.rejected), **src.skipped}
        raise ValueError(f"no labelled images (left out: {dropped or 'nothing'})")


def prepare(
    source_cfg: SourceConfig,
    cfg: PrepareConfig,
    storage: Storage,
    *,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Prepares ``source_cfg.uri`` into ``cfg.output``; returns the dataset card.

    Idempotent: when the output's card has the same fingerprint (same source listing,
    same settings), nothing is rewritten unless ``cfg.overwrite``.
    """
    if not cfg.output:
        raise ValueError("config key 'prepare.output' is required: where to write the dataset")
    t0 = time.time()
    source = open_source(source_cfg, storage)
    log(f"[prepare] listing {source.kind} source {source_cfg.uri}")
    records = sorted(source.records(), key=lambda r: r.id)
    fp = fingerprint(source, source_cfg, cfg, seed)
    existing = load_card(storage, cfg.output, strict=False)  # a damaged card is rewritten
    same_split = existing and (
        existing.get("split_over") == SPLIT_OVER or not existing.get("rejected")
    )
    if existing and existing.get("fingerprint") == fp and same_split and not cfg.overwrite:
        log(
            f"[prepare] {cfg.output} is up to date with the source (fingerprint {fp[:12]}); nothing to do"
        )
        existing["up_to_date"] = True
        return existing
    if existing:
        # Shards are rewritten under the same names: drop the old card first, so a crash
        # midway leaves a dataset without a card (incomplete), never a stale card that
        # describes a mix of old and new shards.
        storage.delete(join(cfg.output, CARD))

    # The classes come from the whole listing: a class whose every file is bad stays in the
    # label space (with zero images and a warning), so class indices don't depend on it.
    classes, multi = label_space(source, records)
    for key, what in (("mosaic_grid", "mosaics need"), ("clutter_canvas", "clutter needs")):
        if getattr(cfg, key) and multi:
            raise ValueError(
                f"config key 'prepare.{key}': {what} a single-label source; "
                f"{source_cfg.uri!r} is multi-label"
            )
    rejected = list(source.rejected)
    _log_repeats(source, log)

    # [1] validate every input, [2] split what passed, [3] write it.
    checks = validate(records, storage, cfg, progress=progress)
    for rec in records:
        if checks[rec.id].reason:
            rejected.append(_rejection(checks[rec.id], storage))
    records = [r for r in records if not checks[r.id].reason]
    promised = promised_splits(records, cfg)
    drawn = not any(r.split for r in records)
    if cfg.mosaic_grid:
        records = build_mosaics(records, splits_for(records, cfg, seed), classes, cfg, seed)
        multi = True
        log(f"[prepare] {len(records)} {cfg.mosaic_grid}x{cfg.mosaic_grid} mosaics")
    elif cfg.clutter_canvas:
        records = build_clutter(records, splits_for(records, cfg, seed), cfg, seed)
        log(f"[prepare] {len(records)} cluttered {cfg.clutter_canvas}px canvases")
    if cfg.mosaic_grid or cfg.clutter_canvas:
        checks = {}  # composites are composed and checked as they are written
    index = {c: i for i, c in enumerate(classes)}
    splits = splits_for(records, cfg, seed)
    meta_schema = infer_meta_schema(source, records)
    schema = shard_schema(multi, meta_schema)
    writers = {
        s: ShardWriter(storage, cfg.output, s, schema, cfg.shard_rows, cfg.shard_bytes)
        for s in SPLITS
    }
    converted: list[dict[str, Any]] = []
    counts: dict[str, Counter] = {s: Counter() for s in SPLITS}
    modes: Counter = Counter()

    # Rows go out in a seeded pseudo-random order, so every shard (and every Ray Data
    # block read from it) mixes classes, even for sources listed class by class.
    ordered = sorted(records, key=lambda r: (SPLITS.index(splits[r.id]), _order_key(seed, r.id)))
    bar = _bar(len(ordered), "write", progress)
    resized = 0
    # Decoded pixels (composites, prepare.max_side) and images read ahead of the writer
    # are bounded in bytes, so memory follows prepare.shard_bytes, not num_threads.
    decoder = Decoder(max(1, cfg.shard_bytes // READ_AHEAD_DIVISOR), cfg.num_threads)
    pool = ThreadPoolExecutor(max_workers=cfg.num_threads)
    try:
        stream = _ordered_map(
            pool,
            lambda r: fit(
                reload(r, checks.get(r.id), storage, cfg, decoder), cfg.max_side, decoder
            ),
            ordered,
            window=cfg.num_threads * 64,
            max_bytes=max(1, cfg.shard_bytes // READ_AHEAD_DIVISOR),
            size=lambda c: len(c.data or b""),
            workers=cfg.num_threads,
        )
        for checked in stream:
            bar.update(1)
            rec = checked.record
            if checked.reason:  # a composite that fails, or a file changed since validation
                rejected.append(_rejection(checked, storage))
                continue
            split = splits[rec.id]
            modes[checked.mode] += 1
            if checked.conversion:
                converted.append(
                    {
                        "id": rec.id,
                        "source": rec.uri,
                        "mode": checked.mode,
                        "reason": checked.conversion,
                    }
                )
            row = {
                "id": rec.id,
                "image": checked.data,
                "split": split,
                "source": rec.uri,
                "width": checked.width,
                "height": checked.height,
                "mode": checked.mode,
                **rec.meta,
            }
            if multi:
                row["labels"] = [index[x] for x in rec.labels]
                counts[split].update(rec.labels)
            else:
                row["label"] = index[rec.label]
                counts[split][rec.label] += 1
            resized += checked.source_size is not None
            del checked  # the row holds the bytes now: one reference, freed with it
            writers[split].add(row)
            del row
        for w in writers.values():
            w.flush()
    except BaseException:
        for w in writers.values():
            w.abort()  # no half shard under a final name
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        decoder.__exit__()
    bar.close()

    files = {s: w.files for s, w in writers.items()}
    _delete_stale(storage, cfg.output, {f for fs in files.values() for f in fs})
    reasons = Counter(r["reason"] for r in rejected)
    warnings = split_warnings(counts, classes, promised, drawn=drawn)
    for w in warnings[:20]:
        log(f"[prepare] warning: {w['message']}")
    if len(warnings) > 20:
        log(f"[prepare] warning: {len(warnings) - 20} more classes missing from a split ({CARD})")
    card = {
        "format": FORMAT,
        "task": "multi_label" if multi else "single_label",
        "classes": classes,
        "num_classes": len(classes),
        "source": {"uri": source_cfg.uri, "kind": source.kind},
        "mosaic": (
            {
                "grid": cfg.mosaic_grid,
                "skew": cfg.mosaic_skew,
                "empty": cfg.mosaic_empty,
                "ratio": cfg.mosaic_ratio,
            }
            if cfg.mosaic_grid
            else None
        ),
        "clutter": (
            {
                k[len("clutter_") :]: getattr(cfg, k)
                for k in (f.name for f in dataclasses.fields(cfg))
                if k.startswith("clutter_")
            }
            if cfg.clutter_canvas
            else None
        ),
        "max_side": (
            {"limit": cfg.max_side, "resized": resized, "jpeg_quality": SHRINK_JPEG_QUALITY}
            if cfg.max_side
            else None
        ),
        "splits": {
            s: {
                "count": writers[s].total,
                "per_class": {c: counts[s].get(c, 0) for c in classes},
                "files": files[s],
            }
            for s in SPLITS
        },
        "total": sum(w.total for w in writers.values()),
        "modes": dict(modes),
        "rejected": rejected,
        "rejected_by_reason": dict(reasons),
        "converted": converted,
        "skipped": dict(source.skipped),
        "duplicates": source.duplicates,
        "warnings": warnings,
        "split_over": SPLIT_OVER,
        "columns": [f.name for f in schema],
        "meta_columns": [f.name for f in meta_schema],
        "seed": seed,
        "fractions": {
            "train": cfg.train_fraction,
            "val": cfg.val_fraction,
            "test": cfg.test_fraction,
        },
        "fingerprint": fp,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - t0, 2),
    }
    storage.write_text(join(cfg.output, CARD), json.dumps(card, indent=1))
    log(
        f"[prepare] wrote {card['total']} images to {cfg.output} in {card['seconds']} s "
        f"({len(rejected)} rejected)"
    )
    return card


def _rejection(checked: Checked, storage: Storage) -> dict[str, str]:
    rec = checked.record
    return {
        "source": rec.uri,
        "id": rec.id,
        "reason": checked.reason or "",
        "detail": storage.scrub(checked.detail),
    }


def _log_repeats(source: Source, log: Callable[[str], None]) -> None:
    """Console lines for manifest rows repeating an id: dropped, or rejected as conflicting."""
    conflicts = [r for r in source.rejected if r["reason"] == "conflicting_duplicate"]
    for entries, what in (
        (source.duplicates, "dropped {} exact repeat(s) of a manifest row"),
        (conflicts, "rejected {} manifest row(s) repeating an id with other values"),
    ):
        if entries:
            more = " ..." if len(entries) > 10 else ""
            places = ", ".join(_position(e) for e in entries[:10])
            log(f"[prepare] {what.format(len(entries))}: {places}{more}")


def _position(entry: dict[str, Any]) -> str:
    """``'img/a.png' (line 7)``: a manifest row's id and 1-based position."""
    kind = "line" if "line" in entry else "row"
    return f"{entry['id']!r} ({kind} {entry.get(kind, '?')})"


def _ordered_map(
    pool: ThreadPoolExecutor,
    fn: Callable,
    items: Iterable,
    window: int,
    *,
    max_bytes: int | None = None,
    size: Callable[[Any], int] = lambda r: 0,
    workers: int = 1,
):
    """``pool.map`` with a bounded number of results in flight (bounded memory).

    With ``max_bytes``, also bounded in bytes (``size`` of a result): no new item is started
    while the finished results waiting to be taken plus the running items (at the mean
    size so far) reach ``max_bytes``, and at most ``workers`` items run at once; so about
    ``max_bytes`` (plus one item) is held however large the items are.
    (``concurrent.futures`` bounds nothing by itself.)
    """
    from collections import deque

    cond = threading.Condition()
    held = 0  # bytes of finished results not yet taken
    busy = 0  # items submitted and not finished
    seen = seen_bytes = 0  # finished items and their bytes: the mean size of one

    def job(item: Any) -> Any:
        nonlocal held, busy, seen, seen_bytes
        try:
            result = fn(item)
        except BaseException:
            with cond:
                busy -= 1
                cond.notify()
            raise
        n = size(result)
        with cond:
            busy -= 1
            held += n
            seen, seen_bytes = seen + 1, seen_bytes + n
            cond.notify()
        return result

    def take() -> Any:
        nonlocal held
        result = pending.popleft().result()
        with cond:
            held -= size(result)
        return result

    pending: deque = deque()
    for item in items:
        while pending:
            with cond:
                ahead = held + busy * (seen_bytes / seen if seen else 0)
                full = len(pending) >= window or (max_bytes is not None and ahead >= max_bytes)
                if not full and (max_bytes is None or busy < workers):
                    break  # room for one more
                if not full and not pending[0].done():
                    cond.wait(timeout=0.1)  # every worker busy: wait for one to finish
                    continue
            yield take()
        with cond:
            busy += 1
        pending.append(pool.submit(job, item))
    while pending:
        yield take()


def _delete_stale(storage: Storage, output: str, keep: set[str]) -> None:
    """Removes shard files of an earlier run that this run did not write."""
    for split in SPLITS:
        try:
            entries = storage.list_files(join(output, split), recursive=False)
        except FileNotFoundError:
            continue
        for e in entries:
            name = f"{split}/{e.uri.rstrip('/').split('/')[-1]}"
            if name.endswith(".parquet") and name not in keep:
                storage.delete(e.uri)


def format_card(card: dict[str, Any]) -> str:
    """A human-readable dataset card."""
    lines = [
        f"dataset: {card['source']['uri']} ({card['source']['kind']}, {card['task']})",
        f"classes ({card['num_classes']}): {', '.join(card['classes'][:20])}"
        + (" ..." if card["num_classes"] > 20 else ""),
        "split      images",
    ]
    for s in SPLITS:
        lines.append(f"  {s:<8} {card['splits'][s]['count']:>7}")
    lines.append(f"  {'total':<8} {card['total']:>7}")
    width = max((len(c) for c in card["classes"]), default=5)
    lines.append(f"{'class':<{width}}  " + "  ".join(f"{s:>6}" for s in SPLITS))
    for c in card["classes"][:50]:
        lines.append(
            f"{c:<{width}}  "
            + "  ".join(f"{card['splits'][s]['per_class'].get(c, 0):>6}" for s in SPLITS)
        )
    lines.append(f"rejected: {len(card['rejected'])} {card['rejected_by_reason'] or ''}")
    for r in card["rejected"][:10]:
        lines.append(f"  - {r['source']}: {r['reason']} ({r['detail'][:100]})")
    lines.append(f"pixel modes: {card['modes']}")
    shrunk = card.get("max_side")  # cards prepared before have none
    if shrunk:
        lines.append(f"images shrunk to a longer side of {shrunk['limit']} px: {shrunk['resized']}")
    if card["converted"]:
        lines.append(
            f"converted to RGB at decode: {len(card['converted'])} "
            f"{dict(Counter(c['mode'] for c in card['converted']))}"
        )
    if card["skipped"]:
        lines.append(f"skipped: {card['skipped']}")
    duplicates = card.get("duplicates") or []  # cards prepared before have none of these
    if duplicates:
        lines.append(f"exact repeats of manifest rows dropped: {len(duplicates)}")
        lines += [f"  - {_position(d)} same as {d['same_as']}" for d in duplicates[:10]]
    warnings = card.get("warnings") or []
    if warnings:
        lines.append(f"warnings: {len(warnings)} classes missing from a split")
        lines += [f"  - {w['message']}" for w in warnings[:20]]
    return "\n".join(lines)
