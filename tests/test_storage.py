"""Storage and the commit protocol, on a temp folder and on a real S3 server on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fusion_etl import manifest, storage
from fusion_etl.errors import FingerprintMismatchError, StorageError, UserError
from fusion_etl.manifest import ShardRecord


def test_roundtrip_listing_and_remove(storage_root: tuple[str, Any]) -> None:
    root, _ = storage_root
    storage.write_bytes(storage.join(root, "b", "x.bin"), b"one")
    storage.write_bytes(storage.join(root, "a.bin"), b"two!")
    storage.write_json(storage.join(root, "b", "c", "y.json"), {"k": [1, 2]})
    assert storage.read_bytes(storage.join(root, "b", "x.bin")) == b"one"
    assert storage.size(storage.join(root, "a.bin")) == 4
    assert storage.read_json(storage.join(root, "b", "c", "y.json")) == {"k": [1, 2]}
    listed = storage.list_files(root)
    assert [storage.relative_name(root, u) for u in listed] == ["a.bin", "b/c/y.json", "b/x.bin"]
    assert storage.list_files(storage.join(root, "a.bin")) == [storage.join(root, "a.bin")]
    assert [
        storage.relative_name(root, u) for u in storage.glob(storage.join(root, "b", "*.bin"))
    ] == ["b/x.bin"]
    storage.write_bytes(storage.join(root, "a.bin"), b"replaced")
    assert storage.read_bytes(storage.join(root, "a.bin")) == b"replaced"
    storage.remove(storage.join(root, "b"))
    assert [storage.relative_name(root, u) for u in storage.list_files(root)] == ["a.bin"]
    assert not storage.exists(storage.join(root, "b", "x.bin"))
    with pytest.raises(UserError, match="does not exist"):
        storage.read_bytes(storage.join(root, "missing"))


def test_local_write_is_atomic_and_leaves_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = str(tmp_path / "d" / "shard.parquet")
    storage.write_bytes(target, b"complete")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr("os.replace", broken_replace)
    # A failing disk is one clear error naming the file, not a traceback.
    with pytest.raises(StorageError, match=r"cannot write .*shard\.parquet: OSError: disk gone"):
        storage.write_bytes(target, b"half")
    # The old content is intact and no temp file is left behind.
    assert Path(target).read_bytes() == b"complete"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["shard.parquet"]


def test_memory_urls_for_unit_tests() -> None:
    storage.write_bytes("memory://unit/x", b"1")
    assert storage.read_bytes("memory://unit/x") == b"1"
    storage.remove("memory://unit")
    assert not storage.exists("memory://unit/x")


def test_unknown_scheme_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="unsupported storage URL scheme 'nosuch'"):
        storage.exists("nosuch://x/y")


def _begin(url: str, fp: str, identity: dict[str, Any], overwrite: bool = False) -> None:
    manifest.begin_stage(
        url, stage="demo", fingerprint=fp, identity=identity, config=identity, overwrite=overwrite
    )


def test_commit_protocol(storage_root: tuple[str, Any]) -> None:
    root, _ = storage_root
    out = storage.join(root, "stage")
    _begin(out, "f1", {"block_size": 10})
    storage.write_bytes(storage.join(out, "part-00000.parquet"), b"abc")
    manifest.write_record(
        out, ShardRecord("part-00000.parquet", rows=2, bytes=3, sha256="h", seconds=0.1)
    )
    # A shard whose write returned but whose record was never written is not done.
    storage.write_bytes(storage.join(out, "part-00001.parquet"), b"xyz")
    # A record whose shard has another size (a torn rewrite) is not done either.
    storage.write_bytes(storage.join(out, "part-00002.parquet"), b"xy")
    manifest.write_record(
        out, ShardRecord("part-00002.parquet", rows=1, bytes=3, sha256="h", seconds=0.1)
    )
    names = ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert list(manifest.done_records(out, names)) == ["part-00000.parquet"]
    with pytest.raises(UserError, match="has not finished"):
        manifest.read_manifest(out, stage="demo")

    _begin(out, "f1", {"block_size": 10})  # same fingerprint: resumes, keeps the work
    assert list(manifest.done_records(out, names)) == ["part-00000.parquet"]
    with pytest.raises(FingerprintMismatchError, match=r"block_size: 10 -> 20.*--overwrite"):
        _begin(out, "f2", {"block_size": 20})

    records = [ShardRecord(n, rows=1, bytes=3, sha256="h", seconds=0.0) for n in names]
    m = manifest.write_manifest(
        out, stage="demo", fingerprint="f1", config={}, inputs={"up": "f0"}, records=records
    )
    assert storage.exists(storage.join(out, manifest.SUCCESS))
    again = manifest.read_manifest(out, stage="demo")
    assert again.shards == m.shards and again.rows == 3 and again.inputs == {"up": "f0"}
    assert again.shard_urls()[0] == storage.join(out, "part-00000.parquet")

    _begin(out, "f2", {"block_size": 20}, overwrite=True)
    assert [storage.relative_name(out, u) for u in storage.list_files(out)] == ["_stage.json"]


def test_foreign_output_is_not_overwritten_silently(tmp_path: Path) -> None:
    out = str(tmp_path / "stage")
    storage.write_bytes(str(tmp_path / "stage" / "precious.txt"), b"mine")
    with pytest.raises(FingerprintMismatchError, match="not written by fusion-etl"):
        _begin(out, "f", {})
    assert (tmp_path / "stage" / "precious.txt").exists()
