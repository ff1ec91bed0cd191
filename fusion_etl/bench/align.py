"""`fusion-etl bench align`: on the same real documents of the tiny kit, the reference DTW in
the FuseLLM code's own shape (a numpy table filled in Python loops, one C `editdistance.eval`
per cell) against the compiled `dtw` and the linear `offsets` method (documents/s, tokens/s,
identical paths); the first-call cost of the compiled kernel in a fresh process; and the time
to map a ~32k vocabulary onto a ~50k one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusion_etl.bench.common import bench_kit, kit_args

__all__ = ["add_parser", "bench_align"]


def _reference_dtw() -> Callable[..., list[tuple[int, int]]]:
    """The reference-shaped DTW kept in the tests (a checkout and the dev extra are needed)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tests" / "align_reference.py"
    spec = importlib.util.spec_from_file_location("align_reference", path)
    if spec is None or spec.loader is None or not path.exists():
        raise SystemExit(f"bench align needs the reference DTW at {path} (run it from a checkout)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise SystemExit(
            f"bench align needs the dev extra for its baseline ({exc}): pip install -e '.[dev]'"
        ) from None
    fn: Callable[..., list[tuple[int, int]]] = module.editdistance_dtw
    return fn


_FIRST_CALL = """\
import time
started = time.perf_counter()
from fusion_etl.align.dtw import align_tokens
align_tokens(["a", "b"], ["a", "c"])
print(time.perf_counter() - started)
"""


def first_call_seconds(*, cold: bool) -> float:
    """Seconds from a fresh interpreter to its first DTW: imports plus loading the compiled
    kernel from numba's on-disk cache, or (`cold`) compiling it, as the first process on a
    new machine does."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as empty:
        if cold:
            env["NUMBA_CACHE_DIR"] = empty  # an empty cache: the kernel compiles
        out = subprocess.run(
            [sys.executable, "-c", _FIRST_CALL],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
    return float(out.stdout.strip().splitlines()[-1])


def bench_align(args: argparse.Namespace) -> int:
    from fusion_etl.align.dtw import bench_alignment
    from fusion_etl.align.vocab import bench_vocab_map
    from fusion_etl.tokenization import load_tokenizer

    kit = bench_kit(args)
    texts = [
        json.loads(line)["text"]
        for path in sorted(kit.corpus_dir.glob("*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    target = load_tokenizer(str(kit.target.path))
    pairs = []
    for text in texts:
        if not text.strip():
            continue
        t = target.encode(text, add_special_tokens=False)
        if not args.min_tokens <= len(t.ids) <= args.max_tokens:
            continue
        for source in kit.sources:
            s = load_tokenizer(str(source.path)).encode(text, add_special_tokens=False)
            pairs.append(
                (
                    list(s.tokens),
                    list(t.tokens),
                    [tuple(o) for o in s.offsets],
                    [tuple(o) for o in t.offsets],
                )
            )
        if len(pairs) >= args.docs:
            break
    print(
        f"alignment benchmark: {len(pairs)} document pairs (3 sources x target) of "
        f"{args.min_tokens}-{args.max_tokens} target tokens from the {args.size} kit\n"
    )
    reference = _reference_dtw()
    warm = first_call_seconds(cold=False)  # also fills the cache if this machine had none
    cold = first_call_seconds(cold=True)
    r = bench_alignment(pairs, reference, repeats=args.repeats)
    print(
        f"{'method':<28}{'docs/s':>10}{'tokens/s':>12}{'per cell':>11}{'speedup':>10}{'same path as reference':>25}"
    )
    print(
        f"{'reference (editdistance)':<28}{r['reference_docs_per_s']:>10.1f}{r['reference_tokens_per_s']:>12.0f}"
        f"{r['reference_us_per_cell']:>8.2f} µs{1.0:>9.0f}x{'':>25}"
    )
    print(
        f"{'dtw (compiled)':<28}{r['dtw_docs_per_s']:>10.1f}{r['dtw_tokens_per_s']:>12.0f}"
        f"{r['dtw_ns_per_cell']:>8.1f} ns{r['dtw_speedup']:>9.0f}x{r['dtw_matches_reference']:>24.1%}"
    )
    print(
        f"{'offsets':<28}{r['offsets_docs_per_s']:>10.1f}{r['offsets_tokens_per_s']:>12.0f}{'':>11}"
        f"{r['offsets_speedup']:>9.0f}x{r['offsets_matches_reference']:>24.1%}"
    )
    print(
        f"  {int(r['cells'])} cells; reference = FuseLLM's dtw shape (numpy table, Python loops, "
        "editdistance.eval per cell)"
    )
    print(
        f"  first DTW in a fresh process (imports + kernel): {warm:.2f} s from numba's cache, "
        f"{cold:.2f} s compiling (once per machine)"
    )
    print("  goal: dtw >= 200x the reference with identical paths on 100% of documents")
    if not args.no_vocab:
        v = bench_vocab_map(Path(args.kit_dir).parent / "vocab_bench")
        print(
            f"\nvocabulary map {int(v['source_size'])} -> {int(v['target_size'])} tokens: {v['seconds']:.1f} s "
            f"(exact {int(v['how_exact'])}, bytes {int(v['how_bytes'])}, special {int(v['how_special'])}, "
            f"mined {int(v['how_mined'])}, mean mined distance {v['mined_mean_distance']:.2f}); goal <= 60 s"
        )
    return 0


def add_parser(sub: Any) -> None:
    al = sub.add_parser(
        "align",
        help="reference DTW vs dtw vs offsets, and the vocabulary map time",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kit_args(al)
    al.add_argument("--docs", type=int, default=60, help="document pairs (default 60)")
    al.add_argument(
        "--min-tokens",
        type=int,
        default=300,
        help="shortest document in target tokens (default 300)",
    )
    al.add_argument(
        "--max-tokens",
        type=int,
        default=1000,
        help="longest document in target tokens (default 1000)",
    )
    al.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed repeats of the fast methods, best kept (default 3)",
    )
    al.add_argument("--no-vocab", action="store_true", help="skip the 32k x 50k vocabulary map")
    al.set_defaults(run=bench_align)
