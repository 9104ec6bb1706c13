"""Storage on a local dir, real S3 (SeaweedFS) and real GCS (fake-gcs-server)."""

from __future__ import annotations

import uuid

import pytest
from conftest import s3_storage
from raylens.schema import StorageConfig
from raylens.storage import Storage, StorageError, join, split_uri


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
