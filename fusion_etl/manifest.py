"""Shard records, `_stage.json`, `_manifest.json` and `_SUCCESS`: the stage commit protocol.

Layout of one stage's output folder:

    _stage.json              written first: fingerprint + resolved config (secrets redacted)
    part-00000.parquet ...   shards, each visible only once complete
    _shards/part-00000.json  one record per shard, written after its shard's write returned
    _manifest.json           written after every shard has returned: records, inputs, totals
    _SUCCESS                 written last

A rerun with the same fingerprint redoes only shards without a valid record; a different
fingerprint is refused unless the caller asked to overwrite. Downstream stages read
`_manifest.json` (never a listing) and only once `_SUCCESS` exists.

One run at a time writes an output folder: it holds a lease, `<parent>/_leases/<folder>.json`
(beside the folder, so that `--overwrite` replacing the folder keeps it), from before it reads
the folder's state until after `_SUCCESS`. A second run is refused while the lease is live. The
holder renews it every `ttl/3`; a lease whose holder died expires after `ttl`, or at once when
the holder was a process on this host that no longer exists (a killed run resumes at once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fusion_etl import storage
from fusion_etl.config import redact
from fusion_etl.console import log
from fusion_etl.errors import FingerprintMismatchError, LeaseHeldError, UserError
from fusion_etl.redaction import scrub

__all__ = [
    "LEASES_DIR",
    "MANIFEST",
    "SHARDS_DIR",
    "STAGE_FILE",
    "SUCCESS",
    "Manifest",
    "ShardRecord",
    "StageLease",
    "acquire_lease",
    "begin_stage",
    "done_records",
    "is_finished",
    "lease_holder",
    "lease_url",
    "read_manifest",
    "stage_lease",
    "stage_state",
    "write_manifest",
    "write_record",
]

STAGE_FILE = "_stage.json"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
SHARDS_DIR = "_shards"
LEASES_DIR = "_leases"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardRecord:
    """What one committed shard holds."""

    name: str
    rows: int
    bytes: int
    sha256: str
    seconds: float
    inputs: tuple[str, ...] = ()
    stats: Mapping[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["inputs"] = list(self.inputs)
        out["stats"] = dict(self.stats)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardRecord:
        return cls(
            name=str(data["name"]),
            rows=int(data["rows"]),
            bytes=int(data["bytes"]),
            sha256=str(data["sha256"]),
            seconds=float(data["seconds"]),
            inputs=tuple(data.get("inputs", ())),
            stats={str(k): int(v) for k, v in dict(data.get("stats", {})).items()},
        )


@dataclass(frozen=True)
class Manifest:
    """A finished stage's `_manifest.json`."""

    stage: str
    url: str
    fingerprint: str
    config: Mapping[str, Any]
    inputs: Mapping[str, str]
    """Upstream stage URL -> that stage's fingerprint."""
    shards: tuple[ShardRecord, ...]
    created: float

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def shard_urls(self) -> list[str]:
        return [storage.join(self.url, s.name) for s in self.shards]


def _record_url(out_url: str, shard: str) -> str:
    stem = shard.rsplit(".", 1)[0]
    return storage.join(out_url, SHARDS_DIR, f"{stem}.json")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def _describe_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    # As recorded: JSON has no tuples, so compare the new identity the way it would be stored.
    a, b = _flatten(old), _flatten(json.loads(json.dumps(new, default=str)))
    changed = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    if not changed:
        return "the inputs or the code version changed"
    shown = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in changed[:8]]
    more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
    return "; ".join(shown) + more


def stage_state(out_url: str) -> dict[str, Any] | None:
    """The `_stage.json` of an output folder, or None if the stage never started there."""
    url = storage.join(out_url, STAGE_FILE)
    if not storage.exists(url):
        return None
    data: dict[str, Any] = storage.read_json(url)
    return data


def is_finished(out_url: str, fingerprint: str) -> bool:
    """True when `out_url` holds a finished stage made with exactly this fingerprint."""
    state = stage_state(out_url)
    return (
        state is not None
        and state.get("fingerprint") == fingerprint
        and storage.exists(storage.join(out_url, SUCCESS))
    )


def begin_stage(
    out_url: str,
    *,
    stage: str,
    fingerprint: str,
    identity: Mapping[str, Any],
    config: Mapping[str, Any],
    overwrite: bool,
) -> None:
    """Claim `out_url` for this fingerprint, or refuse if it holds other work.

    Args:
        out_url: the stage's output folder.
        stage: stage name, for messages.
        fingerprint: hash of `identity`.
        identity: everything that determines the output (compared to explain a refusal).
        config: the resolved config to record (already redacted).
        overwrite: replace output made with another fingerprint (or not by fusion-etl) instead
            of refusing; output with the same fingerprint is always kept and resumed.
    """
    state = stage_state(out_url)
    if state is not None and state.get("fingerprint") == fingerprint:
        return  # the same work: keep what is committed, whatever `overwrite` says
    if state is not None and not overwrite:
        raise FingerprintMismatchError(
            f"{stage}: {out_url} holds output made with a different configuration "
            f"({_describe_change(state.get('identity', {}), identity)}). "
            "Use --overwrite to replace it, or choose another run_dir."
        )
    if state is None and not overwrite and storage.list_files(out_url):
        raise FingerprintMismatchError(
            f"{stage}: {out_url} is not empty and was not written by fusion-etl; "
            "use --overwrite to replace it, or choose another run_dir."
        )
    storage.remove(out_url)
    storage.write_json(
        storage.join(out_url, STAGE_FILE),
        {
            "format": FORMAT_VERSION,
            "stage": stage,
            "fingerprint": fingerprint,
            "identity": identity,
            "config": config,
            "started": time.time(),
        },
    )


def write_record(out_url: str, record: ShardRecord) -> None:
    """Record a shard; call only after the shard's own write has returned."""
    storage.write_json(_record_url(out_url, record.name), record.to_json())


def done_records(out_url: str, shards: Iterable[str]) -> dict[str, ShardRecord]:
    """Records of the given shards that are committed (record present, shard of that size)."""
    out: dict[str, ShardRecord] = {}
    for shard in shards:
        rec_url = _record_url(out_url, shard)
        if not storage.exists(rec_url):
            continue
        record = ShardRecord.from_json(storage.read_json(rec_url))
        shard_url = storage.join(out_url, shard)
        if storage.exists(shard_url) and storage.size(shard_url) == record.bytes:
            out[shard] = record
    return out


def write_manifest(
    out_url: str,
    *,
    stage: str,
    fingerprint: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, str],
    records: Iterable[ShardRecord],
) -> Manifest:
    """Write `_manifest.json`, then `_SUCCESS`. Call only when every shard has returned."""
    ordered = tuple(sorted(records, key=lambda r: r.name))
    manifest = Manifest(
        stage=stage,
        url=out_url,
        fingerprint=fingerprint,
        config=config,
        inputs=dict(inputs),
        shards=ordered,
        created=time.time(),
    )
    storage.write_json(
        storage.join(out_url, MANIFEST),
        {
            "format": FORMAT_VERSION,
            "stage": stage,
            "fingerprint": fingerprint,
            "config": dict(config),
            "inputs": dict(inputs),
            "shards": [r.to_json() for r in ordered],
            "totals": {"shards": len(ordered), "rows": manifest.rows, "bytes": manifest.bytes},
            "created": manifest.created,
        },
    )
    storage.write_bytes(storage.join(out_url, SUCCESS), b"")
    return manifest


def read_manifest(out_url: str, *, stage: str) -> Manifest:
    """The manifest of a finished stage; a clear error if it has not finished."""
    if not storage.exists(storage.join(out_url, SUCCESS)):
        raise UserError(
            f"stage {stage!r} has not finished at {out_url} (no {SUCCESS}); "
            f"run `fusion-etl run {stage}` first"
        )
    data = storage.read_json(storage.join(out_url, MANIFEST))
    return Manifest(
        stage=str(data["stage"]),
        url=out_url,
        fingerprint=str(data["fingerprint"]),
        config=data["config"],
        inputs=data.get("inputs", {}),
        shards=tuple(ShardRecord.from_json(r) for r in data["shards"]),
        created=float(data["created"]),
    )


# --------------------------------------------------------------------------------------------
# The lease: one run at a time per output folder.


def lease_url(out_url: str) -> str:
    """Where the lease of an output folder lives: beside it, in `_leases/`."""
    parent, _, name = out_url.rstrip("/").rpartition("/")
    return storage.join(parent or ".", LEASES_DIR, f"{name}.json")


def _read_lease(url: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = storage.read_json(url)
    except UserError as exc:
        if "does not exist" in str(exc):
            return None
        raise
    except ValueError:  # a torn local write cannot happen (atomic), but never trust a file
        return None
    return data


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


# Leases this process holds right now (a lease of this process not among them was left
# behind by a run that failed while the store was unreachable).
_HELD: set[str] = set()


def _stale(lease: Mapping[str, Any], now: float) -> str | None:
    """Why `lease` no longer protects anything, or None while it is live."""
    if float(lease.get("expires", 0)) < now:
        return "it expired"
    if lease.get("host") == socket.gethostname():
        pid = int(lease.get("pid", -1))
        if not _pid_alive(pid):
            return f"its process {pid} on this host is gone"
        if pid == os.getpid() and lease.get("holder") not in _HELD:
            return "an earlier run in this process left it behind"
    return None


def _describe_holder(lease: Mapping[str, Any], now: float) -> str:
    started = now - float(lease.get("acquired", now))
    left = max(0.0, float(lease.get("expires", now)) - now)
    return (
        f"pid {lease.get('pid')} on {lease.get('host')}, running `{lease.get('command', '?')}` "
        f"for {started:.0f} s; if that run has died its lease expires in {left:.0f} s"
    )


def lease_holder(out_url: str) -> str | None:
    """Who holds a live lease on `out_url` (for `plan`), or None."""
    lease = _read_lease(lease_url(out_url))
    now = time.time()
    if lease is None or _stale(lease, now):
        return None
    return _describe_holder(lease, now)


class StageLease:
    """A held lease; renewed in a background thread until `release`."""

    def __init__(self, url: str, record: dict[str, Any], ttl_s: float) -> None:
        self.url = url
        self._record = record
        self._ttl = ttl_s
        self._stop = threading.Event()
        self._lost: str | None = None
        self._renewed = time.monotonic()
        _HELD.add(self.token)
        self._thread = threading.Thread(
            target=self._renew_loop, name="fusion-etl-lease", daemon=True
        )
        self._thread.start()

    @property
    def token(self) -> str:
        return str(self._record["holder"])

    def _renew_loop(self) -> None:
        while not self._stop.wait(self._ttl / 3):
            try:
                self.renew()
            except UserError as exc:
                # The store may be down for a moment: keep trying until the lease would expire.
                if time.monotonic() - self._renewed > self._ttl:
                    self._lost = f"it could not be renewed for {self._ttl:.0f} s ({exc})"

    def renew(self) -> None:
        current = _read_lease(self.url)
        if current is None or current.get("holder") != self.token:
            self._lost = "another run took it over"
            return
        now = time.time()
        self._record = {**self._record, "renewed": now, "expires": now + self._ttl}
        storage.write_json(self.url, self._record)
        self._renewed = time.monotonic()

    def check(self) -> None:
        """Raise if the lease was lost: the run must stop before it writes anything more."""
        if self._lost is not None:
            raise LeaseHeldError(
                f"lost the lease on {self.url} ({self._lost}); stopping so that two runs never "
                "write one folder. Run the same command again to resume."
            )

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        _HELD.discard(self.token)
        with contextlib.suppress(UserError):
            current = _read_lease(self.url)
            if current is not None and current.get("holder") == self.token:
                storage.remove(self.url)


def acquire_lease(out_url: str, *, stage: str, fingerprint: str, ttl_s: float) -> StageLease:
    """Take the lease of `out_url`, or raise `LeaseHeldError` naming the run that holds it."""
    url = lease_url(out_url)
    now = time.time()
    record = {
        "holder": uuid.uuid4().hex,
        "stage": stage,
        "fingerprint": fingerprint,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": scrub(str(redact(" ".join(["fusion-etl", *sys.argv[1:]]))))[:300],
        "acquired": now,
        "renewed": now,
        "expires": now + ttl_s,
    }
    # Known as this process's own before it can be seen: another thread of this process that
    # reads it mid-acquire must not take it for one an earlier run here left behind.
    _HELD.add(str(record["holder"]))
    try:
        return _acquire(url, out_url, record, stage=stage, ttl_s=ttl_s)
    except BaseException:
        _HELD.discard(str(record["holder"]))
        raise


def _acquire(
    url: str, out_url: str, record: dict[str, Any], *, stage: str, ttl_s: float
) -> StageLease:
    for _ in range(5):
        try:
            storage.write_json(url, record, exclusive=True)
        except FileExistsError:
            current = _read_lease(url)
            if current is None:
                continue  # released in between: try again
            if current.get("holder") == record["holder"]:
                break  # our own create, retried after a lost answer
            why = _stale(current, time.time())
            if why is None:
                raise LeaseHeldError(
                    f"{stage}: {out_url} is in use by another fusion-etl run "
                    f"({_describe_holder(current, time.time())}). Wait for it to finish, "
                    "or use another run_dir."
                ) from None
            log(f"{stage}: taking over the lease of a run that is gone ({why})")
            storage.remove(url)
            continue
        break
    else:
        raise LeaseHeldError(f"{stage}: could not take the lease {url}; runs keep racing for it")
    # Stores that ignore a conditional PUT would let two creates both succeed: read it back.
    current = _read_lease(url)
    if current is None or current.get("holder") != record["holder"]:
        raise LeaseHeldError(f"{stage}: another run took the lease {url} at the same moment")
    return StageLease(url, record, ttl_s)


@contextlib.contextmanager
def stage_lease(
    out_url: str, *, stage: str, fingerprint: str, ttl_s: float = 60.0
) -> Iterator[StageLease]:
    """Hold the lease of `out_url` for the block: every write of a stage's run goes inside.

    Sharded stages get it from the runner; whole-job stages (train, evaluate) wrap their
    `run` in it. Call `lease.check()` before committing (the manifest) to stop if it was lost.
    """
    lease = acquire_lease(out_url, stage=stage, fingerprint=fingerprint, ttl_s=ttl_s)
    try:
        yield lease
    finally:
        lease.release()
