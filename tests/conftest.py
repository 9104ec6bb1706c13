"""Shared fixtures: one local Ray session, real SeaweedFS (S3) and fake-gcs-server (GCS).

Servers come from pip packages and run on free loopback ports (tests/servers.py);
Ray is started once per test session with ``num_cpus=2`` — the size of this machine
and of the no-deadlock case the platform must handle.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # before anything imports gcsfs
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
from raylens.schema import StorageConfig  # noqa: E402
from raylens.storage import Storage  # noqa: E402
from servers import GCSServer, S3Server, start_fake_gcs, start_seaweedfs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_job(job: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs ``python -m jobs.<job> args...`` from the repo root, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", f"jobs.{job}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> S3Server:
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory) -> GCSServer:
    server = start_fake_gcs(tmp_path_factory.mktemp("fake-gcs"))
    yield server
    server.stop()


def s3_storage(server: S3Server) -> Storage:
    return Storage(
        StorageConfig(
            s3_endpoint_url=server.endpoint_url,
            s3_region=server.region,
            s3_access_key_id=server.access_key,
            s3_secret_access_key=server.secret_key,
        )
    )


def gcs_storage(server: GCSServer) -> Storage:
    return Storage(StorageConfig(gcs_endpoint_url=server.endpoint_url, gcs_anonymous=True))


@pytest.fixture(params=["local", "s3", "gs"])
def store(request, tmp_path):
    """``(storage, root_uri)`` on each backend: a local dir, a fresh S3 or GCS bucket."""
    kind = request.param
    if kind == "local":
        return Storage(), str(tmp_path)
    bucket = f"rl-{uuid.uuid4().hex[:12]}"
    if kind == "s3":
        server = request.getfixturevalue("seaweed")
        server.create_bucket(bucket)
        return s3_storage(server), f"s3://{bucket}"
    server = request.getfixturevalue("fake_gcs")
    server.create_bucket(bucket)
    return gcs_storage(server), f"gs://{bucket}"


def start_test_ray():
    """The tests' local Ray: 2 logical CPUs (like this machine)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never a cluster `ray start` left running on this machine
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}},
        )
    return ray


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session."""
    ray = start_test_ray()
    yield ray
    ray.shutdown()


@pytest.fixture
def no_ray_here():
    """No Ray in the test process while the test runs (restored after): a job subprocess
    that starts its own local Ray then is the only instance on the machine (Ray Train's
    placement-group cleaner gives up when it finds two)."""
    import ray

    was = ray.is_initialized()
    ray.shutdown()
    yield
    if was:
        start_test_ray()
