"""Writes small real sources (folder, manifest, YOLO, IDX) to any storage; returns the truth."""

from __future__ import annotations

import gzip
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from raylens.data.prepare import prepare
from raylens.schema import PrepareConfig, SourceConfig
from raylens.storage import Storage, join

from tests.imagegen import class_image

CLASSES = ["cat", "dog", "eel"]


def write_folder(storage: Storage, root: str, per_class: int = 10) -> dict[str, str]:
    truth = {}
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            rel = f"{name}/{i:03d}.{'jpg' if i % 2 else 'png'}"
            storage.write_bytes(join(root, rel), class_image(c, i, fmt="JPEG" if i % 2 else "PNG"))
            truth[rel] = name
    storage.write_text(join(root, "README.txt"), "not an image")  # ignored, counted
    return truth


def write_manifest(storage: Storage, root: str, fmt: str, multi: bool = False, n: int = 24):
    """Images under root/img, manifest at root/manifest.<fmt> with lat/lon/location_id metadata."""
    rows, truth = [], {}
    for i in range(n):
        c = i % 3
        rel = f"img/{i:03d}.png"
        storage.write_bytes(join(root, rel), class_image(c, i))
        labels = sorted({CLASSES[c], CLASSES[(c + 1) % 3]}) if multi and i % 2 else [CLASSES[c]]
        meta = {"lat": 40.0 + i / 10, "lon": -3.5 - i / 100, "location_id": f"loc-{c}"}
        row = {"path": rel, **meta}
        if multi:
            row["labels"] = labels if fmt == "parquet" else "|".join(labels)
        else:
            row["label"] = labels[0]
        rows.append(row)
        truth[rel] = (labels, meta)
    rows.append(
        {
            "path": "img/unlabeled.png",
            "lat": 0.0,
            "lon": 0.0,
            "location_id": "x",
            **({"labels": [] if fmt == "parquet" else ""} if multi else {"label": ""}),
        }
    )
    storage.write_bytes(join(root, "img/unlabeled.png"), class_image(0, 99))
    uri = join(root, f"manifest.{fmt}")
    table = pa.Table.from_pylist(rows)
    buf = io.BytesIO()
    if fmt == "parquet":
        pq.write_table(table, buf)
    else:
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, buf)
    storage.write_bytes(uri, buf.getvalue())
    return uri, truth


def write_yolo(storage: Storage, root: str, n: int = 12) -> dict[str, list[str]]:
    """Tiles in images/, boxes in labels/; every 4th tile has no label file, one is empty."""
    truth = {}
    storage.write_text(join(root, "classes.txt"), "\n".join(CLASSES) + "\n")
    for i in range(n):
        name = f"tile_{i:03d}"
        storage.write_bytes(join(root, f"images/{name}.jpg"), class_image(i % 3, i, fmt="JPEG"))
        if i % 4 == 3:
            continue  # no label file: skipped
        ids = [] if i == 10 else sorted({i % 3, (i * 7) % 3})
        lines = [f"{c} 0.5 0.5 0.2 0.3" for c in ids] + (
            [f"{ids[0]} 0.1 0.1 0.05 0.05"] if ids else []
        )
        storage.write_text(join(root, f"labels/{name}.txt"), "\n".join(lines))
        if ids:
            truth[f"{name}.jpg"] = sorted({CLASSES[c] for c in ids})
    return truth


def _idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx(storage: Storage, root: str, n_train: int = 40, n_test: int = 20) -> dict[str, int]:
    """A small MNIST-layout IDX set (not Fashion-MNIST, so classes are '0'..'9')."""
    rng = np.random.default_rng(0)
    truth = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 255, size=(n, 28, 28))
        storage.write_bytes(
            join(root, f"{prefix}-images-idx3-ubyte.gz"), gzip.compress(_idx(images))
        )
        storage.write_bytes(
            join(root, f"{prefix}-labels-idx1-ubyte.gz"), gzip.compress(_idx(labels))
        )
        for i in range(n):
            truth[f"{split}-{i:0{len(str(n))}d}"] = int(labels[i])
    return truth


def read_prepared(storage: Storage, out: str) -> tuple[dict, list[dict]]:
    card = json.loads(storage.read_text(join(out, "dataset.json")))
    rows = []
    for split in ("train", "val", "test"):
        for f in card["splits"][split]["files"]:
            rows.extend(pq.read_table(io.BytesIO(storage.read_bytes(join(out, f)))).to_pylist())
    return card, rows


def prepare_quiet(storage: Storage, src: str, out: str, **kw) -> dict:
    """``prepare`` without progress or log output; source keys (kind, ...) go to SourceConfig."""
    source_keys = ("kind", "idx_verify_checksum", "yolo_classes")
    source_kw = {k: kw.pop(k) for k in list(kw) if k in source_keys}
    return prepare(
        SourceConfig(uri=src, **source_kw),
        PrepareConfig(output=out, **kw),
        storage,
        progress=False,
        log=lambda m: None,
    )
