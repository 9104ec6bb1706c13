"""Object keys with any character: '#', '?', '%', '+', '=', spaces and unicode are part of an
S3/GCS key everywhere raylens names one (URIs, listings, manifests, prepare outputs, Ray
Data reads, Ray Train run dirs, teacher stores); names that cannot work are refused at
config load, naming the key and the character."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from raylens import config as C
from raylens.config import ConfigError
from raylens.data import teacher_store as TS
from raylens.data.prepare import CARD, check_dataset, load_card
from raylens.schema import RunConfig, SourceConfig
from raylens.storage import Storage, StorageError, join, parent, split_uri

from tests.imagegen import class_image
from tests.sourcegen import CLASSES
from tests.stores import s3_storage

# Every character the issue names, '%20' that URL decoding would turn into a space, '=' that
# Ray Data's hive partitioning would turn into a column, '?' its extension filter cuts at.
HOSTILE = "v2#fixed ?q=1 p%20q a+b ü€"
RUN = "exp#2 ?x=1 p%20q a+b"  # ASCII: Ray Train cannot run under a unicode name
KEYS = [HOSTILE, "a#b", "q?x", "p%20q", "a+b", "sp ace", "ünï€", "k=v"]


# ----------------------------------------------------------------------------- URIs


@pytest.mark.parametrize(
    "scheme, canonical", [("s3", "s3"), ("S3", "s3"), ("s3a", "s3"), ("gs", "gs"), ("gcs", "gs")]
)
def test_object_uris_split_at_the_first_slash_and_keep_every_character(scheme, canonical):
    assert split_uri(f"{scheme}://bucket/datasets/v2#fixed") == (
        canonical,
        "bucket/datasets/v2#fixed",
    )
    uri = f"{scheme}://bucket/datasets/{HOSTILE}/train/part 1?.parquet"
    assert split_uri(uri) == (canonical, f"bucket/datasets/{HOSTILE}/train/part 1?.parquet")
    assert split_uri(f"{scheme}://bucket/{HOSTILE}/") == (canonical, f"bucket/{HOSTILE}")
    assert split_uri(f"{scheme}://bucket") == (canonical, "bucket")


def test_local_paths_and_file_uris_keep_every_character(tmp_path, monkeypatch):
    path = str(tmp_path / HOSTILE / "x#1.png")
    assert split_uri(path) == ("file", path)
    assert split_uri(f"file://{path}") == ("file", path)
    monkeypatch.chdir(tmp_path)
    assert split_uri(f"runs/{HOSTILE}") == ("file", str(tmp_path / "runs" / HOSTILE))
    # '://' after a folder is part of a local name, not a scheme
    assert split_uri("runs/a://b") == ("file", str(tmp_path / "runs/a:/b"))


def test_bad_uris_are_refused_naming_them():
    with pytest.raises(StorageError, match=r"no bucket in 's3:///key'"):
        split_uri("s3:///key")
    with pytest.raises(StorageError, match=r"unsupported URI scheme 'hdfs' in 'hdfs://h/x#1'"):
        split_uri("hdfs://h/x#1")


@pytest.mark.parametrize("root", ["s3://bucket", f"gs://bucket/{HOSTILE}", "/data/root"])
@pytest.mark.parametrize("name", KEYS)
def test_join_and_parent_round_trip(root, name):
    uri = join(root, name, f"{name}.parquet")
    scheme, path = split_uri(uri)
    assert path == split_uri(root)[1] + f"/{name}/{name}.parquet"
    assert uri.startswith(root) and scheme == split_uri(root)[0]
    assert parent(parent(uri)) == root
    assert split_uri(join(root, name)) == (scheme, split_uri(root)[1] + "/" + name)


# ----------------------------------------------------------------------------- run names


@pytest.mark.parametrize("name", [RUN, "fm", "a.b", "..x", "x" * 245])
def test_run_names_with_any_other_character_load(name):
    cfg = C.load(RunConfig, None, [f"run.name={name}", f"tune.name={name}"])
    assert cfg.run.name == name


@pytest.mark.parametrize(
    "name, why",
    [
        ("a/b", "'/' would nest the run dir"),
        ("a\\b", "folder separator to some S3 servers"),
        (".", "names a folder that is not a new one"),
        ("..", "names a folder that is not a new one"),
        ("a\x00b", "control character '\\x00'"),
        ("a\nb", "control character '\\n'"),
        ("x" * 246, "246 bytes in UTF-8, over 245"),
        ("exp-ü", "non-ASCII character 'ü': Ray Train 2.60 tags its metrics with the run name"),
    ],
)
def test_run_names_that_cannot_work_are_refused_naming_the_key_and_character(name, why):
    for key in ("run.name", "tune.name"):
        cfg = RunConfig()
        section = cfg.run if key == "run.name" else cfg.tune
        section.name = name
        with pytest.raises(ConfigError, match=rf"config key '{key}': .* cannot be a run name: "):
            cfg.validate()
        with pytest.raises(ConfigError) as err:
            cfg.validate()
        assert why in str(err.value)


@pytest.mark.parametrize(
    "output_dir", ["s3://b/runs", f"gs://b/{HOSTILE}/runs/", "s3://b", "runs//x", "/tmp/./runs"]
)
def test_output_dirs_with_any_character_load(output_dir):
    assert C.load(RunConfig, None, [f"run.output_dir={output_dir}"]).run.output_dir == output_dir


@pytest.mark.parametrize(
    "output_dir, why",
    [
        ("s3://b/runs//x", "an empty, '.' or '..' folder in the key: Ray Train normalizes"),
        ("gs://b/./runs", "an empty, '.' or '..' folder"),
        ("s3://b/runs/../x", "an empty, '.' or '..' folder"),
        ("s3:///runs", "no bucket"),
        ("s3://b/runs\x01", "control character '\\x01'"),
        ("s3://b/a\\b", "folder separator"),
    ],
)
def test_output_dirs_that_cannot_hold_run_dirs_are_refused(output_dir, why):
    for key in ("run.output_dir", "tune.output_dir"):
        cfg = RunConfig()
        (cfg.run if key == "run.output_dir" else cfg.tune).output_dir = output_dir
        with pytest.raises(ConfigError) as err:
            cfg.validate()
        assert f"config key '{key}'" in str(err.value) and why in str(err.value), err.value


# ----------------------------------------------------------------------------- storage


def test_hostile_keys_write_read_list_exists_delete(store):
    storage, root = store
    base = join(root, "keys")
    uris = [join(base, name, f"{name}.bin") for name in KEYS]
    for i, uri in enumerate(uris):
        storage.write_bytes(uri, f"object {i}".encode())
    assert [storage.read_text(u) for u in uris] == [f"object {i}" for i in range(len(uris))]
    assert all(storage.exists(u) and storage.exists(parent(u)) for u in uris)
    listed = storage.list_files(base)
    assert [e.uri for e in listed] == sorted(uris)  # full keys, the same URIs as written
    assert [e.uri for e in storage.list_files(join(base, "a#b"))] == [join(base, "a#b", "a#b.bin")]
    # nothing was written under a key cut at '#' or '?'
    for cut in ("v2", "a", "q", "p q", "p%20q/p q.bin"):
        assert not storage.exists(join(base, cut))
    storage.delete(uris[0])
    storage.delete_tree(join(base, "q?x"))
    assert not storage.exists(uris[0]) and not storage.exists(join(base, "q?x", "q?x.bin"))
    assert [e.uri for e in storage.list_files(base)] == sorted(uris[1:2] + uris[3:])


def _hostile_manifest(storage: Storage, raw: str, n: int = 24) -> str:
    """Images named with every hostile character, listed three ways: relative, './'-relative
    and as full URIs; returns the manifest's URI."""
    rows = []
    for i in range(n):
        name = f"img/{i:02d} {HOSTILE}.png"
        storage.write_bytes(join(raw, name), class_image(i % 3, i))
        path = [name, f"./{name}", join(raw, name)][i % 3]
        rows.append({"path": path, "label": CLASSES[i % 3]})
    buf = io.BytesIO()
    pacsv.write_csv(pa.Table.from_pylist(rows), buf)
    uri = join(raw, f"manifest {HOSTILE}.csv")
    storage.write_bytes(uri, buf.getvalue())
    return uri


def _storage_args(storage: Storage) -> list[str]:
    return [f"storage.{k}={v}" for k, v in dataclasses.asdict(storage.cfg).items() if v is not None]


def _prepare_job(storage: Storage, manifest: str, out: str, capsys) -> dict:
    from jobs.prepare import main

    card = main([f"source.uri={manifest}", f"prepare.output={out}", *_storage_args(storage)])
    capsys.readouterr()
    return card


@pytest.mark.timeout(180)
@pytest.mark.parametrize("store", ["s3", "gs"], indirect=True)
def test_prepare_from_a_hostile_manifest_into_a_hostile_output(store, capsys):
    storage, root = store
    manifest = _hostile_manifest(storage, join(root, f"raw {HOSTILE}"))
    out = join(root, "datasets", HOSTILE)
    card = _prepare_job(storage, manifest, out, capsys)
    assert card["total"] == 24 and card["rejected"] == [], card["rejected"][:3]
    shards = [join(out, f) for s in card["splits"].values() for f in s["files"]]
    listed = {e.uri for e in storage.list_files(out)}
    assert listed == {join(out, CARD), join(out, "config.yaml"), *shards}
    assert load_card(storage, out)["fingerprint"] == card["fingerprint"]
    assert check_dataset(out, SourceConfig(), storage)["total"] == 24
    saved = C.load(RunConfig, storage.read_text(join(out, "config.yaml")))
    assert saved.prepare.output == out and saved.source.uri == manifest
    # the bug: everything landed on the key cut at '#' ("datasets/v2")
    assert [e.uri for e in storage.list_files(join(root, "datasets"))] == sorted(listed)
    assert not storage.exists(join(root, "datasets", "v2"))
    # listing returns the keys the manifest names: the fingerprint holds, a re-run is a no-op
    again = _prepare_job(storage, manifest, out, capsys)
    assert again.get("up_to_date") and again["fingerprint"] == card["fingerprint"]


@pytest.mark.parametrize("store", ["s3", "gs"], indirect=True)
def test_teacher_store_epochs_under_a_hostile_key(store):
    storage, root = store
    store_uri = join(root, "teacher", HOSTILE)
    ids = [f"{i:02d} {HOSTILE}.png" for i in range(5)]
    idx = np.arange(10, dtype=np.uint16).reshape(5, 2)
    prob = np.full((5, 2), 0.5, dtype=np.float16)
    TS.write_epoch(storage, store_uri, TS.encode(ids, 0, np.arange(5), idx, prob))
    assert storage.exists(TS.epoch_file(store_uri, 0))
    assert TS.read_ids(storage, store_uri, 0) == set(ids)
    got = TS.read_epoch(storage, store_uri, 0, k=2, ids=ids[:2])
    assert list(got.ids) == ids[:2] and got.idx.tolist() == [[0, 1], [2, 3]]
    assert [e.uri for e in storage.list_files(join(root, "teacher"))] == [
        TS.epoch_file(store_uri, 0)
    ]


# ----------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def hostile_s3(seaweed):
    """A bucket with a hostile raw manifest and its dataset, prepared into a hostile key."""
    import uuid

    bucket = f"keys-{uuid.uuid4().hex[:8]}"
    seaweed.create_bucket(bucket)
    storage = s3_storage(seaweed)
    root = f"s3://{bucket}"
    manifest = _hostile_manifest(storage, join(root, f"raw {HOSTILE}"), n=36)
    from raylens.data.prepare import prepare
    from raylens.schema import PrepareConfig

    out = join(root, "datasets", HOSTILE)
    card = prepare(
        SourceConfig(uri=manifest),
        PrepareConfig(output=out),
        storage,
        progress=False,
        log=lambda m: None,
    )
    assert card["total"] == 36 and not card["rejected"]
    return storage, root, manifest, out, card


def _cfg(storage: Storage, dataset: str, *extra: str) -> RunConfig:
    return C.load(
        RunConfig,
        None,
        [
            f"data.dataset={dataset}",
            "data.image_size=16",
            "data.eval_crop_pct=1.0",
            "data.mean=[0.485, 0.456, 0.406]",
            "data.std=[0.229, 0.224, 0.225]",
            "data.batch_size=4",
            "data.decode_batch_size=8",
            *_storage_args(storage),
            *extra,
        ],
    )


@pytest.mark.timeout(300)
def test_ray_data_reads_a_prepared_dataset_and_a_raw_manifest_under_hostile_keys(
    ray_session, hostile_s3
):
    from raylens.runtime.ingest import build_split

    storage, _, manifest, out, card = hostile_s3
    for dataset in (out, manifest):
        cfg = _cfg(storage, dataset)
        for split in ("train", "val", "test"):
            ds, info = build_split(cfg, split, storage, train=False)
            rows = ds.take_all()
            assert len(rows) == card["splits"][split]["count"] > 0, (dataset, split)
            assert all(r["id"].endswith(f"{HOSTILE}.png") for r in rows)
            assert sorted(rows[0]) == ["aug_seed", "id", "image", "label"]  # no 'k=v' column
            assert info.classes == CLASSES


@pytest.mark.timeout(600)
def test_two_step_training_run_with_a_hostile_run_name_and_output_dir(ray_session, hostile_s3):
    from raylens.checkpoint import load_checkpoint
    from raylens.train import finetune

    storage, root, _, dataset, _ = hostile_s3
    output_dir = join(root, f"runs {HOSTILE}")
    cfg = _cfg(
        storage,
        dataset,
        f"run.name={RUN}",
        f"run.output_dir={output_dir}",
        "model.backbone=vgg_s16",
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
        "train.warmup_epochs=0",
        "ray.num_workers=1",
    )
    out = finetune(cfg)
    run = join(output_dir, RUN)
    assert out["run_dir"] == run
    metrics = [json.loads(x) for x in storage.read_text(join(run, "metrics.jsonl")).splitlines()]
    assert [m["epoch"] for m in metrics] == [1] and metrics[0]["step"] == 2
    assert C.load(RunConfig, storage.read_text(join(run, "config.yaml"))).run.name == RUN
    best = json.loads(storage.read_text(join(run, "best.json")))
    ck = load_checkpoint(storage, join(run, best["checkpoint"]))
    assert ck["extra"]["epoch"] == 1
    assert json.loads(storage.read_text(join(run, "test_metrics.json")))["count"] > 0
    # Ray Train's own files (its checkpoint dirs and state) are in the same run dir, and
    # nothing landed on a key cut at '#' or '?'
    listed = [e.uri for e in storage.list_files(root) if not e.uri.startswith(join(root, "raw "))]
    outside = [u for u in listed if not u.startswith(run + "/") and not u.startswith(dataset + "/")]
    assert outside == [], outside[:5]
    assert any("checkpoint" in u for u in listed if u.startswith(run + "/"))
