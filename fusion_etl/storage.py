"""Every path is a URL: the only module that talks to fsspec.

Accepted: local paths, `file://`, `s3://` (through s3fs; endpoint, region, profile and anonymous
access from `StorageConfig`, credentials from the usual AWS environment/config files) and
`memory://` (unit tests). Writes are atomic: a reader sees the whole object or nothing
(local: temp file + rename; object stores: one whole-object PUT).

Failures: an operation on a remote store that fails for a reason that may pass (connection
refused or broken, a timeout, a 5xx answer, throttling) is retried `storage.retries` times
with exponential backoff, each retry logged; then, and at once for what no retry can fix
(missing, wrong or expired credentials, a bucket that does not exist, permission denied), it
raises one `StorageError` that names the URL and what to set or check. Every operation here is
idempotent (whole-object writes, deletes, reads), so a retry can never duplicate anything.
s3fs's and botocore's own retries are off: theirs would multiply ours.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import posixpath
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, TypeVar

import fsspec
from fsspec.core import strip_protocol

from fusion_etl.config import StorageConfig, redact
from fusion_etl.console import log
from fusion_etl.errors import StorageError, UserError
from fusion_etl.redaction import scrub

__all__ = [
    "check_access",
    "configure",
    "exists",
    "filesystem",
    "fsspec_options",
    "glob",
    "join",
    "list_files",
    "local_path",
    "open_file",
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

T = TypeVar("T")

_options = StorageConfig()
MAX_RETRY_WAIT_S = 30.0


def configure(options: StorageConfig) -> None:
    """Set the object-storage options used by every later call in this process."""
    global _options
    if options != _options:
        _options = options
        _cached_filesystem.cache_clear()


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
        "config_kwargs": {
            "connect_timeout": _options.connect_timeout_s,
            "read_timeout": _options.read_timeout_s,
            "retries": {"mode": "standard", "total_max_attempts": 1},
        },
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


def _is_remote(protocol: str) -> bool:
    return protocol not in ("file", "memory")


def _filesystem(protocol: str) -> Any:
    # Credentials come from the environment: a changed AWS_* variable means a new client.
    aws_env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    return _cached_filesystem(protocol, aws_env)


@lru_cache(maxsize=16)
def _cached_filesystem(protocol: str, aws_env: tuple[tuple[str, str], ...]) -> Any:
    if protocol == "s3":
        fs = fsspec.filesystem("s3", **_s3_options())
        fs.retries = 1  # one attempt per call: the retries are ours (see the module docstring)
        return fs
    try:
        return fsspec.filesystem(protocol)
    except (ImportError, ValueError) as exc:
        raise UserError(f"unsupported storage URL scheme {protocol!r}: {exc}") from None


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem for `url` and the path inside it (no retries, no translated
    errors: for libraries that take a filesystem, such as pyarrow)."""
    proto = _protocol(url)
    fs = _filesystem(proto)
    if proto == "file":
        path = os.path.abspath(strip_protocol(url) if "://" in url else os.path.expanduser(url))
    else:
        path = fs._strip_protocol(url)
    return fs, path


# --------------------------------------------------------------------------------------------
# Failures: what went wrong, whether waiting can help, and what the user should check.


@dataclass(frozen=True)
class _Problem:
    transient: bool
    short: str
    """For a retry's log line."""
    advice: str
    """For the final error: what happened and what to set or check."""


_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "OperationAborted",
    "500",
    "502",
    "503",
    "504",
}
_EXPIRED_CODES = {"ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired", "RequestExpired"}


def _code(exc: BaseException) -> str | None:
    """The S3 error code of `exc` or of an exception it was raised from."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code:
                return str(code)
        seen = seen.__cause__ or seen.__context__
    return None


def _endpoint() -> str:
    url = (
        _options.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    return str(redact(url)) if url else "the AWS S3 endpoint"


def _bucket(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0]


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _diagnose(exc: BaseException, op: str, url: str) -> _Problem:
    """Classify a failure of `op` ("read", "write", "list", "delete") on `url`."""
    names = _names(exc)
    code = _code(exc)
    where = _endpoint()
    fix_endpoint = (
        "check that the object store is up and reachable from here, "
        "and that storage.endpoint_url (or AWS_ENDPOINT_URL) is right"
    )
    if "NoCredentialsError" in names:
        return _Problem(
            False,
            "no credentials",
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or name "
            "a profile of ~/.aws/credentials in storage.profile or AWS_PROFILE "
            "(storage.anon=true reads a public bucket without credentials)",
        )
    if "PartialCredentialsError" in names:
        return _Problem(
            False,
            "incomplete credentials",
            f"incomplete AWS credentials ({exc}): set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        )
    if "ProfileNotFound" in names:
        return _Problem(
            False,
            "no such profile",
            f"{exc}: check storage.profile (or AWS_PROFILE) against ~/.aws/credentials and ~/.aws/config",
        )
    if code in _EXPIRED_CODES or (
        isinstance(exc, RuntimeError | OSError) and "expired" in str(exc).lower()
    ):
        return _Problem(
            False,
            "credentials expired",
            "the AWS credentials have expired: get fresh ones (a new AWS_SESSION_TOKEN, "
            "`aws sso login`, or renewed keys in the profile)",
        )
    if "CredentialRetrievalError" in names:
        return _Problem(
            False,
            "credentials unavailable",
            f"the AWS credentials could not be obtained ({exc}): check the profile's credential source",
        )
    if code == "InvalidAccessKeyId":
        return _Problem(
            False,
            "unknown access key",
            f"the access key id is not known to {where}: check AWS_ACCESS_KEY_ID "
            "(or the profile's aws_access_key_id) and storage.endpoint_url",
        )
    if code == "SignatureDoesNotMatch":
        return _Problem(
            False,
            "wrong secret key",
            f"the secret key does not match the access key id at {where}: check "
            "AWS_SECRET_ACCESS_KEY (or the profile's aws_secret_access_key)",
        )
    if code == "InvalidToken":
        return _Problem(
            False,
            "invalid session token",
            "the session token is not valid: check AWS_SESSION_TOKEN, or unset it for long-term keys",
        )
    if code == "RequestTimeTooSkewed":
        return _Problem(
            False,
            "clock skew",
            "this machine's clock is too far from the store's: synchronise it (NTP)",
        )
    if code == "NoSuchBucket":
        return _Problem(
            False,
            "no such bucket",
            f"bucket {_bucket(url)!r} does not exist at {where}: create it, or fix the URL",
        )
    if isinstance(exc, PermissionError) or code in {"AccessDenied", "AllAccessDisabled", "403"}:
        if not _is_remote(_protocol(url)):
            return _Problem(
                False,
                "permission denied",
                "permission denied: check the folder's owner and permissions, or use another path",
            )
        if op in ("write", "delete"):
            return _Problem(
                False,
                "access denied",
                f"access denied: these credentials may not {op} here (s3:PutObject, "
                "s3:DeleteObject); check the bucket policy, or use another run_dir",
            )
        return _Problem(
            False,
            "access denied",
            f"access denied at {where}: the credentials are wrong or may not read here; check "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or storage.profile) and the bucket "
            "policy (s3:ListBucket, s3:GetObject)",
        )
    if code in _TRANSIENT_CODES:
        return _Problem(
            True,
            f"the store answered {code}",
            f"{where} kept answering {code}: check the object store's health",
        )
    if names & {"ConnectTimeoutError", "ServerTimeoutError"}:
        return _Problem(
            True, "connect timeout", f"cannot connect to {where} (timeout): {fix_endpoint}"
        )
    if names & {
        "EndpointConnectionError",
        "ProxyConnectionError",
        "ClientConnectorError",
        "ConnectionRefusedError",
    }:
        return _Problem(True, "connection refused", f"cannot connect to {where}: {fix_endpoint}")
    if names & {"ReadTimeoutError", "FSTimeoutError", "TimeoutError"} or isinstance(
        exc, socket.timeout
    ):
        return _Problem(
            True,
            "read timeout",
            f"{where} did not answer within {_options.read_timeout_s:g} s (storage.read_timeout_s): "
            "check the object store's health and the network",
        )
    if names & {
        "ConnectionClosedError",
        "HTTPClientError",
        "IncompleteRead",
        "ResponseParserError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ClientOSError",
        "ConnectionResetError",
        "BrokenPipeError",
        "ConnectionAbortedError",
    }:
        return _Problem(
            True,
            "connection broken",
            f"the connection to {where} kept breaking: {fix_endpoint}",
        )
    if "SSLError" in names:
        return _Problem(
            False, "TLS error", f"TLS failed with {where} ({exc}): check the endpoint's certificate"
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return _Problem(
            False, "no space", "no space left on the device: free some, or use another path"
        )
    if isinstance(exc, OSError) and exc.errno == errno.EROFS:
        return _Problem(False, "read-only", "the file system is read-only: use another path")
    if isinstance(exc, OSError) and exc.errno in (errno.EBUSY, errno.EREMOTEIO):
        return _Problem(
            True, "the store is busy", f"{where} kept failing ({exc}): check its health"
        )
    return _Problem(False, type(exc).__name__, f"{type(exc).__name__}: {exc}")


def _call(op: str, url: str, fn: Callable[[], T]) -> T:
    """`fn()`, retried with backoff while it fails for a reason that may pass; any other
    failure, or the last one, becomes one `StorageError` naming `url`. FileNotFoundError (a
    missing object, not a missing bucket) and FileExistsError pass through for the caller."""
    attempts = 1 + _options.retries if _is_remote(_protocol(url)) else 1
    started = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (UserError, FileExistsError, KeyboardInterrupt):
            raise
        except FileNotFoundError as exc:
            if _code(exc) != "NoSuchBucket":
                raise
            problem = _diagnose(exc, op, url)
        except Exception as exc:
            problem = _diagnose(exc, op, url)
        if problem.transient and attempt < attempts:
            wait = min(_options.retry_wait_s * 2 ** (attempt - 1), MAX_RETRY_WAIT_S)
            log(
                f"storage: {op} {url} failed ({problem.short}); retry {attempt} of "
                f"{attempts - 1} in {wait:.1f} s"
            )
            time.sleep(wait)
            continue
        tried = (
            f" (gave up after {attempt} attempts over {time.monotonic() - started:.0f} s; "
            "storage.retries sets how many)"
            if attempt > 1
            else ""
        )
        raise StorageError(scrub(f"cannot {op} {redact(url)}: {problem.advice}{tried}")) from None
    raise AssertionError("unreachable")


def check_access(url: str) -> None:
    """Fail fast, naming what to fix, if `url`'s store cannot be reached or listed with the
    configured credentials (one listing request; nothing for local paths)."""
    if _protocol(url) != "s3":
        return
    fs, path = filesystem(url)
    bucket, _, key = path.partition("/")
    _call(
        "list",
        url,
        lambda: fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1),
    )


# --------------------------------------------------------------------------------------------
# Operations.


def join(url: str, *parts: str) -> str:
    """`url` with path segments appended (`/`-separated whatever the scheme). A segment may not
    be `.` or `..`: nothing derived from a name can point outside `url`."""
    out = url.rstrip("/")
    for part in parts:
        piece = part.strip("/")
        if any(seg in (".", "..") for seg in piece.split("/")):
            raise UserError(f"{part!r}: a path segment may not be '.' or '..' (below {url})")
        out = f"{out}/{piece}"
    return out


def local_path(url: str) -> Path | None:
    """The local filesystem path of a local URL, else None."""
    if _protocol(url) != "file":
        return None
    return Path(filesystem(url)[1])


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return _call("read", url, lambda: bool(fs.exists(path)))


def size(url: str) -> int:
    fs, path = filesystem(url)
    try:
        return _call("read", url, lambda: int(fs.size(path)))
    except FileNotFoundError:
        raise UserError(f"{url} does not exist") from None


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    try:
        return _call("read", url, lambda: bytes(fs.cat_file(path)))
    except FileNotFoundError:
        raise UserError(f"{url} does not exist") from None


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


class _ResumingReader(io.RawIOBase):
    """A remote object as a seekable stream that survives a broken connection: a read that
    fails for a reason that may pass is retried (like every call here) on the object opened
    again at the same offset."""

    def __init__(self, fs: Any, path: str, url: str) -> None:
        super().__init__()
        self._fs, self._path, self._url = fs, path, url
        self._pos = 0
        self._size: int | None = None
        self._fh: Any = None

    def open_now(self) -> None:
        """Open at once, so that a missing object is an error of the open, not of a read."""
        _call("read", self._url, self._reopen)

    def _reopen(self) -> None:
        self._drop()
        self._fh = self._fs.open(self._path, "rb")
        self._size = int(self._fh.size)

    def _drop(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            with contextlib.suppress(Exception):
                fh.close()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        else:
            if self._size is None:
                self._size = _call("read", self._url, lambda: int(self._fs.size(self._path)))
            pos = self._size + offset
        self._pos = max(0, pos)
        return self._pos

    def _read_once(self, n: int) -> bytes:
        try:
            if self._fh is None:
                self._reopen()
            self._fh.seek(self._pos)
            return bytes(self._fh.read(n))
        except BaseException:
            self._drop()
            raise

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = _call("read", self._url, lambda: self._read_once(len(view)))
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._drop()
        super().close()


def open_file(url: str) -> IO[bytes]:
    """A seekable binary file to read at random (a Parquet footer, then row groups); the
    caller closes it. Remote: ranged reads that retry like every call here, no download."""
    fs, path = filesystem(url)
    try:
        if not _is_remote(_protocol(url)):
            fh: IO[bytes] = _call("read", url, lambda: fs.open(path, "rb"))
            return fh
        raw = _ResumingReader(fs, path, url)
        raw.open_now()
    except FileNotFoundError:
        raise UserError(f"{url} does not exist") from None
    return io.BufferedReader(raw, buffer_size=1 << 20)


@contextlib.contextmanager
def open_read(url: str, compression: str | None = "infer") -> Iterator[IO[bytes]]:
    """Open for binary reading; `.gz`, `.zst`, ... are decompressed when `compression="infer"`."""
    fs, path = filesystem(url)
    if compression == "infer":
        compression = fsspec.utils.infer_compression(path)
    try:
        if not _is_remote(_protocol(url)):
            with _call("read", url, lambda: fs.open(path, "rb", compression=compression)) as fh:
                yield fh
            return
        raw = _ResumingReader(fs, path, url)
        raw.open_now()
        with io.BufferedReader(raw, buffer_size=1 << 20) as buffered:
            stream = fsspec.compression.compr[compression](buffered, mode="rb")
            try:
                yield stream
            finally:
                stream.close()
    except FileNotFoundError:
        raise UserError(f"{url} does not exist") from None


def _local_atomic_write(path: str, fill: Callable[[IO[bytes]], object], exclusive: bool) -> None:
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            os.link(tmp, path)  # atomic, and fails if `path` exists
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes(url: str, data: bytes, *, exclusive: bool = False) -> None:
    """Write a whole object atomically: readers never see a partial file.

    With `exclusive`, raise FileExistsError instead of replacing an existing object (object
    stores: a conditional PUT, `If-None-Match: *`)."""
    fs, path = filesystem(url)
    proto = _protocol(url)
    if proto == "file":
        _call("write", url, lambda: _local_atomic_write(path, lambda fh: fh.write(data), exclusive))
        return

    def put() -> None:
        if not exclusive:
            # One PUT (or a multipart upload that becomes visible only on completion).
            fs.pipe_file(path, data)
            return
        if proto == "memory":
            if fs.exists(path):
                raise FileExistsError(url)
            fs.pipe_file(path, data)
            return
        try:
            fs.pipe_file(path, data, mode="create")
        except OSError as exc:
            if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise FileExistsError(url) from None
            raise

    _call("write", url, put)


def put_file(local: str | Path, url: str) -> None:
    """Copy a local file to `url` atomically (local: temp file + rename; object stores: one
    upload that becomes visible only once complete), without reading it into memory."""
    fs, path = filesystem(url)
    if _protocol(url) == "file":

        def copy(dst: IO[bytes]) -> None:
            with open(local, "rb") as src:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)

        _call("write", url, lambda: _local_atomic_write(path, copy, False))
        return
    _call("write", url, lambda: fs.put_file(str(local), path))


def write_json(url: str, obj: Any, *, exclusive: bool = False) -> None:
    buf = io.StringIO()
    json.dump(obj, buf, indent=2, sort_keys=True)
    buf.write("\n")
    write_bytes(url, buf.getvalue().encode(), exclusive=exclusive)


def _url_of(url: str, fs_path: str) -> str:
    proto = _protocol(url)
    if proto == "file":
        return fs_path
    return f"{proto}://{fs_path}"


def list_files(url: str) -> list[str]:
    """Every file under `url` (recursively), or `[url]` if it is a file; sorted URLs."""
    fs, path = filesystem(url)

    def find() -> list[str]:
        if not fs.exists(path):
            return []
        if fs.isfile(path):
            return [url]
        return sorted(_url_of(url, p) for p in fs.find(path))

    try:
        return _call("list", url, find)
    except FileNotFoundError:
        return []


def glob(url: str) -> list[str]:
    fs, path = filesystem(url)
    try:
        return _call(
            "list", url, lambda: sorted(_url_of(url, p) for p in fs.glob(path) if fs.isfile(p))
        )
    except FileNotFoundError:
        return []


def remove(url: str) -> None:
    """Remove a file or a folder tree; missing is fine."""
    fs, path = filesystem(url)

    def rm() -> None:
        if fs.exists(path):
            fs.rm(path, recursive=True)
        elif _protocol(url) == "s3":
            # An S3 "folder" may have no marker object, so exists() can be False with keys below.
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path, recursive=True)

    with contextlib.suppress(FileNotFoundError):
        _call("delete", url, rm)


def relative_name(base: str, url: str) -> str:
    """`url`'s path relative to `base` (`/`-separated), or its file name if not below it."""
    _, b = filesystem(base)
    _, u = filesystem(url)
    if u == b:
        return posixpath.basename(u)
    if u.startswith(b.rstrip("/") + "/"):
        return u[len(b.rstrip("/")) + 1 :]
    return posixpath.basename(u)
