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
            "prepare": {
                "input": corpus,
                "block_size": 128,
                "margin": 8,
                "shard_docs": 12,
                **prepare,
            },
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


def _rows(url: str) -> list[dict[str, Any]]:
    m = read_manifest(url, stage="prepare")
    rows: list[dict[str, Any]] = pa.concat_tables(
        [pq.read_table(u) for u in m.shard_urls()]
    ).to_pylist()
    return rows


def test_large_files_split_small_files_grouped(
    ray_local: Any, test_kit: Any, tmp_path: Path
) -> None:
    # A corpus of every kind of file: a large jsonl (blank lines inside), a gzipped jsonl of
    # long documents, a Parquet file of many row groups, small jsonl files and a text file.
    import gzip

    texts = [
        json.loads(line)["text"]
        for p in sorted(Path(test_kit.corpus_dir).glob("*.jsonl"))
        for line in p.read_text().splitlines()
    ]
    texts = [t for t in texts if t.strip()]
    corpus = tmp_path / "corpus"
    (corpus / "small").mkdir(parents=True)
    big = [json.dumps({"text": f"short document number {i}."}) for i in range(1500)]
    big[10] = big[700] = ""  # blank lines count as lines, so later line numbers stay true
    (corpus / "big.jsonl").write_text("\n".join(big) + "\n")
    with gzip.open(corpus / "long.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps({"text": texts[i % len(texts)]}) + "\n" for i in range(29))
        fh.write(json.dumps({"text": max(texts, key=len)}) + "\n")
    pq.write_table(
        pa.table({"text": [f"row {i}: {texts[i % len(texts)][:40]}" for i in range(45)]}),
        corpus / "rows.parquet",
        row_group_size=8,
    )
    for k in range(5):
        lines = [json.dumps({"text": f"small file {k} line {j}"}) for j in range(3)]
        (corpus / "small" / f"s{k}.jsonl").write_text("\n".join(lines) + "\n")
    (corpus / "zz.txt").write_text("one plain-text document", encoding="utf-8")
    n_docs = 1500 + 30 + 45 + 15 + 1

    cut = _config(test_kit, str(tmp_path / "cut"), str(corpus), shard_docs=400)
    assert run_stage(PrepareStage(), cut).complete
    whole = _config(
        test_kit, str(tmp_path / "whole"), str(corpus), shard_docs=10**6, shard_bytes=10**12
    )
    assert run_stage(PrepareStage(), whole).complete

    # The same documents with the same ids, however the corpus is cut.
    rows = _rows(cut.stage_url("prepare"))
    assert rows == _rows(whole.stage_url("prepare"))
    m = read_manifest(cut.stage_url("prepare"), stage="prepare")
    assert len(m.shards) == -(-n_docs // 400)
    assert all(s.stats["documents_in"] <= 400 for s in m.shards)
    assert sum(s.stats["documents_in"] for s in m.shards) == n_docs - 2  # the blank lines
    spans = [s.inputs for s in m.shards]
    assert sum(i.count(str(corpus / "big.jsonl")) for i in spans) == 4  # one file, four shards
    assert any(len(i) >= 3 for i in spans)  # the tail of one file and the heads of others
    # doc_ids name the document's own line (jsonl, 1-based) or row (Parquet, 0-based).
    by_id = {r["doc_id"]: r["text"] for r in rows}
    assert by_id["big.jsonl:12"] == "short document number 11."
    assert by_id["big.jsonl:1500"] == "short document number 1499."
    assert "big.jsonl:11" not in by_id and "big.jsonl:701" not in by_id
    assert by_id["rows.parquet:44"].startswith("row 44: ")
    assert by_id["small/s3.jsonl:2"] == "small file 3 line 1"
    assert by_id["zz.txt"] == "one plain-text document"
    # A long document cut into pieces: they follow its line number and rebuild it exactly.
    longest = max(texts, key=len)
    pieces = {d: t for d, t in by_id.items() if d.startswith("long.jsonl.gz:30#")}
    assert len(pieces) > 1
    assert "".join(pieces[f"long.jsonl.gz:30#{k}"] for k in range(len(pieces))) == longest
    # Written in runs: a shard of more than ROW_GROUP_DOCS documents has several row groups.
    from fusion_etl.stages.prepare import ROW_GROUP_DOCS

    one = read_manifest(whole.stage_url("prepare"), stage="prepare").shard_urls()
    assert len(one) == 1
    assert pq.ParquetFile(one[0]).metadata.num_row_groups == -(-(n_docs - 2) // ROW_GROUP_DOCS)


def test_a_rerun_does_not_scan_the_corpus_again(
    test_kit: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fusion_etl.stages import prepare

    cfg = parse_config(
        _raw(_config(test_kit, str(tmp_path / "run"), str(test_kit.corpus_dir))),
        ["ray.executor=inline"],
    )
    first = PrepareStage().plan(cfg)[0]
    assert run_stage(PrepareStage(), cfg).complete

    def no_scan(*args: Any) -> None:
        raise AssertionError("the corpus was scanned again")

    monkeypatch.setattr(prepare, "_scan_jsonl", no_scan)
    again = PrepareStage().plan(cfg)[0]
    assert again.items == first.items and again.fingerprint == first.fingerprint
    assert run_stage(PrepareStage(), cfg).ran == 0
    # Another configuration is planned afresh.
    with pytest.raises(AssertionError, match="scanned again"):
        PrepareStage().plan(parse_config(_raw(cfg), ["prepare.shard_docs=5"]))


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
    # Files of 3 to 93 lines cut into 40 shards of 12 documents (large files split, small ones
    # grouped), one shard in flight at a time, so the kill lands mid-way.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [
        json.loads(line)["text"]
        for p in sorted(Path(test_kit.corpus_dir).glob("*.jsonl"))
        for line in p.read_text().splitlines()
    ]
    sizes = [93, 3, 5, 60, 4, 7, 90, 3, 3, 100, 50, 62]
    assert sum(sizes) == 40 * 12
    for i, n in enumerate(sizes):
        lines = [json.dumps({"text": docs[(i * 7 + j) % len(docs)]}) for j in range(n)]
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
    assert (killed / "prepare" / "_plan.json").exists()

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
    assert len(got_m.shards) == 40
    spans = [s.inputs for s in got_m.shards]
    assert any(len(i) > 1 for i in spans) and any(spans.count(i) > 1 for i in spans)


def _fingerprint_of(run_dir: Path) -> str:
    return str(json.loads((run_dir / "prepare" / "_manifest.json").read_text())["fingerprint"])
