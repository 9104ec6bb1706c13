"""Storage on a local dir, real S3 (SeaweedFS) and real GCS (fake-gcs-server)."""

from __future__ import annotations

import uuid

import pytest
from raylens.schema import StorageConfig
from raylens.storage import Storage, StorageError, join, split_uri

from tests.stores import s3_storage


def test_round_trip_list_delete(store):
    storage, root = store
    storage.write_bytes(join(root, "a/one.bin"), b"\x00\x01" * 1000)
    storage.write_text(join(root, "a/b/two.txt"), "hello")
    assert storage.read_bytes(join(root, "a/one.bin")) == b"\x00\x01" * 1000
    assert storage.read_text(join(root, "a/b/two.txt")) == "hello"
    listed = storage.list_files(join(root, "a"))
    assert [e.uri for e in listed] == [join(root, "a/b/two.txt"), join(root, "a/one.bin")]
    assert [e.size for e in listed] == [5, 2000]
    assert [e.uri for e in storage.list_files(join(root, "a"), recursive=False)] == [
        join(root, "a/one.bin")
    ]
    storage.write_bytes(join(root, "a/one.bin"), b"new")  # overwrite is atomic too
    assert storage.read_bytes(join(root, "a/one.bin")) == b"new"
    storage.delete(join(root, "a/one.bin"))
    assert not storage.exists(join(root, "a/one.bin"))
    with pytest.raises(FileNotFoundError, match="one.bin"):
        storage.read_bytes(join(root, "a/one.bin"))


def test_gz_files_are_read_as_stored(store):
    storage, root = store
    storage.write_bytes(join(root, "x.gz"), b"\x1f\x8b not really gzip")
    assert storage.read_bytes(join(root, "x.gz")) == b"\x1f\x8b not really gzip"


def test_failed_write_leaves_neither_final_nor_temp_file(store, monkeypatch):
    storage, root = store
    target = join(root, "results/metrics.json")
    scheme, _ = split_uri(target)
    if scheme == "file":
        monkeypatch.setattr(
            "raylens.storage.os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk gone"))
        )
        with pytest.raises(OSError):
            storage.write_bytes(target, b"{}")
    else:
        fs = storage.arrow_fs(scheme)

        class Crashing:
            def __getattr__(self, name):
                return getattr(fs, name)

            def move(self, src, dst):
                raise OSError("connection reset during commit")

        storage._cache[f"arrow:{scheme}"] = Crashing()
        with pytest.raises(StorageError, match="metrics.json"):
            storage.write_bytes(target, b"{}")
        storage._cache[f"arrow:{scheme}"] = fs
    assert not storage.exists(target)
    assert storage.list_files(join(root, "results")) == []


def test_a_folder_holding_a_file_exists_and_an_empty_file_round_trips(store):
    """What sources ask of every backend (tests/test_prepare.py runs locally and on S3): a
    folder, on an object store a key prefix, exists once it holds a file (YOLO's images/ and
    labels/); a zero-byte file is listed and read back empty (a planted empty image)."""
    storage, root = store
    assert not storage.exists(join(root, "tiles/images"))
    storage.write_bytes(join(root, "tiles/images/empty.jpg"), b"")
    assert storage.exists(join(root, "tiles/images"))
    assert storage.read_bytes(join(root, "tiles/images/empty.jpg")) == b""
    listed = storage.list_files(join(root, "tiles"))
    assert [(e.uri, e.size) for e in listed] == [(join(root, "tiles/images/empty.jpg"), 0)]


def test_fsspec_reads_what_arrow_wrote(store):
    storage, root = store
    uri = join(root, "f/data.bin")
    storage.write_bytes(uri, b"fsspec")
    fs, path = storage.fsspec(uri)
    with fs.open(path, "rb") as f:
        assert f.read() == b"fsspec"


def test_s3_settings_from_standard_env_vars(seaweed, monkeypatch):
    bucket = f"env-{uuid.uuid4().hex[:8]}"
    seaweed.create_bucket(bucket)
    for k, v in seaweed.env().items():
        monkeypatch.setenv(k, v)
    storage = Storage()  # nothing in the config: endpoint and keys from the environment
    storage.write_text(f"s3://{bucket}/k.txt", "env")
    assert storage.read_text(f"s3://{bucket}/k.txt") == "env"


def test_gcs_settings_from_emulator_env_var(fake_gcs, monkeypatch):
    bucket = f"env-{uuid.uuid4().hex[:8]}"
    fake_gcs.create_bucket(bucket)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_gcs.endpoint_url)
    storage = Storage()
    storage.write_text(f"gs://{bucket}/k.txt", "env")
    assert storage.read_text(f"gs://{bucket}/k.txt") == "env"


def test_wrong_credentials_fail_without_leaking_them(seaweed):
    bucket = f"cred-{uuid.uuid4().hex[:8]}"
    seaweed.create_bucket(bucket)
    bad = Storage(
        StorageConfig(
            s3_endpoint_url=seaweed.endpoint_url,
            s3_access_key_id=seaweed.access_key,
            s3_secret_access_key="WRONG-secret-value-123",
        )
    )
    with pytest.raises(StorageError) as err:
        bad.write_text(f"s3://{bucket}/x", "no")
    msg = str(err.value)
    assert f"s3://{bucket}/x" in msg
    assert "WRONG-secret-value-123" not in msg and seaweed.access_key not in msg
    good = s3_storage(seaweed)
    assert not good.exists(f"s3://{bucket}/x")


def test_unsupported_scheme_is_named():
    with pytest.raises(StorageError, match="'hdfs'"):
        Storage().resolve("hdfs://nn/path")


@pytest.mark.slow  # starts (and stops) a SeaweedFS of its own
def test_object_store_outage_is_retried_for_retry_seconds_also_after_pickling(tmp_path):
    """A SeaweedFS of this test's own is stopped for ~3 s (2.5 s + its start), four times: a write and a read
    through the storage, and a write through its pyarrow filesystem after a pickle round
    trip (as Ray Train's controller gets it), wait for it and succeed; with
    retry_seconds=0 a write fails at once."""
    import dataclasses
    import pickle
    import threading
    import time

    from tests.servers import start_seaweedfs

    server = start_seaweedfs(tmp_path / "weed")
    done = threading.Event()
    try:
        server.create_bucket("outage")
        storage = s3_storage(server)
        impatient = Storage(dataclasses.replace(storage.cfg, retry_seconds=0))
        fs = pickle.loads(pickle.dumps(storage.arrow_fs("s3")))
        storage.write_text("s3://outage/before.txt", "before")

        def bounce(stopped: threading.Event, started: threading.Event) -> None:
            server.stop()
            stopped.set()
            time.sleep(2.5)
            server.start()
            started.set()
            done.wait(timeout=300)  # the server dies with the thread that started it

        started = threading.Event()
        started.set()
        for what in ("no retry", "write", "read", "pickled write"):
            assert started.wait(timeout=60)  # the last bounce is over
            stopped, started = threading.Event(), threading.Event()
            threading.Thread(target=bounce, args=(stopped, started), daemon=True).start()
            assert stopped.wait(timeout=30)
            t0 = time.monotonic()
            if what == "no retry":  # only the AWS client's own 3 quick attempts
                with pytest.raises(StorageError, match="NETWORK_CONNECTION"):
                    impatient.write_text("s3://outage/x.txt", "no retry")
                continue
            if what == "write":
                storage.write_text("s3://outage/during.txt", "written during the outage")
            elif what == "read":
                assert storage.read_text("s3://outage/before.txt") == "before"
            else:
                with fs.open_output_stream("outage/pickled.txt") as f:
                    f.write(b"via the pickled filesystem")
            waited = time.monotonic() - t0
            assert 1.5 < waited < 30, (what, waited)  # it waited for the server, then went on
        assert started.wait(timeout=60)
        assert storage.read_text("s3://outage/during.txt") == "written during the outage"
        assert storage.read_text("s3://outage/pickled.txt") == "via the pickled filesystem"
        assert not storage.exists("s3://outage/x.txt")
        assert [e.uri for e in storage.list_files("s3://outage")] == [
            "s3://outage/before.txt",
            "s3://outage/during.txt",
            "s3://outage/pickled.txt",
        ]  # no .tmp-* left behind by the retried atomic writes
    finally:
        done.set()
        server.stop()


def test_open_atomic_streams_a_file_into_place_whole_or_not_at_all(store):
    storage, root = store
    target = join(root, "ds/train/part-00000.parquet")
    chunk = bytes(range(256)) * 4096  # 1 MiB
    with storage.open_atomic(target) as f:
        for _ in range(3):
            f.write(chunk)
        assert not storage.exists(target)  # nothing under the name until the block ends
    assert storage.read_bytes(target) == chunk * 3
    with pytest.raises(RuntimeError, match="writer died"), storage.open_atomic(target) as f:
        f.write(b"half a shard")
        raise RuntimeError("writer died")
    assert storage.read_bytes(target) == chunk * 3  # the old file, untouched
    fs, path = storage.resolve(join(root, "ds/train"))
    import pyarrow.fs as pafs

    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path))]
    assert names == ["part-00000.parquet"]  # no temporary left behind
