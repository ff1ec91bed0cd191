"""The align_fuse stage end to end on the tiny kit: real extract outputs, real Ray tasks."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusion_etl.config import PipelineConfig
from fusion_etl.errors import FingerprintMismatchError, InputDataError
from fusion_etl.manifest import read_manifest
from fusion_etl.runner import run_stage
from fusion_etl.schema import VOCAB_MAP, align_fuse_schema, footer_metadata
from fusion_etl.stages.align_fuse import AlignFuseStage
from fusion_etl.tokenization import load_tokenizer
from tests.conftest import kit_config

pytestmark = pytest.mark.slow


def _cfg(kit: Any, run_dir: Path, *overrides: str) -> PipelineConfig:
    cfg: PipelineConfig = kit_config(kit, run_dir, *overrides)
    return cfg


@pytest.fixture
def extracted(extracted_run: Path) -> Path:
    return extracted_run


def _copy(extracted: Path, tmp_path: Path, name: str) -> Path:
    run_dir = tmp_path / name
    for stage in ("prepare", "extract"):
        shutil.copytree(extracted / stage, run_dir / stage)
    return run_dir


def _table(url: str) -> pa.Table:
    m = read_manifest(url, stage="x")
    return pa.concat_tables([pq.read_table(u) for u in m.shard_urls()])


def test_align_fuse_outputs(extracted: Path, tmp_path: Path, test_kit: Any) -> None:
    run_dir = _copy(extracted, tmp_path, "fuse")
    cfg = _cfg(test_kit, run_dir)
    result = run_stage(AlignFuseStage(), cfg)
    assert result.complete and result.ran == result.total > 0
    fused = _table(str(run_dir / "align_fuse"))
    assert fused.schema.remove_metadata() == align_fuse_schema(5)
    target = _table(str(run_dir / "extract" / "target"))
    assert fused.column("doc_id").equals(target.column("doc_id"))
    assert fused.column("input_ids").equals(target.column("input_ids"))

    n_sources = len(cfg.sources)
    ce = {
        m.name: (
            lambda t: (
                t.column("nll").to_numpy() / np.maximum(t.column("num_tokens").to_numpy() - 1, 1)
            )
        )(_table(str(run_dir / "extract" / m.name)))
        for m in cfg.models
    }
    ce_matrix = np.stack([ce[m.name] for m in cfg.models], axis=1)
    for d, row in enumerate(fused.to_pylist()):
        n = len(row["input_ids"])
        assert len(row["fused_ids"]) == len(row["fused_probs"]) == n
        probs = np.asarray(row["fused_probs"])
        ids = np.asarray(row["fused_ids"])
        assert (probs >= 0).all() and (probs.sum(axis=1) <= 1 + 1e-5).all()
        assert (np.diff(probs, axis=1) <= 1e-7).all()
        assert ((ids == -1) == (probs == 0)).all()
        assert probs[:-1].sum(axis=1).min() > 0  # every position with a next token has mass
        weights = row["source_weights"]
        assert len(weights) == 1 + n_sources
        # MinCE per sequence: a one-hot on the model with the lowest CE on this document.
        assert weights == [
            1.0 if i == int(np.argmin(ce_matrix[d])) else 0.0 for i in range(1 + n_sources)
        ]
        assert len(row["matched_fraction"]) == n_sources
        assert all(0.0 <= f <= 1.0 for f in row["matched_fraction"])
    matched = np.array(fused.column("matched_fraction").to_pylist())
    assert matched.mean() > 0.3, "different tokenizers of one text should still match often"
    for m in cfg.sources:
        vm = pq.read_table(run_dir / "vocab_map" / f"{m.name}.parquet")
        assert vm.schema.remove_metadata() == VOCAB_MAP
        assert vm.num_rows == load_tokenizer(m.tokenizer_path).get_vocab_size(
            with_added_tokens=True
        )
        assert set(vm.column("how").to_pylist()) <= {"exact", "bytes", "special", "mined"}

    # A second run does nothing; the vocabulary maps are reused, not rebuilt.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (run_dir / "vocab_map").glob("*.parquet")}
    assert run_stage(AlignFuseStage(), cfg).ran == 0
    with pytest.raises(FingerprintMismatchError, match=r"align_fuse\.fusion: 'min_ce' -> 'avg_ce'"):
        run_stage(AlignFuseStage(), _cfg(test_kit, run_dir, "align_fuse.fusion=avg_ce"))
    avg = _cfg(test_kit, run_dir, "align_fuse.fusion=avg_ce", "align_fuse.align_method=offsets")
    assert run_stage(AlignFuseStage(), avg, overwrite=True).complete
    assert mtimes == {
        p.name: p.stat().st_mtime_ns for p in (run_dir / "vocab_map").glob("*.parquet")
    }
    avg_table = _table(str(run_dir / "align_fuse"))
    w = np.array(avg_table.column("source_weights").to_pylist())
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)
    expected = np.exp(-ce_matrix) / np.exp(-ce_matrix).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(w, expected, rtol=1e-4)


@pytest.mark.parametrize(
    ("method", "match"), [("dtw", "token"), ("offsets", "token"), ("offsets", "boundary")]
)
def test_a_source_identical_to_the_target_reproduces_the_target(
    extracted: Path, tmp_path: Path, test_kit: Any, method: str, match: str
) -> None:
    # The target once more, as a source under another name: the alignment is the diagonal, the
    # vocabulary map the identity, every position matches, the CEs tie (the target, first,
    # wins MinCE), and the fused distributions are the target's own top-k, exactly.
    run_dir = _copy(extracted, tmp_path, f"identity-{method}-{match}")
    shutil.copytree(run_dir / "extract" / "target", run_dir / "extract" / "twin")
    cfg = _cfg(
        test_kit,
        run_dir,
        f"sources=[{{name: twin, path: {test_kit.target.path}}}]",
        f"align_fuse.align_method={method}",
        f"align_fuse.match={match}",
    )
    assert run_stage(AlignFuseStage(), cfg).complete
    fused = _table(str(run_dir / "align_fuse"))
    target = _table(str(run_dir / "extract" / "target"))
    if match == "token":
        assert fused.column("matched_fraction").to_pylist() == [[1.0]] * fused.num_rows
    else:
        # Every position but the last (nothing follows it) shares its end with its twin.
        lengths = [len(ids) for ids in fused.column("input_ids").to_pylist()]
        got = [f[0] for f in fused.column("matched_fraction").to_pylist()]
        assert got == pytest.approx([(n - 1) / n for n in lengths], rel=1e-6)
    assert fused.column("source_weights").to_pylist() == [[1.0, 0.0]] * fused.num_rows
    for got, want_ids, want_lp in zip(
        fused.to_pylist(),
        target.column("topk_ids").to_pylist(),
        target.column("topk_logprobs").to_pylist(),
        strict=True,
    ):
        # Row by row the same id -> probability; the order of ids whose float16 log-probs are
        # equal is free (fusion puts the lower id first).
        for g_ids, g_p, w_ids, w_lp in zip(
            got["fused_ids"], got["fused_probs"], want_ids, want_lp, strict=True
        ):
            assert sorted(g_ids) == sorted(w_ids)
            want = dict(zip(w_ids, np.exp(np.asarray(w_lp, dtype=np.float64)), strict=True))
            assert np.allclose([want[i] for i in g_ids], g_p, rtol=1e-6)
            assert list(g_p) == sorted(g_p, reverse=True)
    vm = pq.read_table(run_dir / "vocab_map" / "twin.parquet")
    assert vm.column("target_id").to_pylist() == vm.column("source_id").to_pylist()


def test_boundary_matching_pairs_more_positions_than_equal_tokens(
    extracted: Path, tmp_path: Path, test_kit: Any
) -> None:
    # The kit's sources tokenize differently from the target: equal 1:1 tokens are a fraction
    # of the positions, while tokens that end at the same character (word ends at least) are
    # many more.
    fractions = {}
    tables = {}
    for match in ("token", "boundary"):
        run_dir = _copy(extracted, tmp_path, f"match-{match}")
        cfg = _cfg(
            test_kit, run_dir, "align_fuse.align_method=offsets", f"align_fuse.match={match}"
        )
        assert run_stage(AlignFuseStage(), cfg).complete
        tables[match] = _table(str(run_dir / "align_fuse"))
        fractions[match] = np.array(tables[match].column("matched_fraction").to_pylist())
    lengths = np.array([len(x) for x in tables["token"].column("input_ids").to_pylist()])
    token = (fractions["token"] * lengths[:, None]).sum(axis=0) / lengths.sum()
    boundary = (fractions["boundary"] * lengths[:, None]).sum(axis=0) / lengths.sum()
    assert (boundary > token + 0.1).all(), (token, boundary)
    assert (boundary > 0.6).all(), boundary


def test_doc_ids_must_line_up(extracted: Path, tmp_path: Path, test_kit: Any) -> None:
    run_dir = _copy(extracted, tmp_path, "mismatch")
    cfg = _cfg(test_kit, run_dir)
    source = cfg.sources[0].name
    shard = run_dir / "extract" / source / "part-00000.parquet"
    table = pq.read_table(shard)
    # The footer's fusion_etl.* metadata (k, dtype, tokenizer) kept: only the order changes.
    footer = footer_metadata(pq.ParquetFile(shard))
    reordered = table.take(np.arange(table.num_rows)[::-1].copy())
    pq.write_table(reordered.replace_schema_metadata(footer), shard)
    with pytest.raises(InputDataError, match=rf"doc_ids of source '{source}' do not line up"):
        run_stage(AlignFuseStage(), cfg)
