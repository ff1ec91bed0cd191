"""`fusion-etl bench extract`: for each backend, extraction tokens/s (scoring + top-k + Arrow +
Parquet) against bare forward tokens/s of the same model on the same batches, and stored bytes
per token at k=10 after Parquet compression, with the float16 rounding error of the stored
log-probs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fusion_etl.bench.common import bench_kit, corpus_docs, kit_args, timed

__all__ = ["add_parser", "bench_extract"]


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
    t_bare = timed(bare, repeats)
    t_extract = timed(extract, repeats)
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
        "bare_tok_s": tokens / timed(bare, repeats),
        "extract_tok_s": tokens / timed(extract, repeats),
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
            "fusion_etl.bench.extract",
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
    kit = bench_kit(args)
    model = kit.target
    context = json.loads((model.path / "config.json").read_text()).get(
        "max_position_embeddings", args.max_tokens + 1
    )
    # vLLM's generated step (the distribution after the last token) needs one slot of context.
    docs = corpus_docs(
        model.path, kit.corpus_dir, args.docs, min(args.max_tokens, int(context) - 1)
    )
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


def add_parser(sub: Any) -> None:
    ex = sub.add_parser(
        "extract",
        help="extraction throughput vs bare forward, and bytes/token",
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
        "--repeats", type=int, default=3, help="timed repeats, median reported (default 3)"
    )
    ex.add_argument("--no-vllm", action="store_true", help="skip the vLLM backend")
    ex.set_defaults(run=bench_extract)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "_vllm":
        _vllm_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
