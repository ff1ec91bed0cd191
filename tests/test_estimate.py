"""`fusion-etl plan --estimate`: the cost model's arithmetic, its estimates against what the
stages really produce on the test kit, and its handling of inputs it cannot read."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from fusion_etl.cli import main
from fusion_etl.config import parse_config
from fusion_etl.errors import ConfigError, UserError
from fusion_etl.estimate import (
    Estimate,
    Row,
    estimate,
    extract_bytes_per_token,
    forward_seconds,
    render,
    train_seconds,
    train_steps,
)
from fusion_etl.manifest import read_manifest
from tests.conftest import kit_config

JOBS = Path(__file__).parent.parent / "jobs"


def test_flop_model() -> None:
    # 1B tokens through a 7B model: 1.4e19 FLOPs at 2 per parameter per token, 4.2e19 to train.
    assert forward_seconds(1e9, 7e9, flops=1e14, mfu=0.5, overhead=1.0) == pytest.approx(2.8e5)
    assert forward_seconds(1e9, 7e9, flops=1e14, mfu=0.5, overhead=1.1) == pytest.approx(3.08e5)
    assert train_seconds(1e9, 7e9, flops=1e14, mfu=0.5, overhead=1.0) == pytest.approx(8.4e5)
    # bench extract measured 22.9 bytes/token at k=10 with float16 log-probs, 56.8 with float32.
    assert extract_bytes_per_token(10, "float16") == pytest.approx(22.9)
    assert extract_bytes_per_token(10, "float32") == pytest.approx(56.9)
    # 1000 blocks of 2048 over a global batch of 128 blocks: 8 steps per epoch.
    tokens = 1000 * 2048
    steps = train_steps(tokens, block_size=2048, micro_batch=1, grad_accum=16, workers=8, epochs=2)
    assert steps == 16


def by_stage(result: Estimate) -> dict[tuple[str, str], Row]:
    return {(r.stage, r.model): r for r in result.rows}


@pytest.mark.slow
def test_estimate_before_and_after_the_stages_run(test_kit: Any, tmp_path: Path) -> None:
    from fusion_etl.runner import run_stage
    from fusion_etl.stages.extract import ExtractStage
    from fusion_etl.stages.prepare import PrepareStage

    cfg = kit_config(test_kit, tmp_path / "run", "ray.executor=inline")
    before = by_stage(estimate(cfg))
    assert run_stage(PrepareStage(), cfg).complete
    assert run_stage(ExtractStage(), cfg).complete
    prepared = read_manifest(str(tmp_path / "run" / "prepare"), stage="prepare")
    after = by_stage(estimate(cfg))

    # Before: the whole (small) corpus fits the sample, so only the split factor is sampled.
    row = before[("prepare", "")]
    # Cut every prepare.shard_docs documents or shard_bytes of text: the rule prepare follows.
    assert row.shards is not None and row.shards.source == "e"
    assert row.shards.value == len(prepared.shards)
    assert row.documents is not None and row.documents.source == "s"
    assert row.documents.value == pytest.approx(prepared.rows, rel=0.05)
    for model in cfg.models:
        done = read_manifest(str(tmp_path / "run" / "extract" / model.name), stage="extract")
        tokens = sum(s.stats["tokens"] for s in done.shards)
        guess = before[("extract", model.name)]
        assert guess.tokens is not None and guess.tokens.source == "s"
        assert guess.tokens.value == pytest.approx(tokens, rel=0.05), model.name
        assert guess.cpu_hours is not None and guess.gpu_hours is None  # no GPUs asked for
        # After: the finished stages' own records.
        seen = after[("extract", model.name)]
        assert seen.tokens is not None and seen.tokens.source == "m"
        assert seen.tokens.value == tokens
        assert seen.stored_bytes is not None and seen.stored_bytes.source == "m"
        assert seen.stored_bytes.value == done.bytes
        assert seen.cpu_hours is not None and seen.cpu_hours.source == "m"
        assert seen.cpu_hours.value == pytest.approx(sum(s.seconds for s in done.shards) / 3600)
    row = after[("prepare", "")]
    assert row.documents is not None and row.documents.value == prepared.rows
    assert row.documents.source == "m"
    assert row.stored_bytes is not None and row.stored_bytes.value == prepared.bytes
    # Training from the target's tokens: the same optimizer-step arithmetic as the trainer's.
    train = after[("train", "target")]
    target_tokens = after[("extract", "target")].tokens
    assert train.tokens is not None and target_tokens is not None
    assert train.tokens.value == target_tokens.value * cfg.train.epochs


def write_gzip_corpus(path: Path, docs: int) -> int:
    """A gzip jsonl corpus of `docs` short documents (none long enough to be split); returns
    its UTF-8 text bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    total = 0
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for i in range(docs):
            text = f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (1 + i % 3)
            total += len(text.encode("utf-8"))
            fh.write(json.dumps({"text": text}) + "\n")
    return total


def test_a_compressed_corpus_larger_than_the_sample(test_kit: Any, tmp_path: Path) -> None:
    text_bytes = write_gzip_corpus(tmp_path / "corpus" / "part.jsonl.gz", 20_000)
    cfg = kit_config(
        test_kit,
        tmp_path / "run",
        f"prepare.input={tmp_path / 'corpus'}",
        "estimate.sample_bytes=200000",
    )
    row = by_stage(estimate(cfg))[("prepare", "")]
    # A tenth of the text is read: the compressed bytes it took scale it to the whole file.
    assert row.documents is not None and row.documents.source == "s"
    assert row.documents.value == pytest.approx(20_000, rel=0.1)
    extract = by_stage(estimate(cfg))[("extract", "target")]
    assert extract.tokens is not None
    assert extract.tokens.value > text_bytes / 20  # tokenized here, not a placeholder


def test_an_unreadable_corpus_needs_given_figures(test_kit: Any, tmp_path: Path) -> None:
    missing = f"prepare.input={tmp_path / 'nowhere'}"
    with pytest.raises(
        UserError, match=r"set estimate\.corpus_documents and estimate\.corpus_bytes"
    ):
        estimate(kit_config(test_kit, tmp_path / "run", missing))
    cfg = kit_config(
        test_kit,
        tmp_path / "run",
        missing,
        "estimate.corpus_documents=1000",
        "estimate.corpus_bytes=4000000",
        "estimate.corpus_files=3",
        "estimate.bytes_per_token=4.0",
    )
    result = estimate(cfg)
    row = by_stage(result)[("prepare", "")]
    # 1,000 documents at prepare.shard_docs=12 (the kit config's) documents per shard.
    assert row.shards is not None and (row.shards.value, row.shards.source) == (84, "e")
    extract = by_stage(result)[("extract", "target")]
    # No text to tokenize: bytes_per_token (the default, so "assumed") plus one EOS each.
    assert extract.tokens is not None and extract.tokens.source == "a"
    assert extract.tokens.value == pytest.approx(4_000_000 / 4.0 + 1000)
    assert any("cannot be read from here" in n for n in result.notes)


def test_models_without_config_json_use_given_parameters(test_kit: Any, tmp_path: Path) -> None:
    moved = tmp_path / "target_tokenizer_only"
    shutil.copytree(test_kit.target.path, moved)
    (moved / "config.json").unlink()
    cfg = kit_config(test_kit, tmp_path / "run", f"target.path={moved}")
    rows = by_stage(estimate(cfg))
    assert rows[("extract", "target")].cpu_hours is None
    cfg = kit_config(
        test_kit, tmp_path / "run", f"target.path={moved}", "estimate.parameters={target: 1.0e6}"
    )
    hours = by_stage(estimate(cfg))[("extract", "target")].cpu_hours
    assert hours is not None and hours.source == "e"


def test_estimate_settings_are_checked() -> None:
    base = {"run_dir": "/tmp/r", "target": {"name": "t", "path": "/m"}}
    with pytest.raises(ConfigError, match=r"estimate\.extract_mfu: is a fraction"):
        parse_config(base, ["estimate.extract_mfu=35"])
    with pytest.raises(ConfigError, match=r"estimate\.corpus_documents: set both"):
        parse_config(base, ["estimate.corpus_documents=10"])
    with pytest.raises(ConfigError, match=r"estimate\.gpu_flops: must be positive"):
        parse_config(base, ["estimate.gpu_flops=0"])


def test_cli_estimates_the_paper_job_without_its_corpus_or_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Local stand-ins for the job's s3:// run_dir and corpus, so that nothing leaves the
    # machine: the figures come from the job's estimate: section.
    code = main(
        [
            "plan",
            "--estimate",
            "--config",
            str(JOBS / "paper_gpu.yaml"),
            f"run_dir={tmp_path / 'run'}",
            f"prepare.input={tmp_path / 'corpus'}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    lines = {
        line.split()[0] + " " + line.split()[1]: line
        for line in out.splitlines()
        if line[:1].isalpha() and len(line.split()) > 1
    }
    assert "1.00M" in lines["extract llama2_7b"] and "GiB e" in lines["extract llama2_7b"]
    assert "optimizer steps" in lines["train llama2_7b"]
    assert "1.41k tasks e" in lines["prepare -"]  # 5.9 GB in shards of 4 MiB
    assert "sources: m measured" in out and "wall clock: train:" in out
    # Unreadable and nothing given: one error line, exit 2.
    code = main(
        [
            "plan",
            "--estimate",
            "--config",
            str(JOBS / "demo.yaml"),
            f"run_dir={tmp_path / 'run2'}",
            f"prepare.input={tmp_path / 'corpus'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: prepare.input cannot be read from here")


def test_render_marks_every_figure() -> None:
    from fusion_etl.estimate import Figure

    text = render(
        Estimate(
            rows=(
                Row("extract", "m1", tokens=Figure(2.5e9, "s"), gpu_hours=Figure(12.0, "e")),
                Row("train", "m1", gpu_hours=Figure(3.0, "e"), cpu_hours=Figure(0.001, "m")),
            )
        ),
        title="t",
    )
    assert "2.50B s" in text and "12 e" in text and "(3.6 s) m" in text
    assert "15 e" in text.splitlines()[-2] or any("15 e" in line for line in text.splitlines())
