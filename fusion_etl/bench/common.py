"""What every benchmark shares: the kit, documents from its corpus, timing, arguments."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["bench_kit", "corpus_docs", "kit_args", "timed"]


def kit_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kit-dir", default="runs/bench/kit", help="where the tiny model kit is (built if missing)"
    )
    parser.add_argument(
        "--size", choices=["demo", "test"], default="demo", help="kit size (default demo)"
    )


def bench_kit(args: argparse.Namespace) -> Any:
    """The kit the arguments name, built if missing."""
    from fusion_etl.kit import build_kit

    return build_kit(
        args.kit_dir, size=args.size, seed=0, log=lambda m: print(f"  kit: {m}", flush=True)
    )


def corpus_docs(
    model_dir: Path, corpus_dir: Path, n_docs: int, max_tokens: int
) -> list[npt.NDArray[np.int32]]:
    """The first `n_docs` corpus documents of at least 8 tokens, cut to `max_tokens`."""
    from fusion_etl.tokenization import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    texts = [
        json.loads(line)["text"]
        for path in sorted(corpus_dir.glob("*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    texts = [t for t in texts if t.strip()]
    out = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids = enc.ids[:max_tokens]
        if len(ids) >= 8:
            out.append(np.asarray(ids, dtype=np.int32))
        if len(out) == n_docs:
            break
    return out


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `repeats` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)
