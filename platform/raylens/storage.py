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
import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# gcsfs hangs 60 s per call against emulators unless this is set before it is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import pyarrow.fs as pafs  # noqa: E402

from raylens.schema import StorageConfig  # noqa: E402

TMP_PREFIX = ".tmp-"


class StorageError(OSError):
    """A storage operation failed; the message names the URI, never a credential."""


@dataclass(frozen=True)
class FileEntry:
    uri: str
    size: int


def split_uri(uri: str) -> tuple[str, str]:
    """Returns ``(scheme, path)``: ``("s3", "bucket/key")``, ``("file", "/abs/path")``."""
    if "://" not in uri:
        return "file", str(Path(uri).expanduser().absolute())
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        return "file", str(Path(parsed.netloc + parsed.path).absolute())
    if scheme in ("s3", "s3a"):
        return "s3", (parsed.netloc + parsed.path).rstrip("/")
    if scheme in ("gs", "gcs"):
        return "gs", (parsed.netloc + parsed.path).rstrip("/")
    raise StorageError(
        f"unsupported URI scheme {scheme!r} in {uri!r}: expected s3://, gs://, file:// or a path"
    )


def join(uri: str, *parts: str) -> str:
    """Joins path parts onto a URI or path, keeping its scheme."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def parent(uri: str) -> str:
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.dirname(rest.rstrip("/"))
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
        """The pyarrow filesystem for a scheme (``file``, ``s3``, ``gs``), cached."""
        key = f"arrow:{scheme}"
        if key in self._cache:
            return self._cache[key]
        if scheme == "file":
            fs: pafs.FileSystem = pafs.LocalFileSystem()
        elif scheme == "s3":
            s = self.s3_settings()
            kw: dict[str, Any] = {"region": s["region"] or "us-east-1"}
            if s["endpoint"]:
                kw["endpoint_override"], kw["scheme"] = _host_and_scheme(s["endpoint"])
            if s["anonymous"]:
                kw["anonymous"] = True
            elif s["key"] and s["secret"]:
                kw.update(access_key=s["key"], secret_key=s["secret"], session_token=s["token"])
            fs = pafs.S3FileSystem(**kw)
        elif scheme == "gs":
            s = self.gcs_settings()
            kw = {}
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
        fs = self.arrow_fs(scheme)
        if scheme == "file":
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(
                directory, f"{TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}"
            )
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return
        tmp = posixpath.join(
            posixpath.dirname(path), f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(path)}"
        )
        try:
            with fs.open_output_stream(tmp, compression=None) as f:
                f.write(data)
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
