"""The FuseLLM training loss, sparse: `lam * CLM + (1 - lam) * fusion`.

fusion = soft cross-entropy of the student against the fused top-k distribution,
-sum_j p_j log softmax(z)_{id_j}, computed with a gather over the k ids: no dense
[batch, length, vocab] target ever exists (the reference's collator builds one, about 131 MB per
teacher per 2048-token sample). One log-sum-exp over the vocabulary serves both terms, since
-log softmax(z)_v = logsumexp(z) - z_v. Pure torch: no I/O, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["LossParts", "fusion_loss"]

IGNORE = -100


@dataclass(frozen=True)
class LossParts:
    total: Any
    """The loss to minimise (a scalar tensor)."""
    clm: Any
    """Mean next-token cross-entropy over labelled positions (detached)."""
    fusion: Any
    """Mean soft cross-entropy over positions with a fused distribution (detached); NaN when
    lam == 1, where it is not computed."""
    tokens: int
    """Labelled positions."""


def fusion_loss(
    logits: Any, labels: Any, fused_ids: Any | None, fused_probs: Any | None, lam: float
) -> LossParts:
    """The combined loss of one micro-batch.

    Args:
        logits: [B, L, V] student logits; position i predicts `labels[:, i]`.
        labels: [B, L] next-token ids, `IGNORE` (-100) where there is none (padding, block end).
        fused_ids: [B, L, k] fused target ids for the same positions, -1 in empty slots.
        fused_probs: [B, L, k] their probabilities (renormalised over the k slots here).
        lam: weight of the CLM term; 1.0 skips the fusion term entirely (plain CLM).

    Returns:
        The parts; `total` keeps the graph.
    """
    import torch

    mask = labels != IGNORE
    n = int(mask.sum())
    logits32 = logits.float()
    lse = torch.logsumexp(logits32, dim=-1)  # [B, L]
    label_logit = logits32.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    clm = ((lse - label_logit) * mask).sum() / max(n, 1)
    if lam >= 1.0 or fused_ids is None or fused_probs is None:
        return LossParts(total=clm, clm=clm.detach(), fusion=torch.tensor(float("nan")), tokens=n)
    valid_slot = fused_ids >= 0
    p = torch.where(
        valid_slot, fused_probs.float(), torch.zeros((), dtype=torch.float32, device=logits.device)
    )
    z = p.sum(-1, keepdim=True)
    has_target = mask & (z.squeeze(-1) > 0)
    p = p / z.clamp(min=1e-12)
    slot_logit = logits32.gather(-1, fused_ids.clamp(min=0).long())  # [B, L, k]
    soft_ce = (p * (lse.unsqueeze(-1) - slot_logit)).sum(-1)  # [B, L]
    m = int(has_target.sum())
    fusion = (soft_ce * has_target).sum() / max(m, 1)
    total = lam * clm + (1.0 - lam) * fusion
    return LossParts(total=total, clm=clm.detach(), fusion=fusion.detach(), tokens=n)
