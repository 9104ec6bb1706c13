"""Raw image sources: folder-per-class, manifest CSV/Parquet, YOLO tiles, IDX files.

A source lists :class:`Record` s cheaply (no image bytes read, except IDX where the
pixels live inside the IDX file); :mod:`raylens.data.prepare` reads, validates and shards
them. Records that cannot be used before reading (no label, unknown class id, manifest
rows repeating an id with other values) land in ``source.rejected`` with their reason;
tiles without labels and exact repeats of a manifest row are counted in ``skipped``, the
repeats also listed in ``duplicates``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

from raylens.data import fashion_mnist
from raylens.data.images import encode_png
from raylens.schema import SourceConfig
from raylens.storage import FileEntry, Storage, is_uri, join, parent, split_uri

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


@dataclass
class Record:
    """One input image. ``label`` (single-label) xor ``labels`` (multi-label) is set."""

    id: str
    uri: str
    label: str | None = None
    labels: list[str] | None = None
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    data: bytes | None = None  # set when the bytes come with the listing (IDX)
    parts: list[Record | None] | None = None  # a mosaic's member records (None: empty cell)
    grid: int = 0  # a mosaic's side, in cells
    canvas: int = 0  # a clutter canvas's side, in pixels (parts: item, then fragments)


def _reject(uri: str, reason: str, detail: str, id: str | None = None) -> dict[str, str]:
    out = {"source": uri, "reason": reason, "detail": detail}
    if id is not None:
        out["id"] = id
    return out


def listing_fingerprint(storage: Storage, uris: list[str]) -> list[str]:
    """``uri:size`` of the given files, by one listing per parent folder (not one stat each)."""
    wanted = set(uris)
    out = []
    for folder in sorted({parent(u) for u in uris}):
        try:
            entries = storage.list_files(folder, recursive=False)
        except FileNotFoundError:
            continue
        out.extend(f"{e.uri}:{e.size}" for e in entries if e.uri in wanted)
    return sorted(out)


def normalize_split(value: Any, where: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    split = SPLIT_ALIASES.get(str(value).strip().lower())
    if split is None:
        raise ValueError(f"{where}: split {value!r} is not one of train/val/test")
    return split


class Source:
    """Base: ``records()`` lists inputs; ``rejected``/``skipped`` collect what was dropped."""

    kind = "base"

    def __init__(self, cfg: SourceConfig, storage: Storage):
        self.cfg = cfg
        self.storage = storage
        self.uri = cfg.uri
        self.rejected: list[dict[str, str]] = []
        self.skipped: dict[str, int] = {}
        # exact repeats of a manifest row, dropped: {id, source, line|row, same_as}
        self.duplicates: list[dict[str, Any]] = []
        self.class_order: list[str] | None = None  # fixed by the source (IDX, YOLO)
        self.meta_schema: pa.Schema = pa.schema([])
        self._listing: list[FileEntry] | None = None

    def files(self) -> list[FileEntry]:
        """Every file under the source root, listed once (listings of buckets are slow)."""
        if self._listing is None:
            self._listing = self.storage.list_files(self.uri)
        return self._listing

    def records(self) -> list[Record]:
        raise NotImplementedError

    def fingerprint_parts(self) -> list[str]:
        """Strings that change when the source's contents change."""
        return [f"{e.uri}:{e.size}" for e in self.files()]

    def _is_image(self, uri: str) -> bool:
        return posixpath.splitext(uri)[1].lower() in {e.lower() for e in self.cfg.extensions}

    def _rel(self, uri: str, root: str) -> str:
        return posixpath.relpath(split_uri(uri)[1], split_uri(root)[1])


class FolderSource(Source):
    """``root/<class>/<image>``; optionally ``root/<split>/<class>/<image>``."""

    kind = "folder"

    def records(self) -> list[Record]:
        entries = self.files()
        if not entries:
            raise FileNotFoundError(f"folder source {self.uri!r}: no files found")
        rels = [(e, self._rel(e.uri, self.uri)) for e in entries]
        image_rels = [(e, r) for e, r in rels if self._is_image(e.uri)]
        ignored = len(rels) - len(image_rels)
        if ignored:
            self.skipped["not_an_image_suffix"] = ignored
        top = {r.split("/")[0] for _, r in image_rels if "/" in r}
        split_layout = (
            bool(top)
            and top <= set(SPLIT_ALIASES)
            and all(r.count("/") >= 2 for _, r in image_rels)
        )
        out = []
        for entry, rel in image_rels:
            parts = rel.split("/")
            split = None
            if split_layout:
                split, parts = SPLIT_ALIASES[parts[0]], parts[1:]
            if len(parts) < 2:
                self.rejected.append(
                    _reject(entry.uri, "missing_label", "file is not inside a class folder", rel)
                )
                continue
            out.append(Record(id=rel, uri=entry.uri, label=parts[0], split=split))
        return out


def _parse_labels(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None and str(v) != ""]
    text = str(value).strip()
    if not text:
        return []
    if text.startswith("["):
        return [str(v) for v in json.loads(text)]
    for sep in ("|", ";", ","):
        if sep in text:
            return [p.strip() for p in text.split(sep) if p.strip()]
    return [text]


class ManifestSource(Source):
    """A CSV or Parquet table: ``path``, ``label`` or ``labels``, optional ``split``/``id``.

    Paths are relative to the manifest's folder unless absolute or a URI. Every other
    column is metadata, carried through with its Arrow type.
    """

    kind = "manifest"
    RESERVED = {"path", "label", "labels", "split", "id"}

    def fingerprint_parts(self) -> list[str]:
        data = self._manifest_bytes()
        return [
            hashlib.sha256(data).hexdigest(),
            *listing_fingerprint(self.storage, [r.uri for r in self.records()]),
        ]

    def _manifest_bytes(self) -> bytes:
        if not hasattr(self, "_manifest"):
            self._manifest = self.storage.read_bytes(self.uri)
        return self._manifest

    def _read_table(self) -> pa.Table:
        data = self._manifest_bytes()
        suffix = posixpath.splitext(self.uri.lower())[1]
        if suffix == ".parquet":
            return pq.read_table(io.BytesIO(data))
        if suffix in (".csv", ".tsv"):
            opts = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            conv = pacsv.ConvertOptions(
                column_types={
                    "path": pa.string(),
                    "label": pa.string(),
                    "labels": pa.string(),
                    "id": pa.string(),
                    "split": pa.string(),
                }
            )
            return pacsv.read_csv(io.BytesIO(data), parse_options=opts, convert_options=conv)
        raise ValueError(f"manifest {self.uri!r}: expected a .csv, .tsv or .parquet file")

    def _resolve_path(self, path: str) -> str:
        """A manifest's path as a URI or an absolute local path: a URI as written, an
        absolute path as it is, anything else relative to the manifest's folder, with
        ``.`` and ``..`` resolved (on object stores too: a key is read as written, so
        ``./img/a.png`` would name no object). Nothing is URL-decoded: ``#``, ``?``, ``%``,
        ``+`` and spaces are characters of the file name or key."""
        if is_uri(path):
            return path
        if os.path.isabs(path):
            return os.path.normpath(path)
        resolved = join(parent(self.uri), path)
        if not is_uri(resolved):
            return os.path.normpath(resolved)
        scheme, rest = resolved.split("://", 1)
        bucket, _, key = rest.partition("/")
        return f"{scheme}://{bucket}/{posixpath.normpath(key)}"

    def _where(self, i: int) -> tuple[str, int]:
        """Where data row ``i`` (0-based) is in the manifest file: ``("line", n)`` for CSV/TSV,
        the 1-based physical line on which the row starts, the header being line 1 (so the
        first data row is line 2, as an editor shows it); ``("row", n)`` for Parquet (and a
        CSV whose rows cannot be told apart line by line): the 1-based data row, header not
        counted.
        """
        if not hasattr(self, "_lines"):  # parsed only when a position is to be shown
            suffix = posixpath.splitext(self.uri.lower())[1]
            lines = None
            if suffix != ".parquet":
                lines = _csv_row_lines(self._manifest_bytes(), "\t" if suffix == ".tsv" else ",")
            # a CSV that Python's csv module splits otherwise than pyarrow: data row numbers
            self._lines = lines if lines is not None and len(lines) == self._num_rows else None
        if self._lines is None:
            return "row", i + 1
        return "line", self._lines[i]

    def _at(self, i: int) -> str:
        kind, n = self._where(i)
        return f"{kind} {n}"

    def records(self) -> list[Record]:
        """The manifest's records, one per distinct id (the ``id`` column, else ``path``).

        Rows repeating an id are judged together: identical rows (same path, label(s), split
        and metadata) keep the first and drop the rest, each listed in ``duplicates`` with
        its position and counted in ``skipped["duplicate_row"]``; rows that disagree are all
        rejected (``conflicting_duplicate``), each with its position, since none can be
        trusted over the others. Positions are 1-based (:meth:`_where`).
        """
        if hasattr(self, "_records"):
            return self._records
        table = self._read_table()
        cols = set(table.column_names)
        if "path" not in cols:
            raise ValueError(
                f"manifest {self.uri!r}: missing required column 'path' (columns: {sorted(cols)})"
            )
        if "label" in cols and "labels" in cols:
            raise ValueError(f"manifest {self.uri!r}: has both 'label' and 'labels'; keep one")
        if "label" not in cols and "labels" not in cols:
            raise ValueError(
                f"manifest {self.uri!r}: needs a 'label' column (single-label) "
                "or a 'labels' column (multi-label)"
            )
        multi = "labels" in cols
        meta_cols = [c for c in table.column_names if c not in self.RESERVED]
        self.meta_schema = pa.schema([table.schema.field(c) for c in meta_cols])
        rows = table.to_pylist()
        self._num_rows = len(rows)
        parsed: list[dict[str, Any] | None] = []
        by_id: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            path = row["path"]
            if not path:
                kind, n = self._where(i)
                self.rejected.append(_reject(f"{self.uri}#{kind}{n}", "undecodable", "empty path"))
                parsed.append(None)
                continue
            rid = str(row.get("id") or path)
            value = row["labels"] if multi else row["label"]
            fields = {
                "path": self._resolve_path(str(path)),
                "labels" if multi else "label": (
                    sorted(set(_parse_labels(value))) if multi else _text_or_none(value)
                ),
                "split": normalize_split(row.get("split"), f"manifest {self.uri!r} {self._at(i)}"),
                "meta": {c: row[c] for c in meta_cols},
            }
            parsed.append({"id": rid, **fields})
            by_id.setdefault(rid, []).append(i)
        dropped = self._judge_duplicates(parsed, by_id)
        out = []
        for i, item in enumerate(parsed):
            if item is None or i in dropped:
                continue
            rid, uri, split, meta = item["id"], item["path"], item["split"], item["meta"]
            if multi:
                if not item["labels"]:
                    self.rejected.append(_reject(uri, "missing_label", "empty 'labels'", rid))
                    continue
                out.append(Record(rid, uri, labels=item["labels"], split=split, meta=meta))
            else:
                if item["label"] is None:
                    self.rejected.append(_reject(uri, "missing_label", "empty 'label'", rid))
                    continue
                out.append(Record(rid, uri, label=item["label"], split=split, meta=meta))
        self._records = out
        return out

    def _judge_duplicates(
        self, parsed: list[dict[str, Any] | None], by_id: dict[str, list[int]]
    ) -> set[int]:
        """Drops exact repeats and rejects conflicting ones (see :meth:`records`); returns
        the indices of every row not to be used."""
        dropped: set[int] = set()
        for rid, rows in by_id.items():
            if len(rows) < 2:
                continue
            first = parsed[rows[0]]
            # json with default=str: NaN equals NaN, dates and decimals compare by value
            signature = [json.dumps(parsed[i], sort_keys=True, default=str) for i in rows]
            if len(set(signature)) == 1:
                kind, n0 = self._where(rows[0])
                for i in rows[1:]:
                    _, n = self._where(i)
                    self.duplicates.append(
                        {"id": rid, "source": first["path"], kind: n, "same_as": n0}
                    )
                    dropped.add(i)
                self.skipped["duplicate_row"] = self.skipped.get("duplicate_row", 0) + len(rows) - 1
                continue
            differ = sorted(
                k for k in first if len({json.dumps(parsed[i][k], default=str) for i in rows}) > 1
            )
            kind = self._where(rows[0])[0]
            places = f"{kind}s " + ", ".join(str(self._where(i)[1]) for i in rows)
            for i in rows:
                kind, n = self._where(i)
                values = ", ".join(f"{k}={parsed[i][k]!r}" for k in differ)
                self.rejected.append(
                    {
                        **_reject(
                            parsed[i]["path"],
                            "conflicting_duplicate",
                            f"id {rid!r} is on {places} with different {', '.join(differ)}; "
                            f"this {kind} has {values}",
                            rid,
                        ),
                        kind: n,
                    }
                )
                dropped.add(i)
        return dropped


def _text_or_none(value: Any) -> str | None:
    return None if value is None or str(value).strip() == "" else str(value)


def _csv_row_lines(data: bytes, delimiter: str) -> list[int] | None:
    """The 1-based line on which each data row of a CSV starts (the header is line 1).

    pyarrow's reader, which parses the manifest, does not report positions; Python's
    ``csv`` module does (``line_num``), and splits rows the same way: quoted newlines stay
    inside a row, blank lines are skipped. None when the text cannot be parsed that way.
    """
    try:
        reader = csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""), delimiter=delimiter)
        starts, end = [], 0
        for row in reader:
            start, end = end + 1, reader.line_num
            if row:
                starts.append(start)
    except (csv.Error, UnicodeDecodeError):
        return None
    return starts[1:]


class YoloSource(Source):
    """``root/images[/split]/x.jpg`` + ``root/labels[/split]/x.txt`` (``class cx cy w h``).

    Each tile becomes a multi-label record: the set of class names of its boxes.
    """

    kind = "yolo"

    def _classes(self) -> list[str]:
        if self.cfg.yolo_classes:
            return list(self.cfg.yolo_classes)
        candidates = (
            [self.cfg.yolo_classes_file]
            if self.cfg.yolo_classes_file
            else [
                join(self.uri, n)
                for n in ("classes.txt", "classes.json", "data.yaml", "classes.yaml")
            ]
        )
        for uri in candidates:
            if uri and self.storage.exists(uri):
                text = self.storage.read_text(uri)
                if uri.endswith(".txt"):
                    return [line.strip() for line in text.splitlines() if line.strip()]
                data = yaml.safe_load(text)
                names = data.get("names", data) if isinstance(data, dict) else data
                if isinstance(names, dict):
                    return [str(names[k]) for k in sorted(names, key=int)]
                return [str(n) for n in names]
        raise ValueError(
            f"YOLO source {self.uri!r}: no class map; set source.yolo_classes=[...] or "
            "source.yolo_classes_file, or put classes.txt / data.yaml in the root"
        )

    def records(self) -> list[Record]:
        classes = self._classes()
        self.class_order = classes
        files = self.files()
        if not files:
            raise FileNotFoundError(f"YOLO source {self.uri!r}: no files found")
        images = [
            e
            for e in files
            if self._is_image(e.uri) and "/images/" in "/" + self._rel(e.uri, self.uri)
        ]
        labels = {self._rel(e.uri, self.uri): e.uri for e in files if e.uri.endswith(".txt")}
        out = []
        for entry in images:
            rel = self._rel(entry.uri, self.uri)  # images[/split]/x.jpg
            sub = rel.split("/", 1)[1]
            stem = posixpath.splitext(sub)[0]
            split = None
            if "/" in sub and sub.split("/")[0].lower() in SPLIT_ALIASES:
                split = SPLIT_ALIASES[sub.split("/")[0].lower()]
            label_uri = labels.get(f"labels/{stem}.txt")
            if label_uri is None:
                self.skipped["no_labels"] = self.skipped.get("no_labels", 0) + 1
                continue
            names, boxes, bad = set(), 0, None
            for ln, line in enumerate(self.storage.read_text(label_uri).splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    cid = int(float(parts[0]))
                    [float(p) for p in parts[1:5]]
                except ValueError:
                    bad = f"{label_uri} line {ln}: expected 'class cx cy w h', got {line!r}"
                    break
                if not 0 <= cid < len(classes):
                    bad = f"{label_uri} line {ln}: class id {cid} not in 0..{len(classes) - 1}"
                    break
                names.add(classes[cid])
                boxes += 1
            if bad:
                self.rejected.append(_reject(entry.uri, "unknown_class", bad, sub))
                continue
            if not names:
                self.skipped["no_labels"] = self.skipped.get("no_labels", 0) + 1
                continue
            out.append(
                Record(
                    id=sub,
                    uri=entry.uri,
                    labels=sorted(names),
                    split=split,
                    meta={"num_objects": boxes},
                )
            )
        self.meta_schema = pa.schema([("num_objects", pa.int32())])
        return out


class IdxSource(Source):
    """A folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (MNIST layout)."""

    kind = "idx"

    def __init__(self, cfg: SourceConfig, storage: Storage):
        if cfg.uri in fashion_mnist.ALIASES:
            cfg = SourceConfig(**{**cfg.__dict__, "uri": fashion_mnist.default_dir()})
        super().__init__(cfg, storage)

    def _payload(self, name: str) -> tuple[str, bytes]:
        for candidate in (name + ".gz", name):
            uri = join(self.uri, candidate)
            if self.storage.exists(uri):
                return uri, fashion_mnist.maybe_decompress(candidate, self.storage.read_bytes(uri))
        raise FileNotFoundError(f"IDX source {self.uri!r}: missing {name}[.gz]")

    def records(self) -> list[Record]:
        out: list[Record] = []
        known = []
        for split, prefix in (("train", "train"), ("test", "test")):
            img_uri, images = self._payload(fashion_mnist.FILES[f"{prefix}_images"])
            _, labels = self._payload(fashion_mnist.FILES[f"{prefix}_labels"])
            if self.cfg.idx_verify_checksum:
                known.append(fashion_mnist.verify(fashion_mnist.FILES[f"{prefix}_images"], images))
                known.append(fashion_mnist.verify(fashion_mnist.FILES[f"{prefix}_labels"], labels))
            pixels, targets = fashion_mnist.parse_idx(images), fashion_mnist.parse_idx(labels)
            if len(pixels) != len(targets):
                raise ValueError(f"IDX {split}: {len(pixels)} images but {len(targets)} labels")
            width = len(str(len(pixels)))
            for i in range(len(pixels)):
                out.append(
                    Record(
                        id=f"{split}-{i:0{width}d}",
                        uri=f"{img_uri}#{i}",
                        label=str(int(targets[i])),
                        split=split,
                        data=encode_png(pixels[i]),
                    )
                )
        if self.cfg.idx_verify_checksum and known and all(known):
            self.class_order = list(fashion_mnist.CLASSES)
            for r in out:
                r.label = fashion_mnist.CLASSES[int(r.label)]
        else:
            self.class_order = [str(i) for i in range(int(max(int(r.label) for r in out)) + 1)]
        return out


def label_space(source: Source, records: list[Record]) -> tuple[list[str], bool]:
    """``(classes, multi_label)`` of listed records: the source's own class order (IDX,
    YOLO) or the sorted label names.

    Raises:
        ValueError: when single-label and multi-label records are mixed.
    """
    multi = any(r.labels is not None for r in records)
    if multi and any(r.label is not None for r in records):
        raise ValueError("source mixes single-label and multi-label records")
    if source.class_order is not None:
        return list(source.class_order), multi
    return sorted({lbl for r in records for lbl in (r.labels or [r.label])}), multi


KINDS: dict[str, type[Source]] = {
    "folder": FolderSource,
    "manifest": ManifestSource,
    "yolo": YoloSource,
    "idx": IdxSource,
}


def detect_kind(uri: str, storage: Storage) -> str:
    """Guesses the layout: manifest by suffix, IDX by file names, YOLO by images/+labels/."""
    if uri in fashion_mnist.ALIASES:
        return "idx"
    if posixpath.splitext(uri.lower())[1] in (".csv", ".tsv", ".parquet"):
        return "manifest"
    names = {posixpath.basename(e.uri) for e in storage.list_files(uri, recursive=False)}
    if any(n.startswith(fashion_mnist.FILES["train_images"]) for n in names):
        return "idx"
    if storage.exists(join(uri, "images")) and storage.exists(join(uri, "labels")):
        return "yolo"
    return "folder"


def open_source(cfg: SourceConfig, storage: Storage) -> Source:
    """The source for ``cfg.uri``; ``kind=auto`` detects it."""
    if not cfg.uri:
        raise ValueError(
            "config key 'source.uri' is required: the folder, manifest or IDX dir to read"
        )
    kind = cfg.kind if cfg.kind != "auto" else detect_kind(cfg.uri, storage)
    if kind not in KINDS:
        raise ValueError(f"source kind {kind!r}: expected one of {sorted(KINDS)}")
    return KINDS[kind](cfg, storage)
