"""Row groups of a prepared dataset's shards: the unit ingest reads a train pass in (in a
seeded order per pass, :func:`raylens.runtime.ingest.build_split`) and the unit decode-time
mixing pairs rows within (:mod:`raylens.data.mix`).

Pure: pyarrow and numpy only (decode workers import this; :mod:`raylens.data.mix` costs
~3 CPU-s of torch + timm imports).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylens.storage import Storage, join


@dataclass(frozen=True)
class Unit:
    """One mixing unit: a row group of a prepared dataset's shard (``file`` relative to it)."""

    file: str
    row_group: int


def list_units(storage: Storage, dataset: str, files: Sequence[str]) -> list[Unit]:
    """Every row group of ``files`` (a prepared split's shards, as its card lists them)."""
    units: list[Unit] = []
    for f in files:
        fs, path = storage.resolve(join(dataset, f))
        with fs.open_input_file(path) as fh:
            count = pq.ParquetFile(fh).metadata.num_row_groups
        units.extend(Unit(f, g) for g in range(count))
    return units


def read_unit(
    storage: Storage,
    dataset: str,
    unit: Unit,
    columns: Sequence[str] = ("id", "image", "label"),
    remap: dict[int, int] | None = None,
) -> pa.Table:
    """One row group; with ``remap`` (``data.classes``: old -> new label) only the rows of
    the selected classes, relabelled, as the ordinary ingest selects them."""
    fs, path = storage.resolve(join(dataset, unit.file))
    with fs.open_input_file(path) as fh:
        table = pq.ParquetFile(fh).read_row_group(unit.row_group, columns=list(columns))
    if remap is None:
        return table
    label = table.column("label").to_numpy().astype(np.int64)
    keep = np.isin(label, np.array(sorted(remap), dtype=np.int64))
    new = np.array([remap[int(v)] for v in label[keep]], dtype=np.int32)
    table = table.filter(pa.array(keep))
    return table.set_column(table.schema.get_field_index("label"), "label", pa.array(new))
