"""Distribution transfer onto the target's positions, and fusion (MinCE, AvgCE).

Everything works on sparse per-position distributions: `ids` [n, K] (target vocabulary ids,
-1 = empty slot) and `probs` [n, K]. Row i of a target document is the distribution that
predicts target token i+1. Pure numpy: no I/O, no Ray.

Transfer (per source, per document). A target position i aligned 1:1 to a source position j
whose tokens match (the same bytes, or the vocabulary map sends the source token to the target
token) takes the source's top-k at j, ids mapped through the vocabulary map, with the mass of
ids that collide summed. Every other position gets a one-hot on the **next** target token
(i+1); the reference FuseLLM put it on token i (its bug B1). The last position has no next
token: it stays empty, and training never reads it (labels are shifted).

`boundary_pairs` is a wider choice of pairs than the 1:1 equal tokens: target position i takes
source position j when both tokens end at the same character of the text. What makes a source's
next-token distribution usable at a target position is that both predict from the same text
(the same character), and an equal token pair is only the special case of that where the tokens
also start together. Tokenizers of different granularity meet at most word ends while splitting
words differently, so this pairs far more positions than equal tokens do.

Fusion (per document, over the target's own distribution and every source's transferred one):
- `min_ce`: the candidate with the lowest cross-entropy wins;
- `avg_ce`: a weighted sum with weights softmax(-CE / temperature) (not the reference's
  softmax(exp(-CE)), its bug B2, which is nearly uniform).
At `level="sequence"` CE is the model's mean NLL on the document, per own token (`ce_unit`
token) or per UTF-8 byte (`byte`: comparable across tokenizers). At `level="token"` each
position is fused on its own: CE of a candidate is -log of the probability it gives the actual
next target token (floored), and sources only take part where they matched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "Candidate",
    "Fused",
    "boundary_pairs",
    "fuse",
    "merge_topk",
    "one_to_one_pairs",
    "transfer",
]

FusionMethod = Literal["min_ce", "avg_ce"]
FusionLevel = Literal["sequence", "token"]
CeUnit = Literal["token", "byte"]

# Probability given to a next token that a candidate's top-k does not contain (token level).
MISSING_PROB_FLOOR = 1e-6


def merge_topk(
    ids: npt.NDArray[np.integer], probs: npt.NDArray[np.floating], k: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Per row: sum the mass of equal ids, keep the k largest (ties: lower id first).

    Args:
        ids: [n, M] ids, -1 for empty slots.
        probs: [n, M] probabilities (slots with id -1 or probability 0 are ignored).
        k: slots in the result.

    Returns:
        ([n, k] ids padded with -1, [n, k] probabilities padded with 0), descending per row.
    """
    n, m = ids.shape
    out_ids = np.full((n, k), -1, dtype=np.int32)
    out_probs = np.zeros((n, k), dtype=np.float32)
    if n == 0 or m == 0:
        return out_ids, out_probs
    flat_ids = ids.reshape(-1).astype(np.int64)
    flat_p = probs.reshape(-1).astype(np.float64)
    rows = np.repeat(np.arange(n, dtype=np.int64), m)
    keep = (flat_ids >= 0) & (flat_p > 0)
    if not keep.any():
        return out_ids, out_probs
    base = int(flat_ids[keep].max()) + 1
    keys, inverse = np.unique(rows[keep] * base + flat_ids[keep], return_inverse=True)
    sums = np.bincount(inverse, weights=flat_p[keep])
    urow, uid = keys // base, keys % base
    # Row first, then descending mass; equal mass keeps np.unique's order: lower id first.
    order = np.lexsort((-sums, urow))
    urow, uid, sums = urow[order], uid[order], sums[order]
    starts = np.searchsorted(urow, np.arange(n))
    rank = np.arange(len(urow)) - starts[urow]
    sel = rank < k
    out_ids[urow[sel], rank[sel]] = uid[sel]
    out_probs[urow[sel], rank[sel]] = sums[sel]
    return out_ids, out_probs


def one_to_one_pairs(
    path: Sequence[tuple[int, int]], n_source: int, n_target: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The (source, target) pairs of an alignment path where each index occurs exactly once."""
    if not path:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    arr = np.asarray(path, dtype=np.int64)
    s, t = arr[:, 0], arr[:, 1]
    cs = np.bincount(s, minlength=n_source)
    ct = np.bincount(t, minlength=n_target)
    one = (cs[s] == 1) & (ct[t] == 1)
    return s[one], t[one]


def boundary_pairs(
    source_spans: Sequence[tuple[int, int]], target_spans: Sequence[tuple[int, int]]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(source, target) positions whose tokens end at the same character of the text.

    Several tokens can end at one character: the byte pieces of one character, or
    SentencePiece's lone `▁` before a letter, all span it. Where both sides have as many such
    tokens they are the same pieces and pair in order; otherwise only the last of each side
    pairs, since its next token is the first that starts after that end, so it is the one
    that predicts from exactly that text. The last position of either side is left out:
    nothing follows it (the target's is never trained on, and a source's predicts past the
    text), so a trailing zero-width EOS does not take the place of the text's last token.
    Spans are character offsets into one text, both in token order.
    """

    def by_end(spans: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i, (_, end) in enumerate(spans[:-1]):
            out.setdefault(int(end), []).append(i)
        return out

    src = by_end(source_spans)
    tgt = by_end(target_spans)
    s_idx: list[int] = []
    t_idx: list[int] = []
    for end in sorted(set(src) & set(tgt)):
        s_group, t_group = src[end], tgt[end]
        if len(s_group) != len(t_group):
            s_group, t_group = s_group[-1:], t_group[-1:]
        s_idx += s_group
        t_idx += t_group
    return np.asarray(s_idx, dtype=np.int64), np.asarray(t_idx, dtype=np.int64)


def transfer(
    path: Sequence[tuple[int, int]],
    *,
    source_ids: npt.NDArray[np.integer],
    target_ids: npt.NDArray[np.integer],
    source_topk_ids: npt.NDArray[np.integer],
    source_topk_logprobs: npt.NDArray[np.floating],
    vocab_map: npt.NDArray[np.integer],
    source_token_keys: npt.NDArray[np.integer] | None = None,
    target_token_keys: npt.NDArray[np.integer] | None = None,
    pairs: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None = None,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Carry a source's top-k onto the target's positions.

    Args:
        path: alignment path (source index, target index) of this document.
        source_ids, target_ids: the two tokenizations' token ids ([n_s], [n_t]).
        source_topk_ids, source_topk_logprobs: the source's top-k per position ([n_s, k]).
        vocab_map: source id -> target id.
        source_token_keys, target_token_keys: optional per-vocabulary keys (e.g. hashes of the
            bytes each token stands for) indexed by token id; equal keys also count as a match.
        pairs: (source, target) positions to transfer, used as given instead of the path's
            1:1 pairs of matching tokens (e.g. `boundary_pairs`); `path` is then ignored.

    Returns:
        (ids [n_t, k], probs [n_t, k], matched [n_t]): transferred distributions in the target
        vocabulary, and which target positions took a source distribution.
    """
    n_t = len(target_ids)
    k = source_topk_ids.shape[1]
    if pairs is not None:
        s_idx, t_idx = (np.asarray(p, dtype=np.int64) for p in pairs)
    else:
        s_idx, t_idx = one_to_one_pairs(path, len(source_ids), n_t)
        src_tok = np.asarray(source_ids, dtype=np.int64)[s_idx]
        tgt_tok = np.asarray(target_ids, dtype=np.int64)[t_idx]
        match = np.asarray(vocab_map, dtype=np.int64)[src_tok] == tgt_tok
        if source_token_keys is not None and target_token_keys is not None:
            match |= (
                np.asarray(source_token_keys)[src_tok] == np.asarray(target_token_keys)[tgt_tok]
            )
        s_idx, t_idx = s_idx[match], t_idx[match]

    # Default: one-hot on the next target token; the last position has none and stays empty.
    ids = np.full((n_t, k), -1, dtype=np.int64)
    probs = np.zeros((n_t, k), dtype=np.float64)
    if n_t > 1:
        ids[:-1, 0] = np.asarray(target_ids[1:], dtype=np.int64)
        probs[:-1, 0] = 1.0
    matched = np.zeros(n_t, dtype=bool)
    if len(t_idx):
        mapped = np.asarray(vocab_map, dtype=np.int64)[
            np.asarray(source_topk_ids, dtype=np.int64)[s_idx]
        ]
        ids[t_idx] = mapped
        probs[t_idx] = np.exp(np.asarray(source_topk_logprobs, dtype=np.float64)[s_idx])
        matched[t_idx] = True
    out_ids, out_probs = merge_topk(ids, probs, k)
    return out_ids, out_probs, matched


@dataclass(frozen=True)
class Candidate:
    """One model's distribution over a target document's positions."""

    ids: npt.NDArray[np.int32]
    """[n_t, k] target ids, -1 padded."""
    probs: npt.NDArray[np.float32]
    """[n_t, k]."""
    valid: npt.NDArray[np.bool_]
    """[n_t]: where the distribution is the model's own (always for the target)."""
    nll: float
    """The model's total NLL on the document (its own tokens)."""
    num_tokens: int
    """The model's own token count (its CE is nll / (num_tokens - 1) per token)."""
    num_bytes: int


@dataclass(frozen=True)
class Fused:
    ids: npt.NDArray[np.int32]
    probs: npt.NDArray[np.float32]
    weights: npt.NDArray[np.float32]
    """Per candidate (target first, then sources in order): sequence level, the weights used;
    token level, the mean weight over the positions that have a next token."""


def sequence_ce(c: Candidate, unit: CeUnit) -> float:
    """Mean NLL per predicted own token, or per UTF-8 byte of the document."""
    if unit == "byte":
        return c.nll / max(c.num_bytes, 1)
    return c.nll / max(c.num_tokens - 1, 1)


def _softmax(x: npt.NDArray[np.float64], axis: int = -1) -> npt.NDArray[np.float64]:
    z = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(z)
    out: npt.NDArray[np.float64] = e / e.sum(axis=axis, keepdims=True)
    return out


def _prob_of(
    ids: npt.NDArray[np.int32], probs: npt.NDArray[np.float32], token: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]:
    hit = ids.astype(np.int64) == token[:, None]
    out: npt.NDArray[np.float64] = np.where(hit, probs, 0.0).sum(axis=1).astype(np.float64)
    return out


def fuse(
    candidates: Sequence[Candidate],
    target_ids: npt.NDArray[np.integer],
    *,
    method: FusionMethod = "min_ce",
    level: FusionLevel = "sequence",
    ce_unit: CeUnit = "token",
    temperature: float = 1.0,
    k: int | None = None,
    next_token_bytes: npt.NDArray[np.integer] | None = None,
) -> Fused:
    """Fuse candidate distributions of one target document (target first, then sources).

    Args:
        candidates: the target's own distribution first, then each source's transferred one.
        target_ids: the target's tokens [n_t] (for token-level CE on the next token).
        method: `min_ce` or `avg_ce`.
        level: `sequence` (one choice or weighting per document) or `token` (per position).
        ce_unit: `token` or `byte`.
        temperature: AvgCE temperature tau in softmax(-CE / tau).
        k: slots in the result (default: the candidates' k).
        next_token_bytes: [n_t] UTF-8 bytes of target token i+1 (token level, `byte` unit).
    """
    if not candidates:
        raise ValueError("fuse needs at least the target's own distribution")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    k = k or candidates[0].ids.shape[1]
    n_t = len(target_ids)
    if any(
        c.ids.shape[0] != n_t or c.probs.shape != c.ids.shape or len(c.valid) != n_t
        for c in candidates
    ):
        raise ValueError(f"every candidate needs {n_t} rows (one per target token)")
    n_c = len(candidates)
    if level == "sequence":
        ce = np.array([sequence_ce(c, ce_unit) for c in candidates], dtype=np.float64)
        if method == "min_ce":
            weights = np.zeros(n_c)
            weights[int(np.argmin(ce))] = 1.0  # first minimum: the target wins ties
        else:
            weights = _softmax(-ce / temperature)
        w = np.broadcast_to(weights, (n_t, n_c))
        mean_w = weights
    else:
        nxt = np.full(n_t, -1, dtype=np.int64)
        nxt[:-1] = np.asarray(target_ids[1:], dtype=np.int64)
        ce_pos = np.stack(
            [
                -np.log(np.maximum(_prob_of(c.ids, c.probs, nxt), MISSING_PROB_FLOOR))
                for c in candidates
            ],
            axis=1,
        )
        if ce_unit == "byte":
            if next_token_bytes is None:
                raise ValueError("token-level byte CE needs next_token_bytes")
            ce_pos = (
                ce_pos / np.maximum(np.asarray(next_token_bytes, dtype=np.float64), 1.0)[:, None]
            )
        valid = np.stack([c.valid for c in candidates], axis=1)
        ce_pos = np.where(valid, ce_pos, np.inf)
        if method == "min_ce":
            w = np.zeros((n_t, n_c))
            w[np.arange(n_t), np.argmin(ce_pos, axis=1)] = 1.0
        else:
            w = _softmax(np.where(valid, -ce_pos / temperature, -np.inf), axis=1)
        has_next = nxt >= 0
        mean_w = w[has_next].mean(axis=0) if has_next.any() else np.zeros(n_c)
    all_ids = np.concatenate([c.ids for c in candidates], axis=1)
    all_probs = np.concatenate(
        [c.probs * w[:, i : i + 1] for i, c in enumerate(candidates)], axis=1
    )
    ids, probs = merge_topk(all_ids, all_probs, k)
    return Fused(ids=ids, probs=probs, weights=np.asarray(mean_w, dtype=np.float32))
