"""`fusion-etl bench extract`: for each backend, extraction tokens/s (scoring + top-k + Arrow +
Parquet) against a bare forward of the same model on the same batches, where a shard's time
goes, and stored bytes per token at k=10 after Parquet compression, with the float16 rounding
error of the stored log-probs.

Each backend runs in a fresh process of its own (vLLM pins threads in the process that creates
its engine, and neither backend may inherit the other's warm caches). In that process every
variant runs once untimed, then the variants take turns, `--repeats` times, in alternating
order, so that load from elsewhere falls on all of them alike; the minimum and the median of
each are printed. Baselines:

* transformers: ``model(input_ids, attention_mask).logits`` over the same padded batches that
  extraction scores: the same model, the same batches, logits only.
* vLLM: ``generate`` with ``max_tokens=1`` and no log-probs (a plain prefill). Extraction also
  needs logits and a log-softmax at every position, which a plain prefill skips (it computes
  them for the last position only), so a variant asking for the actual token's log-prob alone
  (``prompt_logprobs=0``) is timed too: the part of the overhead that is inherent to the API.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fusion_etl.bench.common import bench_kit, corpus_docs, kit_args

__all__ = ["add_parser", "bench_extract", "interleaved_times"]


def interleaved_times(
    variants: dict[str, Callable[[], Any]], repeats: int
) -> dict[str, list[float]]:
    """Wall times of each variant: one untimed warm-up call each, then `repeats` rounds in
    which every variant runs once, the order reversed every other round."""
    for fn in variants.values():
        fn()
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            started = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - started)
    return times


def _summary(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {name: {"min": min(ts), "median": statistics.median(ts)} for name, ts in times.items()}


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

    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    per_col: dict[str, int] = {}
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(rg).column(c)
            name = col.path_in_schema.split(".")[0]
            per_col[name] = per_col.get(name, 0) + col.total_compressed_size
    return len(data), per_col


def _to_table(docs: list[npt.NDArray[np.int32]], scored: Any, k: int) -> Any:
    from fusion_etl.stages.extract import scored_to_table

    return scored_to_table(
        [str(i) for i in range(len(docs))],
        docs,
        np.zeros(len(docs), np.int64),
        scored,
        k=k,
        logprob_dtype="float16",
    )


def transformers_worker(
    model_dir: str, docs: list[npt.NDArray[np.int32]], k: int, repeats: int, threads: int
) -> dict[str, Any]:
    """The transformers figures, in this (fresh) process, with `threads` torch threads."""
    import torch

    torch.set_num_threads(threads)

    from fusion_etl.backends.transformers_backend import TransformersScorer
    from fusion_etl.schema import parquet_bytes

    scorer = TransformersScorer(model_dir, top_k=k, dtype="float32", batch_tokens=8192)
    _, batches = scorer.batches(docs)
    padded = [scorer.pad(batch) for batch in batches]

    def bare() -> None:
        # The same padded batches through the model, logits only: the floor for extraction.
        with torch.inference_mode():
            for ids, mask in padded:
                scorer.model(input_ids=ids, attention_mask=mask).logits.float()

    def body_only() -> None:
        # The transformer body without the LM head: what extraction runs before its chunks.
        with torch.inference_mode():
            for ids, mask in padded:
                scorer.model.base_model(input_ids=ids, attention_mask=mask)

    def extract() -> None:
        parquet_bytes(_to_table(docs, scorer.score(docs), k))

    scored = scorer.score(docs)
    table = _to_table(docs, scored, k)
    times = interleaved_times(
        {
            "bare": bare,
            "extract": extract,
            "body": body_only,
            "score": lambda: scorer.score(docs),
            "arrow": lambda: _to_table(docs, scored, k),
            "parquet": lambda: parquet_bytes(table),
        },
        repeats,
    )
    size16, cols16 = _table_bytes(docs, scored, k, "float16")
    size32, _ = _table_bytes(docs, scored, k, "float32")
    lp = scored.topk_logprobs
    rel = np.abs(lp.astype(np.float16).astype(np.float32) - lp) / np.maximum(np.abs(lp), 1e-30)
    tokens = sum(len(d) for d in docs)
    return {
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "times": _summary(times),
        "bytes_per_token_fp16": size16 / tokens,
        "bytes_per_token_fp32": size32 / tokens,
        "bytes_per_token_by_column": {c: round(b / tokens, 2) for c, b in cols16.items()},
        "fp16_max_relative_error": float(rel[np.abs(lp) > 6e-5].max()),
    }


def vllm_worker(
    model_dir: str,
    docs: list[npt.NDArray[np.int32]],
    k: int,
    repeats: int,
    batched_tokens: int,
) -> dict[str, Any]:
    """The vLLM figures, in this (fresh) process: vLLM pins threads in the process that
    creates the engine."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from fusion_etl.backends.vllm_backend import VllmScorer
    from fusion_etl.schema import parquet_bytes

    scorer = VllmScorer(model_dir, top_k=k, dtype="float32", max_num_batched_tokens=batched_tokens)
    prompts = [TokensPrompt(prompt_token_ids=d.tolist()) for d in docs]

    def generate(**extra: Any) -> Callable[[], Any]:
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, **extra)
        return lambda: scorer.llm.generate(prompts, params, use_tqdm=False)

    def extract() -> None:
        parquet_bytes(_to_table(docs, scorer.score(docs), k))

    times = interleaved_times(
        {
            "bare": generate(),
            "actual_token_only": generate(prompt_logprobs=0, flat_logprobs=True),
            "api_call": generate(prompt_logprobs=k, logprobs=k, flat_logprobs=True),
            "extract": extract,
        },
        repeats,
    )
    return {
        "tokens": sum(len(d) for d in docs),
        "batched_tokens": batched_tokens,
        "times": _summary(times),
    }


def _run_worker(backend: str, model_dir: Path, docs_file: Path, *extra: str) -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusion_etl.bench.extract",
            "_worker",
            backend,
            str(model_dir),
            str(docs_file),
            *extra,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    raise RuntimeError(f"{backend} benchmark failed:\n{proc.stderr[-3000:]}")


def _ratio(r: dict[str, Any], name: str, base: str = "bare") -> tuple[float, float]:
    t = r["times"]
    return t[name]["min"] / t[base]["min"], t[name]["median"] / t[base]["median"]


def bench_extract(args: argparse.Namespace) -> int:
    kit = bench_kit(args)
    model = kit.target
    context = json.loads((model.path / "config.json").read_text()).get(
        "max_position_embeddings", args.max_tokens + 1
    )
    # vLLM's generated step (the distribution after the last token) needs one slot of context.
    docs = corpus_docs(
        model.path, kit.corpus_dir, args.docs, min(args.max_tokens, int(context) - 1)
    )
    tokens = sum(len(d) for d in docs)
    print(
        f"extract benchmark: model {model.name} ({model.architecture}), {len(docs)} documents "
        f"(one shard), {tokens} tokens, k={args.k}; each backend in a fresh process, "
        f"1 warm-up + {args.repeats} interleaved repeats\n",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        docs_file = Path(tmp) / "docs.npz"
        np.savez(docs_file, ids=np.concatenate(docs), lengths=np.array([len(d) for d in docs]))
        common = (str(args.k), str(args.repeats))
        tf = _run_worker("transformers", model.path, docs_file, *common, str(args.threads))
        vl = [
            _run_worker("vllm", model.path, docs_file, *common, str(n))
            for n in ([] if args.no_vllm else args.vllm_batched_tokens)
        ]

    def tok_s(r: dict[str, Any], name: str) -> float:
        return float(r["tokens"] / r["times"][name]["min"])

    print(
        f"{'backend':<28}{'bare tok/s':>12}{'extract tok/s':>15}"
        f"{'overhead (min)':>16}{'(median)':>10}"
    )
    rows = [("transformers", tf)] + [
        (f"vllm (batched tokens {r['batched_tokens']})", r) for r in vl
    ]
    for name, r in rows:
        lo, mid = _ratio(r, "extract")
        print(
            f"{name:<28}{tok_s(r, 'bare'):>12.0f}{tok_s(r, 'extract'):>15.0f}{lo:>15.2f}x{mid:>9.2f}x"
        )
    t = tf["times"]
    extract_s = t["extract"]["min"]
    parts = {
        "transformer body (no LM head)": t["body"]["min"],
        "LM head + log-softmax + top-k": t["score"]["min"] - t["body"]["min"],
        "Arrow columns": t["arrow"]["min"],
        "Parquet (zstd)": t["parquet"]["min"],
    }
    print(
        f"\nwhere one shard's time goes, transformers ({tf['threads']} threads; "
        f"extract {extract_s:.2f} s, bare forward {t['bare']['min']:.2f} s; minima):"
    )
    parts["other (padding, reordering, copies)"] = extract_s - sum(parts.values())
    for part, seconds in parts.items():
        print(f"  {part:<36}{seconds:>7.2f} s {seconds / extract_s:>6.0%}")
    for r in vl:
        print(f"\nvLLM, batched tokens {r['batched_tokens']}: each call against a plain prefill")
        for name, label in (
            ("actual_token_only", "prompt_logprobs=0 (logits + log-softmax everywhere)"),
            ("api_call", f"prompt_logprobs={args.k}, logprobs={args.k} (the extraction call)"),
            ("extract", "+ columns, Arrow, Parquet (extraction)"),
        ):
            lo, mid = _ratio(r, name)
            print(f"  {label:<58}{lo:>6.2f}x (median {mid:.2f}x)")
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


def add_parser(sub: Any) -> None:
    ex = sub.add_parser(
        "extract",
        help="extraction throughput vs bare forward, where the time goes, and bytes/token",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kit_args(ex)
    ex.add_argument("--docs", type=int, default=128, help="documents to score (default 128)")
    ex.add_argument(
        "--max-tokens", type=int, default=512, help="tokens per document at most (default 512)"
    )
    ex.add_argument("-k", type=int, default=10, help="top-k (default 10)")
    ex.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed repeats per variant after one warm-up, interleaved (default 5)",
    )
    ex.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the transformers backend (default 1: what an extract actor gets, "
        "since Ray sets OMP_NUM_THREADS to an actor's whole CPUs, at least 1, and "
        "extract.num_cpus is 0.5)",
    )
    ex.add_argument("--no-vllm", action="store_true", help="skip the vLLM backend")
    ex.add_argument(
        "--vllm-batched-tokens",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[8192],
        metavar="N[,N...]",
        help="vLLM max_num_batched_tokens to try, each in its own process (default 8192)",
    )
    ex.set_defaults(run=bench_extract)


def _worker_main(argv: list[str]) -> None:
    backend, model_dir, docs_file, k, repeats, *rest = argv
    data = np.load(docs_file, allow_pickle=False)
    docs = list(np.split(data["ids"], np.cumsum(data["lengths"])[:-1]))
    if backend == "transformers":
        result = transformers_worker(model_dir, docs, int(k), int(repeats), int(rest[0]))
    else:
        result = vllm_worker(model_dir, docs, int(k), int(repeats), int(rest[0]))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "_worker":
        _worker_main(sys.argv[2:])
