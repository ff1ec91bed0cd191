"""Scorers: teacher-forced next-token distributions of one model, behind one small interface.

A scorer takes documents as token-id arrays and returns, for every position i of every
document, the top-k of the distribution that predicts token i+1 (the last position: the
distribution after the last token), the log-prob of the actual next token, all log-softmaxed
over the full vocabulary in fp32. The result is flat numpy arrays, ready to become Arrow
columns without a Python loop per entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["Scored", "Scorer", "concat_scored"]


@dataclass(frozen=True)
class Scored:
    """Scores of a batch of documents, concatenated in document order."""

    lengths: npt.NDArray[np.int64]
    """Tokens per document (n_d)."""
    topk_ids: npt.NDArray[np.int32]
    """[sum n_d, k], descending log-prob within a row."""
    topk_logprobs: npt.NDArray[np.float32]
    """[sum n_d, k]."""
    token_logprobs: npt.NDArray[np.float32]
    """[sum (n_d - 1)]: log-prob of token i+1 at position i, per document."""


class Scorer(Protocol):
    top_k: int
    max_length: int
    dtype: str
    """The dtype the model really computes in (``float32``, ``bfloat16``, ``float16``)."""

    def score(self, docs: list[npt.NDArray[np.int32]]) -> Scored: ...


def concat_scored(parts: list[Scored], order: npt.NDArray[np.int64] | None = None) -> Scored:
    """Concatenate batch results; with `order`, parts hold documents in `order` and the result
    is put back into the original document order."""
    if not parts:
        raise ValueError("nothing to concatenate")
    lengths = np.concatenate([p.lengths for p in parts])
    ids = np.concatenate([p.topk_ids for p in parts])
    lps = np.concatenate([p.topk_logprobs for p in parts])
    tok = np.concatenate([p.token_logprobs for p in parts])
    if order is None:
        return Scored(lengths, ids, lps, tok)
    # Documents came in the order `order` (order[j] = original index of the j-th scored doc).
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    tstarts = np.concatenate([[0], np.cumsum(lengths - 1)[:-1]])
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    row_idx = (
        np.concatenate([np.arange(starts[j], starts[j] + lengths[j]) for j in inverse])
        if len(order)
        else np.zeros(0, np.int64)
    )
    tok_idx = (
        np.concatenate([np.arange(tstarts[j], tstarts[j] + lengths[j] - 1) for j in inverse])
        if len(order)
        else np.zeros(0, np.int64)
    )
    return Scored(lengths[inverse], ids[row_idx], lps[row_idx], tok[tok_idx])
