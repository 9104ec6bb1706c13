"""jobs.prepare logic: every source kind from and to local, S3 and GCS; bad files; idempotence."""

from __future__ import annotations

import gzip
from collections import Counter

import pytest
from raylens.data import fashion_mnist
from raylens.data.prepare import assign_splits
from raylens.data.sources import Record
from raylens.storage import join

from tests.imagegen import bad_files, class_image
from tests.sourcegen import (
    CLASSES,
    prepare_quiet,
    read_prepared,
    write_folder,
    write_idx,
    write_manifest,
    write_yolo,
)

_prepare = prepare_quiet

# Prepare reads and writes through Storage, whose own tests run on local, S3 and GCS
# (tests/test_storage.py). Here every source kind runs locally (the fast tier) and once on
# S3 (its listing, prefix checks and relative URIs against an object store); GCS gets a
# folder prepared and ingested in tests/test_ingest.py.
LOCAL_AND_S3 = pytest.mark.parametrize("store", ["local", "s3"], indirect=True)
LOCAL = pytest.mark.parametrize("store", ["local"], indirect=True)


@LOCAL_AND_S3
def test_folder_source(store):
    storage, root = store
    truth = write_folder(storage, join(root, "raw"))
    card = _prepare(storage, join(root, "raw"), join(root, "ds"))
    assert card["source"]["kind"] == "folder" and card["task"] == "single_label"
    assert card["classes"] == CLASSES
    _, rows = read_prepared(storage, join(root, "ds"))
    assert {r["id"]: CLASSES[r["label"]] for r in rows} == truth
    assert card["skipped"] == {"not_an_image_suffix": 1}
    # stratified 80/10/10 of 10 per class
    for split, n in (("train", 8), ("val", 1), ("test", 1)):
        assert card["splits"][split]["per_class"] == {c: n for c in CLASSES}
    assert Counter(r["split"] for r in rows) == {"train": 24, "val": 3, "test": 3}
    one = next(r for r in rows if r["id"] == "dog/003.jpg")
    assert one["image"] == storage.read_bytes(join(root, "raw/dog/003.jpg"))  # bytes kept as-is
    assert (one["width"], one["height"], one["mode"]) == (24, 24, "RGB")


@pytest.mark.parametrize(
    "store,fmt,multi",
    [
        pytest.param("local", "csv", False, id="local-csv-single"),
        pytest.param("local", "parquet", False, id="local-parquet-single"),
        pytest.param("local", "csv", True, id="local-csv-multi"),
        pytest.param("local", "parquet", True, id="local-parquet-multi"),
        # the manifest is parsed from its bytes: one S3 variant covers both formats
        pytest.param("s3", "parquet", True, id="s3-parquet-multi"),
    ],
    indirect=["store"],
)
def test_manifest_source_carries_metadata(store, fmt, multi):
    storage, root = store
    uri, truth = write_manifest(storage, join(root, "raw"), fmt, multi=multi)
    card = _prepare(storage, uri, join(root, "ds"))
    assert card["task"] == ("multi_label" if multi else "single_label")
    assert card["meta_columns"] == ["lat", "lon", "location_id"]
    _, rows = read_prepared(storage, join(root, "ds"))
    assert len(rows) == len(truth) == card["total"]
    for r in rows:
        labels, meta = truth[r["id"]]
        got = [card["classes"][i] for i in r["labels"]] if multi else [card["classes"][r["label"]]]
        assert sorted(got) == labels
        assert r["lat"] == pytest.approx(meta["lat"]) and r["lon"] == pytest.approx(meta["lon"])
        assert r["location_id"] == meta["location_id"]
    assert [(x["reason"], x["id"]) for x in card["rejected"]] == [
        ("missing_label", "img/unlabeled.png")
    ]


@LOCAL_AND_S3
def test_yolo_source(store):
    storage, root = store
    truth = write_yolo(storage, join(root, "tiles"))
    card = _prepare(storage, join(root, "tiles"), join(root, "ds"))
    assert card["source"]["kind"] == "yolo" and card["task"] == "multi_label"
    assert card["classes"] == CLASSES  # order from classes.txt = class ids
    assert card["skipped"] == {"no_labels": 4}  # 3 tiles without a file + 1 empty file
    _, rows = read_prepared(storage, join(root, "ds"))
    assert {r["id"]: sorted(CLASSES[i] for i in r["labels"]) for r in rows} == truth
    assert all(r["num_objects"] >= 2 for r in rows)


def test_yolo_unknown_class_id_is_rejected(tmp_path):
    from raylens.storage import Storage

    storage = Storage()
    write_yolo(storage, str(tmp_path / "t"), n=3)
    storage.write_text(str(tmp_path / "t/labels/tile_000.txt"), "7 0.5 0.5 0.1 0.1")
    card = _prepare(storage, str(tmp_path / "t"), str(tmp_path / "ds"))
    assert [(r["id"], r["reason"]) for r in card["rejected"]] == [("tile_000.jpg", "unknown_class")]
    assert "class id 7 not in 0..2" in card["rejected"][0]["detail"]


@LOCAL_AND_S3
def test_idx_source(store):
    storage, root = store
    truth = write_idx(storage, join(root, "idx"))
    card = _prepare(storage, join(root, "idx"), join(root, "ds"), idx_verify_checksum=False)
    assert card["source"]["kind"] == "idx"
    assert card["classes"] == [str(i) for i in range(10)]
    _, rows = read_prepared(storage, join(root, "ds"))
    assert {r["id"]: int(card["classes"][r["label"]]) for r in rows} == truth
    # source split kept for test; val carved out of train (10 / 90 of train)
    assert card["splits"]["test"]["count"] == 20
    assert card["splits"]["val"]["count"] + card["splits"]["train"]["count"] == 40
    assert card["splits"]["val"]["count"] >= 4


def test_idx_checksum_mismatch_is_named(tmp_path):
    from raylens.storage import Storage

    storage = Storage()
    name = fashion_mnist.FILES["train_labels"]
    storage.write_bytes(
        str(tmp_path / f"{name}.gz"), gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 8)
    )
    for other in ("train_images", "test_images", "test_labels"):
        storage.write_bytes(
            str(tmp_path / f"{fashion_mnist.FILES[other]}.gz"),
            gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x00"),
        )
    with pytest.raises(fashion_mnist.ChecksumError, match="does not match Fashion-MNIST"):
        _prepare(storage, str(tmp_path), str(tmp_path / "ds"), kind="idx")


@LOCAL  # bytes are judged after reading; empty files on every backend: test_storage.py
def test_planted_bad_files_are_rejected_or_converted_with_reasons(store):
    storage, root = store
    raw = join(root, "raw")
    write_folder(storage, raw, per_class=4)
    planted = bad_files()
    for name, (data, _, _) in planted.items():
        storage.write_bytes(join(raw, f"dog/{name}"), data)
    card = _prepare(storage, raw, join(root, "ds"))
    rejected = {r["id"].split("/")[-1]: r["reason"] for r in card["rejected"]}
    converted = {c["id"].split("/")[-1]: c["mode"] for c in card["converted"]}
    assert rejected == {n: why for n, (_, outcome, why) in planted.items() if outcome == "rejected"}
    assert converted == {
        n: mode for n, (_, outcome, mode) in planted.items() if outcome == "converted"
    }
    assert all(r["detail"] for r in card["rejected"]) and all(
        c["reason"] for c in card["converted"]
    )
    assert card["total"] == 12 + 3  # the good ones and the converted ones
    assert card["rejected_by_reason"] == {"undecodable": 2, "zero_bytes": 1, "too_large": 1}


def test_rerun_is_idempotent_and_source_changes_are_picked_up(tmp_path):
    from raylens.storage import Storage

    storage = Storage()
    raw, out = str(tmp_path / "raw"), str(tmp_path / "ds")
    write_folder(storage, raw, per_class=6)
    first = _prepare(storage, raw, out, shard_rows=5)
    files = {
        f: storage.read_bytes(join(out, f)) for s in first["splits"].values() for f in s["files"]
    }
    again = _prepare(storage, raw, out, shard_rows=5)
    assert again.get("up_to_date") and again["fingerprint"] == first["fingerprint"]
    forced = _prepare(storage, raw, out, shard_rows=5, overwrite=True)
    _, rows_forced = read_prepared(storage, out)
    assert sorted(f for s in forced["splits"].values() for f in s["files"]) == sorted(files)
    # a changed source re-prepares, and shards of the old layout are removed
    storage.write_bytes(join(raw, "cat/new.png"), class_image(0, 500))
    changed = _prepare(storage, raw, out, shard_rows=50)
    assert not changed.get("up_to_date") and changed["total"] == first["total"] + 1
    on_disk = {e.uri for e in storage.list_files(out) if e.uri.endswith(".parquet")}
    listed = {join(out, f) for s in changed["splits"].values() for f in s["files"]}
    assert on_disk == listed
    _, rows = read_prepared(storage, out)
    assert len(rows) == len(rows_forced) + 1 and "cat/new.png" in {r["id"] for r in rows}


def test_split_is_seeded_and_stratified():
    recs = [Record(f"{c}-{i}", "", label=c) for c in "abc" for i in range(50)]
    one = assign_splits(recs, train=0.8, val=0.1, test=0.1, seed=1)
    assert one == assign_splits(recs, train=0.8, val=0.1, test=0.1, seed=1)
    assert one != assign_splits(recs, train=0.8, val=0.1, test=0.1, seed=2)
    for c in "abc":
        got = Counter(s for rid, s in one.items() if rid.startswith(c))
        assert got == {"train": 40, "val": 5, "test": 5}
    with pytest.raises(ValueError, match="some records have a split"):
        assign_splits(
            [Record("x", "", label="a", split="train"), Record("y", "", label="a")],
            train=0.8,
            val=0.1,
            test=0.1,
            seed=0,
        )


def test_crash_while_rewriting_leaves_no_card_that_looks_complete(tmp_path, monkeypatch):
    from raylens.data import prepare as P
    from raylens.storage import Storage

    storage = Storage()
    raw, out = str(tmp_path / "raw"), str(tmp_path / "ds")
    write_folder(storage, raw, per_class=6)
    _prepare(storage, raw, out, shard_rows=4)
    assert storage.exists(join(out, "dataset.json"))
    storage.write_bytes(join(raw, "eel/new.png"), class_image(2, 77))  # source changed
    real_flush, calls = P.ShardWriter.flush, []

    def crashing_flush(self):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed mid-write")
        real_flush(self)

    monkeypatch.setattr(P.ShardWriter, "flush", crashing_flush)
    with pytest.raises(RuntimeError, match="killed"):
        _prepare(storage, raw, out, shard_rows=4)
    assert not storage.exists(join(out, "dataset.json"))
    monkeypatch.setattr(P.ShardWriter, "flush", real_flush)
    card = _prepare(storage, raw, out, shard_rows=4)  # a re-run completes it
    assert card["total"] == 19 and storage.exists(join(out, "dataset.json"))


@LOCAL  # mosaics are built in memory, written like any shard
def test_mosaics_label_sets_match_their_pixels_and_never_cross_splits(store):
    storage, root = store
    import io

    import numpy as np
    from PIL import Image

    from tests.imagegen import PALETTE

    write_folder(storage, join(root, "raw"), per_class=20)
    plain = _prepare(storage, join(root, "raw"), join(root, "plain"))
    _, plain_rows = read_prepared(storage, join(root, "plain"))
    split_of = {r["id"]: r["split"] for r in plain_rows}
    card = _prepare(
        storage, join(root, "raw"), join(root, "mosaic"), mosaic_grid=2, mosaic_skew=0.5,
        mosaic_ratio=2.0,
    )  # fmt: skip
    assert card["task"] == "multi_label" and card["classes"] == CLASSES
    assert card["mosaic"]["grid"] == 2 and plain["fingerprint"] != card["fingerprint"]
    _, rows = read_prepared(storage, join(root, "mosaic"))
    # 2 uses per image / 4 cells: 20 mosaics from 40 train images, 5 from 10 val, ...
    counts = {s: card["splits"][s]["count"] for s in ("train", "val", "test")}
    assert counts == {s: round(2 * plain["splits"][s]["count"] / 4) for s in counts}
    for row in rows:
        members = row["members"].split(";")
        assert len(members) == 4 and any(members)
        assert {split_of[m] for m in members if m} == {row["split"]}  # no leakage
        img = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"), dtype=np.float64)
        assert img.shape == (48, 48, 3)  # 2 x 24 px cells
        seen = set()
        for k in range(4):
            cell = img[(k // 2) * 24 : (k // 2 + 1) * 24, (k % 2) * 24 : (k % 2 + 1) * 24]
            mean = cell.reshape(-1, 3).mean(0)
            if not members[k]:
                assert mean.max() == 0  # an empty cell is black
                continue
            dist = [np.abs(mean - np.array(c)).sum() for c in PALETTE[:3]]
            seen.add(int(np.argmin(dist)))
        assert sorted(seen) == row["labels"], row["id"]
    per_class = card["splits"]["train"]["per_class"]
    assert per_class["cat"] > per_class["dog"] > per_class["eel"] > 0  # skew 0.5: eel rare
    again = _prepare(
        storage, join(root, "raw"), join(root, "mosaic"), mosaic_grid=2, mosaic_skew=0.5,
        mosaic_ratio=2.0,
    )  # fmt: skip
    assert again.get("up_to_date")  # same source and settings: same mosaics, nothing rewritten


def test_mosaic_settings_and_sources_are_checked(tmp_path):
    from raylens.config import ConfigError
    from raylens.schema import PrepareConfig

    for bad, key in ((dict(mosaic_grid=1), "mosaic_grid"), (dict(mosaic_empty=1.0), "mosaic_empty"),
                     (dict(mosaic_skew=0), "mosaic_skew")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"prepare.{key}"):
            PrepareConfig(output="x", **bad).validate()
    from raylens.storage import Storage

    storage = Storage()
    uri, _ = write_manifest(storage, str(tmp_path / "src"), "csv", multi=True)
    with pytest.raises(ValueError, match="prepare.mosaic_grid.*multi-label"):
        _prepare(storage, uri, str(tmp_path / "out"), mosaic_grid=2)


def test_clutter_canvases_keep_ids_labels_splits_and_show_the_item(tmp_path):
    import io

    import numpy as np
    from PIL import Image
    from raylens.storage import Storage

    from tests.imagegen import PALETTE

    storage = Storage()
    raw, root = str(tmp_path / "raw"), str(tmp_path)
    write_folder(storage, raw, per_class=20)
    plain = _prepare(storage, raw, join(root, "plain"))
    _, plain_rows = read_prepared(storage, join(root, "plain"))
    plain_of = {r["id"]: (r["label"], r["split"]) for r in plain_rows}
    # No fragments, noise or brightness change: the canvas is black but for the item.
    clean = dict(clutter_canvas=40, clutter_fragments=0, clutter_noise=0.0,
                 clutter_brightness=(1.0, 1.0))  # fmt: skip
    card = _prepare(storage, raw, join(root, "clean"), **clean)
    assert card["task"] == "single_label" and card["clutter"]["canvas"] == 40
    assert card["fingerprint"] != plain["fingerprint"]
    _, rows = read_prepared(storage, join(root, "clean"))
    assert {r["id"]: (r["label"], r["split"]) for r in rows} == plain_of
    sides = set()
    for row in rows:
        img = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"), dtype=np.float64)
        assert img.shape == (40, 40, 3)
        ys, xs = np.nonzero(img.max(-1) > 0)
        side = ys.max() - ys.min() + 1
        assert side == xs.max() - xs.min() + 1 and 18 <= side <= 30  # 0.46-0.75 of 40
        sides.add(int(side))
        mean = img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].reshape(-1, 3).mean(0)
        dist = [np.abs(mean - np.array(c)).sum() for c in PALETTE[: len(CLASSES)]]
        assert int(np.argmin(dist)) == row["label"], row["id"]
    assert len(sides) > 3  # the scale is drawn per image
    # Default clutter: fragments come from other images of the same split only.
    card = _prepare(storage, raw, join(root, "clutter"), clutter_canvas=40)
    _, rows = read_prepared(storage, join(root, "clutter"))
    for row in rows:
        members = row["members"].split(";")
        assert len(members) == 2 and {plain_of[m][1] for m in members} == {row["split"]}
    again = _prepare(storage, raw, join(root, "clutter2"), clutter_canvas=40)
    _, rows2 = read_prepared(storage, join(root, "clutter2"))
    assert again["fingerprint"] == card["fingerprint"]
    assert {r["id"]: r["image"] for r in rows} == {r["id"]: r["image"] for r in rows2}  # seeded


def test_clutter_settings_are_checked_and_bad_members_rejected(tmp_path):
    from raylens.config import ConfigError
    from raylens.schema import PrepareConfig
    from raylens.storage import Storage

    for bad, key in ((dict(clutter_canvas=4), "clutter_canvas"),
                     (dict(clutter_canvas=32, mosaic_grid=2), "clutter_canvas"),
                     (dict(clutter_scale=(0.8, 0.5)), "clutter_scale"),
                     (dict(clutter_fragment_gain=2.0), "clutter_fragment_gain")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"prepare.{key}"):
            PrepareConfig(output="x", **bad).validate()
    storage = Storage()
    raw = str(tmp_path / "raw")
    write_folder(storage, raw, per_class=6)
    storage.write_bytes(join(raw, "cat", "broken.png"), b"\x89PNG\r\n\x1a\n not really")
    card = _prepare(storage, raw, str(tmp_path / "out"), clutter_canvas=32)
    assert [r["source"].rsplit("/", 2)[-2:] for r in card["rejected"]] == [["cat", "broken.png"]]
    uri, _ = write_manifest(storage, str(tmp_path / "src"), "csv", multi=True)
    with pytest.raises(ValueError, match="prepare.clutter_canvas.*multi-label"):
        _prepare(storage, uri, str(tmp_path / "out2"), clutter_canvas=32)
