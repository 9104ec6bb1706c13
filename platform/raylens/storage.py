"""One place that turns ``s3://``, ``gs://``, ``file://`` and plain paths into filesystems.

Bulk reads use pyarrow's native filesystems (the fastest here); :meth:`Storage.fsspec`
gives s3fs/gcsfs where an fsspec API is needed. Endpoints and credentials come from
:class:`~raylens.schema.StorageConfig`, else the standard environment variables.

Writes of results are atomic: bytes go to a hidden temporary name beside the target and
are then renamed (local) or moved (object stores, a server-side copy that appears whole).
A crash leaves at most a ``.tmp-*`` object, never a partial file under the final name.
Credentials never appear in messages: :meth:`Storage.scrub` removes them.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import posixpath
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlparse

# gcsfs hangs 60 s per call against emulators unless this is set before it is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import pyarrow as pa  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402

from raylens.schema import StorageConfig  # noqa: E402

TMP_PREFIX = ".tmp-"
T = TypeVar("T")
log = logging.getLogger(__name__)


class StorageError(OSError):
    """A storage operation failed; the message names the URI, never a credential."""


@dataclass(frozen=True)
class FileEntry:
    uri: str
    size: int


# A URI's scheme (RFC 3986): anything else before "://" is part of a local path.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
OBJECT_SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs"}


def split_uri(uri: str) -> tuple[str, str]:
    """Returns ``(scheme, path)``: ``("s3", "bucket/key")``, ``("file", "/abs/path")``.

    An object URI is split at the first ``/`` after the scheme and never URL-decoded: every
    character after ``bucket/`` (``#``, ``?``, ``%``, ``+``, spaces, unicode) is part of
    the key, as S3 and GCS store it. ``urllib.parse`` is not used on purpose: it would cut
    the key at ``#`` (a fragment) or ``?`` (a query). A trailing ``/`` is dropped.

    Raises:
        StorageError: an unsupported scheme, or an object URI without a bucket.
    """
    match = _SCHEME.match(uri)
    if match is None:
        return "file", str(Path(uri).expanduser().absolute())
    scheme, rest = match.group(1).lower(), uri[match.end() :]
    if scheme == "file":
        return "file", str(Path(rest).absolute())
    if scheme not in OBJECT_SCHEMES:
        raise StorageError(
            f"unsupported URI scheme {scheme!r} in {uri!r}: expected s3://, gs://, file:// "
            "or a path"
        )
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise StorageError(f"no bucket in {uri!r}: expected {scheme}://<bucket>/<key>")
    return OBJECT_SCHEMES[scheme], rest.rstrip("/")


def is_uri(text: str) -> bool:
    """Whether ``text`` starts with a scheme (``s3://``, ``gs://``, ``file://``...), rather
    than being a local path."""
    return _SCHEME.match(text) is not None


def join(uri: str, *parts: str) -> str:
    """Joins path parts onto a URI or path, keeping its scheme; characters are kept as they
    are (no URL quoting), so ``split_uri(join(u, p))`` names the key ``<key of u>/<p>``."""
    match = _SCHEME.match(uri)
    if match:
        return uri[: match.end()] + posixpath.join(uri[match.end() :].rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def parent(uri: str) -> str:
    match = _SCHEME.match(uri)
    if match:
        return uri[: match.end()] + posixpath.dirname(uri[match.end() :].rstrip("/"))
    return os.path.dirname(os.path.abspath(uri))


def _to_uri(scheme: str, path: str) -> str:
    return path if scheme == "file" else f"{scheme}://{path}"


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _host_and_scheme(endpoint: str) -> tuple[str, str]:
    if "://" not in endpoint:
        return endpoint, "https"
    parsed = urlparse(endpoint)
    return parsed.netloc, parsed.scheme


# Errors worth another attempt: the server is away, overloaded or throttling. Anything
# else (not found, access denied, bad request) fails at once.
TRANSIENT_ERRORS = (
    "NETWORK_CONNECTION",
    "INTERNAL_FAILURE",
    "SLOW_DOWN",
    "SERVICE_UNAVAILABLE",
    "REQUEST_TIMEOUT",
    "HTTP status 5",
    "Could not connect",
    "Couldn't connect",
    "Connection refused",
    "Connection reset",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
)


def is_transient(err: BaseException) -> bool:
    return isinstance(err, OSError) and any(p in str(err) for p in TRANSIENT_ERRORS)


def with_retries(fn: Callable[[], T], seconds: float, what: str = "") -> T:
    """``fn()``, called again on transient errors (exponential backoff from 0.1 s, at most
    5 s apart) until ``seconds`` have passed; then the last error is raised."""
    deadline = time.monotonic() + seconds
    delay = 0.1
    while True:
        try:
            return fn()
        except OSError as err:
            if not is_transient(err) or time.monotonic() + delay > deadline:
                raise
            log.warning("storage: %s failed (%s); retrying in %.1fs", what, err, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class _RetryingHandler(pafs.FileSystemHandler):
    """A pyarrow filesystem over the native S3/GCS one that retries transient errors for
    :attr:`StorageConfig.retry_seconds` and pickles as its config (a native
    ``S3FileSystem`` pickles without its retry strategy, so Ray Train's controller and
    Tune would get the default). Whole-object streams are buffered so that a write or a
    read is retried as a whole; random-access files (Parquet) are the native ones.
    """

    def __init__(self, cfg: StorageConfig, scheme: str):
        self.cfg, self.scheme = cfg, scheme
        self._fs: pafs.FileSystem | None = None

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg, "scheme": self.scheme}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cfg"], state["scheme"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _RetryingHandler) and self.__getstate__() == other.__getstate__()

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            self._fs = Storage(self.cfg).native_fs(self.scheme)
        return self._fs

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        return with_retries(fn, self.cfg.retry_seconds, f"{what} ({self.scheme})")

    def get_type_name(self) -> str:
        return f"raylens-retrying-{self.fs.type_name}"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self._retry("stat", lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._retry("list", lambda: self.fs.get_file_info(selector))

    def create_dir(self, path, recursive):
        self._retry("mkdir", lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self._retry("rmdir", lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._retry(
            "rm -r", lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)
        )

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the contents of a whole object store")

    def delete_file(self, path):
        self._retry("rm", lambda: self.fs.delete_file(path))

    def move(self, src, dest):
        # S3 has no move: copy, then delete. An attempt can be cut after the copy (or its
        # reply lost), so a retry first checks whether the move already happened.
        tried = False

        def attempt() -> None:
            nonlocal tried
            if tried:
                src_info, dest_info = self.fs.get_file_info([src, dest])
                if src_info.type == pafs.FileType.NotFound and dest_info.type != src_info.type:
                    return
            tried = True
            self.fs.move(src, dest)

        self._retry("move", attempt)

    def copy_file(self, src, dest):
        self._retry("copy", lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path):
        def read() -> bytes:
            with self.fs.open_input_stream(path, compression=None) as f:
                return f.read()

        return pa.BufferReader(self._retry(f"read {path}", read))

    def open_input_file(self, path):
        return self._retry(f"open {path}", lambda: self.fs.open_input_file(path))

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_UploadOnClose(self, path, metadata), mode="w")

    def open_append_stream(self, path, metadata):
        raise OSError(f"append to {path!r}: object stores do not append")


class _UploadOnClose(io.RawIOBase):
    """A write stream that spools to memory (or disk past 64 MiB) and uploads the whole
    object on close, retried as a whole."""

    def __init__(self, handler: _RetryingHandler, path: str, metadata):
        super().__init__()
        self._handler, self._path, self._metadata = handler, path, metadata
        self._buf = tempfile.SpooledTemporaryFile(max_size=64 * 1024**2)  # noqa: SIM115

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self._buf.write(data)

    def close(self) -> None:
        if self.closed:
            return
        try:

            def upload() -> None:
                self._buf.seek(0)
                fs = self._handler.fs
                with fs.open_output_stream(
                    self._path, compression=None, metadata=self._metadata
                ) as out:
                    shutil.copyfileobj(self._buf, out, 8 * 1024**2)

            self._handler._retry(f"write {self._path}", upload)
        finally:
            self._buf.close()
            super().close()


def _tmp_beside(path: str, module: Any) -> str:
    """A hidden temporary name in ``path``'s folder (``module``: os.path or posixpath);
    listings leave it out (:data:`TMP_PREFIX`)."""
    name = f"{TMP_PREFIX}{uuid.uuid4().hex}-{module.basename(path)}"
    return module.join(module.dirname(path), name)


class Storage:
    """Resolves URIs to filesystems with the configured endpoints and credentials.

    Instances pickle (for Ray tasks) and rebuild their filesystems lazily.
    """

    def __init__(self, cfg: StorageConfig | None = None):
        self.cfg = cfg or StorageConfig()
        self._cache: dict[str, Any] = {}

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg}

    def __setstate__(self, state: dict) -> None:
        self.cfg = state["cfg"]
        self._cache = {}

    # ------------------------------------------------------------------ settings

    def s3_settings(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "endpoint": c.s3_endpoint_url or _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
            "region": c.s3_region or _env("AWS_REGION", "AWS_DEFAULT_REGION"),
            "key": c.s3_access_key_id or _env("AWS_ACCESS_KEY_ID"),
            "secret": c.s3_secret_access_key or _env("AWS_SECRET_ACCESS_KEY"),
            "token": _env("AWS_SESSION_TOKEN"),
            "anonymous": c.s3_anonymous,
        }

    def gcs_settings(self) -> dict[str, Any]:
        c = self.cfg
        endpoint = c.gcs_endpoint_url or _env("STORAGE_EMULATOR_HOST")
        anonymous = c.gcs_anonymous if c.gcs_anonymous is not None else bool(endpoint)
        return {
            "endpoint": endpoint,
            "credentials_file": c.gcs_credentials_file or _env("GOOGLE_APPLICATION_CREDENTIALS"),
            "anonymous": anonymous,
            "project": c.gcs_project or _env("GOOGLE_CLOUD_PROJECT"),
        }

    def scrub(self, text: str) -> str:
        """Removes every configured or environment credential from ``text``."""
        s3 = self.s3_settings()
        for secret in (s3["key"], s3["secret"], s3["token"]):
            if secret:
                text = text.replace(secret, "***")
        return text

    # ------------------------------------------------------------------ filesystems

    def arrow_fs(self, scheme: str) -> pafs.FileSystem:
        """The pyarrow filesystem for a scheme (``file``, ``s3``, ``gs``), cached. Object
        stores come wrapped so that transient errors are retried for
        ``storage.retry_seconds``, in this process and wherever the filesystem is pickled
        to (Ray Data tasks, Ray Train's controller, Tune)."""
        if scheme == "file":
            return self.native_fs(scheme)
        key = f"arrow:{scheme}"
        if key not in self._cache:
            self._cache[key] = pafs.PyFileSystem(_RetryingHandler(self.cfg, scheme))
        return self._cache[key]

    def native_fs(self, scheme: str) -> pafs.FileSystem:
        """pyarrow's own filesystem for a scheme, cached: no retries beyond the client's
        few fast ones, and it pickles without them. Use :meth:`arrow_fs`."""
        key = f"native:{scheme}"
        if key in self._cache:
            return self._cache[key]
        if scheme == "file":
            fs: pafs.FileSystem = pafs.LocalFileSystem()
        elif scheme == "s3":
            s = self.s3_settings()
            kw: dict[str, Any] = {
                "region": s["region"] or "us-east-1",
            }
            if s["endpoint"]:
                kw["endpoint_override"], kw["scheme"] = _host_and_scheme(s["endpoint"])
            if s["anonymous"]:
                kw["anonymous"] = True
            elif s["key"] and s["secret"]:
                kw.update(access_key=s["key"], secret_key=s["secret"], session_token=s["token"])
            fs = pafs.S3FileSystem(**kw)
        elif scheme == "gs":
            s = self.gcs_settings()
            kw = {"retry_time_limit": datetime.timedelta(seconds=self.cfg.retry_seconds)}
            if s["endpoint"]:
                kw["endpoint_override"], kw["scheme"] = _host_and_scheme(s["endpoint"])
            if s["anonymous"]:
                kw["anonymous"] = True
            elif s["credentials_file"]:
                # pyarrow's GCS client reads service-account credentials from this variable.
                os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = s["credentials_file"]
            if s["project"]:
                kw["project_id"] = s["project"]
            fs = pafs.GcsFileSystem(**kw)
        else:
            raise StorageError(f"unsupported scheme {scheme!r}")
        self._cache[key] = fs
        return fs

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """``(pyarrow filesystem, path within it)`` for a URI or local path."""
        scheme, path = split_uri(uri)
        return self.arrow_fs(scheme), path

    def fsspec(self, uri: str) -> tuple[Any, str]:
        """``(fsspec filesystem, path)`` via s3fs / gcsfs / local, with the same settings."""
        scheme, path = split_uri(uri)
        key = f"fsspec:{scheme}"
        if key not in self._cache:
            if scheme == "s3":
                import s3fs

                s = self.s3_settings()
                client_kwargs = {"region_name": s["region"] or "us-east-1"}
                if s["endpoint"]:
                    client_kwargs["endpoint_url"] = s["endpoint"]
                self._cache[key] = s3fs.S3FileSystem(
                    anon=s["anonymous"],
                    key=s["key"],
                    secret=s["secret"],
                    token=s["token"],
                    client_kwargs=client_kwargs,
                    config_kwargs={"retries": {"max_attempts": 10, "mode": "standard"}},
                )
            elif scheme == "gs":
                import gcsfs

                s = self.gcs_settings()
                token = "anon" if s["anonymous"] else (s["credentials_file"] or None)
                self._cache[key] = gcsfs.GCSFileSystem(
                    endpoint_url=s["endpoint"], token=token, project=s["project"]
                )
            else:
                import fsspec

                self._cache[key] = fsspec.filesystem("file")
        return self._cache[key], path

    # ------------------------------------------------------------------ operations

    def _fail(self, what: str, uri: str, err: BaseException) -> StorageError:
        return StorageError(self.scrub(f"{what} {uri!r} failed: {type(err).__name__}: {err}"))

    def exists(self, uri: str) -> bool:
        fs, path = self.resolve(uri)
        try:
            return fs.get_file_info(path).type != pafs.FileType.NotFound
        except OSError as err:
            raise self._fail("stat", uri, err) from None

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.resolve(uri)
        try:
            with fs.open_input_stream(path, compression=None) as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {uri!r}") from None
        except OSError as err:
            if "not found" in str(err).lower() or "does not exist" in str(err).lower():
                raise FileNotFoundError(f"no such file: {uri!r}") from None
            raise self._fail("read", uri, err) from None

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def list_files(self, uri: str, recursive: bool = True) -> list[FileEntry]:
        """Every file below ``uri``, sorted; hidden temporaries (``.tmp-*``) are left out.

        A folder that does not exist lists as empty, on every backend alike.
        """
        scheme, _ = split_uri(uri)
        fs, path = self.resolve(uri)
        try:
            infos = fs.get_file_info(
                pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
            )
        except FileNotFoundError:
            return []
        except OSError as err:
            raise self._fail("list", uri, err) from None
        out = [
            FileEntry(_to_uri(scheme, i.path), int(i.size or 0))
            for i in infos
            if i.type == pafs.FileType.File and not i.base_name.startswith(TMP_PREFIX)
        ]
        return sorted(out, key=lambda e: e.uri)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Writes ``data`` atomically: readers see the old file or the whole new one."""
        scheme, path = split_uri(uri)
        if scheme == "file":  # a temporary beside it, synced, renamed
            with self.open_atomic(uri) as f:
                f.write(data)
            return
        fs = self.arrow_fs(scheme)  # object stores: streamed, no local spool
        tmp = _tmp_beside(path, posixpath)
        try:
            with fs.open_output_stream(tmp, compression=None) as f:
                f.write(data)
            fs.move(tmp, path)
        except OSError as err:
            with contextlib.suppress(OSError):
                fs.delete_file(tmp)
            raise self._fail("write", uri, err) from None

    @contextlib.contextmanager
    def open_atomic(self, uri: str) -> Iterator[BinaryIO]:
        """A binary file to stream a large result into; when the block ends without an
        error it is put in place whole under ``uri`` (like :meth:`write_bytes`, without
        holding the bytes in memory). When the block raises, nothing appears under ``uri``.

        Local: written to a hidden temporary beside the target, synced, renamed. Object
        stores: spooled to a local temporary file (memory stays flat however large), then
        uploaded to a hidden temporary key (retried as a whole on transient errors, for
        ``storage.retry_seconds``) and moved into place.
        """
        scheme, path = split_uri(uri)
        if scheme == "file":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = _tmp_beside(path, os.path)
            try:
                with open(tmp, "wb") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return
        fs = self.arrow_fs(scheme)
        tmp = _tmp_beside(path, posixpath)
        with tempfile.TemporaryFile() as spool:
            yield spool
            spool.flush()

            def upload() -> None:
                spool.seek(0)
                native = self.native_fs(scheme)
                with native.open_output_stream(tmp, compression=None) as out:
                    shutil.copyfileobj(spool, out, 8 * 1024**2)

            try:
                with_retries(upload, self.cfg.retry_seconds, f"write {tmp} ({scheme})")
                fs.move(tmp, path)
            except OSError as err:
                with contextlib.suppress(OSError):
                    fs.delete_file(tmp)
                raise self._fail("write", uri, err) from None

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def delete(self, uri: str) -> None:
        fs, path = self.resolve(uri)
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise self._fail("delete", uri, err) from None

    def delete_tree(self, uri: str) -> None:
        """Deletes a directory and everything under it; objects are deleted one by one
        too, for object stores without directory markers. Missing is fine."""
        fs, path = self.resolve(uri)
        with contextlib.suppress(OSError):
            if fs.get_file_info(path).type == pafs.FileType.Directory:
                fs.delete_dir(path)
        for f in self.list_files(uri):
            self.delete(f.uri)

    def delete_dirs_named(self, uri: str, prefix: str) -> None:
        """Deletes every directory directly under ``uri`` whose name starts with ``prefix``
        (e.g. the ``_staging-*`` dirs an interrupted job left behind)."""
        fs, path = self.resolve(uri)
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except OSError:
            return
        for info in infos:
            if info.base_name.startswith(prefix):
                self.delete_tree(join(uri, info.base_name))
