"""Weight merging of same-architecture models, one tensor at a time. Pure torch: no I/O.

Every method works per parameter tensor, so a merge never needs more than one tensor of each
model in memory. theta_i are the models' tensors, theta_0 the base's, tau_i = theta_i - theta_0
their task vectors, w_i the weights (normalised to sum to 1 where they average):

- `linear`: sum_i w_i theta_i (uniform weights, or performance weights, see
  `performance_weights`);
- `task_arithmetic` (Ilharco et al., 2023): theta_0 + scale * sum_i w_i tau_i;
- `ties` (Yadav et al., 2023): trim each tau_i to its `density` fraction of largest
  magnitudes, elect per element the sign of sum_i w_i trim(tau_i), and average (weighted) only
  the trimmed entries that agree with it: theta_0 + scale * merged;
- `sce` (FuseChat, Wan et al., 2024: select, calculate, erase): per tensor, *select* the
  `select` fraction of elements whose task-vector entries vary most across the models;
  *calculate* each model's coefficient as the sum of squares of its selected entries over that
  of all models; *erase* selected entries whose sign disagrees with the sign of their sum;
  theta_0 + scale * sum_i c_i tau_i (selected, kept entries only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

__all__ = ["MergeMethod", "merge_tensor", "performance_weights"]

MergeMethod = Literal["linear", "task_arithmetic", "ties", "sce"]


def performance_weights(losses: Sequence[float], temperature: float) -> list[float]:
    """Weights softmax(-loss / temperature): the better a model on validation text, the more
    it counts (losses in bits per byte, lower is better)."""
    if not losses:
        raise ValueError("no losses")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    import math

    best = min(losses)
    e = [math.exp(-(x - best) / temperature) for x in losses]
    return [v / sum(e) for v in e]


def _top_fraction_mask(score: Any, fraction: float) -> Any:
    """True at the `fraction` of entries with the largest `score` (at least one)."""
    import torch

    n = score.numel()
    keep = max(1, round(fraction * n))
    if keep >= n:
        return torch.ones_like(score, dtype=torch.bool)
    threshold = score.reshape(-1).float().topk(keep).values[-1]
    return score >= threshold


def merge_tensor(
    tensors: Sequence[Any],
    *,
    method: MergeMethod,
    weights: Sequence[float] | None = None,
    base: Any | None = None,
    scale: float = 1.0,
    density: float = 0.2,
    select: float = 0.1,
) -> Any:
    """Merge one parameter tensor of several models (see the module docstring).

    Args:
        tensors: the models' tensors, all of one shape.
        method: the merge method.
        weights: per model; default uniform. Normalised to sum to 1.
        base: the base model's tensor (task vectors are taken against it); needed by every
            method but `linear`.
        scale: multiplies the merged task vector.
        density: `ties`: fraction of each task vector's entries kept.
        select: `sce`: fraction of entries selected by their variance across models.

    Returns:
        The merged tensor, in fp32 (the caller casts).
    """
    import torch

    if not tensors:
        raise ValueError("nothing to merge")
    shape = tensors[0].shape
    if any(t.shape != shape for t in tensors):
        raise ValueError("tensors of different shapes cannot be merged")
    n = len(tensors)
    w = torch.tensor(list(weights) if weights is not None else [1.0] * n, dtype=torch.float32)
    if len(w) != n or (w < 0).any() or float(w.sum()) <= 0:
        raise ValueError("weights must be one non-negative number per model, not all zero")
    w = w / w.sum()
    stack = torch.stack([t.detach().float() for t in tensors])  # [n, ...]
    view = w.reshape(-1, *([1] * len(shape)))
    if method == "linear":
        return (view * stack).sum(0)
    if base is None:
        raise ValueError(f"{method} needs a base model")
    theta0 = base.detach().float()
    tau = stack - theta0
    if method == "task_arithmetic":
        return theta0 + scale * (view * tau).sum(0)
    if method == "ties":
        if not 0 < density <= 1:
            raise ValueError("density must be in (0, 1]")
        trimmed = torch.stack([t * _top_fraction_mask(t.abs(), density) for t in tau])
        sign = torch.sign((view * trimmed).sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        mass = (view * agree).sum(0)
        merged = (view * trimmed * agree).sum(0) / mass.clamp(min=1e-12)
        return theta0 + scale * torch.where(mass > 0, merged, torch.zeros_like(merged))
    if method == "sce":
        if not 0 < select <= 1:
            raise ValueError("select must be in (0, 1]")
        chosen = _top_fraction_mask(tau.var(0, unbiased=False) if n > 1 else tau[0].abs(), select)
        selected = tau * chosen
        energy = selected.pow(2).reshape(n, -1).sum(1)
        coeff = energy / energy.sum() if float(energy.sum()) > 0 else w
        sign = torch.sign(selected.sum(0))
        kept = selected * (torch.sign(selected) == sign)
        return theta0 + scale * (coeff.reshape(-1, *([1] * len(shape))) * kept).sum(0)
    raise ValueError(f"unknown merge method {method!r}")
