"""Every model at once, and align_fuse pipelined behind extract: the same bytes as a staged run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from fusion_etl.pipeline import extract_and_align
from fusion_etl.runner import WorkItem
from fusion_etl.scheduler import Gate
from tests.conftest import kit_config


def _checksums(run_dir: Path) -> dict[str, Any]:
    """Per output folder: its fingerprint and (shard, sha256) of every shard; vocab maps."""
    out: dict[str, Any] = {}
    for path in sorted(run_dir.glob("**/_manifest.json")):
        data = json.loads(path.read_text())
        out[str(path.parent.relative_to(run_dir))] = (
            data["fingerprint"],
            [(s["name"], s["rows"], s["sha256"]) for s in data["shards"]],
        )
    for path in sorted((run_dir / "vocab_map").glob("*.parquet")):
        out[f"vocab_map/{path.name}"] = path.read_bytes()
    return out


@pytest.mark.slow
def test_models_at_once_and_pipelined_align_equal_a_staged_run(
    fused_run: Path, test_kit: Any, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(fused_run / "prepare", run_dir / "prepare")
    # A quarter CPU per actor and task: four models' actors leave room for align_fuse tasks on
    # the two CPUs of the test's Ray (on a cluster they sit on different node groups).
    cfg = kit_config(test_kit, run_dir, "extract.num_cpus=0.25", "align_fuse.num_cpus=0.25")
    assert cfg.ray.schedule == "pipelined"
    extract, align = extract_and_align(cfg, overwrite=False)
    assert extract.complete and align.complete
    assert extract.ran == 4 * align.ran and align.ran == align.total > 1

    expected = _checksums(fused_run)  # one model after the other, then align_fuse
    assert _checksums(run_dir) == expected
    assert set(expected) >= {
        "align_fuse",
        "extract/target",
        "extract/src_gpt2",
        "vocab_map/src_gpt2.parquet",
    }

    # Every model's extract and align_fuse were under way before any model had finished.
    started = {
        str(p.parent.relative_to(run_dir)): json.loads(p.read_text())["started"]
        for p in run_dir.glob("**/_stage.json")
    }
    finished = [
        json.loads(p.read_text())["created"] for p in run_dir.glob("extract/*/_manifest.json")
    ]
    assert len(finished) == 4 and len(started) == 6
    assert max(t for k, t in started.items() if k != "prepare") < min(finished)

    # Again: nothing to do.
    extract, align = extract_and_align(cfg, overwrite=False)
    assert extract.ran == align.ran == 0 and extract.complete and align.complete


def test_gate_releases_a_shard_once_every_upstream_committed_it() -> None:
    items = [WorkItem(shard=f"part-{i:05d}.parquet", inputs=()) for i in range(3)]
    a: set[str] = set()
    b: set[str] = {"part-00001.parquet"}
    gate = Gate(items, [a, b])
    assert gate.release() == []
    a.update({"part-00001.parquet", "part-00002.parquet"})
    assert gate.release() == [items[1]]
    assert gate.release() == []
    b.update({"part-00000.parquet", "part-00002.parquet"})
    a.add("part-00000.parquet")
    assert gate.release() == [items[0], items[2]]
    assert gate.waiting == []
    assert Gate(items, []).release() == items  # no upstream: everything at once
