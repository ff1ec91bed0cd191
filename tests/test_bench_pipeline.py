"""Smoke test of `fusion-etl bench pipeline`'s worker-memory part on the test kit: the real
extract path (a fresh process per measurement, one shard committed) on 1x and 2x shards."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_worker_memory_part_measures_each_shard_streamed_and_whole(
    test_kit: Any, tmp_path: Path
) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusion_etl",
            "bench",
            "pipeline",
            "--size",
            "test",
            "--kit-dir",
            str(test_kit.root),
            "--out",
            str(tmp_path / "bench"),
            "--part",
            "memory",
            "--factor",
            "2",
            "--run-docs",
            "4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = re.findall(
        r"^\| (1x|2x) \| (\d+) \| (\d+) \| (.+?) \| (\d+) \| (-?\d+) \|$", proc.stdout, re.M
    )
    assert [(r[0], r[3]) for r in rows] == [
        ("1x", "4 docs"),
        ("1x", "whole shard"),
        ("2x", "4 docs"),
        ("2x", "whole shard"),
    ], proc.stdout
    one, two = int(rows[0][1]), int(rows[2][1])
    assert two == 2 * one  # the 2x shard is the 1x shard's documents twice
    assert all(int(r[4]) > 0 for r in rows)
    assert re.search(r"^streamed: 2x shard holds [+-]\d+ MiB more", proc.stdout, re.M)
