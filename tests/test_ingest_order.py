"""The train split's read order: a seeded order of read units (row groups) per pass,
streamed with no barrier, so the first batch comes after one unit is read, not the split."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import ray
from raylens import config as C
from raylens.data.prepare import load_card
from raylens.data.transforms import sample_seed
from raylens.data.units import list_units
from raylens.runtime.ingest import (
    DatasetInfo,
    _decode_udf,
    _ReadInPassOrder,
    _RowGroupReader,
    build_split,
    pass_order,
)
from raylens.schema import RunConfig
from raylens.storage import Storage, join

from tests.sourcegen import prepare_quiet, write_folder


def _cfg(dataset: str, *extra: str) -> RunConfig:
    return C.load(
        RunConfig,
        None,
        [
            f"data.dataset={dataset}",
            "data.image_size=16",
            "data.mean=[0.485, 0.456, 0.406]",
            "data.std=[0.229, 0.224, 0.225]",
            "data.decode_batch_size=4",
            "data.shuffle_buffer=0",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def many_units(tmp_path_factory):
    """A prepared dataset of many small shards (one row group of <= 4 rows each)."""
    root = tmp_path_factory.mktemp("order")
    storage = Storage()
    write_folder(storage, str(root / "raw"), per_class=100)
    prepare_quiet(storage, str(root / "raw"), str(root / "ds"), shard_rows=4)
    return storage, str(root / "ds")


def test_pass_order_is_a_permutation_per_seed_and_epoch():
    a = pass_order(3, 0, 50)
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, pass_order(3, 0, 50))  # same seed + epoch: same order
    assert not np.array_equal(a, pass_order(3, 1, 50))  # another epoch
    assert not np.array_equal(a, pass_order(4, 0, 50))  # another seed


def _one_pass(storage, ds_uri, seed: int, epoch: int) -> list[tuple[str, int]]:
    """One pass of the ordered reader, in this process (no Ray): (id, aug_seed) in order."""
    cfg = _cfg(ds_uri, f"run.seed={seed}")
    card = load_card(storage, ds_uri)
    info = DatasetInfo.from_card(card)
    units = list_units(storage, ds_uri, card["splits"]["train"]["files"])
    reader = _ReadInPassOrder(
        units,
        _RowGroupReader(ds_uri, storage.cfg, ["id", "image", "label"]),
        _decode_udf(cfg, info, True, epoch, None),
        seed=seed,
        epoch=epoch,
        decode_rows=cfg.data.decode_rows(),
    )
    rows = []
    for slot in range(len(units)):
        for out in reader({"slot": np.array([slot])}):
            rows.extend(zip(out["id"].tolist(), out["aug_seed"].tolist(), strict=True))
    return rows


def test_each_pass_reads_every_row_once_in_its_own_seeded_order(many_units):
    storage, ds_uri = many_units
    count = load_card(storage, ds_uri)["splits"]["train"]["count"]
    e0, e0_again, e1 = (_one_pass(storage, ds_uri, 3, e) for e in (0, 0, 1))
    other_seed = _one_pass(storage, ds_uri, 4, 0)
    for rows in (e0, e1, other_seed):
        ids = [r for r, _ in rows]
        assert len(ids) == len(set(ids)) == count  # every row exactly once
    assert e0 == e0_again  # same seed + epoch: same order, same seeds
    assert [r for r, _ in e0] != [r for r, _ in e1]  # epochs differ
    assert [r for r, _ in e0] != [r for r, _ in other_seed]  # seeds differ
    # augmentation seeds follow (run seed, id, epoch), whatever the order
    assert all(s == sample_seed(3, rid, 0) for rid, s in e0)
    assert all(s == sample_seed(3, rid, 1) for rid, s in e1)
    assert dict(e0) == {rid: sample_seed(3, rid, 0) for rid, _ in e1}


@pytest.mark.ray
def test_passes_through_ray_differ_and_a_rerun_repeats_them(ray_session, many_units):
    storage, ds_uri = many_units
    count = load_card(storage, ds_uri)["splits"]["train"]["count"]

    def passes(seed: int) -> list[list[str]]:
        ds, _ = build_split(_cfg(ds_uri, f"run.seed={seed}"), "train", storage)
        (it,) = ds.streaming_split(1, equal=True)
        return [[i for b in it.iter_batches(batch_size=16) for i in b["id"]] for _ in range(2)]

    ctx = ray.data.DataContext.get_current()
    keep, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        first, again, other = passes(3), passes(3), passes(4)
    finally:
        ctx.execution_options.preserve_order = keep
    assert first == again
    for p in (*first, *other):
        assert len(p) == len(set(p)) == count
    assert first[0] != first[1] and first[0] != other[0]


def _shards(ds_uri: str, storage: Storage) -> list[str]:
    card = load_card(storage, ds_uri)
    return [join(ds_uri, f) for f in card["splits"]["train"]["files"]]


@pytest.mark.ray
def test_the_first_batch_comes_before_the_split_is_read(ray_session, many_units):
    """Counted by the shard files read (their access time) when the first batch arrives;
    ``randomize_block_order`` read every shard first."""
    storage, ds_uri = many_units
    shards = _shards(ds_uri, storage)
    probe = shards[0] + ".probe"
    with open(probe, "wb") as fh:
        fh.write(b"x")
    os.utime(probe, (1, time.time()))
    with open(probe, "rb") as fh:
        fh.read()
    if os.stat(probe).st_atime < 100:
        pytest.skip("this filesystem does not record access times (noatime)")
    os.unlink(probe)
    ds, _ = build_split(_cfg(ds_uri, "run.seed=3"), "train", storage)  # reads the footers
    for path in shards:  # accessed long ago, modified now: the next read updates atime
        os.utime(path, (1, time.time()))
    it = iter(ds.iter_batches(batch_size=4))
    first = next(it)
    read = sum(os.stat(p).st_atime > 100 for p in shards)
    rest = sum(len(b["id"]) for b in it)
    assert (
        len(first["id"]) == 4 and 4 + rest == load_card(storage, ds_uri)["splits"]["train"]["count"]
    )
    assert all(os.stat(p).st_atime > 100 for p in shards)  # the pass read them all
    assert read <= len(shards) // 2, f"{read} of {len(shards)} shards read before the first batch"


def test_a_raw_train_split_reads_chunks_of_files_in_the_pass_order(tmp_path):
    """An unprepared folder: units of RAW_UNIT_ROWS files, every row once, labels kept."""
    from raylens.runtime.ingest import RAW_UNIT_ROWS, _raw_items, _RawReader
    from raylens.schema import SourceConfig

    storage = Storage()
    raw = str(tmp_path / "raw")
    truth = write_folder(storage, raw, per_class=60)
    cfg = _cfg(raw, "run.seed=5")
    items, info = _raw_items(SourceConfig(uri=raw), "train", storage, cfg.prepare, 5)
    units = [items[i : i + RAW_UNIT_ROWS] for i in range(0, len(items), RAW_UNIT_ROWS)]
    assert len(units) >= 2
    reader = _ReadInPassOrder(
        units,
        _RawReader(storage.cfg),
        _decode_udf(cfg, info, True, 2, None),
        seed=5,
        epoch=2,
        decode_rows=cfg.data.decode_rows(),
    )
    got = [
        (rid, label)
        for slot in range(len(units))
        for out in reader({"slot": np.array([slot])})
        for rid, label in zip(out["id"].tolist(), out["label"].tolist(), strict=True)
    ]
    assert sorted(r for r, _ in got) == sorted(i["id"] for i in items)
    assert all(info.classes[label] == truth[rid] for rid, label in got)
    first_unit = units[pass_order(5, 2, len(units))[0]]
    assert {r for r, _ in got[: len(first_unit)]} == {i["id"] for i in first_unit}
