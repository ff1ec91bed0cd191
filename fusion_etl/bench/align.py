"""`fusion-etl bench align`: on the same real documents of the tiny kit, the pure-Python
reference DTW against the vectorised `dtw` and the linear `offsets` method (documents/s,
tokens/s, identical paths), and the time to map a ~32k vocabulary onto a ~50k one.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusion_etl.bench.common import bench_kit, kit_args

__all__ = ["add_parser", "bench_align"]


def _reference_dtw() -> Callable[..., list[tuple[int, int]]]:
    """The pure-Python reference DTW kept in the tests (a checkout is needed for it)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tests" / "align_reference.py"
    spec = importlib.util.spec_from_file_location("align_reference", path)
    if spec is None or spec.loader is None or not path.exists():
        raise SystemExit(f"bench align needs the reference DTW at {path} (run it from a checkout)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn: Callable[..., list[tuple[int, int]]] = module.reference_dtw
    return fn


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
    r = bench_alignment(pairs, _reference_dtw(), repeats=args.repeats)
    print(
        f"{'method':<22}{'docs/s':>10}{'tokens/s':>12}{'speedup':>10}{'same path as reference':>25}"
    )
    print(
        f"{'reference (Python)':<22}{r['reference_docs_per_s']:>10.1f}{r['reference_tokens_per_s']:>12.0f}{1.0:>9.0f}x{'':>25}"
    )
    print(
        f"{'dtw':<22}{r['dtw_docs_per_s']:>10.1f}{r['dtw_tokens_per_s']:>12.0f}{r['dtw_speedup']:>9.0f}x{r['dtw_matches_reference']:>24.1%}"
    )
    print(
        f"{'offsets':<22}{r['offsets_docs_per_s']:>10.1f}{r['offsets_tokens_per_s']:>12.0f}{r['offsets_speedup']:>9.0f}x{r['offsets_matches_reference']:>24.1%}"
    )
    print("  goal: dtw >= 100x the reference with identical paths on 100% of documents")
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
