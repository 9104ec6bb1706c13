"""jobs.prepare's memory (streamed shards, read-ahead bounded in bytes) and prepare.max_side."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from PIL import Image
from raylens import config as C
from raylens.schema import RunConfig
from raylens.storage import Storage, join

from tests.imagegen import class_image, encode, photo
from tests.repo import REPO
from tests.sourcegen import prepare_quiet, read_prepared

MiB = 2**20

# A child process: imports prepare and warms it up on two of the images (lazily imported
# modules and the codecs' first buffers count as the imports), samples its RSS from a thread while prepare runs, and
# prints baseline and peak. Sampling every 2 ms sees the peak: a shard's bytes are held for
# far longer than that.
_CHILD = r"""
import json, sys, tempfile, threading, time
import psutil
from raylens.data import prepare as P
from raylens.data.prepare import prepare
from raylens.schema import PrepareConfig, SourceConfig
from raylens.storage import Storage
src, tiny, out, shard, threads = sys.argv[1:6]
run = lambda s, o, b: prepare(SourceConfig(uri=s), PrepareConfig(output=o, shard_bytes=b,
    num_threads=int(threads), overwrite=True), Storage(), progress=False, log=lambda m: None)
P.return_freed_buffers()  # what jobs.prepare does first
with tempfile.TemporaryDirectory() as d:
    run(tiny, d, int(shard))
proc = psutil.Process()
base = peak = proc.memory_info().rss
done = threading.Event()
def sample():
    global peak
    while not done.is_set():
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.002)
t = threading.Thread(target=sample); t.start()
card = run(src, out, int(shard))
done.set(); t.join()
print(json.dumps({"base": base, "peak": peak, "files": card["splits"]["train"]["files"]}))
"""


def _photos(storage: Storage, root: str, n: int) -> int:
    """``n`` photo-like JPEGs of ~350 KB in two classes; returns their total bytes."""
    total = 0
    for i in range(n):
        data = encode(photo(1000, 800, seed=i, noise=14), "JPEG", quality=92)
        storage.write_bytes(join(root, f"c{i % 2}/{i:03d}.jpg"), data)
        total += len(data)
    return total


@pytest.mark.slow  # ~15 s: 128 photos made, then prepared in a child process
def test_prepare_peak_rss_stays_within_two_shards(tmp_path):
    storage = Storage()
    src, tiny, out = str(tmp_path / "src"), str(tmp_path / "tiny"), str(tmp_path / "ds")
    shard = 16 * MiB
    total = _photos(storage, src, 128)
    for c in ("c0", "c1"):
        name = f"{c}/00{c[1]}.jpg"
        storage.write_bytes(join(tiny, name), storage.read_bytes(join(src, name)))
    assert total > 2.5 * shard  # several shards in the train split alone
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), str(REPO)])}
    # 16 threads: the default, many more than the cores that decode
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, src, tiny, out, str(shard), "16"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(got["files"]) >= 2
    grew = got["peak"] - got["base"]
    assert grew <= 2 * shard, f"peak RSS grew {grew / MiB:.1f} MiB for {shard / MiB:.0f} MiB shards"


def test_streamed_shards_keep_rows_and_bound_row_groups_in_bytes(tmp_path):
    storage = Storage()
    src, out = str(tmp_path / "src"), str(tmp_path / "ds")
    _photos(storage, src, 24)
    shard = 2 * MiB
    card = prepare_quiet(storage, src, out, shard_bytes=shard, num_threads=3)
    _, rows = read_prepared(storage, out)
    assert len(rows) == 24 == card["total"]
    for r in rows:  # bytes as in the source, sizes as decoded
        assert r["image"] == storage.read_bytes(join(src, r["id"]))
        assert (r["width"], r["height"]) == (1000, 800)
    biggest = max(len(r["image"]) for r in rows)
    files = [f for s in card["splits"].values() for f in s["files"]]
    assert len(card["splits"]["train"]["files"]) >= 3
    for f in files:
        meta = pq.ParquetFile(io.BytesIO(storage.read_bytes(join(out, f)))).metadata
        images = meta.schema.names.index("image")
        groups = [meta.row_group(g).column(images) for g in range(meta.num_row_groups)]
        sizes = [g.total_uncompressed_size for g in groups]
        assert sum(sizes) <= shard + biggest + 4096 * meta.num_rows
        assert max(sizes) <= shard // 8 + biggest + 4096 * 8
    # nothing hidden left behind by the temporaries a shard is streamed into
    assert not [p for p in (tmp_path / "ds").rglob(".tmp-*")]


def test_a_failed_prepare_leaves_no_half_shard(tmp_path, monkeypatch):
    from raylens.data import prepare as P

    storage = Storage()
    src, out = str(tmp_path / "src"), str(tmp_path / "ds")
    _photos(storage, src, 12)
    real, calls = P.ShardWriter._write_group, []

    def crash_on_third_group(self):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed mid-shard")
        real(self)

    monkeypatch.setattr(P.ShardWriter, "_write_group", crash_on_third_group)
    with pytest.raises(RuntimeError, match="killed"):
        prepare_quiet(storage, src, out, shard_bytes=8 * MiB, num_threads=2)
    left = sorted(p.name for p in (tmp_path / "ds").rglob("*") if p.is_file())
    assert left == []  # neither the shard being written nor its temporary


def _sized(storage: Storage, root: str) -> dict[str, bytes]:
    """Big JPEGs (300x200, 240x320), a big PNG (500x100) and small ones, per class."""
    files = {
        "cat/big.jpg": encode(photo(300, 200, seed=1), "JPEG", quality=90),
        "cat/tall.jpg": encode(photo(240, 320, seed=2), "JPEG", quality=90),
        "dog/wide.png": encode(photo(500, 100, seed=3), "PNG"),
        "cat/small.png": class_image(0, 1),
        "dog/small.jpg": class_image(1, 2, fmt="JPEG"),
        "dog/edge.jpg": encode(photo(100, 60, seed=4), "JPEG", quality=90),
    }
    for rel, data in files.items():
        storage.write_bytes(join(root, rel), data)
    return files


def test_max_side_shrinks_big_images_only_and_is_part_of_the_dataset(tmp_path):
    storage = Storage()
    src = str(tmp_path / "src")
    files = _sized(storage, src)
    plain = prepare_quiet(storage, src, str(tmp_path / "plain"))
    card = prepare_quiet(storage, src, str(tmp_path / "s100"), max_side=100)
    assert card["max_side"] == {"limit": 100, "resized": 3, "jpeg_quality": 90}
    assert plain["max_side"] is None
    _, rows = read_prepared(storage, str(tmp_path / "s100"))
    got = {r["id"]: r for r in rows}
    want = {
        "cat/big.jpg": ((100, 67), "JPEG"),
        "cat/tall.jpg": ((75, 100), "JPEG"),
        "dog/wide.png": ((100, 20), "PNG"),
    }
    for rid, (size, fmt) in want.items():
        img = Image.open(io.BytesIO(got[rid]["image"]))
        assert (img.size, img.format) == (size, fmt)
        assert (got[rid]["width"], got[rid]["height"]) == size
        assert got[rid]["mode"] == "RGB"
    for rid in ("cat/small.png", "dog/small.jpg", "dog/edge.jpg"):  # fits: kept byte for byte
        assert got[rid]["image"] == files[rid]
    for rel, data in files.items():  # originals untouched
        assert storage.read_bytes(join(src, rel)) == data
    # a different max_side is a different dataset; the same one is up to date
    other = prepare_quiet(storage, src, str(tmp_path / "s120"), max_side=120)
    fps = {plain["fingerprint"], card["fingerprint"], other["fingerprint"]}
    assert len(fps) == 3
    again = prepare_quiet(storage, src, str(tmp_path / "s100"), max_side=100)
    assert again.get("up_to_date")
    changed = prepare_quiet(storage, src, str(tmp_path / "s100"), max_side=120)
    assert not changed.get("up_to_date") and changed["fingerprint"] == other["fingerprint"]


@pytest.mark.parametrize(
    "value,expected",
    [
        ("0", "expected a positive int (pixels) or null (off), got 0"),
        ("-3", "expected a positive int (pixels) or null (off), got -3"),
        ("big", "expected int or null"),
        ("1.5", "expected int or null"),
    ],
)
def test_bad_max_side_is_named(value, expected):
    with pytest.raises(C.ConfigError, match=r"'prepare\.max_side'") as err:
        C.load(RunConfig, overrides=[f"prepare.max_side={value}"])
    assert expected in str(err.value)
    assert C.load(RunConfig, overrides=["prepare.max_side=null"]).prepare.max_side is None
    assert C.load(RunConfig, overrides=["prepare.max_side=512"]).prepare.max_side == 512
