"""`extract`: every model (the target and each source) scores every prepared shard.

Output: `extract/<model>/part-NNNNN.parquet`, one shard per prepared shard, with the columns of
`schema.extract_schema`: the model's own tokens of each document (`text + eos` by default, no
BOS, as the reference), and per position i the top-k of the distribution that predicts token
i+1 (the last position: the distribution after the last token), log-softmaxed over the full
vocabulary in fp32; the log-prob of each actual next token; the document's total NLL (fp64),
token count and UTF-8 byte count, so CE per token and per byte are both derivable.

Each model runs on its own pool of Ray actors (`extract.actors` replicas); a vLLM actor reserves
`vllm.tensor_parallel_size` GPUs, so on a cluster pending extract actors are what scales the
GPU worker group.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from fusion_etl import storage
from fusion_etl.backends import Scored, Scorer
from fusion_etl.config import (
    ExtractConfig,
    ModelConfig,
    PipelineConfig,
    fingerprint_fields,
)
from fusion_etl.errors import InputDataError, UserError
from fusion_etl.manifest import read_manifest
from fusion_etl.models import model_identity, require_local_model
from fusion_etl.runner import ActorPool, ShardOutput, StagePlan, WorkItem, make_plan
from fusion_etl.schema import PREPARE, check_schema, extract_schema, open_parquet
from fusion_etl.tokenization import tokenizer_fingerprint

__all__ = ["ExtractStage", "model_identity", "scored_to_table"]

VERSION = 1


def resolve_backend(cfg: PipelineConfig, model: ModelConfig) -> str:
    """The model's own backend setting, else extract.backend, else by the cluster's GPUs."""
    if model.backend != "auto":
        return model.backend
    ec = cfg.extract
    if ec.backend != "auto":
        return ec.backend
    if cfg.ray.executor == "ray":
        from fusion_etl.ray_utils import init_ray

        has_gpus = init_ray(cfg.ray).cluster_resources().get("GPU", 0) > 0
    else:
        import torch

        has_gpus = torch.cuda.is_available()
    return "vllm" if has_gpus else "transformers"


def resolve_extract_dtype(cfg: PipelineConfig, backend: str) -> str:
    """`extract.dtype` made explicit for the device the model's scorer will run on, the same
    for both backends (`fusion_etl.backends.dtypes`): float32 on CPUs, bfloat16 on GPUs.

    Decided on the driver, before any actor starts, so that it enters the fingerprint: the
    device is a GPU exactly when the scorer's actor reserves one (or, inline, when this
    process has one).
    """
    from fusion_etl.backends.dtypes import resolve_dtype

    if cfg.ray.executor == "inline":
        import torch

        on_gpu = torch.cuda.is_available()
    else:
        on_gpu = _actor_num_gpus(cfg, backend) > 0
    return resolve_dtype(cfg.extract.dtype, device="cuda" if on_gpu else "cpu")


@lru_cache(maxsize=2)
def _special_ids(tokenizer_dir: str) -> tuple[int | None, int | None]:
    from transformers import PreTrainedTokenizerFast

    try:
        tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    except Exception as exc:
        raise UserError(f"tokenizer at {tokenizer_dir} cannot be loaded: {exc}") from None
    return tok.bos_token_id, tok.eos_token_id


@lru_cache(maxsize=1)
def _scorer(path: str, backend: str, ec: ExtractConfig, dtype: str) -> Scorer:
    """One scorer per actor process, kept across shards (the model loads once)."""
    try:
        if backend == "vllm":
            from fusion_etl.backends.vllm_backend import VllmScorer

            v = ec.vllm
            return VllmScorer(
                path,
                top_k=ec.top_k,
                dtype=dtype,
                max_length=ec.max_length,
                tensor_parallel_size=v.tensor_parallel_size,
                gpu_memory_utilization=v.gpu_memory_utilization,
                max_num_batched_tokens=v.max_num_batched_tokens,
                max_logprobs=v.max_logprobs,
                seed=ec.seed,
            )
        from fusion_etl.backends.transformers_backend import TransformersScorer

        return TransformersScorer(
            path,
            top_k=ec.top_k,
            dtype=dtype,
            batch_tokens=ec.batch_tokens,
            max_length=ec.max_length,
        )
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"model at {path} cannot be loaded with the {backend} backend: {type(exc).__name__}: {exc}"
        ) from None


def _list_array(offsets: npt.NDArray[np.int64], values: pa.Array) -> pa.Array:
    return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), values).cast(
        pa.list_(values.type)
    )


def scored_to_table(
    doc_ids: list[str],
    input_ids: list[npt.NDArray[np.int32]],
    num_bytes: npt.NDArray[np.int64],
    scored: Scored,
    *,
    k: int,
    logprob_dtype: str,
) -> pa.Table:
    """Arrow columns from flat arrays (no Python loop per entry)."""
    lengths = scored.lengths
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tok_offsets = np.concatenate([[0], np.cumsum(lengths - 1)]).astype(np.int64)
    lp_type = pa.float16() if logprob_dtype == "float16" else pa.float32()
    lp_np = np.float16 if logprob_dtype == "float16" else np.float32
    flat_ids = pa.array(scored.topk_ids.reshape(-1), pa.int32())
    flat_lps = pa.array(scored.topk_logprobs.astype(lp_np).reshape(-1), lp_type)
    # NLL in fp64 from the fp32 token log-probs, summed per document.
    tok64 = scored.token_logprobs.astype(np.float64)
    nll = -np.add.reduceat(tok64, tok_offsets[:-1]) if len(tok64) else np.zeros(len(lengths))
    nll[lengths <= 1] = 0.0  # reduceat repeats the next value for an empty range
    columns = {
        "doc_id": pa.array(doc_ids, pa.string()),
        "input_ids": _list_array(
            offsets, pa.array(np.concatenate(input_ids).astype(np.int32), pa.int32())
        ),
        "topk_ids": _list_array(offsets, pa.FixedSizeListArray.from_arrays(flat_ids, k)),
        "topk_logprobs": _list_array(offsets, pa.FixedSizeListArray.from_arrays(flat_lps, k)),
        "token_logprobs": _list_array(tok_offsets, pa.array(scored.token_logprobs, pa.float32())),
        "nll": pa.array(nll, pa.float64()),
        "num_tokens": pa.array(lengths.astype(np.int32), pa.int32()),
        "num_bytes": pa.array(num_bytes.astype(np.int32), pa.int32()),
    }
    return pa.table(columns, schema=extract_schema(k, logprob_dtype))


class ExtractStage:
    """The `extract` stage (see the module docstring)."""

    name = "extract"

    def plan(self, cfg: PipelineConfig) -> list[StagePlan]:
        upstream = read_manifest(cfg.stage_url("prepare"), stage="prepare")
        plans = []
        for model in cfg.models:
            backend = resolve_backend(cfg, model)
            dtype = resolve_extract_dtype(cfg, backend)
            identity = {
                "stage": self.name,
                "version": VERSION,
                "model": model_identity(model),
                "backend": backend,
                "dtype": dtype,
                "extract": fingerprint_fields(cfg.extract),
                "prepare": upstream.fingerprint,
            }
            items = tuple(
                WorkItem(
                    shard=s.name,
                    inputs=(storage.join(upstream.url, s.name),),
                    payload={"model": model.name, "backend": backend, "dtype": dtype},
                )
                for s in upstream.shards
            )
            plans.append(
                make_plan(
                    self.name,
                    cfg,
                    output=storage.join(cfg.stage_url(self.name), model.name),
                    identity=identity,
                    inputs={upstream.url: upstream.fingerprint},
                    items=items,
                )
            )
        return plans

    def setup(self, cfg: PipelineConfig, plan: StagePlan) -> None:
        return None

    def actor_pool(self, cfg: PipelineConfig, plan: StagePlan) -> ActorPool | None:
        ec = cfg.extract
        backend = str(plan.items[0].payload["backend"]) if plan.items else "transformers"
        num_gpus = _actor_num_gpus(cfg, backend)
        options: dict[str, Any] = {"num_cpus": ec.num_cpus, "num_gpus": num_gpus}
        if ec.accelerator_type:
            options["accelerator_type"] = ec.accelerator_type
        if ec.resources:
            options["resources"] = dict(ec.resources)
        if backend == "vllm":
            env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
            if num_gpus == 0:
                env["VLLM_CPU_KVCACHE_SPACE"] = str(ec.vllm.cpu_kv_cache_gib)
            options["runtime_env"] = {"env_vars": env}
        return ActorPool(size=ec.actors, options=options)

    def process(self, cfg: PipelineConfig, item: WorkItem) -> ShardOutput:
        """Score a prepared shard in runs of `extract.docs_per_call` documents, each run read,
        scored and written as one row group: memory is bounded by a run, not by the shard."""
        ec = cfg.extract
        model = next(m for m in cfg.models if m.name == item.payload["model"])
        backend = str(item.payload["backend"])
        shard_url = item.inputs[0]
        prepared = open_parquet(shard_url)
        check_schema(prepared.schema_arrow, PREPARE, where=f"prepared shard {shard_url}")

        path = require_local_model(model)
        tok_dir = storage.local_path(model.tokenizer_path)
        bos, eos = _special_ids(str(tok_dir) if tok_dir else path)
        if ec.add_eos and eos is None:
            raise UserError(
                f"model {model.name!r}: extract.add_eos is set but its tokenizer has no EOS token"
            )
        if ec.add_bos and bos is None:
            raise UserError(
                f"model {model.name!r}: extract.add_bos is set but its tokenizer has no BOS token"
            )
        from fusion_etl.tokenization import load_tokenizer

        tokenizer = load_tokenizer(model.tokenizer_path)
        prefix = [bos] if ec.add_bos else []
        suffix = [eos] if ec.add_eos else []
        stats = {"tokens": 0}

        dtype = str(item.payload["dtype"])

        def batches() -> Iterator[pa.Table]:
            scorer = _scorer(path, backend, ec, dtype)
            if scorer.dtype != dtype:
                raise RuntimeError(
                    f"model {model.name!r}: planned for {dtype} but the {backend} scorer runs in "
                    f"{scorer.dtype} (it landed on a different device than the plan assumed)"
                )
            try:
                for batch in prepared.iter_batches(
                    batch_size=ec.docs_per_call, columns=["doc_id", "text"]
                ):
                    if batch.num_rows == 0:
                        continue
                    doc_ids = batch.column(0).to_pylist()
                    texts = batch.column(1).to_pylist()
                    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
                    docs = [np.array(prefix + e.ids + suffix, dtype=np.int32) for e in encoded]
                    _check_lengths(doc_ids, docs, model.name, scorer.max_length)
                    scored = scorer.score(docs)
                    num_bytes = np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64)
                    stats["tokens"] += int(scored.lengths.sum())
                    yield scored_to_table(
                        doc_ids, docs, num_bytes, scored, k=ec.top_k, logprob_dtype=ec.logprob_dtype
                    )
            finally:
                prepared.close()

        metadata = {
            "fusion_etl.model_name": model.name,
            "fusion_etl.model_path": model.path,
            "fusion_etl.model_revision": json.dumps(model_identity(model), sort_keys=True),
            "fusion_etl.top_k": str(ec.top_k),
            "fusion_etl.logprob_dtype": ec.logprob_dtype,
            "fusion_etl.tokenizer_fingerprint": tokenizer_fingerprint(model.tokenizer_path),
            "fusion_etl.backend": backend,
            "fusion_etl.dtype": dtype,
            "fusion_etl.add_eos": str(ec.add_eos).lower(),
            "fusion_etl.add_bos": str(ec.add_bos).lower(),
        }
        return ShardOutput(
            batches=batches(),
            schema=extract_schema(ec.top_k, ec.logprob_dtype),
            stats=stats,
            metadata=metadata,
        )


def _actor_num_gpus(cfg: PipelineConfig, backend: str) -> float:
    """GPUs per extract actor: extract.num_gpus, or by default the tensor-parallel size for
    vLLM on a cluster with GPUs and none otherwise."""
    ec = cfg.extract
    if ec.num_gpus >= 0:
        return ec.num_gpus
    if backend == "vllm" and _cluster_has_gpus(cfg):
        return float(ec.vllm.tensor_parallel_size)
    return 0.0


def _check_lengths(
    doc_ids: list[str], docs: list[npt.NDArray[np.int32]], model: str, max_length: int
) -> None:
    for doc_id, doc in zip(doc_ids, docs, strict=True):
        if len(doc) > max_length:
            raise InputDataError(
                f"document {doc_id!r} has {len(doc)} tokens under {model!r}, more than its maximum "
                f"length {max_length}; rerun prepare with prepare.block_size at most "
                f"{max_length} (plus prepare.margin) so that it splits such documents"
            )
        if len(doc) == 0:
            raise InputDataError(f"document {doc_id!r} has no tokens under {model!r}")


def _cluster_has_gpus(cfg: PipelineConfig) -> bool:
    from fusion_etl.ray_utils import init_ray

    return bool(init_ray(cfg.ray).cluster_resources().get("GPU", 0) > 0)
