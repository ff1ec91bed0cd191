"""The sparse fusion loss, block packing and the learning-rate schedule (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fusion_etl.train.data import count_blocks, pack_blocks
from fusion_etl.train.loop import lr_factor
from fusion_etl.train.loss import IGNORE, fusion_loss


def _random_case(
    seed: int, b: int = 3, length: int = 7, v: int = 11, k: int = 4
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, length, v, generator=g, dtype=torch.float64).requires_grad_(True)
    labels = torch.randint(0, v, (b, length), generator=g)
    labels[0, -1] = IGNORE
    labels[2, 3:] = IGNORE
    fused_ids = torch.randint(0, v, (b, length, k), generator=g)
    fused_ids[1, 2, 2:] = -1  # padded slots
    fused_ids[0, 4, :] = -1  # a position with no fused target at all
    fused_probs = torch.rand(b, length, k, generator=g, dtype=torch.float64)
    fused_probs[fused_ids < 0] = 0.0
    return logits, labels, fused_ids, fused_probs


def _dense_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    fused_ids: torch.Tensor,
    fused_probs: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """The loss as the reference computes it: a dense [B, L, V] target distribution."""
    b, length, v = logits.shape
    logp = torch.log_softmax(logits, dim=-1)
    mask = labels != IGNORE
    clm = (
        -(logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum() / mask.sum()
    )
    dense = torch.zeros(b, length, v, dtype=logits.dtype)
    for i in range(b):
        for j in range(length):
            for slot in range(fused_ids.shape[-1]):
                if fused_ids[i, j, slot] >= 0:
                    dense[i, j, fused_ids[i, j, slot]] += fused_probs[i, j, slot]
    z = dense.sum(-1, keepdim=True)
    has = mask & (z.squeeze(-1) > 0)
    dense = dense / z.clamp(min=1e-12)
    soft = -(dense * logp).sum(-1)
    fusion = (soft * has).sum() / has.sum()
    return lam * clm + (1 - lam) * fusion


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lam", [0.0, 0.5, 0.9])
def test_sparse_loss_equals_dense_reference_and_gradients_match(seed: int, lam: float) -> None:
    logits, labels, fused_ids, fused_probs = _random_case(seed)
    sparse = fusion_loss(logits, labels, fused_ids, fused_probs, lam).total
    (g_sparse,) = torch.autograd.grad(sparse, logits)
    dense = _dense_reference(logits, labels, fused_ids, fused_probs, lam)
    (g_dense,) = torch.autograd.grad(dense, logits)
    # The sparse loss computes in float32 (as in training); the reference in float64.
    assert float(sparse.detach()) == pytest.approx(float(dense.detach()), rel=1e-5, abs=1e-6)
    assert torch.allclose(g_sparse.double(), g_dense, atol=1e-6)
    assert g_sparse.abs().sum() > 0, "gradients must flow"


def test_lambda_one_is_plain_clm_exactly() -> None:
    logits, labels, fused_ids, fused_probs = _random_case(3)
    logits32 = logits.detach().float().requires_grad_(True)
    parts = fusion_loss(logits32, labels, fused_ids, fused_probs, 1.0)
    reference = torch.nn.functional.cross_entropy(
        logits32.reshape(-1, logits32.shape[-1]), labels.reshape(-1), ignore_index=IGNORE
    )
    assert float(parts.total) == pytest.approx(float(reference), rel=1e-6)
    assert math.isnan(float(parts.fusion))  # not computed at all
    assert parts.tokens == int((labels != IGNORE).sum())


def test_fused_probabilities_are_renormalised_over_the_k_slots() -> None:
    logits, labels, fused_ids, fused_probs = _random_case(4)
    a = fusion_loss(logits, labels, fused_ids, fused_probs, 0.0).total
    b = fusion_loss(logits, labels, fused_ids, fused_probs * 0.25, 0.0).total
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def _docs(lengths: list[int], k: int = 2) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    out, start = [], 0
    for n in lengths:
        ids = np.arange(start, start + n)
        out.append((ids, np.stack([ids, ids + 1000], axis=1), np.full((n, k), 0.5, np.float32)))
        start += n
    return out


def test_pack_blocks_concatenates_and_labels_within_blocks() -> None:
    blocks = list(pack_blocks(_docs([3, 5, 4]), 5, keep_remainder=True))
    assert [b.input_ids.tolist() for b in blocks] == [
        [0, 1, 2, 3, 4],
        [5, 6, 7, 8, 9],
        [10, 11, 0, 0, 0],
    ]
    assert blocks[0].labels.tolist() == [1, 2, 3, 4, IGNORE]
    assert blocks[2].labels.tolist() == [11, IGNORE, IGNORE, IGNORE, IGNORE]
    assert blocks[1].fused_ids[:, 1].tolist() == [
        1005,
        1006,
        1007,
        1008,
        1009,
    ]  # targets travel with tokens
    assert (
        blocks[2].fused_ids[2:].tolist() == [[-1, -1]] * 3 and blocks[2].fused_probs[2:].sum() == 0
    )
    dropped = list(pack_blocks(_docs([3, 5, 4]), 5, keep_remainder=False))
    assert len(dropped) == 2
    assert count_blocks(12, 5, True) == 3 and count_blocks(12, 5, False) == 2
    # A remainder of one token has nothing to predict: it is not a block.
    assert count_blocks(11, 5, True) == 2 and len(list(pack_blocks(_docs([11]), 5))) == 2


def test_lr_schedule() -> None:
    total, warmup = 100, 10
    assert lr_factor(0, total, warmup, "cosine", 0.0) == pytest.approx(0.1)
    assert lr_factor(9, total, warmup, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(10, total, warmup, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(55, total, warmup, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(100, total, warmup, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(55, total, warmup, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(77, total, warmup, "constant", 0.0) == 1.0


def _rest_case(
    seed: int, b: int = 3, length: int = 7, v: int = 11, k: int = 4
) -> tuple[torch.Tensor, ...]:
    """Like `_random_case`, with distinct ids per row (as align_fuse writes them) and fused
    probabilities that leave mass outside the k ids (one row holds all of it, one-hot)."""
    logits, labels, _, _ = _random_case(seed, b, length, v, k)
    g = torch.Generator().manual_seed(seed + 100)
    fused_ids = torch.stack(
        [torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(length)]) for _ in range(b)]
    )
    fused_ids[1, 2, 2:] = -1
    fused_ids[0, 4, :] = -1
    fused_probs = torch.rand(b, length, k, generator=g, dtype=torch.float64)
    fused_probs = fused_probs / fused_probs.sum(-1, keepdim=True) * 0.6
    fused_probs[2, 1] = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    fused_probs[fused_ids < 0] = 0.0
    return logits, labels, fused_ids, fused_probs


def _dense_rest_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    fused_ids: torch.Tensor,
    fused_probs: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """The rest-bucket loss from dense [B, L, V] tensors: teacher mass on each id plus one
    bucket for the rest, against the student's full softmax summed the same way."""
    b, length, v = logits.shape
    q = torch.softmax(logits, dim=-1)
    mask = labels != IGNORE
    clm = -(torch.log(q.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)) * mask).sum()
    clm = clm / mask.sum()
    dense = torch.zeros(b, length, v, dtype=logits.dtype)
    in_topk = torch.zeros(b, length, v, dtype=torch.bool)
    for i in range(b):
        for j in range(length):
            for slot in range(fused_ids.shape[-1]):
                if fused_ids[i, j, slot] >= 0:
                    dense[i, j, fused_ids[i, j, slot]] = fused_probs[i, j, slot]
                    in_topk[i, j, fused_ids[i, j, slot]] = True
    teacher_rest = 1.0 - dense.sum(-1)
    student_rest = (q * ~in_topk).sum(-1)
    soft = -(dense * torch.log(q)).sum(-1) - teacher_rest * torch.log(student_rest)
    has = mask & (dense.sum(-1) > 0)
    fusion = (soft * has).sum() / has.sum()
    return lam * clm + (1 - lam) * fusion


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lam", [0.0, 0.5, 0.9])
def test_rest_bucket_loss_equals_dense_reference_and_gradients_match(seed: int, lam: float) -> None:
    logits, labels, fused_ids, fused_probs = _rest_case(seed)
    sparse = fusion_loss(logits, labels, fused_ids, fused_probs, lam, topk_mass="rest").total
    (g_sparse,) = torch.autograd.grad(sparse, logits)
    dense = _dense_rest_reference(logits, labels, fused_ids, fused_probs, lam)
    (g_dense,) = torch.autograd.grad(dense, logits)
    assert float(sparse.detach()) == pytest.approx(float(dense.detach()), rel=1e-5, abs=1e-6)
    assert torch.allclose(g_sparse.double(), g_dense, atol=1e-6)
    assert torch.isfinite(g_sparse).all()


def test_rest_bucket_differs_from_renormalising_only_where_mass_is_missing() -> None:
    logits, labels, fused_ids, fused_probs = _rest_case(5)
    rest = fusion_loss(logits, labels, fused_ids, fused_probs, 0.0, topk_mass="rest")
    renorm = fusion_loss(logits, labels, fused_ids, fused_probs, 0.0)
    assert float(rest.fusion) != pytest.approx(float(renorm.fusion), rel=1e-3)
    full = fused_probs / fused_probs.sum(-1, keepdim=True).clamp(min=1e-12)
    a = fusion_loss(logits, labels, fused_ids, full, 0.0, topk_mass="rest").total
    b = fusion_loss(logits, labels, fused_ids, full, 0.0).total
    assert float(a) == pytest.approx(float(b), rel=1e-6)  # nothing outside the k ids
    with pytest.raises(ValueError, match="topk_mass"):
        fusion_loss(logits, labels, fused_ids, fused_probs, 0.5, topk_mass="other")
