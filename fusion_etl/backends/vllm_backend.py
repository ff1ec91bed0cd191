"""Scoring with vLLM: `prompt_logprobs` with flat output, raw log-probs, prompts as token ids.

vLLM's flat prompt log-probs hold, for each position p >= 1, exactly k+1 entries: the actual
token p (with its true rank) followed by the top-k in rank order; position 0 is empty. The
distribution after the last token comes from one greedy generated step with `logprobs=k`, laid
out the same way. So the conversion is a reshape, never a loop per entry.
"""

from __future__ import annotations

import os
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from fusion_etl.backends import Scored
from fusion_etl.backends.dtypes import Device, check_dtype_supported, resolve_dtype

__all__ = ["VllmScorer", "flat_to_scored"]


def flat_to_scored(
    prompt_flat: list[Any], gen_flat: list[Any], lengths: npt.NDArray[np.int64], top_k: int
) -> Scored:
    """Convert per-request flat log-probs (prompt and first generated step) to `Scored`."""
    k1 = top_k + 1
    n_docs = len(lengths)
    ids_rows: list[npt.NDArray[np.int64]] = []
    lp_rows: list[npt.NDArray[np.float64]] = []
    for d in range(n_docs):
        p, g = prompt_flat[d], gen_flat[d]
        n = int(lengths[d])
        p_ids = np.asarray(p.token_ids, dtype=np.int64)
        p_lp = np.asarray(p.logprobs, dtype=np.float64)
        g_ids = np.asarray(g.token_ids, dtype=np.int64)
        g_lp = np.asarray(g.logprobs, dtype=np.float64)
        if len(p_ids) != (n - 1) * k1 or len(g_ids) != k1:
            raise RuntimeError(
                f"unexpected vLLM flat log-probs layout: {len(p_ids)} prompt entries for {n} tokens at k={top_k}"
            )
        ids_rows.append(np.concatenate([p_ids, g_ids]).reshape(n, k1))
        lp_rows.append(np.concatenate([p_lp, g_lp]).reshape(n, k1))
    ids = np.concatenate(ids_rows)
    lps = np.concatenate(lp_rows)
    # Column 0 is the actual token of the *next* position (row r of the prompt part predicted
    # token r+1): the actual next-token log-prob of positions 0..n-2 of each document.
    last_row = np.cumsum(lengths) - 1
    keep = np.ones(len(ids), dtype=bool)
    keep[last_row] = False
    return Scored(
        lengths=lengths,
        topk_ids=ids[:, 1:].astype(np.int32),
        topk_logprobs=lps[:, 1:].astype(np.float32),
        token_logprobs=lps[keep, 0].astype(np.float32),
    )


class VllmScorer:
    """One vLLM engine in this process (run it inside its own Ray actor)."""

    def __init__(
        self,
        path: str,
        *,
        top_k: int,
        dtype: str = "auto",
        max_length: int = 0,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_num_batched_tokens: int = 8192,
        max_logprobs: int = 20,
        seed: int = 0,
    ) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import torch
        from vllm import LLM, SamplingParams

        # vLLM's own `auto` follows the checkpoint and the platform (bfloat16 for a float32
        # checkpoint on this CPU, float16 on a GPU): never hand it `auto`.
        device: Device = "cuda" if torch.cuda.is_available() else "cpu"
        resolved = resolve_dtype(dtype, device=device)
        check_dtype_supported(resolved, device=device, requested=dtype)
        kwargs: dict[str, Any] = {}
        if max_length:
            kwargs["max_model_len"] = max_length
        self.llm = LLM(
            model=path,
            dtype=cast(Any, resolved),
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_batched_tokens=max_num_batched_tokens,
            max_logprobs=max_logprobs,
            logprobs_mode="raw_logprobs",
            enable_prefix_caching=False,
            skip_tokenizer_init=True,
            enforce_eager=True,
            seed=seed,
            **kwargs,
        )
        self.top_k = top_k
        # What the engine really runs in (recorded in each shard's metadata).
        self.dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        # One slot is taken by the generated step that yields the distribution after the last token.
        self.max_length = int(self.llm.llm_engine.model_config.max_model_len) - 1
        self.params = SamplingParams(
            prompt_logprobs=top_k,
            logprobs=top_k,
            max_tokens=1,
            temperature=0.0,
            detokenize=False,
            flat_logprobs=True,
        )

    def score(self, docs: list[npt.NDArray[np.int32]]) -> Scored:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=d.tolist()) for d in docs]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        return flat_to_scored(
            [o.prompt_logprobs for o in outputs],
            [o.outputs[0].logprobs for o in outputs],
            lengths,
            self.top_k,
        )
