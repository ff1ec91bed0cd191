"""The `fusion-etl` command as a user runs it: help texts, and the demo end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_etl.cli import main


@pytest.mark.parametrize("command", [[], ["run"], ["plan"], ["status"], ["demo"]])
def test_help_everywhere(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fusion-etl")
    if command == ["run"]:
        assert "prepare" in out and "--overwrite" in out and "--shards" in out
        assert "--until" in out


def test_unknown_arguments_and_stages(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "prepare", "--config", "x.yaml", "--bogus"])
    assert info.value.code == 2
    job = tmp_path / "job.yaml"
    job.write_text("run_dir: /tmp/x\ntarget: {name: t, path: /m}\n")
    assert main(["run", "extract-everything", "--config", str(job)]) == 2
    assert "unknown stage 'extract-everything'" in capsys.readouterr().err
    assert main(["run", "all", "--config", str(job), "--shards", "0"]) == 2
    assert "--shards needs a single stage" in capsys.readouterr().err
    assert main(["run", "prepare", "--config", str(job), "--until", "extract"]) == 2
    assert "--until goes with 'all'" in capsys.readouterr().err
    assert main(["run", "all", "--config", str(job), "--until", "fuse"]) == 2
    assert "unknown stage 'fuse'" in capsys.readouterr().err
    # A bench's bad options are one line too, before it builds anything.
    out = tmp_path / "quality"
    argv = ["bench", "quality", "--mode", "table7", "--match", "boundary", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --match boundary") and err.count("\n") == 1
    assert not out.exists()


def test_bench_quality_help_shows_each_modes_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "quality", "--help"])
    out = capsys.readouterr().out
    assert "table7: lam=0.5, topk_mass=rest, align_method=dtw, match=token, top_k=200" in out
    assert "hetero: lam=0.5, topk_mass=rest, align_method=dtw, match=token, top_k=200" in out


@pytest.mark.slow
def test_demo_end_to_end_with_test_kit(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "fusion_etl", "demo", "--size", "test", "--run-dir", str(run_dir)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert re.search(r"^prepare\s+complete", first.stdout, re.M)
    assert (run_dir / "prepare" / "_SUCCESS").exists()
    # A readable console: one line per stage (per model in extract), training steps, the
    # evaluation table last; Ray's and the libraries' own output is in the log file.
    console = first.stdout + first.stderr
    for noise in ("(pid=", "Loading weights", "Failed to query", "Running Dataset", "INFO worker"):
        assert noise not in console, noise
    for line in ("prepare: committed", "extract/src_neox: committed", "align_fuse: committed"):
        assert len(re.findall(rf"^\[fusion-etl\] {line}", first.stderr, re.M)) == 1, line
    assert re.search(r"^\[fusion-etl\] train: step \d+/\d+ loss", console, re.M)
    assert first.stdout.rstrip().splitlines()[-1].startswith("| src_gpt2 |")
    logs = list((run_dir / "_logs").glob("*-demo-*.log"))
    assert len(logs) == 1 and f"[fusion-etl] log: {logs[0]}" in first.stderr
    assert "Started a local Ray instance" in logs[0].read_text()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "prepare: up to date" in second.stderr
    status = subprocess.run(
        [sys.executable, "-m", "fusion_etl", "status", "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0 and re.search(r"^align_fuse\s+complete", status.stdout, re.M)
