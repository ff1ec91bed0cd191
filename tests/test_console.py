"""The console router: fusion-etl's lines on the console, everything else in the log file."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import pytest

from fusion_etl import console


def _route(tmp_path: Path, verbose: bool = False) -> tuple[io.StringIO, io.StringIO, Path]:
    out, err = io.StringIO(), io.StringIO()
    path = tmp_path / "_logs" / "run.log"
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        with console.routed_output(path, verbose=verbose):
            print("| model | bits |")  # our own table, on stdout
            print()
            print("(RayTrainWorker pid=12, ip=10.0.0.2) [fusion-etl] train: step 3/9 loss 4.2")
            print("\x1b[36m(ShardActor pid=7)\x1b[0m Loading weights:  0%\rLoading weights: 100%")
            print("(PlacementGroupCleaner pid=3) Failed to query Ray Train Controller actor state.")
            console.log("prepare: committed 4 shards")
            print(
                "2026-12-01 INFO worker.py:2038 -- Started a local Ray instance.", file=sys.stderr
            )
            logging.getLogger("botocore.credentials").warning("refreshed but still expired")
            console.detail("prepare: 4 shards, 0 already committed")
            late = sys.stderr
        late.write("(pid=9) Running Dataset: 0 row [00:05]\n")  # a bar closing at exit
    finally:
        sys.stdout, sys.stderr = saved
    return out, err, path


def test_ours_on_the_console_the_rest_in_the_log(tmp_path: Path) -> None:
    out, err, path = _route(tmp_path)
    assert out.getvalue() == ("| model | bits |\n\n[fusion-etl] train: step 3/9 loss 4.2\n")
    assert err.getvalue() == "[fusion-etl] prepare: committed 4 shards\n"
    log = path.read_text()
    for line in (
        "(ShardActor pid=7) Loading weights: 100%",  # a redrawn bar: its last state
        "(PlacementGroupCleaner pid=3) Failed to query Ray Train Controller actor state.",
        "Started a local Ray instance.",
        "WARNING botocore.credentials: refreshed but still expired",
        "[fusion-etl] prepare: 4 shards, 0 already committed",
        "[fusion-etl] prepare: committed 4 shards",
        "(pid=9) Running Dataset: 0 row [00:05]",
    ):
        assert line in log, line


def test_verbose_shows_everything(tmp_path: Path) -> None:
    out, err, _ = _route(tmp_path, verbose=True)
    assert "Failed to query Ray Train Controller" in out.getvalue()
    assert "Started a local Ray instance" in err.getvalue()
    assert "[fusion-etl] prepare: 4 shards, 0 already committed" in err.getvalue()


def test_lines_are_scrubbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "VERY-SECRET-value-123")
    out = io.StringIO()
    saved = sys.stdout
    sys.stdout = out
    try:
        with console.routed_output(tmp_path / "x.log"):
            print("(pid=1) botocore said VERY-SECRET-value-123")
            print("[fusion-etl] key VERY-SECRET-value-123")
    finally:
        sys.stdout = saved
    assert "VERY-SECRET" not in out.getvalue() + (tmp_path / "x.log").read_text()
    assert "[fusion-etl] key ***" in out.getvalue()
