"""Scoring with a transformers model: dynamic padding, fp32 log-softmax, top-k."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from fusion_etl.backends import Scored, concat_scored

__all__ = ["TransformersScorer"]


class TransformersScorer:
    """Batched teacher-forced forward passes on CPU or GPU."""

    def __init__(
        self,
        path: str,
        *,
        top_k: int,
        dtype: str = "auto",
        batch_tokens: int = 8192,
        max_length: int = 0,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = (
                "bfloat16"
                if self.device == "cuda" and torch.cuda.is_bf16_supported()
                else "float32"
            )
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        self.model = model.to(self.device).eval()
        self.top_k = top_k
        self.batch_tokens = batch_tokens
        self.max_length = max_length or int(
            getattr(self.model.config, "max_position_embeddings", 0) or 2**31 - 1
        )
        self._torch = torch

    def _forward(self, docs: list[npt.NDArray[np.int32]]) -> Scored:
        torch = self._torch
        n = max(len(d) for d in docs)
        ids = torch.zeros((len(docs), n), dtype=torch.long)
        mask = torch.zeros((len(docs), n), dtype=torch.long)
        for row, d in enumerate(docs):
            ids[row, : len(d)] = torch.from_numpy(d.astype(np.int64))
            mask[row, : len(d)] = 1
        with torch.inference_mode():
            logits = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).logits.float()
            # log_softmax(x)_v = x_v - logsumexp(x): one reduction instead of a full
            # [batch, length, vocab] log-prob tensor.
            norm = torch.logsumexp(logits, dim=-1, keepdim=True)
            top_logits, top_ids = logits.topk(self.top_k, dim=-1, sorted=True)
            top_lp = top_logits - norm
            nxt = ids[:, 1:].to(self.device)
            tok_lp = logits[:, :-1].gather(-1, nxt.unsqueeze(-1)).squeeze(-1) - norm[:, :-1, 0]
        valid = mask.bool().to(self.device)
        valid_next = valid[:, 1:]
        return Scored(
            lengths=np.array([len(d) for d in docs], dtype=np.int64),
            topk_ids=top_ids[valid].to(torch.int32).cpu().numpy(),
            topk_logprobs=top_lp[valid].cpu().numpy().astype(np.float32),
            token_logprobs=tok_lp[valid_next].cpu().numpy().astype(np.float32),
        )

    def score(self, docs: list[npt.NDArray[np.int32]]) -> Scored:
        # Sort by length so each batch pads little; put results back in document order.
        order = np.argsort([-len(d) for d in docs], kind="stable").astype(np.int64)
        parts: list[Scored] = []
        batch: list[npt.NDArray[np.int32]] = []
        for j in order:
            doc = docs[j]
            if batch and (len(batch) + 1) * len(batch[0]) > self.batch_tokens:
                parts.append(self._forward(batch))
                batch = []
            batch.append(doc)
        if batch:
            parts.append(self._forward(batch))
        return concat_scored(parts, order)

    def close(self) -> None:
        del self.model

    def __getstate__(self) -> Any:  # never shipped between processes
        raise TypeError("scorers live in the process that built them")
