"""Smoke tests of `fusion-etl bench quality` on the test kit: one seed, few variants, the real
stages (prepare, extract, align_fuse, train, merge, evaluate) in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _bench(test_kit: Any, tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "quality"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusion_etl",
            "bench",
            "quality",
            "--size",
            "test",
            "--kit-dir",
            str(test_kit.root),
            "--seeds",
            "0",
            "--out",
            str(out),
            # A smoke test: the paper's k and one pass, not the modes' tuned defaults.
            "--top-k",
            "10",
            "--epochs",
            "1",
            *args,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    mode = args[args.index("--mode") + 1]
    folder = out / mode
    for name in ("results.md", "results.json", "bits_per_byte.png", "training_curves.png"):
        assert (folder / name).exists(), name
    assert (folder / "bits_per_byte.png").read_bytes()[:4] == b"\x89PNG"
    result: dict[str, Any] = json.loads((folder / "results.json").read_text())
    assert result["mode"] == mode and result["domains"] == ["code", "prose", "scripture"]
    for row in result["rows"]:
        assert set(row) == {"variant", "seed", "model", "bits_per_byte", "average"}
        assert row["seed"] == 0
        assert set(row["bits_per_byte"]) == set(result["domains"])
        assert row["average"] == pytest.approx(sum(row["bits_per_byte"].values()) / 3)
        if row["variant"] == "ensemble":
            assert row["model"] is None
        else:
            assert (Path(row["model"]) / "config.json").exists(), row
    assert "Goals:" in (folder / "results.md").read_text()
    return result


def test_hetero_smoke(test_kit: Any, tmp_path: Path) -> None:
    result = _bench(
        test_kit,
        tmp_path,
        "--mode",
        "hetero",
        "--variants",
        "clm_only,min_ce_byte",
        "--align-method",
        "offsets",
        "--match",
        "boundary",
    )
    variants = {r["variant"] for r in result["rows"]}
    assert variants == {
        "base",
        "clm_only",
        "min_ce_byte",
        *(f"source:{m.name}" for m in test_kit.sources),
    }
    fusion = result["diagnostics"]["fusion"]["min_ce_byte"]
    assert set(fusion["matched_fraction"]) == {m.name for m in test_kit.sources}
    assert sum(fusion["candidate_share"].values()) == pytest.approx(1.0, abs=1e-3)
    # Training moved the targets away from the base.
    by = {r["variant"]: r["average"] for r in result["rows"]}
    assert by["clm_only"] != by["base"] and by["min_ce_byte"] != by["clm_only"]


def test_table7_smoke(test_kit: Any, tmp_path: Path) -> None:
    result = _bench(test_kit, tmp_path, "--mode", "table7", "--variants", "min_ce")
    variants = {r["variant"] for r in result["rows"]}
    assert {"base", "ensemble", "weight_merging", "min_ce"} <= variants
    assert {"source:src_code", "source:src_scripture", "source:src_prose"} <= variants
    assert {"merge:ties", "merge:sce", "merge:task_arithmetic"} <= variants
    # Same tokenizer everywhere: every target position takes every source's distribution.
    matched = result["diagnostics"]["fusion"]["min_ce"]["matched_fraction"]
    assert all(v == pytest.approx(1.0, abs=0.01) for v in matched.values()), matched
    # Each source trained on its own domain beats the base there.
    by = {r["variant"]: r["bits_per_byte"] for r in result["rows"]}
    for domain in ("code", "prose", "scripture"):
        assert by[f"source:src_{domain}"][domain] < by["base"][domain]
