"""Round trips against the real local object-storage servers from tests/servers.py."""

from __future__ import annotations

import os
import uuid

# gcsfs blocks ~60 s per call against an emulator unless this is set before import.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import pytest
from pyarrow import fs as pafs

from tests.servers import GCSServer, S3Server  # fixtures `seaweed`, `fake_gcs`: conftest.py


def _bucket(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


# ----------------------------------------------------------------------------- SeaweedFS


def test_s3_server_basics(seaweed: S3Server):
    assert seaweed.running and seaweed.pid > 0
    assert seaweed.endpoint_url.startswith("http://127.0.0.1:")
    env = seaweed.env()
    assert env["AWS_ENDPOINT_URL"] == seaweed.endpoint_url
    assert env["AWS_ACCESS_KEY_ID"] == seaweed.access_key
    assert env["AWS_SECRET_ACCESS_KEY"] == seaweed.secret_key
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "us-east-1"
    # every port weed opens is one we picked (no 8333/9333/8888/23646 defaults)
    assert len(set(seaweed.ports.values())) == len(seaweed.ports)
    assert seaweed.log_path.exists()


def test_s3_pyarrow_roundtrip_listing_and_move(seaweed: S3Server):
    bucket = _bucket("rt")
    seaweed.create_bucket(bucket)
    fs = seaweed.pyarrow_fs()
    payload = os.urandom(300_000) + b"tail"
    _write(fs, f"{bucket}/dir/a.bin", payload)
    _write(fs, f"{bucket}/dir/sub/b.txt", b"bee")
    assert _read(fs, f"{bucket}/dir/a.bin") == payload

    infos = {i.path: i for i in fs.get_file_info(pafs.FileSelector(bucket, recursive=True))}
    assert infos[f"{bucket}/dir/a.bin"].type == pafs.FileType.File
    assert infos[f"{bucket}/dir/a.bin"].size == len(payload)
    assert infos[f"{bucket}/dir/sub/b.txt"].size == 3
    assert infos[f"{bucket}/dir/sub"].type == pafs.FileType.Directory

    # file move (copy + delete under the hood) works on SeaweedFS
    fs.move(f"{bucket}/dir/a.bin", f"{bucket}/moved/a.bin")
    src, dst = fs.get_file_info([f"{bucket}/dir/a.bin", f"{bucket}/moved/a.bin"])
    assert src.type == pafs.FileType.NotFound
    assert dst.type == pafs.FileType.File
    assert _read(fs, f"{bucket}/moved/a.bin") == payload

    # ...but a "directory" move does not (pyarrow copies the key itself)
    with pytest.raises(OSError, match="NO_SUCH_KEY"):
        fs.move(f"{bucket}/dir/sub", f"{bucket}/other")


def test_s3_pyarrow_create_dir_bucket(seaweed: S3Server):
    name = _bucket("mkdir")
    with pytest.raises(OSError, match="allow_bucket_creation"):
        seaweed.pyarrow_fs().create_dir(name)
    seaweed.pyarrow_fs(allow_bucket_creation=True).create_dir(name)
    names = [b["Name"] for b in seaweed.boto3_client().list_buckets()["Buckets"]]
    assert name in names


def test_s3fs_reads_same_object(seaweed: S3Server):
    import s3fs

    bucket = _bucket("s3fs")
    seaweed.create_bucket(bucket)
    _write(seaweed.pyarrow_fs(), f"{bucket}/k/obj.bin", b"written by pyarrow")
    fs = s3fs.S3FileSystem(
        key=seaweed.access_key,
        secret=seaweed.secret_key,
        client_kwargs={"endpoint_url": seaweed.endpoint_url, "region_name": seaweed.region},
        skip_instance_cache=True,
    )
    assert fs.cat(f"{bucket}/k/obj.bin") == b"written by pyarrow"
    assert fs.ls(f"{bucket}/k", detail=False) == [f"{bucket}/k/obj.bin"]


def test_s3_wrong_credentials_rejected(seaweed: S3Server):
    import botocore.exceptions
    import s3fs

    bucket = _bucket("auth")
    seaweed.create_bucket(bucket)
    _write(seaweed.pyarrow_fs(), f"{bucket}/x", b"secret data")

    for key, secret in [(seaweed.access_key, "wrong-secret"), ("unknown-key", "whatever")]:
        bad = pafs.S3FileSystem(
            endpoint_override=seaweed.endpoint_url,
            access_key=key,
            secret_key=secret,
            scheme="http",
            region=seaweed.region,
        )
        with pytest.raises(OSError, match="ACCESS_DENIED"):
            _read(bad, f"{bucket}/x")
        with pytest.raises(OSError):
            _write(bad, f"{bucket}/y", b"nope")

    anon = pafs.S3FileSystem(
        endpoint_override=seaweed.endpoint_url, anonymous=True, scheme="http", region="us-east-1"
    )
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        _read(anon, f"{bucket}/x")

    bad_s3fs = s3fs.S3FileSystem(
        key=seaweed.access_key,
        secret="wrong-secret",
        client_kwargs={"endpoint_url": seaweed.endpoint_url},
        skip_instance_cache=True,
    )
    with pytest.raises(PermissionError):
        bad_s3fs.cat(f"{bucket}/x")

    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=seaweed.endpoint_url,
        aws_access_key_id=seaweed.access_key,
        aws_secret_access_key="wrong-secret",
        region_name=seaweed.region,
    )
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        client.list_buckets()
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_s3_restart_keeps_data(seaweed: S3Server):
    bucket = _bucket("restart")
    seaweed.create_bucket(bucket)
    fs = seaweed.pyarrow_fs()
    payload = os.urandom(50_000)
    _write(fs, f"{bucket}/persist.bin", payload)
    old_pid, endpoint = seaweed.pid, seaweed.endpoint_url

    seaweed.restart()

    assert seaweed.running and seaweed.pid != old_pid
    assert seaweed.endpoint_url == endpoint
    assert _read(fs, f"{bucket}/persist.bin") == payload  # same client object still works
    assert _read(seaweed.pyarrow_fs(), f"{bucket}/persist.bin") == payload
    _write(fs, f"{bucket}/after.bin", b"after restart")  # and it accepts writes again
    assert _read(fs, f"{bucket}/after.bin") == b"after restart"


# ----------------------------------------------------------------------------- fake GCS


def test_gcs_server_basics(fake_gcs: GCSServer):
    assert fake_gcs.running and fake_gcs.pid > 0
    assert fake_gcs.endpoint_url == f"http://{fake_gcs.host_port}"
    assert fake_gcs.env()["STORAGE_EMULATOR_HOST"] == fake_gcs.endpoint_url
    assert fake_gcs.log_path.exists()


def test_gcs_pyarrow_roundtrip_listing_and_move(fake_gcs: GCSServer):
    bucket = _bucket("gcs-rt")
    fake_gcs.create_bucket(bucket)
    fake_gcs.create_bucket(bucket)  # idempotent
    fs = pafs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=fake_gcs.host_port)
    payload = os.urandom(300_000) + b"tail"
    _write(fs, f"{bucket}/dir/a.bin", payload)
    _write(fs, f"{bucket}/dir/sub/b.txt", b"bee")
    assert _read(fs, f"{bucket}/dir/a.bin") == payload

    infos = {i.path: i for i in fs.get_file_info(pafs.FileSelector(bucket, recursive=True))}
    assert infos[f"{bucket}/dir/a.bin"].type == pafs.FileType.File
    assert infos[f"{bucket}/dir/a.bin"].size == len(payload)
    assert infos[f"{bucket}/dir/sub/b.txt"].size == 3

    # file move (rewrite + delete) works on fake-gcs-server
    fs.move(f"{bucket}/dir/a.bin", f"{bucket}/moved/a.bin")
    src, dst = fs.get_file_info([f"{bucket}/dir/a.bin", f"{bucket}/moved/a.bin"])
    assert src.type == pafs.FileType.NotFound
    assert dst.type == pafs.FileType.File
    assert _read(fs, f"{bucket}/moved/a.bin") == payload

    # a "directory" move is refused
    with pytest.raises(OSError, match="does not represent a file"):
        fs.move(f"{bucket}/dir/sub", f"{bucket}/other")


def test_gcs_pyarrow_create_dir_bucket_needs_project(fake_gcs: GCSServer):
    name = _bucket("gcs-mkdir")
    fs = fake_gcs.pyarrow_fs(project_id="test")
    fs.create_dir(name)
    assert fs.get_file_info(name).type == pafs.FileType.Directory


def test_gcsfs_reads_same_object(fake_gcs: GCSServer):
    import gcsfs

    bucket = _bucket("gcsfs")
    fake_gcs.create_bucket(bucket)
    _write(fake_gcs.pyarrow_fs(), f"{bucket}/k/obj.bin", b"written by pyarrow")
    fs = gcsfs.GCSFileSystem(
        endpoint_url=fake_gcs.endpoint_url, token="anon", skip_instance_cache=True
    )
    assert fs.cat(f"{bucket}/k/obj.bin") == b"written by pyarrow"
    assert fs.ls(f"{bucket}/k", detail=False) == [f"{bucket}/k/obj.bin"]
    fs.pipe(f"{bucket}/k/from-gcsfs.txt", b"written by gcsfs")
    assert _read(fake_gcs.pyarrow_fs(), f"{bucket}/k/from-gcsfs.txt") == b"written by gcsfs"


def test_gcs_restart_keeps_data(fake_gcs: GCSServer):
    bucket = _bucket("gcs-restart")
    fake_gcs.create_bucket(bucket)
    fs = fake_gcs.pyarrow_fs()
    _write(fs, f"{bucket}/persist.bin", b"durable")
    old_pid = fake_gcs.pid
    fake_gcs.restart()
    assert fake_gcs.running and fake_gcs.pid != old_pid
    assert _read(fs, f"{bucket}/persist.bin") == b"durable"
