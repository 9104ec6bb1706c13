"""Nearest-Class-Mean prototypes of a served metric-learning run, enrolled and persisted.

A metric run writes ``prototypes.parquet`` (each class's mean train embedding). The server
starts from it; enrolling a class (``POST /v1/enroll``) or deleting one writes the whole
table to ``<run>/serving/prototypes.parquet`` (atomically: readers see the old table or the
new one), which a restarted replica loads instead. The trained table is never modified.

Enrolling an existing class updates its prototype with the new images: the prototype is
the normalized mean of every unit-length embedding it was built from (``count`` of them),
so ``normalize(prototype * count + sum(new))`` continues that mean. ``replace=True`` starts
the class afresh. Pure: no Ray.
"""

from __future__ import annotations

import io
import time
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylens.rundir import METRIC
from raylens.serving.errors import RequestError
from raylens.storage import Storage, join

TRAINED = "prototypes.parquet"
SERVING = "serving/prototypes.parquet"
MAX_NAME = 128


def check_class_name(name: object) -> str:
    """A class name: 1-128 printable characters, no leading/trailing spaces."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise ValueError(f"class name must be a string of 1-{MAX_NAME} characters, got {name!r}")
    if name != name.strip() or any(unicodedata.category(c).startswith("C") for c in name):
        raise ValueError(
            f"class name {name!r}: no control characters or leading/trailing whitespace"
        )
    return name


def require_metric(model_id: str, kind: str) -> None:
    """Refuses (409) to enrol into or delete from a model that is not a metric run."""
    if kind != METRIC:
        raise RequestError(
            409,
            "not_a_metric_model",
            f"model {model_id!r} is a {kind}: classes can be enrolled only in a "
            "metric-learning run (task.name=metric)",
        )


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


class PrototypeStore:
    """Class name → unit-length prototype (with how many embeddings built it)."""

    def __init__(self, storage: Storage, run: str, dim: int):
        self.storage, self.run, self.dim = storage, run, int(dim)
        self.names: list[str] = []
        self.protos = np.zeros((0, self.dim), np.float32)
        self.counts: list[int] = []
        self.seen: list[bool] = []
        self.enrolled: list[bool] = []
        self.source = ""

    # ------------------------------------------------------------------ persistence

    def load(self) -> PrototypeStore:
        for rel in (SERVING, TRAINED):
            uri = join(self.run, rel)
            if self.storage.exists(uri):
                table = pq.read_table(io.BytesIO(self.storage.read_bytes(uri)))
                rows = table.to_pylist()
                self.names = [r["class"] for r in rows]
                emb = np.array([r["embedding"] for r in rows], np.float32).reshape(-1, self.dim)
                self.protos = _unit(emb) if len(rows) else emb
                self.counts = [int(r["count"]) for r in rows]
                self.seen = [bool(r.get("seen", False)) for r in rows]
                self.enrolled = [bool(r.get("enrolled", False)) for r in rows]
                self.source = uri
                return self
        self.source = ""  # a run without prototypes: classes come from enrolment only
        return self

    def save(self) -> str:
        table = pa.table(
            {
                "class": pa.array(self.names, pa.string()),
                "seen": pa.array(self.seen, pa.bool_()),
                "enrolled": pa.array(self.enrolled, pa.bool_()),
                "count": pa.array(self.counts, pa.int64()),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(self.protos.reshape(-1), pa.float32()), self.dim
                ),
            }
        )
        table = table.replace_schema_metadata(
            {"updated_at": time.strftime("%FT%TZ", time.gmtime())}
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        uri = join(self.run, SERVING)
        self.storage.write_bytes(uri, buf.getvalue())
        self.source = uri
        return uri

    # ------------------------------------------------------------------ changes

    def enroll(self, name: str, embeddings: np.ndarray, *, replace: bool = False) -> dict:
        """Adds ``name`` (or updates it) from ``embeddings [n, dim]``, then persists."""
        name = check_class_name(name)
        e = np.asarray(embeddings, np.float32)
        if e.ndim != 2 or e.shape[1] != self.dim or len(e) == 0:
            raise ValueError(f"enrolment needs embeddings [n >= 1, {self.dim}], got {e.shape}")
        e = _unit(e)
        created = name not in self.names
        if created:
            self.names.append(name)
            self.protos = np.concatenate([self.protos, _unit(e.sum(0, keepdims=True))])
            self.counts.append(len(e))
            self.seen.append(False)
            self.enrolled.append(True)
        else:
            i = self.names.index(name)
            base = np.zeros(self.dim, np.float32) if replace else self.protos[i] * self.counts[i]
            self.protos[i] = _unit(base + e.sum(0))
            self.counts[i] = len(e) if replace else self.counts[i] + len(e)
            self.enrolled[i] = True
        self.save()
        return {"class": name, "created": created, "count": self.counts[self.names.index(name)]}

    def delete(self, name: str) -> bool:
        if name not in self.names:
            return False
        i = self.names.index(name)
        for seq in (self.names, self.counts, self.seen, self.enrolled):
            del seq[i]
        self.protos = np.delete(self.protos, i, axis=0)
        self.save()
        return True

    # ------------------------------------------------------------------ queries

    @property
    def origin(self) -> str | None:
        """Which table the prototypes come from, as a response says it (never its path):
        ``"serving"`` (enrolled since training), ``"trained"``, or None (none yet)."""
        if not self.source:
            return None
        return "serving" if self.source.endswith(SERVING) else "trained"

    def list(self) -> list[dict]:
        return [
            {"class": n, "count": c, "seen_in_training": s, "enrolled": e}
            for n, c, s, e in zip(self.names, self.counts, self.seen, self.enrolled, strict=True)
        ]

    def similarities(self, queries: np.ndarray) -> np.ndarray:
        """Cosine similarity of each query to each class's prototype: ``queries [N, dim]``
        → ``[N, classes]`` in :attr:`names` order (decode with
        :func:`raylens.serving.labels.decode`, kind ``metric``)."""
        q = _unit(np.asarray(queries, np.float32).reshape(-1, self.dim))
        return q @ self.protos.T
