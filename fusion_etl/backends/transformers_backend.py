"""Scoring with a transformers model: dynamic padding, fp32 log-softmax, top-k."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from fusion_etl.backends import Scored, concat_scored
from fusion_etl.backends.dtypes import Device, check_dtype_supported, resolve_dtype

__all__ = ["PLAIN_LM_HEAD", "TransformersScorer"]

# Causal LMs whose logits are `lm_head(base_model(...).last_hidden_state)` with nothing after
# the head (no logit scaling or soft-capping): their head can be applied per block of rows.
PLAIN_LM_HEAD = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "GPTNeoXForCausalLM",
        "GPT2LMHeadModel",
    }
)


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

        self.device: Device = "cuda" if torch.cuda.is_available() else "cpu"
        resolved = resolve_dtype(dtype, device=self.device)
        check_dtype_supported(resolved, device=self.device, requested=dtype)
        model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, resolved))
        self.model = model.to(self.device).eval()
        # What the weights really are once loaded (recorded in each shard's metadata).
        self.dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        self.top_k = top_k
        self.batch_tokens = batch_tokens
        # CPU: blocks that fit in cache (256 rows measured best with the fused log-softmax and
        # the compiled top-k, against 128, 512 and 1024); GPU: big blocks, few launches.
        self.chunk_rows = 256 if self.device == "cpu" else 8192
        self._plain_head = type(self.model).__name__ in PLAIN_LM_HEAD
        # The compiled top-k on CPU (torch.topk when False or on a GPU).
        self.topk_kernel = True
        self.max_length = max_length or int(
            getattr(self.model.config, "max_position_embeddings", 0) or 2**31 - 1
        )
        self._torch = torch

    def _final_states(self, ids: Any, mask: Any) -> tuple[Any, Any]:
        """[batch*length, d] states and the map from a block of them to logits.

        For architectures whose logits are exactly `lm_head(last hidden state)`, the head is
        applied per block of real (unpadded) rows later: the full [batch, length, vocab] logits
        never exist. Any other architecture returns its logits and an identity head.
        """
        if self._plain_head:
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            return hidden.reshape(-1, hidden.shape[-1]), self.model.get_output_embeddings()
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        return logits.reshape(-1, logits.shape[-1]), lambda block: block

    def batches(
        self, docs: list[npt.NDArray[np.int32]]
    ) -> tuple[npt.NDArray[np.int64], list[list[npt.NDArray[np.int32]]]]:
        """(order, batches): documents sorted by length, longest first, so each batch pads
        little, cut at `batch_tokens` padded tokens; `order[j]` is the original index of the
        j-th document in the batches."""
        order = np.argsort([-len(d) for d in docs], kind="stable").astype(np.int64)
        batches: list[list[npt.NDArray[np.int32]]] = []
        for j in order:
            if batches and (len(batches[-1]) + 1) * len(batches[-1][0]) <= self.batch_tokens:
                batches[-1].append(docs[j])
            else:
                batches.append([docs[j]])
        return order, batches

    def pad(self, docs: list[npt.NDArray[np.int32]]) -> tuple[Any, Any]:
        """(input_ids, attention_mask) [batch, longest] tensors, right-padded with 0."""
        torch = self._torch
        n = max(len(d) for d in docs)
        ids = torch.zeros((len(docs), n), dtype=torch.long)
        mask = torch.zeros((len(docs), n), dtype=torch.long)
        for row, d in enumerate(docs):
            ids[row, : len(d)] = torch.from_numpy(d.astype(np.int64))
            mask[row, : len(d)] = 1
        return ids, mask

    def _forward(self, docs: list[npt.NDArray[np.int32]]) -> Scored:
        torch = self._torch
        ids, mask = self.pad(docs)
        with torch.inference_mode():
            flat, head = self._final_states(ids.to(self.device), mask.to(self.device))
            # The token each position predicts; -1 where there is none (last token, padding).
            nxt = torch.full_like(ids, -1)
            nxt[:, :-1] = ids[:, 1:].masked_fill(~mask[:, 1:].bool(), -1)
            nxt = nxt.reshape(-1).to(self.device)
            rows = mask.reshape(-1).nonzero().squeeze(1).to(self.device)
            top_lp = torch.empty((len(rows), self.top_k), dtype=torch.float32, device=self.device)
            top_ids = torch.empty((len(rows), self.top_k), dtype=torch.int32, device=self.device)
            tok_lp = torch.empty(len(rows), dtype=torch.float32, device=self.device)
            # Row chunks that stay in cache, so that the [batch, length, vocab] log-probs never
            # exist. Per chunk: one fused log_softmax (max, sum of exp and subtraction per row,
            # while the row is in L1; logsumexp instead makes four passes with temporaries over
            # the whole chunk), one top-k and one gather. On a CPU the top-k is a compiled
            # single scan per row writing straight into the outputs (torch.topk cost about as
            # much as the LM head itself on a small model); on a GPU torch.topk is cheap.
            targets = nxt[rows].clamp(min=0)  # where there is no next token: any column
            cpu_topk = self.topk_kernel and self.device == "cpu"
            if cpu_topk:
                from fusion_etl.backends._topk_kernel import row_topk

                top_lp_np, top_ids_np = top_lp.numpy(), top_ids.numpy()
                tok_lp_np, targets_np = tok_lp.numpy(), targets.numpy()
            for start in range(0, len(rows), self.chunk_rows):
                idx = rows[start : start + self.chunk_rows]
                end = start + len(idx)
                logprobs = torch.log_softmax(head(flat.index_select(0, idx)).float(), dim=-1)
                if cpu_topk:
                    # Top-k and the next token's log-prob in one compiled pass.
                    row_topk(
                        logprobs.numpy(),
                        self.top_k,
                        values=top_lp_np[start:end],
                        ids=top_ids_np[start:end],
                        targets=targets_np[start:end],
                        picked=tok_lp_np[start:end],
                    )
                    continue
                values, indices = logprobs.topk(self.top_k, dim=-1, sorted=True)
                top_lp[start:end] = values
                top_ids[start:end] = indices.to(torch.int32)
                tok_lp[start:end] = logprobs.gather(1, targets[start:end].unsqueeze(1)).squeeze(1)
            has_next = nxt[rows] >= 0
        return Scored(
            lengths=np.array([len(d) for d in docs], dtype=np.int64),
            topk_ids=top_ids.cpu().numpy(),
            topk_logprobs=top_lp.cpu().numpy(),
            token_logprobs=tok_lp[has_next].cpu().numpy(),
        )

    def score(self, docs: list[npt.NDArray[np.int32]]) -> Scored:
        order, batches = self.batches(docs)
        # Results come in batch order; concat_scored puts them back in document order.
        return concat_scored([self._forward(batch) for batch in batches], order)

    def __getstate__(self) -> Any:  # never shipped between processes
        raise TypeError("scorers live in the process that built them")
