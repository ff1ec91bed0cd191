"""Every path is a URL: the only module that talks to fsspec.

Accepted: local paths, `file://`, `s3://` (through s3fs; endpoint, region, profile and anonymous
access from `StorageConfig`, credentials from the usual AWS environment/config files) and
`memory://` (unit tests). Writes are atomic: a reader sees the whole object or nothing
(local: temp file + rename; object stores: one whole-object PUT).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.core import strip_protocol

from fusion_etl.config import StorageConfig
from fusion_etl.errors import UserError

__all__ = [
    "configure",
    "exists",
    "filesystem",
    "fsspec_options",
    "glob",
    "join",
    "list_files",
    "local_path",
    "open_read",
    "put_file",
    "read_bytes",
    "read_json",
    "relative_name",
    "remove",
    "size",
    "write_bytes",
    "write_json",
]

_options = StorageConfig()


def configure(options: StorageConfig) -> None:
    """Set the object-storage options used by every later call in this process."""
    global _options
    if options != _options:
        _options = options
        _filesystem.cache_clear()


def _protocol(url: str) -> str:
    if "://" not in url:
        return "file"
    proto = url.split("://", 1)[0].lower()
    return {"s3a": "s3", "local": "file"}.get(proto, proto)


def _s3_options() -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "anon": _options.anon,
        # Listings are never cached: shards appear while we run.
        "use_listings_cache": False,
        "skip_instance_cache": True,
    }
    if _options.endpoint_url:
        kwargs["endpoint_url"] = _options.endpoint_url
    if _options.profile:
        kwargs["profile"] = _options.profile
    if _options.region:
        kwargs["client_kwargs"] = {"region_name": _options.region}
    return kwargs


def fsspec_options(url: str) -> dict[str, Any]:
    """The keyword arguments `fsspec.url_to_fs(url, **options)` needs to reach `url` the way
    this module does (for libraries that open URLs themselves, e.g. torch's DCP reader)."""
    return _s3_options() if _protocol(url) == "s3" else {}


@lru_cache(maxsize=16)
def _filesystem(protocol: str) -> Any:
    if protocol == "s3":
        return fsspec.filesystem("s3", **_s3_options())
    try:
        return fsspec.filesystem(protocol)
    except (ImportError, ValueError) as exc:
        raise UserError(f"unsupported storage URL scheme {protocol!r}: {exc}") from None


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem for `url` and the path inside it."""
    proto = _protocol(url)
    fs = _filesystem(proto)
    if proto == "file":
        path = os.path.abspath(strip_protocol(url) if "://" in url else os.path.expanduser(url))
    else:
        path = fs._strip_protocol(url)
    return fs, path


def join(url: str, *parts: str) -> str:
    """`url` with path segments appended (`/`-separated whatever the scheme)."""
    out = url.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def local_path(url: str) -> Path | None:
    """The local filesystem path of a local URL, else None."""
    if _protocol(url) != "file":
        return None
    return Path(filesystem(url)[1])


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return bool(fs.exists(path))


def size(url: str) -> int:
    fs, path = filesystem(url)
    return int(fs.size(path))


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    try:
        return bytes(fs.cat_file(path))
    except FileNotFoundError:
        raise UserError(f"{url} does not exist") from None


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


@contextlib.contextmanager
def open_read(url: str, compression: str | None = "infer") -> Iterator[IO[bytes]]:
    """Open for binary reading; `.gz`, `.zst`, ... are decompressed when `compression="infer"`."""
    fs, path = filesystem(url)
    if compression == "infer":
        compression = fsspec.utils.infer_compression(path)
    try:
        with fs.open(path, "rb", compression=compression) as fh:
            yield fh
    except FileNotFoundError:
        raise UserError(f"{url} does not exist") from None


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole object atomically: readers never see a partial file."""
    fs, path = filesystem(url)
    if _protocol(url) == "file":
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return
    # Object stores: one PUT (or a multipart upload that becomes visible only on completion).
    fs.pipe_file(path, data)


def put_file(local: str | Path, url: str) -> None:
    """Copy a local file to `url` atomically (local: temp file + rename; object stores: one
    upload that becomes visible only once complete), without reading it into memory."""
    fs, path = filesystem(url)
    if _protocol(url) == "file":
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(local, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return
    fs.put_file(str(local), path)


def write_json(url: str, obj: Any) -> None:
    buf = io.StringIO()
    json.dump(obj, buf, indent=2, sort_keys=True)
    buf.write("\n")
    write_bytes(url, buf.getvalue().encode())


def _url_of(url: str, fs_path: str) -> str:
    proto = _protocol(url)
    if proto == "file":
        return fs_path
    return f"{proto}://{fs_path}"


def list_files(url: str) -> list[str]:
    """Every file under `url` (recursively), or `[url]` if it is a file; sorted URLs."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    if fs.isfile(path):
        return [url]
    found = fs.find(path)
    return sorted(_url_of(url, p) for p in found)


def glob(url: str) -> list[str]:
    fs, path = filesystem(url)
    return sorted(_url_of(url, p) for p in fs.glob(path) if fs.isfile(p))


def remove(url: str) -> None:
    """Remove a file or a folder tree; missing is fine."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    elif _protocol(url) == "s3":
        # An S3 "folder" may have no marker object, so exists() can be False with keys below.
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=True)


def relative_name(base: str, url: str) -> str:
    """`url`'s path relative to `base` (`/`-separated), or its file name if not below it."""
    _, b = filesystem(base)
    _, u = filesystem(url)
    if u == b:
        return posixpath.basename(u)
    if u.startswith(b.rstrip("/") + "/"):
        return u[len(b.rstrip("/")) + 1 :]
    return posixpath.basename(u)
