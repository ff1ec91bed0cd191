"""Benchmarks: speed and size targets, measured side by side in one run, printed as ratios.

    fusion-etl bench extract [--size demo|test] [--docs N]
    fusion-etl bench align [--size demo|test] [--docs N]
    fusion-etl bench train [--size demo|test] [--steps N]

`align`: on the same real documents of the tiny kit, the pure-Python reference DTW against the
vectorised `dtw` and the linear `offsets` method (documents/s, tokens/s, identical paths), and
the time to map a ~32k vocabulary onto a ~50k one.

`train`: step time and peak memory of fusion training (lambda 0.9, sparse top-k targets)
against CLM-only training (lambda 1) of the same model on the same batch, each variant in a
fresh process, alternated.

`extract`: for each backend, extraction tokens/s (scoring + top-k + Arrow + Parquet) against
bare forward tokens/s of the same model on the same batches, and stored bytes per token at
k=10 after Parquet compression, with the float16 rounding error of the stored log-probs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["main"]


def _docs(
    model_dir: Path, corpus_dir: Path, n_docs: int, max_tokens: int
) -> list[npt.NDArray[np.int32]]:
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


def _timed(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _table_bytes(
    docs: list[npt.NDArray[np.int32]], scored: Any, k: int, dtype: str
) -> tuple[int, dict[str, int]]:
    import pyarrow.parquet as pq

    from fusion_etl.schema import parquet_bytes
    from fusion_etl.stages.extract import scored_to_table

    table = scored_to_table(
        [f"d{i}" for i in range(len(docs))],
        docs,
        np.array([4 * len(d) for d in docs]),
        scored,
        k=k,
        logprob_dtype=dtype,
    )
    data = parquet_bytes(table)
    import io

    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    per_col: dict[str, int] = {}
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(rg).column(c)
            name = col.path_in_schema.split(".")[0]
            per_col[name] = per_col.get(name, 0) + col.total_compressed_size
    return len(data), per_col


def bench_transformers(
    model_dir: Path, docs: list[npt.NDArray[np.int32]], k: int, repeats: int
) -> dict[str, Any]:
    import torch

    from fusion_etl.backends.transformers_backend import TransformersScorer
    from fusion_etl.schema import parquet_bytes
    from fusion_etl.stages.extract import scored_to_table

    scorer = TransformersScorer(str(model_dir), top_k=k, dtype="float32", batch_tokens=8192)
    tokens = sum(len(d) for d in docs)
    _, batches = scorer.batches(docs)

    def bare() -> None:
        # The same padded batches through the model, logits only: the floor for extraction.
        for batch in batches:
            ids, mask = scorer.pad(batch)
            with torch.inference_mode():
                scorer.model(input_ids=ids, attention_mask=mask).logits.float()

    def extract() -> None:
        scored = scorer.score(docs)
        parquet_bytes(
            scored_to_table(
                [str(i) for i in range(len(docs))],
                docs,
                np.zeros(len(docs), np.int64),
                scored,
                k=k,
                logprob_dtype="float16",
            )
        )

    bare()  # warm up
    extract()
    t_bare = _timed(bare, repeats)
    t_extract = _timed(extract, repeats)
    scored = scorer.score(docs)
    size16, cols16 = _table_bytes(docs, scored, k, "float16")
    size32, _ = _table_bytes(docs, scored, k, "float32")
    lp = scored.topk_logprobs
    rel = np.abs(lp.astype(np.float16).astype(np.float32) - lp) / np.maximum(np.abs(lp), 1e-30)
    return {
        "tokens": tokens,
        "bare_tok_s": tokens / t_bare,
        "extract_tok_s": tokens / t_extract,
        "bytes_per_token_fp16": size16 / tokens,
        "bytes_per_token_fp32": size32 / tokens,
        "bytes_per_token_by_column": {c: round(b / tokens, 2) for c, b in cols16.items()},
        "fp16_max_relative_error": float(rel[np.abs(lp) > 6e-5].max()),
    }


def _vllm_worker(model_dir: str, docs_file: str, k: int, repeats: int) -> None:
    """Runs in its own process: vLLM pins threads in the process that creates the engine."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from fusion_etl.backends.vllm_backend import VllmScorer
    from fusion_etl.schema import parquet_bytes
    from fusion_etl.stages.extract import scored_to_table

    data = np.load(docs_file, allow_pickle=False)
    lengths = data["lengths"]
    flat = data["ids"]
    docs = np.split(flat, np.cumsum(lengths)[:-1])
    scorer = VllmScorer(model_dir, top_k=k, dtype="float32")
    prompts = [TokensPrompt(prompt_token_ids=d.tolist()) for d in docs]
    plain = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)

    def bare() -> None:
        scorer.llm.generate(prompts, plain, use_tqdm=False)

    def extract() -> None:
        scored = scorer.score(list(docs))
        parquet_bytes(
            scored_to_table(
                [str(i) for i in range(len(docs))],
                list(docs),
                np.zeros(len(docs), np.int64),
                scored,
                k=k,
                logprob_dtype="float16",
            )
        )

    bare()
    extract()
    tokens = int(lengths.sum())
    result = {
        "tokens": tokens,
        "bare_tok_s": tokens / _timed(bare, repeats),
        "extract_tok_s": tokens / _timed(extract, repeats),
    }
    print("RESULT " + json.dumps(result), flush=True)


def bench_vllm(
    model_dir: Path, docs: list[npt.NDArray[np.int32]], k: int, repeats: int, workdir: Path
) -> dict[str, Any]:
    docs_file = workdir / "bench_docs.npz"
    np.savez(docs_file, ids=np.concatenate(docs), lengths=np.array([len(d) for d in docs]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusion_etl.bench",
            "_vllm",
            str(model_dir),
            str(docs_file),
            str(k),
            str(repeats),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    raise RuntimeError(f"vLLM benchmark failed:\n{proc.stderr[-3000:]}")


def bench_extract(args: argparse.Namespace) -> int:
    from fusion_etl.kit import build_kit

    kit = build_kit(
        args.kit_dir, size=args.size, seed=0, log=lambda m: print(f"  kit: {m}", flush=True)
    )
    model = kit.target
    context = json.loads((model.path / "config.json").read_text()).get(
        "max_position_embeddings", args.max_tokens + 1
    )
    # vLLM's generated step (the distribution after the last token) needs one slot of context.
    docs = _docs(model.path, kit.corpus_dir, args.docs, min(args.max_tokens, int(context) - 1))
    print(
        f"extract benchmark: model {model.name} ({model.architecture}), {len(docs)} documents, "
        f"{sum(len(d) for d in docs)} tokens, k={args.k}, {args.repeats} timed repeats (median)\n"
    )
    tf = bench_transformers(model.path, docs, args.k, args.repeats)
    rows = [("transformers", tf)]
    if not args.no_vllm:
        rows.append(
            ("vllm", bench_vllm(model.path, docs, args.k, args.repeats, Path(args.kit_dir)))
        )
    print(f"{'backend':<14}{'bare fwd tok/s':>16}{'extract tok/s':>16}{'overhead':>10}")
    for name, r in rows:
        print(
            f"{name:<14}{r['bare_tok_s']:>16.0f}{r['extract_tok_s']:>16.0f}{r['bare_tok_s'] / r['extract_tok_s']:>9.2f}x"
        )
    print(
        f"\nstored bytes/token at k={args.k} (Parquet, zstd): {tf['bytes_per_token_fp16']:.1f} with float16 log-probs, "
        f"{tf['bytes_per_token_fp32']:.1f} with float32"
    )
    print(
        "  by column (float16): "
        + ", ".join(f"{c} {b}" for c, b in tf["bytes_per_token_by_column"].items())
    )
    print(
        f"  float16 storage: max relative error {tf['fp16_max_relative_error']:.2e} (float16 rounding bound 4.9e-04)"
    )
    print("  goals: transformers overhead <= 1.15x; <= 30 bytes/token/source at k=10")
    return 0


def _reference_dtw() -> Callable[..., list[tuple[int, int]]]:
    """The pure-Python reference DTW kept in the tests (a checkout is needed for it)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "tests" / "align_reference.py"
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
    from fusion_etl.kit import build_kit
    from fusion_etl.tokenization import load_tokenizer

    kit = build_kit(
        args.kit_dir, size=args.size, seed=0, log=lambda m: print(f"  kit: {m}", flush=True)
    )
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


def _train_worker(model_dir: str, lam: float, block: int, batch: int, k: int, steps: int) -> None:
    """One variant in its own process: median step time and peak memory over the baseline."""
    import resource

    import torch
    from transformers import AutoModelForCausalLM

    from fusion_etl.train.loss import IGNORE, fusion_loss

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = model.to(device)
    model.train()
    vocab = model.config.vocab_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, block), generator=g).to(device)
    labels = torch.cat([ids[:, 1:], torch.full((batch, 1), IGNORE, device=device)], dim=1)
    fused_ids = torch.randint(0, vocab, (batch, block, k), generator=g).to(device)
    fused_probs = torch.rand(batch, block, k, generator=g).to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        fusion_loss(logits, labels, fused_ids, fused_probs, lam).total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    # The baseline is taken before any step: peak RSS only grows, so everything a step
    # allocates (activations, logits, gradients, the loss, optimizer state) counts above it.
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()  # warm-up, not timed
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(
        "RESULT "
        + json.dumps(
            {"step_s": statistics.median(times), "peak_extra_bytes": peak, "device": device}
        ),
        flush=True,
    )


def bench_train(args: argparse.Namespace) -> int:
    from fusion_etl.kit import build_kit

    kit = build_kit(
        args.kit_dir, size=args.size, seed=0, log=lambda m: print(f"  kit: {m}", flush=True)
    )
    model_dir = str(kit.target.path)
    vocab = int(json.loads((kit.target.path / "config.json").read_text())["vocab_size"])
    runs: dict[str, list[dict[str, Any]]] = {"clm": [], "fusion": []}
    for _ in range(args.rounds):
        for name, lam in (("clm", 1.0), ("fusion", 0.9)):
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "fusion_etl.bench",
                    "_train",
                    model_dir,
                    str(lam),
                    str(args.block),
                    str(args.batch),
                    str(args.k),
                    str(args.steps),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"train benchmark ({name}) failed:\n{proc.stderr[-3000:]}")
            runs[name].append(json.loads(line[len("RESULT ") :]))
    med = {
        n: {key: statistics.median(r[key] for r in rs) for key in ("step_s", "peak_extra_bytes")}
        for n, rs in runs.items()
    }
    device = runs["clm"][0]["device"]
    print(
        f"train benchmark on {device}: {kit.target.architecture} target, batch {args.batch} x {args.block} tokens, "
        f"vocab {vocab}, k={args.k}, {args.steps} steps x {args.rounds} rounds per variant (medians)\n"
    )
    print(f"{'variant':<22}{'step ms':>10}{'peak extra MiB':>16}")
    for n, label in (("clm", "CLM only (lambda 1)"), ("fusion", "fusion (lambda 0.9)")):
        print(
            f"{label:<22}{med[n]['step_s'] * 1000:>10.1f}{med[n]['peak_extra_bytes'] / 2**20:>16.1f}"
        )
    t_ratio = med["fusion"]["step_s"] / med["clm"]["step_s"]
    m_ratio = (med["fusion"]["peak_extra_bytes"] + 1) / (med["clm"]["peak_extra_bytes"] + 1)
    print(f"{'ratio':<22}{t_ratio:>9.2f}x{m_ratio:>15.2f}x")
    dense = args.batch * args.block * vocab * 4
    print(
        f"\n  peak memory is measured above the loaded model and batch ({'CUDA allocator' if device == 'cuda' else 'process peak RSS'}); "
        f"a dense fused target for this batch would add {dense / 2**20:.1f} MiB per teacher"
    )
    print("  goal: fusion <= 1.10x CLM-only in step time and in peak memory")
    return 0


def _kit_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kit-dir", default="runs/bench/kit", help="where the tiny model kit is (built if missing)"
    )
    parser.add_argument(
        "--size", choices=["demo", "test"], default="demo", help="kit size (default demo)"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_vllm":
        _vllm_worker(argv[1], argv[2], int(argv[3]), int(argv[4]))
        return 0
    if argv and argv[0] == "_train":
        _train_worker(
            argv[1], float(argv[2]), int(argv[3]), int(argv[4]), int(argv[5]), int(argv[6])
        )
        return 0
    parser = argparse.ArgumentParser(
        prog="fusion-etl bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    ex = sub.add_parser(
        "extract",
        help="extraction throughput vs bare forward, and bytes/token",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _kit_args(ex)
    ex.add_argument("--docs", type=int, default=128, help="documents to score (default 128)")
    ex.add_argument(
        "--max-tokens", type=int, default=512, help="tokens per document at most (default 512)"
    )
    ex.add_argument("-k", type=int, default=10, help="top-k (default 10)")
    ex.add_argument(
        "--repeats", type=int, default=3, help="timed repeats, median reported (default 3)"
    )
    ex.add_argument("--no-vllm", action="store_true", help="skip the vLLM backend")
    al = sub.add_parser(
        "align",
        help="reference DTW vs dtw vs offsets, and the vocabulary map time",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _kit_args(al)
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
    tr = sub.add_parser(
        "train",
        help="fusion vs CLM-only training: step time and peak memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _kit_args(tr)
    tr.add_argument("--batch", type=int, default=8, help="blocks per step (default 8)")
    tr.add_argument("--block", type=int, default=512, help="tokens per block (default 512)")
    tr.add_argument("-k", type=int, default=10, help="fused entries per position (default 10)")
    tr.add_argument("--steps", type=int, default=10, help="timed steps per run (default 10)")
    tr.add_argument(
        "--rounds", type=int, default=2, help="alternating runs per variant (default 2)"
    )
    args = parser.parse_args(argv)
    return {"extract": bench_extract, "align": bench_align, "train": bench_train}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
