"""The FuseLLM training loss, sparse: `lam * CLM + (1 - lam) * fusion`.

fusion = soft cross-entropy of the student against the fused top-k distribution, computed
with a gather over the k ids: no dense [batch, length, vocab] target ever exists (the
reference's collator builds one, about 131 MB per teacher per 2048-token sample). One
log-sum-exp over the vocabulary serves both terms, since -log softmax(z)_v = logsumexp(z) - z_v.

What happens to the teacher's mass outside its top-k (`topk_mass`):
- `renormalize` (the reference): the k probabilities are rescaled to sum to 1, and the student
  is taught -sum_j p_j/P log q_j (P = sum_j p_j, q = softmax(z)): a teacher whose top-10 holds
  half its mass is taught as twice as confident as it is;
- `rest`: the mass outside the top-k is one more category the student must also match,
  -sum_j p_j log q_j - (1 - P) log(1 - sum_j q_j): the cross-entropy between the teacher's and
  the student's distributions over {the k ids, everything else}.
Pure torch: no I/O, no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["LossParts", "fusion_loss"]

IGNORE = -100
REST_FLOOR = 1e-6
"""Smallest mass the `rest` loss lets the student keep outside the k ids."""


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


def _log1mexp(a: Any) -> Any:
    """log(1 - exp(a)) for a <= 0, accurate near both ends."""
    import torch

    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def fusion_loss(
    logits: Any,
    labels: Any,
    fused_ids: Any | None,
    fused_probs: Any | None,
    lam: float,
    *,
    topk_mass: str = "renormalize",
) -> LossParts:
    """The combined loss of one micro-batch.

    Args:
        logits: [B, L, V] student logits; position i predicts `labels[:, i]`.
        labels: [B, L] next-token ids, `IGNORE` (-100) where there is none (padding, block end).
        fused_ids: [B, L, k] fused target ids for the same positions, -1 in empty slots.
        fused_probs: [B, L, k] their probabilities (at most 1 in sum; distinct ids per row).
        lam: weight of the CLM term; 1.0 skips the fusion term entirely (plain CLM).
        topk_mass: `renormalize` or `rest` (see the module docstring).

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
    slot_logit = logits32.gather(-1, fused_ids.clamp(min=0).long())  # [B, L, k]
    if topk_mass == "rest":
        rest = (1.0 - z.squeeze(-1)).clamp(min=0.0)
        # log of the student's mass on the k ids (empty slots: a finite -1e30, so that a row
        # with none keeps finite gradients), then on everything else, floored at 1e-6 so that a
        # student sure of the k ids gets a large but finite loss.
        in_slots = torch.logsumexp(slot_logit.masked_fill(~valid_slot, -1e30), dim=-1) - lse
        log_rest = _log1mexp(in_slots.clamp(max=math.log1p(-REST_FLOOR)))
        soft_ce = (p * (lse.unsqueeze(-1) - slot_logit)).sum(-1) - rest * log_rest
    elif topk_mass == "renormalize":
        p = p / z.clamp(min=1e-12)
        soft_ce = (p * (lse.unsqueeze(-1) - slot_logit)).sum(-1)  # [B, L]
    else:
        raise ValueError(f"topk_mass must be 'renormalize' or 'rest', not {topk_mass!r}")
    m = int(has_target.sum())
    fusion = (soft_ce * has_target).sum() / max(m, 1)
    total = lam * clm + (1.0 - lam) * fusion
    return LossParts(total=total, clm=clm.detach(), fusion=fusion.detach(), tokens=n)
