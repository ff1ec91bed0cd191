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
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fusion_etl import storage
from fusion_etl.errors import FingerprintMismatchError, UserError

__all__ = [
    "MANIFEST",
    "SHARDS_DIR",
    "STAGE_FILE",
    "SUCCESS",
    "Manifest",
    "ShardRecord",
    "begin_stage",
    "done_records",
    "is_finished",
    "read_manifest",
    "stage_state",
    "write_manifest",
    "write_record",
]

STAGE_FILE = "_stage.json"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
SHARDS_DIR = "_shards"
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
    a, b = _flatten(old), _flatten(new)
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
