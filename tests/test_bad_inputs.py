"""Bad inputs as a new user makes them: one `error:` line each, exit 2, never a traceback.

The table in docs/reliability.md lists these cases (and the storage ones of
tests/test_storage_faults.py) with what the user sees.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fusion_etl.cli import main
from fusion_etl.config import to_dict
from tests.conftest import kit_config


def _corpus(tmp_path: Path, name: str, content: bytes) -> str:
    folder = tmp_path / "corpus"
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(content)
    return str(folder)


def _input(name: str, content: bytes) -> Callable[[Path], list[str]]:
    """A corpus of one file with `content`, as the prepare.input override."""
    return lambda t: [f"prepare.input={_corpus(t, name, content)}"]


def _empty(tmp_path: Path) -> str:
    (tmp_path / "empty").mkdir()
    return str(tmp_path / "empty")


# (case, how to build the extra CLI arguments from tmp_path, expected message)
CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("config file missing", lambda t: ["run", "prepare", "-c", str(t / "nope.yaml")], "config file '"),
    ("config not YAML", lambda t: ["run", "prepare", "-c", str(_write(t, "x.yaml", "a: [1"))], "is not valid YAML"),
    ("unknown key", lambda t: ["prepare.blocksize=3"], "unknown key 'prepare.blocksize'; allowed keys at prepare:"),
    ("value out of range", lambda t: ["prepare.margin=4096"], "prepare.margin: must be in [0, block_size)"),
    ("wrong type", lambda t: ["prepare.block_size=big"], "prepare.block_size: expected an integer, got 'big'"),
    ("not an allowed choice", lambda t: ["align_fuse.fusion=max"], "align_fuse.fusion: 'max' is not allowed"),
    ("empty run_dir", lambda t: ["run_dir="], "run_dir: must not be empty"),
    ("negative retries", lambda t: ["storage.retries=-1"], "storage.retries: must be 0 or more"),
    ("negative shard time limit", lambda t: ["ray.shard_timeout_s=-5"], "ray.shard_timeout_s: must be 0 (no limit) or positive"),
    ("model name used twice", lambda t: ["sources=[{name: target, path: /x}]"], "model name 'target' is used twice"),
    ("path-escaping model name", lambda t: ["sources=[{name: '..', path: /x}]"], "sources[0].name: '..' must use letters"),
    ("path-escaping run name", lambda t: ["train.run_name=../up"], "train.run_name: '../up' must use letters"),
    ("unknown stage", lambda t: ["@stage=extract-all"], "unknown stage 'extract-all'"),
    ("--shards with all", lambda t: ["@stage=all", "--shards", "0"], "--shards needs a single stage"),
    ("--shards not a shard", lambda t: ["--shards", "x-y"], "--shards: 'x-y' is neither a shard name nor an index"),
    ("--shards out of range", lambda t: ["--shards", "7-9"], "--shards: index 7 is out of range; this stage has 4 shards (0-3)"),
    ("corpus folder empty", lambda t: [f"prepare.input={_empty(t)}"], "prepare.input: no corpus files at"),
    ("malformed jsonl", _input("a.jsonl", b"{not json}\n"), "a.jsonl line 1: not valid JSON"),
    ("jsonl without the text field", _input("a.jsonl", b'{"body": 1}\n'), "a.jsonl line 1: no 'text' field (set prepare.text_field"),
    ("invalid UTF-8", _input("a.txt", b"ok\n\xff\n"), "a.txt line 2: invalid UTF-8 (byte 0xff at column 1)"),
    ("not a Parquet file", _input("a.parquet", b"PAR1 broken"), "a.parquet: not a Parquet file"),
    ("missing model", lambda t: [f"target.path={t / 'no-model'}"], "no tokenizer found at"),
    ("documents too long for a model", lambda t: ["prepare.block_size=4096"], "do not fit model 'target', whose context is"),
    ("stage out of order", lambda t: ["@stage=extract"], "stage 'prepare' has not finished at"),
    ("train before align_fuse", lambda t: ["@stage=train"], "stage 'align_fuse' has not finished at"),
]  # fmt: skip


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("case", "build", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(
    case: str,
    build: Callable[[Path], list[str]],
    message: str,
    test_kit: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = kit_config(test_kit, tmp_path / "run", "ray.executor=inline")
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({k: v for k, v in to_dict(cfg).items() if v is not None}))
    extra = build(tmp_path)
    if extra[:1] == ["run"]:
        argv = extra
    else:
        stage = next((e.split("=", 1)[1] for e in extra if e.startswith("@stage=")), "prepare")
        argv = ["run", stage, "--config", str(job), *[e for e in extra if not e.startswith("@")]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert all(line.startswith(("error: ", "[fusion-etl] ")) for line in lines), err
