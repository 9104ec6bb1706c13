"""One writer per output: a lease on a run dir, a prepared dataset, a teacher store, an
embeddings output or a sweep, on a local path, ``s3://`` or ``gs://``.

A job that writes an output takes its lease first and holds it until it ends::

    with hold(output, storage, job="jobs.prepare", what=f"dataset output {output!r}",
              key="prepare.output"):
        ...   # write shards; a second job on the same output was refused

The lease is one small JSON object, ``<output>/.lease.json``, naming its holder (job, run,
host, pid, started / renewed / expires in UTC). A second job that finds a live lease is
refused with :class:`LeaseHeld`, one line naming the holder (jobs exit 2). A daemon
thread renews the lease every ``ttl_s / 3``; a lease not renewed for ``ttl_s`` (its holder
died with its machine) is taken over, and so at once is one whose holder process is gone
from this machine (same kernel boot and pid namespace). A takeover says so on stderr.

Every change is a compare-and-swap done by the store itself, so two jobs racing for the
same output never both win (written here because fsspec and pyarrow offer no conditional
writes):

* local paths: creating is ``os.link`` of a complete temporary file (fails if the lease
  exists); renewing, taking over and releasing happen under ``flock`` on the lease file,
  re-checked to still be the file at the path (POSIX: local disks and NFS);
* S3: ``PutObject`` with ``If-None-Match: *`` (create) or ``If-Match: <ETag>``, and
  ``DeleteObject`` with ``If-Match`` (AWS S3 honours them, writes since 2024, deletes
  since 2025; so does the SeaweedFS the tests run). A server
  that ignores these headers would let two creators both write; each then reads the
  lease back and only the one whose write stayed goes on, which narrows that race to the
  moments between one's read-back and the other's write;
* GCS: uploads with ``ifGenerationMatch`` (0 = create), deletes likewise. (The
  fake-gcs-server emulator ignores it on deletes; a release reads the lease first, so
  there only a takeover in the instant between that read and the delete is lost.)

Expiry compares the holder's UTC timestamps with the reader's clock: hosts sharing
outputs must keep their clocks within a few seconds (NTP). Pure: no Ray.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

from raylens.storage import TMP_PREFIX, Storage, StorageError, join, split_uri

LEASE = ".lease.json"  # hidden: Parquet readers (pyarrow, pandas) skip "."-names
FORMAT = "raylens.lease/1"
TTL_S = 60.0  # a holder gone without a trace is taken over after this long
_ATTEMPTS = 8  # compare-and-swap rounds lost to other contenders before giving up


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class LeaseHeld(FileExistsError):
    """Another live job holds the lease; the message names it. ``holder``: its record."""

    def __init__(self, message: str, holder: dict[str, Any]):
        super().__init__(message)
        self.holder = holder


# ----------------------------------------------------------------------------- records


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _epoch(text: Any) -> float | None:
    try:
        return dt.datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def process_space() -> str:
    """Where a pid means one process: this kernel boot and pid namespace (two containers
    on one host may share a host name, never both); the host name without ``/proc``."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return socket.gethostname()


def _process_started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def holder_gone(holder: dict[str, Any]) -> bool:
    """Whether the holder's process is known to be gone: it ran in this process space and
    its pid is dead, a zombie, or now another process (started at another time)."""
    if holder.get("process_space") != process_space() or not isinstance(holder.get("pid"), int):
        return False  # another machine: only the lease's expiry can tell
    try:
        proc = psutil.Process(holder["pid"])
        started = holder.get("process_started")
        if isinstance(started, (int, float)) and abs(proc.create_time() - started) > 0.5:
            return True  # the pid was reused
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # alive, but not ours to inspect
        return False


def _ago(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min"


def _since(t: float | None, now: float) -> str:
    if t is None:
        return "?"
    day = dt.datetime.fromtimestamp(t, dt.UTC)
    same_day = day.date() == dt.datetime.fromtimestamp(now, dt.UTC).date()
    return day.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S") + " UTC"


def describe(holder: dict[str, Any], now: float | None = None) -> str:
    """``jobs.finetune (pid 123 on host h, since 12:03:04 UTC, renewed 5 s ago)``."""
    now = time.time() if now is None else now
    renewed = _epoch(holder.get("renewed"))
    return (
        f"{holder.get('job') or 'an unknown job'} (pid {holder.get('pid', '?')} on host "
        f"{holder.get('host', '?')}, since {_since(_epoch(holder.get('started')), now)}, "
        f"renewed {_ago(now - renewed) + ' ago' if renewed is not None else '?'})"
    )


def stale_because(holder: dict[str, Any] | None, now: float) -> str | None:
    """Why a lease may be taken over (expired, its process gone, unreadable), or None
    while its holder is alive."""
    if holder is None:
        return "its lease object is unreadable"
    expires, renewed = _epoch(holder.get("expires")), _epoch(holder.get("renewed"))
    if expires is None:
        return "its lease object names no expiry"
    if expires <= now:
        return f"its lease expired (not renewed for {_ago(now - (renewed or expires))})"
    if holder_gone(holder):
        return f"its process (pid {holder['pid']}) is gone"
    return None


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        holder = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


# ----------------------------------------------------------------------------- backends
# Each: read() -> (bytes, version) | None; create(bytes) / replace(bytes, version) ->
# the new version, or None when the object exists / changed; delete(version) -> deleted.


class _LocalFile:
    def __init__(self, path: str):
        self.path = path

    def read(self) -> tuple[bytes, Any] | None:
        try:
            data = Path(self.path).read_bytes()
        except FileNotFoundError:
            return None
        return data, data  # content is the version: it holds a token and a timestamp

    def _tmp(self, data: bytes) -> str:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex}-{LEASE}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, data: bytes) -> Any:
        tmp = self._tmp(data)
        try:
            os.link(tmp, self.path)  # atomic, and the lease appears whole
            return data
        except FileExistsError:
            return None
        except OSError as err:
            raise StorageError(
                f"cannot take a lease at {self.path!r}: {err.strerror} (local leases need "
                "hard links and flock: a local disk or NFS; for a bucket use its URI)"
            ) from None
        finally:
            os.unlink(tmp)

    @contextlib.contextmanager
    def _locked(self):
        """The lease file, exclusively locked, while it is still the one at the path
        (None when there is none): a replace or an unlink swaps the file under a waiter,
        who then locks the new one."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR)  # NFS locks need a writable file
            except FileNotFoundError:
                yield None
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    current = False
                if current:
                    yield fd
                    return
            finally:
                os.close(fd)

    def replace(self, data: bytes, version: Any) -> Any:
        with self._locked() as fd:
            if fd is None or Path(self.path).read_bytes() != version:
                return None
            os.replace(self._tmp(data), self.path)
            return data

    def delete(self, version: Any) -> bool:
        with self._locked() as fd:
            if fd is None or Path(self.path).read_bytes() != version:
                return False
            os.unlink(self.path)
            return True


def _s3_conflict(err: BaseException) -> bool:
    """A failed S3 precondition (412), or a concurrent conditional write (409)."""
    if isinstance(err, FileExistsError):  # s3fs's reading of a failed If-None-Match
        return True
    response = getattr(err.__cause__, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = response.get("Error", {}).get("Code")
    return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")


class _S3Object:
    """Through s3fs's botocore client: s3fs itself has no conditional replace or delete."""

    def __init__(self, storage: Storage, uri: str):
        self.fs, path = storage.fsspec(uri)
        self.bucket, self.key = path.split("/", 1)

    def read(self) -> tuple[bytes, Any] | None:
        from fsspec.asyn import sync

        try:
            out = self.fs.call_s3("get_object", Bucket=self.bucket, Key=self.key)
        except FileNotFoundError:
            return None
        return sync(self.fs.loop, out["Body"].read), out["ETag"]

    def _put(self, data: bytes, **condition: str) -> Any:
        try:
            out = self.fs.call_s3(
                "put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition
            )
        except OSError as err:
            if _s3_conflict(err):
                return None
            raise
        return out["ETag"]

    def create(self, data: bytes) -> Any:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: Any) -> Any:
        return self._put(data, IfMatch=version)

    def delete(self, version: Any) -> bool:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
        except FileNotFoundError:
            return False
        except OSError as err:
            if _s3_conflict(err):
                return False
            raise
        return True


class _GCSObject:
    """GCS's JSON API through gcsfs's authenticated session (``call``): gcsfs writes with
    ``ifGenerationMatch=0`` at most, and never deletes conditionally."""

    def __init__(self, storage: Storage, uri: str):
        self.fs, path = storage.fsspec(uri)
        bucket, self.key = path.split("/", 1)
        endpoint = storage.gcs_settings()["endpoint"] or "https://storage.googleapis.com"
        if "://" not in endpoint:  # STORAGE_EMULATOR_HOST may be host:port
            endpoint = f"http://{endpoint}"
        endpoint = endpoint.rstrip("/")
        bucket = quote(bucket, safe="")
        self.object = f"{endpoint}/storage/v1/b/{bucket}/o/{quote(self.key, safe='')}"
        self.upload = f"{endpoint}/upload/storage/v1/b/{bucket}/o"

    def read(self) -> tuple[bytes, Any] | None:
        try:
            meta = self.fs.call("GET", self.object, json_out=True)
            # that generation exactly: a newer one between the two calls reads as absent,
            # and the caller's conditional write then fails and looks again
            _, data = self.fs.call("GET", self.object, alt="media", generation=meta["generation"])
        except FileNotFoundError:
            return None
        return data, meta["generation"]

    def _upload(self, data: bytes, generation: Any) -> Any:
        boundary = f"lease-{uuid.uuid4().hex}"
        meta = json.dumps({"name": self.key, "contentType": "application/json"})
        body = (
            (
                f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{meta}\r\n"
                f"--{boundary}\r\nContent-Type: application/json\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--".encode()
        )
        try:
            out = self.fs.call(
                "POST",
                self.upload,
                uploadType="multipart",
                ifGenerationMatch=str(generation),
                data=body,
                headers={"Content-Type": f"multipart/related; boundary={boundary}"},
                json_out=True,
            )
        except FileExistsError:  # gcsfs's reading of 412 Precondition Failed
            return None
        return out["generation"]

    def create(self, data: bytes) -> Any:
        return self._upload(data, 0)

    def replace(self, data: bytes, version: Any) -> Any:
        return self._upload(data, version)

    def delete(self, version: Any) -> bool:
        try:
            self.fs.call("DELETE", self.object, ifGenerationMatch=str(version))
        except (FileExistsError, FileNotFoundError):
            return False
        return True


# Errors of the store's clients, as one scrubbed StorageError line (jobs exit 1): gcsfs
# raises ValueError on HTTP 400 and its own HttpError, botocore / aiohttp their own types.
_CLIENTS = ("gcsfs", "s3fs", "botocore", "aiobotocore", "aiohttp", "google", "fsspec")


def _client_error(err: BaseException) -> bool:
    return isinstance(err, (OSError, ValueError)) or type(err).__module__.split(".")[0] in _CLIENTS


def _backend(storage: Storage, uri: str):
    scheme, path = split_uri(uri)
    if scheme == "file":
        return _LocalFile(path)
    return _S3Object(storage, uri) if scheme == "s3" else _GCSObject(storage, uri)


# ----------------------------------------------------------------------------- the lease


class Lease:
    """A lease on one object (``uri``), taken by :meth:`acquire` or ``with``; ``with`` also
    renews it from a daemon thread and releases it on exit, error or not.

    Args:
        uri: the lease object (see :func:`hold` for an output's).
        job: who holds it, as the refusal names it (``jobs.finetune``).
        what: the output, as messages name it (``run dir 'runs/x'``).
        key: the config key that picks another output (``run.name``).
        run: the holder's run name, recorded for people reading the lease.
        ttl_s: seconds without a renewal after which the lease may be taken over.
        log: where a takeover or a lost lease is said (one line each).
    """

    def __init__(
        self,
        uri: str,
        storage: Storage | None = None,
        *,
        job: str,
        what: str,
        key: str,
        run: str = "",
        ttl_s: float = TTL_S,
        log: Callable[[str], None] = _say,
    ):
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s: {ttl_s}, expected > 0 seconds")
        self.uri, self.storage = uri, storage or Storage()
        self.job, self.what, self.key, self.run = job, what, key, run
        self.ttl_s, self.log = ttl_s, log
        self.token = uuid.uuid4().hex
        self._process_started = _process_started(os.getpid())
        self.started: float | None = None
        self.held = self.lost = False
        self._store = _backend(self.storage, uri)
        self._version: Any = None
        self._lock = threading.Lock()  # the renewing thread against release
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, now: float) -> dict[str, Any]:
        """What the lease object says while this lease holds it."""
        return {
            "format": FORMAT,
            "token": self.token,
            "job": self.job,
            "run": self.run,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_space": process_space(),
            "process_started": self._process_started,
            "started": _iso(self.started or now),
            "renewed": _iso(now),
            "expires": _iso(now + self.ttl_s),
            "ttl_s": self.ttl_s,
        }

    def _data(self, now: float) -> bytes:
        return json.dumps(self.record(now), indent=1).encode()

    def _storage_call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (StorageError, LeaseHeld):
            raise
        except Exception as err:
            if not _client_error(err):
                raise  # a bug, not the store
            text = re.sub(r"https?://\S+", "<endpoint>", (str(err).splitlines() or [""])[0])
            raise StorageError(
                self.storage.scrub(
                    f"{self.what}: {what} its lease {self.uri!r} failed: "
                    f"{type(err).__name__}{': ' + text if text else ''}"
                )
            ) from None

    def acquire(self) -> Lease:
        """Takes the lease: creates it, or takes over a stale one (said on ``log``).

        Raises:
            LeaseHeld: a live holder has it (the message names it and ``key``).
            StorageError: the store failed or refused.
        """
        return self._storage_call("taking", self._acquire)

    def _acquire(self) -> Lease:
        holder: dict[str, Any] | None = None
        for _ in range(_ATTEMPTS):
            now = time.time()
            self.started = now
            current = self._store.read()
            if current is None:
                version = self._store.create(self._data(now))
                if version is None:
                    continue  # another job created it first: look at it
                return self._won()
            data, version = current
            holder = _parse(data)
            if holder and holder.get("token") == self.token:  # our own write, its reply lost
                return self._won()
            why = stale_because(holder, now)
            if why is None:
                raise self._refusal(holder or {}, now)
            new = self._store.replace(self._data(now), version)
            if new is None:
                continue  # someone else renewed it or took it over first
            self.log(
                f"[lease] {self.what}: taking over from "
                f"{describe(holder, now) if holder else 'an unreadable lease'}: {why}"
            )
            return self._won()
        raise self._refusal(holder or {}, time.time())

    def _won(self) -> Lease:
        # Read back: on a store that honours conditional writes this is what was written;
        # on one that ignores them the later of two writers is the one that stays.
        current = self._store.read()
        holder = _parse(current[0]) if current else None
        if not holder or holder.get("token") != self.token:
            raise self._refusal(holder or {}, time.time())
        self._version, self.held, self.lost = current[1], True, False
        return self

    def _refusal(self, holder: dict[str, Any], now: float) -> LeaseHeld:
        return LeaseHeld(
            f"{self.what} is in use by {describe(holder, now)}; wait for it to end, or "
            f"pick another {self.key}",
            holder,
        )

    def renew(self) -> bool:
        """Extends the lease by ``ttl_s`` from now; False (said once on ``log``) when it
        is no longer this lease's: it lapsed and another job took it over."""
        with self._lock:
            if not self.held:
                return False
            return self._storage_call("renewing", self._renew)

    def _renew(self) -> bool:
        version = self._version
        for _ in range(_ATTEMPTS):
            new = self._store.replace(self._data(time.time()), version)
            if new is not None:
                self._version = new
                return True
            # changed under us: by our own earlier write (its reply lost and retried), or
            # by a job that took the lapsed lease over
            current = self._store.read()
            holder = _parse(current[0]) if current else None
            if current is None or not holder or holder.get("token") != self.token:
                self.held, self.lost = False, True
                self.log(
                    f"[lease] {self.what}: LOST the lease (not renewed within {self.ttl_s:g} s)"
                    + (f"; now held by {describe(holder)}" if holder else "")
                    + "; another job may now write here"
                )
                return False
            version = current[1]
        raise StorageError(f"{self.what}: its lease {self.uri!r} keeps changing under renewal")

    def release(self) -> None:
        """Gives the lease up (deletes the object, if it is still this lease's)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._lock:
            if not self.held:
                return
            self.held = False
            self._storage_call("releasing", self._release)

    def _release(self) -> None:
        # Read first: after a lapse and a takeover the object is another job's, whatever the
        # store does with the conditional delete below (fake-gcs-server ignores it).
        current = self._store.read()
        holder = _parse(current[0]) if current else None
        if current and holder and holder.get("token") == self.token:
            self._store.delete(current[1])

    def _keep(self) -> None:
        wait = self.ttl_s / 3
        while not self._stop.wait(wait):
            try:
                if not self.renew():
                    return
                wait = self.ttl_s / 3
            except Exception as err:  # noqa: BLE001 - a dying thread would let the lease lapse unsaid
                self.log(f"[lease] {self.what}: renewing failed ({err}); trying again")
                wait = min(self.ttl_s / 10, 5.0)

    def __enter__(self) -> Lease:
        self.acquire()
        self._stop.clear()
        self._thread = threading.Thread(target=self._keep, name="raylens-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.release()
        except StorageError as err:  # never hides the job's own error, nor fails its result
            self.log(f"[lease] {err}; it lapses {self.ttl_s:g} s after its last renewal")


def hold(
    output: str,
    storage: Storage | None = None,
    *,
    job: str,
    what: str,
    key: str,
    run: str = "",
    ttl_s: float = TTL_S,
    log: Callable[[str], None] = _say,
) -> Lease | contextlib.nullcontext:
    """The lease of an output dir (``<output>/.lease.json``), to use as ``with hold(...)``.
    An empty ``output`` has none (the caller's own checks refuse it, naming ``key``)."""
    if not output:
        return contextlib.nullcontext()
    lease_uri = join(output, LEASE)
    return Lease(lease_uri, storage, job=job, what=what, key=key, run=run, ttl_s=ttl_s, log=log)
