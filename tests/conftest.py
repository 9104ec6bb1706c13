"""Shared fixtures (one local Ray session, real SeaweedFS (S3) and fake-gcs-server (GCS)), and
the two tiers of the suite.

Servers come from pip packages and run on free loopback ports (tests/servers.py);
Ray is started once per test session with ``num_cpus=2`` — the size of this machine
and of the no-deadlock case the platform must handle.

Tiers: a test is marked ``slow`` here, automatically, when it needs a server or Ray: it uses
one of :data:`SLOW_FIXTURES`, it is a ``store`` test on ``s3``/``gs``, or it carries one of
:data:`SLOW_MARKS`. ``make test-fast`` runs ``-m "not slow"``, ``make test`` runs everything.
A test that starts a server or Ray in its own body must be marked by hand (``ray``, ``e2e``,
or ``slow``). When a session selects no slow test at all, starting Ray or a server fails
loudly (:func:`_forbid_servers_and_ray`), so a unit test that does either cannot hide.
"""

from __future__ import annotations

import os
import uuid

os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # before anything imports gcsfs
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import pytest
from raylens.storage import Storage

from tests import servers
from tests.servers import GCSServer, S3Server, start_fake_gcs, start_seaweedfs
from tests.stores import gcs_storage, s3_storage

# Fixtures that start a server or Ray (or, no_ray_here, make room for a job that starts Ray).
SLOW_FIXTURES = frozenset({"seaweed", "fake_gcs", "ray_session", "no_ray_here"})
# Markers of tests that need Ray, real servers or a cluster.
SLOW_MARKS = frozenset({"ray", "e2e", "faults", "slow"})
REMOTE_STORES = frozenset({"s3", "gs"})


def _is_slow(item: pytest.Item) -> bool:
    if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    if any(item.get_closest_marker(name) for name in SLOW_MARKS):
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("store") in REMOTE_STORES


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)


def pytest_collection_finish(session):
    if session.items and not any(item.get_closest_marker("slow") for item in session.items):
        _forbid_servers_and_ray()


def _forbid_servers_and_ray() -> None:
    """Only unit tests were selected: make ``ray.init`` (explicit or Ray's auto-init) and
    starting a test server raise, naming the way out."""
    import ray

    def refuse(what: str):
        def raiser(*args, **kwargs):
            raise RuntimeError(
                f"a unit test (fast tier, not marked slow) tried to start {what}; use a "
                f"fixture from tests/conftest.py or mark the test `ray`, `e2e` or `slow`"
            )

        return raiser

    ray.init = refuse("Ray")
    servers._Server._launch = refuse("a storage server")


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


@pytest.fixture(params=["local", "s3", "gs"])
def store(request, tmp_path):
    """``(storage, root_uri)`` on each backend: a local dir, a fresh S3 or GCS bucket.

    Storage's own tests run on all three; a test whose subject is not storage narrows it
    with ``@pytest.mark.parametrize("store", [...], indirect=True)``. The ``s3``/``gs``
    variants are in the slow tier."""
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
