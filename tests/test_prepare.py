"""The prepare stage on real Ray, real Parquet, real tokenizers, local folders and S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusion_etl import storage
from fusion_etl.config import PipelineConfig, StorageConfig, parse_config
from fusion_etl.errors import FingerprintMismatchError, InputDataError
from fusion_etl.manifest import read_manifest
from fusion_etl.runner import run_stage
from fusion_etl.stages.prepare import PrepareStage, split_to_fit
from fusion_etl.tokenization import load_tokenizer, offsets_encoder

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _config(kit: Any, run_dir: str, corpus: str, **prepare: Any) -> PipelineConfig:
    return parse_config(
        {
            "run_dir": run_dir,
            "target": {"name": "target", "path": str(kit.target.path)},
            "sources": [{"name": m.name, "path": str(m.path)} for m in kit.sources],
            "prepare": {"input": corpus, "block_size": 128, "margin": 8, **prepare},
            "ray": {"num_cpus": 2},
        }
    )


def _upload(local_dir: Path, url: str) -> None:
    for path in sorted(local_dir.rglob("*")):
        if path.is_file():
            storage.write_bytes(
                storage.join(url, path.relative_to(local_dir).as_posix()), path.read_bytes()
            )


def _shards(url: str) -> dict[str, bytes]:
    m = read_manifest(url, stage="prepare")
    return {s.name: storage.read_bytes(storage.join(url, s.name)) for s in m.shards}


def test_prepare_local_and_s3_identical_and_idempotent(
    ray_local: Any, test_kit: Any, tmp_path: Path, s3_server: Any
) -> None:
    stage = PrepareStage()
    local_cfg = _config(test_kit, str(tmp_path / "run"), str(test_kit.corpus_dir))
    first = run_stage(stage, local_cfg)
    assert first.complete and first.ran == first.total > 1
    local = _shards(local_cfg.stage_url("prepare"))

    # The same corpus on S3, written to S3.
    s3_opts = StorageConfig(endpoint_url=s3_server.endpoint_url)
    storage.configure(s3_opts)
    base = f"s3://{s3_server.bucket}/prepare-{os.getpid()}"
    _upload(test_kit.corpus_dir, f"{base}/corpus")
    s3_cfg = parse_config(
        {
            **_raw(local_cfg),
            "run_dir": f"{base}/run",
            "storage": {"endpoint_url": s3_server.endpoint_url},
        },
        [f"prepare.input={base}/corpus"],
    )
    result = run_stage(stage, s3_cfg)
    assert result.complete
    remote = _shards(s3_cfg.stage_url("prepare"))
    assert remote == local  # byte-identical shards

    # A second run does nothing: no shard is rewritten.
    mtimes = {
        p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "prepare").glob("*.parquet")
    }
    again = run_stage(stage, local_cfg)
    assert again.ran == 0 and again.complete
    assert mtimes == {
        p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "prepare").glob("*.parquet")
    }
    assert run_stage(stage, s3_cfg).ran == 0

    # A changed config is refused, then redone with overwrite.
    changed = parse_config(_raw(local_cfg), ["prepare.block_size=96"])
    with pytest.raises(FingerprintMismatchError, match=r"prepare\.block_size: 128 -> 96"):
        run_stage(stage, changed)
    assert run_stage(stage, changed, overwrite=True).ran == first.total
    # --overwrite replaces output of another configuration only: the same one is kept.
    assert run_stage(stage, changed, overwrite=True).ran == 0
    storage.configure(StorageConfig())


def _raw(cfg: PipelineConfig) -> dict[str, Any]:
    from fusion_etl.config import to_dict

    data = to_dict(cfg)
    assert isinstance(data, dict)
    return {k: v for k, v in data.items() if v is not None}


def test_prepare_output_content(ray_local: Any, test_kit: Any, tmp_path: Path) -> None:
    cfg = _config(test_kit, str(tmp_path / "run"), str(test_kit.corpus_dir))
    run_stage(PrepareStage(), cfg)
    m = read_manifest(cfg.stage_url("prepare"), stage="prepare")
    tables = [pq.read_table(u) for u in m.shard_urls()]
    table = pa.concat_tables(tables)
    ids = table.column("doc_id").to_pylist()
    texts = table.column("text").to_pylist()
    assert len(ids) == len(set(ids)), "doc_ids must be unique"
    assert all(t.strip() for t in texts), "empty documents must be dropped"
    stats = {
        k: sum(s.stats.get(k, 0) for s in m.shards)
        for k in ("dropped_empty", "split_documents", "documents_out")
    }
    assert stats["dropped_empty"] >= 1
    assert stats["split_documents"] >= 1
    assert stats["documents_out"] == table.num_rows == m.rows
    limit = cfg.prepare.max_tokens
    for model in cfg.models:
        tok = load_tokenizer(model.tokenizer_path)
        lengths = [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]
        assert max(lengths) <= limit, (
            f"{model.name}: a document has {max(lengths)} > {limit} tokens"
        )

    # Pieces of a split document concatenate back to the original document.
    originals = {}
    for path in sorted(Path(test_kit.corpus_dir).glob("*.jsonl")):
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            originals[f"{path.name}:{line_no}"] = json.loads(line)["text"]
    pieces: dict[str, list[tuple[int, str]]] = {}
    for doc_id, text in zip(ids, texts, strict=True):
        base, _, k = doc_id.partition("#")
        if k:
            pieces.setdefault(base, []).append((int(k), text))
        else:
            assert originals[doc_id] == text
    assert pieces
    for base, parts in pieces.items():
        assert "".join(t for _, t in sorted(parts)) == originals[base]


def test_split_to_fit_with_real_tokenizers(test_kit: Any) -> None:
    toks = [load_tokenizer(str(m.path)) for m in (test_kit.target, *test_kit.sources)]
    encoders = [offsets_encoder(t) for t in toks]
    text = "Ünïcode ✓ and words\n" * 60 + "x" * 500 + " tail 😀😀😀"
    for limit in (5, 17, 64):
        pieces = split_to_fit(text, encoders, limit)
        assert "".join(pieces) == text
        for piece in pieces:
            for tok in toks:
                assert len(tok.encode(piece, add_special_tokens=False).ids) <= limit
    assert split_to_fit("short", encoders, 64) == ["short"]
    with pytest.raises(ValueError):
        split_to_fit("x", encoders, 0)


def test_formats_and_bad_input(ray_local: Any, test_kit: Any, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"body": ["first doc", "", "second doc"]}), corpus / "a.parquet")
    (corpus / "b.txt").write_text("a whole plain-text file is one document\n", encoding="utf-8")
    (corpus / "c.jsonl").write_text(json.dumps({"body": "json doc"}) + "\n", encoding="utf-8")
    (corpus / "ignored.csv").write_text("not a corpus file\n")
    cfg = _config(test_kit, str(tmp_path / "run"), str(corpus), text_field="body")
    run_stage(PrepareStage(), cfg)
    m = read_manifest(cfg.stage_url("prepare"), stage="prepare")
    rows = pa.concat_tables([pq.read_table(u) for u in m.shard_urls()]).to_pylist()
    assert rows == [
        {"doc_id": "a.parquet:0", "text": "first doc"},
        {"doc_id": "a.parquet:2", "text": "second doc"},
        {"doc_id": "b.txt", "text": "a whole plain-text file is one document\n"},
        {"doc_id": "c.jsonl:1", "text": "json doc"},
    ]

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    bad_cfg = _config(test_kit, str(tmp_path / "run2"), str(bad))
    with pytest.raises(InputDataError, match=r"x\.jsonl line 2: invalid UTF-8 \(byte 0xe9"):
        run_stage(PrepareStage(), bad_cfg)
    skipping = parse_config(_raw(bad_cfg), ["prepare.on_invalid_utf8=skip"])
    run_stage(PrepareStage(), skipping, overwrite=True)
    m = read_manifest(skipping.stage_url("prepare"), stage="prepare")
    assert m.rows == 1 and m.shards[0].stats["invalid_utf8_skipped"] == 1

    (bad / "x.jsonl").write_text('{"body": "wrong field"}\n')
    with pytest.raises(InputDataError, match=r"x\.jsonl line 1: no 'text' field"):
        run_stage(
            PrepareStage(), parse_config(_raw(bad_cfg), ["run_dir=" + str(tmp_path / "run3")])
        )


def _cli(*args: str, cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fusion_etl", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def test_cli_errors_are_messages_not_tracebacks(test_kit: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "doc.txt").write_bytes(b"line one\nline \xff two\n")
    job = tmp_path / "job.yaml"
    job.write_text(
        json.dumps(
            {
                "run_dir": str(tmp_path / "run"),
                "target": {"name": "target", "path": str(test_kit.target.path)},
                "prepare": {"input": str(bad), "block_size": 256},
                "ray": {"executor": "inline"},
            }
        )
    )
    proc = _cli("run", "prepare", "--config", str(job), cwd=tmp_path)
    assert proc.returncode == 2
    assert "doc.txt line 2: invalid UTF-8 (byte 0xff at column 6)" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _cli("run", "prepare", "--config", str(job), "prepare.block_size=x", cwd=tmp_path)
    assert (
        proc.returncode == 2 and "prepare.block_size: expected an integer, got 'x'" in proc.stderr
    )
    proc = _cli("run", "prepare", "--config", str(job), "prepare.block_size=4096", cwd=tmp_path)
    assert proc.returncode == 2
    assert "do not fit model 'target', whose context is 256 tokens" in proc.stderr
    proc = _cli(
        "run",
        "prepare",
        "--config",
        str(job),
        "target.path=" + str(tmp_path / "nomodel"),
        cwd=tmp_path,
    )
    assert (
        proc.returncode == 2
        and "no tokenizer found at" in proc.stderr
        and "Traceback" not in proc.stderr
    )


def test_killed_run_resumes_to_identical_output(test_kit: Any, tmp_path: Path) -> None:
    # Many small input files, one shard in flight at a time, so the kill lands mid-way.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [
        json.loads(line)["text"]
        for p in sorted(Path(test_kit.corpus_dir).glob("*.jsonl"))
        for line in p.read_text().splitlines()
    ]
    for i in range(40):
        lines = [json.dumps({"text": docs[(i * 7 + j) % len(docs)]}) for j in range(12)]
        (corpus / f"f{i:03d}.jsonl").write_text("\n".join(lines) + "\n")

    def job(run_dir: Path) -> Path:
        path = tmp_path / f"{run_dir.name}.yaml"
        cfg = _raw(_config(test_kit, str(run_dir), str(corpus)))
        cfg["ray"] = {"num_cpus": 2, "max_in_flight": 1}
        path.write_text(json.dumps(cfg))
        return path

    reference = tmp_path / "reference"
    assert _cli("run", "prepare", "--config", str(job(reference)), cwd=tmp_path).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fusion_etl", "run", "prepare", "--config", str(job(killed))],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes its local Ray down too
    )
    records = killed / "prepare" / "_shards"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(records.glob("*.json"))) < 3:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # A Ray worker already running a shard may still finish it (atomically) after the driver
    # died, until Ray's reaper ends it: count once the records stop changing.
    committed, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 3.0:
        now = len(list(records.glob("*.json")))
        if now != committed:
            committed, stable_since = now, time.monotonic()
        time.sleep(0.1)
    assert not (killed / "prepare" / "_SUCCESS").exists(), (
        "the run finished before the kill; make it longer"
    )
    assert 3 <= committed < 40

    resumed = _cli("run", "prepare", "--config", str(job(killed)), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{committed} already committed" in resumed.stderr
    ref = _shards(str(reference / "prepare"))
    got = _shards(str(killed / "prepare"))
    assert got == ref
    ref_m = read_manifest(str(reference / "prepare"), stage="prepare")
    got_m = read_manifest(str(killed / "prepare"), stage="prepare")
    assert [(s.name, s.rows, s.sha256) for s in got_m.shards] == [
        (s.name, s.rows, s.sha256) for s in ref_m.shards
    ]
    assert got_m.fingerprint != "" and got_m.fingerprint == _fingerprint_of(reference)


def _fingerprint_of(run_dir: Path) -> str:
    return str(json.loads((run_dir / "prepare" / "_manifest.json").read_text())["fingerprint"])
