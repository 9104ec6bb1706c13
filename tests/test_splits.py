"""Split honesty: splits drawn over valid images, warnings for classes missing from a split,
manifest rows repeating an id, and absent classes in the run report."""

from __future__ import annotations

import io
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from raylens.data.prepare import CARD, assign_splits, format_card, reload, validate
from raylens.data.sources import Record
from raylens.report import write_report
from raylens.schema import PrepareConfig
from raylens.storage import Storage, join

from tests.imagegen import bad_files, class_image
from tests.sourcegen import CLASSES, prepare_quiet, read_prepared, write_folder


def _logged(storage: Storage, src: str, out: str, **kw) -> tuple[dict, list[str]]:
    """``prepare`` with its console lines kept."""
    from raylens.data.prepare import prepare
    from raylens.schema import SourceConfig

    lines: list[str] = []
    card = prepare(
        SourceConfig(uri=src), PrepareConfig(output=out, **kw), storage, progress=False,
        log=lines.append,
    )  # fmt: skip
    return card, lines


def test_a_class_with_bad_files_still_gets_val_and_test(tmp_path):
    storage = Storage()
    raw = str(tmp_path / "raw")
    write_folder(storage, raw, per_class=10)
    # eel: 3 good images and 9 that do not decode, named to sort among the good ones
    for i in range(3, 10):
        storage.delete(join(raw, f"eel/{i:03d}.{'jpg' if i % 2 else 'png'}"))
    broken = class_image(2, 0, fmt="JPEG")[:40]
    for i in range(9):
        storage.write_bytes(join(raw, f"eel/{i:03d}b.jpg"), broken)
    good = [f"eel/{i:03d}.{'jpg' if i % 2 else 'png'}" for i in range(3)]
    # A split over the listing (bad files included) leaves eel without a val or test image
    # once the bad files are dropped: what prepare did before.
    listed = [Record(f"eel/{i:03d}b.jpg", "", label="eel") for i in range(9)]
    listed += [Record(g, "", label="eel") for g in good]
    old = assign_splits(listed, train=0.8, val=0.1, test=0.1, seed=0)
    assert {old[g] for g in good} != {"train", "val", "test"}

    card = prepare_quiet(storage, raw, str(tmp_path / "ds"))
    assert card["rejected_by_reason"] == {"undecodable": 9}
    assert {s: card["splits"][s]["per_class"]["eel"] for s in ("train", "val", "test")} == {
        "train": 1, "val": 1, "test": 1,
    }  # fmt: skip
    assert card["warnings"] == [] and card["split_over"] == "valid_images"
    _, rows = read_prepared(storage, str(tmp_path / "ds"))
    # the split is assign_splits over the valid images: seeded, stratified, reproducible
    valid = [Record(r["id"], "", label=CLASSES[r["label"]]) for r in rows]
    assert {r["id"]: r["split"] for r in rows} == assign_splits(
        valid, train=0.8, val=0.1, test=0.1, seed=0
    )
    again = prepare_quiet(storage, raw, str(tmp_path / "ds2"))
    _, rows2 = read_prepared(storage, str(tmp_path / "ds2"))
    assert {r["id"]: r["split"] for r in rows2} == {r["id"]: r["split"] for r in rows}
    assert again["fingerprint"] == card["fingerprint"]


def test_a_class_too_small_for_a_split_is_warned_about(tmp_path):
    storage = Storage()
    raw = str(tmp_path / "raw")
    write_folder(storage, raw, per_class=10)
    for i in range(2, 10):  # eel keeps 2 images, one of them bad: 1 valid
        storage.delete(join(raw, f"eel/{i:03d}.{'jpg' if i % 2 else 'png'}"))
    storage.write_bytes(join(raw, "eel/001.jpg"), b"")
    card, lines = _logged(storage, raw, str(tmp_path / "ds"))
    assert card["total"] == 21
    [w] = card["warnings"]
    assert {k: w[k] for k in ("class", "images", "per_split", "missing")} == {
        "class": "eel", "images": 1, "per_split": {"train": 1, "val": 0, "test": 0},
        "missing": ["val", "test"],
    }  # fmt: skip
    assert w["message"] in format_card(card)
    assert f"[prepare] warning: {w['message']}" in lines
    assert (
        "class 'eel' has 1 valid image(s) (train 1, val 0, test 0): none in val, test"
        in (w["message"])
    )
    card = json.loads(storage.read_text(join(str(tmp_path / "ds"), CARD)))
    assert [w["class"] for w in card["warnings"]] == ["eel"]  # on disk too


def test_a_class_only_in_the_sources_train_split_is_warned_about(tmp_path):
    storage = Storage()
    raw = str(tmp_path / "raw")
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        for c, name in enumerate(CLASSES):
            if name == "eel" and split != "train":
                continue
            for i in range(n):
                storage.write_bytes(join(raw, f"{split}/{name}/{i}.png"), class_image(c, i))
    card, lines = _logged(storage, raw, str(tmp_path / "ds"))
    assert [(w["class"], w["missing"]) for w in card["warnings"]] == [("eel", ["val", "test"])]
    assert "needs >= 3" not in card["warnings"][0]["message"]  # the source chose the splits
    assert sum("warning" in line for line in lines) == 1


def _manifest_csv(storage: Storage, root: str) -> str:
    for i in range(12):
        storage.write_bytes(join(root, f"img/{i:03d}.png"), class_image(i % 3, i))
    lines = ["path,label,note"]  # line 1
    for i in range(12):  # lines 2-14: img/004 has a quoted two-line note (lines 6-7)
        note = '"two\nlines"' if i == 4 else f"n{i}"
        lines.append(f"img/{i:03d}.png,{CLASSES[i % 3]},{note}")
    lines.append("")  # a blank line (line 15), skipped by the reader
    lines.append("img/003.png,cat,n3")  # line 16: exact repeat of line 5
    lines.append("img/007.png,cat,n7")  # line 17: img/007 is a dog on line 10
    lines.append("img/003.png,cat,n3")  # line 18: exact repeat again
    uri = join(root, "manifest.csv")
    storage.write_text(uri, "\n".join(lines) + "\n")
    return uri


def test_manifest_repeats_are_dropped_or_rejected_with_their_lines(tmp_path):
    storage = Storage()
    uri = _manifest_csv(storage, str(tmp_path / "src"))
    card, lines = _logged(storage, uri, str(tmp_path / "ds"))
    assert [(d["id"], d["line"], d["same_as"]) for d in card["duplicates"]] == [
        ("img/003.png", 16, 5), ("img/003.png", 18, 5),
    ]  # fmt: skip
    assert card["skipped"] == {"duplicate_row": 2}
    conflicts = [r for r in card["rejected"] if r["reason"] == "conflicting_duplicate"]
    assert [(r["id"], r["line"]) for r in conflicts] == [("img/007.png", 10), ("img/007.png", 17)]
    assert "lines 10, 17 with different label" in conflicts[0]["detail"]
    assert "label='dog'" in conflicts[0]["detail"] and "label='cat'" in conflicts[1]["detail"]
    assert card["rejected_by_reason"] == {"conflicting_duplicate": 2}
    # the job went on: every other image is written once
    _, rows = read_prepared(storage, str(tmp_path / "ds"))
    assert sorted(r["id"] for r in rows) == [f"img/{i:03d}.png" for i in range(12) if i != 7]
    assert card["total"] == 11
    assert any("2 exact repeat(s)" in x and "'img/003.png' (line 16)" in x for x in lines)
    assert any("'img/007.png' (line 10), 'img/007.png' (line 17)" in x for x in lines)
    assert "'img/003.png' (line 18) same as 5" in format_card(card)


def test_parquet_manifest_repeats_are_named_by_row(tmp_path):
    storage = Storage()
    root = str(tmp_path / "src")
    rows = []
    for i in range(9):
        storage.write_bytes(join(root, f"img/{i}.png"), class_image(i % 3, i))
        rows.append({"path": f"img/{i}.png", "label": CLASSES[i % 3], "lat": float(i)})
    rows.append(dict(rows[2]))  # row 10: exact repeat of row 3
    rows.append({**rows[4], "lat": -1.0})  # row 11: row 5 with other metadata
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    storage.write_bytes(join(root, "m.parquet"), buf.getvalue())
    card = prepare_quiet(storage, join(root, "m.parquet"), str(tmp_path / "ds"))
    assert [(d["id"], d["row"], d["same_as"]) for d in card["duplicates"]] == [("img/2.png", 10, 3)]
    conflicts = [(r["id"], r["row"]) for r in card["rejected"]]
    assert conflicts == [("img/4.png", 5), ("img/4.png", 11)]
    assert "with different meta" in card["rejected"][0]["detail"]
    assert card["total"] == 8


def test_a_file_changed_after_validation_is_judged_again(tmp_path):
    storage = Storage()
    cfg = PrepareConfig(output="unused", num_threads=2)
    good, bad = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    storage.write_bytes(good, class_image(0, 0))
    storage.write_bytes(bad, class_image(1, 1))
    recs = [Record("a", good, label="x"), Record("b", bad, label="x")]
    checks = validate(recs, storage, cfg, progress=False)
    assert all(c.reason is None and c.data is None for c in checks.values())  # bytes not kept
    storage.write_bytes(bad, bad_files()["notes.png"][0])
    same = reload(recs[0], checks["a"], storage, cfg)
    assert same.data == storage.read_bytes(good) and (same.width, same.mode) == (24, "RGB")
    assert reload(recs[1], checks["b"], storage, cfg).reason == "undecodable"


def test_cards_prepared_before_still_read_and_are_reused_only_when_nothing_was_rejected(
    tmp_path,
):
    storage = Storage()
    raw, out = str(tmp_path / "raw"), str(tmp_path / "ds")
    write_folder(storage, raw, per_class=5)
    card = prepare_quiet(storage, raw, out)
    old = {k: v for k, v in card.items() if k not in ("duplicates", "warnings", "split_over")}
    storage.write_text(join(out, CARD), json.dumps(old))
    assert "rejected: 0" in format_card(old)
    assert prepare_quiet(storage, raw, out).get("up_to_date")  # same split either way
    # an old card with rejected files may have drawn its split over them: prepared again
    storage.write_bytes(join(raw, "cat/broken.png"), b"\x89PNG not really")
    card = prepare_quiet(storage, raw, out)
    old = {k: v for k, v in card.items() if k not in ("duplicates", "warnings", "split_over")}
    storage.write_text(join(out, CARD), json.dumps(old))
    again = prepare_quiet(storage, raw, out)
    assert not again.get("up_to_date") and again["split_over"] == "valid_images"
    assert prepare_quiet(storage, raw, out).get("up_to_date")


def test_report_shows_absent_classes_instead_of_a_zero_f1(tmp_path):
    storage = Storage()
    # class c: in training only; test has no sample of it
    test = {"top1": 1.0, "f1_macro": 1.0, "count": 5, "confusion": [[3, 0, 0], [0, 2, 0],
            [0, 0, 0]], "per_class_f1": [1.0, 1.0, 0.0], "absent_classes": [2]}  # fmt: skip
    # metrics written before absent_classes: found from the confusion matrix
    val = {"top1": 1.0, "count": 2, "confusion": [[1, 0, 0], [0, 1, 0], [0, 0, 0]],
           "per_class_f1": [1.0, 1.0, 0.0]}  # fmt: skip
    md = storage.read_text(
        write_report(
            storage, str(tmp_path), history=[], metric="top1", best=None,
            splits={"val": val, "test": test}, classes=["a", "b", "c"], multi_label=False,
            samples=None, summary={},
        )
    )  # fmt: skip
    assert "## Classes absent from a split" in md
    assert "- val: c" in md and "- test: c" in md
    assert "| c | absent |" in md and "| a | 1.0000 |" in md
    assert storage.exists(join(str(tmp_path), "report", "per_class_f1.png"))


def test_counts_of_the_split_check():
    """The promise behind the warnings: >= 3 valid images give one val and one test."""
    recs = [Record(f"{c}-{i}", "", label=c) for c, n in (("a", 3), ("b", 2), ("c", 40))
            for i in range(n)]  # fmt: skip
    got = assign_splits(recs, train=0.8, val=0.1, test=0.1, seed=3)
    per = {c: Counter(s for rid, s in got.items() if rid.startswith(c)) for c in "abc"}
    assert per["a"] == {"train": 1, "val": 1, "test": 1}
    assert per["b"] == {"train": 2}
    assert per["c"] == {"train": 32, "val": 4, "test": 4}


@pytest.mark.parametrize("bad", [0, 5])
def test_the_split_ignores_how_many_bad_files_there_are(tmp_path, bad):
    storage = Storage()
    raw = str(tmp_path / "raw")
    write_folder(storage, raw, per_class=8)
    for i in range(bad):
        storage.write_bytes(join(raw, f"dog/bad{i}.jpg"), b"")
    card = prepare_quiet(storage, raw, str(tmp_path / "ds"))
    _, rows = read_prepared(storage, str(tmp_path / "ds"))
    assert len(card["rejected"]) == bad
    expected = assign_splits(
        [Record(r["id"], "", label=CLASSES[r["label"]]) for r in rows],
        train=0.8, val=0.1, test=0.1, seed=0,
    )  # fmt: skip
    assert {r["id"]: r["split"] for r in rows} == expected
