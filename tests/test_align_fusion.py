"""Distribution transfer and fusion on hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fusion_etl.align.fusion import (
    Candidate,
    boundary_pairs,
    fuse,
    merge_topk,
    one_to_one_pairs,
    transfer,
)


def test_merge_topk_sums_collisions_orders_and_pads() -> None:
    ids = np.array([[3, 5, 3, -1], [7, 7, 7, 2], [-1, -1, -1, -1], [4, 9, 1, 6]])
    probs = np.array(
        [[0.2, 0.3, 0.4, 0.9], [0.1, 0.1, 0.1, 0.5], [0.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]
    )
    out_ids, out_probs = merge_topk(ids, probs, 3)
    assert out_ids.tolist() == [
        [3, 5, -1],
        [2, 7, -1],
        [-1, -1, -1],
        [1, 4, 6],
    ]  # ties: lower id first
    expected = np.array(
        [[0.6, 0.3, 0], [0.5, 0.3, 0], [0, 0, 0], [0.25, 0.25, 0.25]], dtype=np.float32
    )
    np.testing.assert_allclose(out_probs, expected, atol=1e-7)


def test_one_to_one_pairs() -> None:
    # source 0 -> target 0 (1:1); source 1 -> targets 1,2 (1:n); sources 2,3 -> target 3 (n:1)
    path = [(0, 0), (1, 1), (1, 2), (2, 3), (3, 3), (4, 4)]
    s, t = one_to_one_pairs(path, 5, 5)
    assert list(zip(s.tolist(), t.tolist(), strict=True)) == [(0, 0), (4, 4)]


def test_boundary_pairs_pair_the_last_token_of_each_shared_end() -> None:
    # Text "ab cd—e" (the dash is one character that a byte-level tokenizer splits in three).
    # Target: BOS, "ab", " cd", "—", "e", EOS. Source: BOS, "a", "b", " c", "d", 3 byte pieces of
    # "—" (all spanning it), "e", EOS.
    target = [(0, 0), (0, 2), (2, 5), (5, 6), (6, 7), (7, 7)]
    source = [(0, 0), (0, 1), (1, 2), (2, 4), (4, 5), (5, 6), (5, 6), (5, 6), (6, 7), (7, 7)]
    s, t = boundary_pairs(source, target)
    # Ends shared: 0 (BOS), 2 ("ab" / "b"), 5 (" cd" / "d"), 6 (the dash / its last byte piece)
    # and 7 ("e", which predicts the EOS; the EOS itself, the last position, predicts nothing).
    assert list(zip(s.tolist(), t.tolist(), strict=True)) == [
        (0, 0),
        (2, 1),
        (4, 2),
        (7, 3),
        (8, 4),
    ]
    # An equal tokenization pairs every position but the last with itself.
    s, t = boundary_pairs(target, target)
    assert s.tolist() == t.tolist() == list(range(len(target) - 1))
    assert [x.tolist() for x in boundary_pairs([], target)] == [[], []]
    # The same three byte pieces of the dash on both sides pair in order.
    target_bytes = [(0, 0), (0, 2), (2, 5), (5, 6), (5, 6), (5, 6), (6, 7), (7, 7)]
    s, t = boundary_pairs(source, target_bytes)
    assert list(zip(s.tolist(), t.tolist(), strict=True))[3:] == [(5, 3), (6, 4), (7, 5), (8, 6)]


def test_transfer_takes_given_pairs_whatever_the_tokens() -> None:
    # Pairs given (by character ends): source position 2 -> target position 0 although the
    # tokens differ; position 1 unpaired gets the one-hot on the next token.
    ids, probs, matched = transfer(
        [],
        source_ids=np.array([0, 1, 2]),
        target_ids=np.array([10, 11]),
        source_topk_ids=np.array([[0, 1], [1, 2], [2, 0]]),
        source_topk_logprobs=np.array([_lp(0.5, 0.4), _lp(0.6, 0.3), _lp(0.9, 0.1)]),
        vocab_map=np.array([10, 11, 12]),
        pairs=(np.array([2]), np.array([0])),
    )
    assert matched.tolist() == [True, False]
    assert ids[0].tolist() == [12, 10] and probs[0] == pytest.approx([0.9, 0.1])
    assert ids[1].tolist() == [-1, -1]


def _lp(*p: float) -> list[float]:
    return [math.log(x) for x in p]


def test_transfer_matched_unmatched_next_token_and_collisions() -> None:
    # Target tokens t0..t4 = ids 10..14; source tokens s0..s4 = ids 0..4, vocab map i -> 10 + i,
    # except source id 3, which maps to 99 (so a 1:1 pair on it does not match).
    vocab_map = np.array([10, 11, 12, 99, 14, 11])
    source_ids = np.array([0, 1, 3, 2, 4])
    target_ids = np.array([10, 11, 12, 13, 14])
    path = [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]
    # Source top-2 at each position (source vocab ids); position 1 has ids 1 and 5, which both
    # map to target id 11: their mass must be summed.
    src_top = np.array([[1, 2], [1, 5], [2, 0], [4, 2], [0, 1]])
    src_lp = np.array([_lp(0.6, 0.3), _lp(0.5, 0.25), _lp(0.7, 0.2), _lp(0.8, 0.1), _lp(0.5, 0.5)])
    ids, probs, matched = transfer(
        path,
        source_ids=source_ids,
        target_ids=target_ids,
        source_topk_ids=src_top,
        source_topk_logprobs=src_lp,
        vocab_map=vocab_map,
    )
    assert matched.tolist() == [True, True, False, False, True]
    assert ids[0].tolist() == [11, 12] and probs[0] == pytest.approx([0.6, 0.3])
    assert ids[1].tolist() == [11, -1] and probs[1] == pytest.approx([0.75, 0.0])
    # Unmatched: a one-hot on the NEXT target token (not the current one: FuseLLM's bug B1).
    assert ids[2].tolist() == [13, -1] and probs[2].tolist() == [1.0, 0.0]
    assert ids[3].tolist() == [14, -1] and probs[3].tolist() == [1.0, 0.0]
    assert ids[4].tolist() == [10, 11] and probs[4] == pytest.approx([0.5, 0.5])


def test_transfer_byte_keys_count_as_match_and_last_position_unmatched_is_empty() -> None:
    vocab_map = np.array([50, 50])  # the map sends both source ids elsewhere
    keys_source = np.array([7, 8])
    keys_target = np.array([0, 0, 0, 7, 9])  # target id 3 stands for the same bytes as source id 0
    ids, probs, matched = transfer(
        [(0, 0), (1, 1)],
        source_ids=np.array([0, 1]),
        target_ids=np.array([3, 4]),
        source_topk_ids=np.array([[0], [1]]),
        source_topk_logprobs=np.array([[0.0], [0.0]]),
        vocab_map=vocab_map,
        source_token_keys=keys_source,
        target_token_keys=keys_target,
    )
    assert matched.tolist() == [True, False]
    assert ids.tolist() == [[50], [-1]] and probs.tolist() == [[1.0], [0.0]]


def _cand(
    ids: list[list[int]],
    probs: list[list[float]],
    nll: float,
    n: int,
    nbytes: int,
    valid: list[bool] | None = None,
) -> Candidate:
    return Candidate(
        ids=np.array(ids, dtype=np.int32),
        probs=np.array(probs, dtype=np.float32),
        valid=np.array(valid if valid is not None else [True] * len(ids)),
        nll=nll,
        num_tokens=n,
        num_bytes=nbytes,
    )


TARGET_IDS = np.array([1, 2, 3])


def test_min_ce_sequence_picks_lowest_ce() -> None:
    target = _cand(
        [[2, 5], [3, 5], [-1, -1]], [[0.5, 0.2], [0.6, 0.1], [0, 0]], nll=4.0, n=3, nbytes=10
    )  # CE 2.0
    src1 = _cand(
        [[2, 6], [3, 6], [-1, -1]], [[0.7, 0.2], [0.8, 0.1], [0, 0]], nll=3.0, n=3, nbytes=10
    )  # CE 1.5
    src2 = _cand(
        [[2, 7], [3, 7], [-1, -1]], [[0.9, 0.0], [0.9, 0.0], [0, 0]], nll=6.0, n=3, nbytes=10
    )  # CE 3.0
    f = fuse([target, src1, src2], TARGET_IDS, method="min_ce")
    assert f.weights.tolist() == [0.0, 1.0, 0.0]
    assert f.ids.tolist() == src1.ids.tolist()
    np.testing.assert_allclose(f.probs, src1.probs)


def test_avg_ce_weights_are_softmax_of_minus_ce_over_tau() -> None:
    target = _cand([[2, 5]], [[0.5, 0.5]], nll=1.0, n=2, nbytes=4)  # CE 1.0
    src = _cand([[2, 6]], [[0.8, 0.2]], nll=2.0, n=2, nbytes=4)  # CE 2.0
    f = fuse([target, src], np.array([1]), method="avg_ce", temperature=1.0)
    w_t = math.exp(-1) / (math.exp(-1) + math.exp(-2))  # 0.7311
    assert f.weights.tolist() == pytest.approx([w_t, 1 - w_t], abs=1e-6)
    # id 2: 0.5 w_t + 0.8 (1 - w_t); id 5: 0.5 w_t; id 6: 0.2 (1 - w_t)
    assert f.ids.tolist() == [[2, 5]]
    assert f.probs[0].tolist() == pytest.approx([0.5 * w_t + 0.8 * (1 - w_t), 0.5 * w_t], abs=1e-6)
    f2 = fuse([target, src], np.array([1]), method="avg_ce", temperature=0.5)
    w2 = math.exp(-2) / (math.exp(-2) + math.exp(-4))
    assert f2.weights[0] == pytest.approx(w2, abs=1e-6)


def test_byte_unit_can_change_the_choice() -> None:
    # Target: nll 10 over 11 tokens (1.0/token), 20 bytes (0.5/byte).
    # Source: nll 12 over 7 tokens (2.0/token), 40 bytes (0.3/byte).
    target = _cand([[2]], [[1.0]], nll=10.0, n=11, nbytes=20)
    src = _cand([[3]], [[1.0]], nll=12.0, n=7, nbytes=40)
    assert fuse([target, src], np.array([1]), ce_unit="token").weights.tolist() == [1.0, 0.0]
    assert fuse([target, src], np.array([1]), ce_unit="byte").weights.tolist() == [0.0, 1.0]


def test_token_level_min_ce_per_position_respects_validity() -> None:
    # Next tokens are 2 then 3. Position 0: target gives 2 prob 0.4, source 0.9 -> source.
    # Position 1: the source is not matched there, so the target wins whatever its CE.
    target = _cand(
        [[2, 9], [3, 9], [-1, -1]], [[0.4, 0.1], [0.2, 0.1], [0, 0]], nll=1, n=3, nbytes=3
    )
    src = _cand(
        [[2, 8], [3, -1], [-1, -1]],
        [[0.9, 0.1], [1.0, 0], [0, 0]],
        nll=9,
        n=3,
        nbytes=3,
        valid=[True, False, True],
    )
    f = fuse([target, src], TARGET_IDS, method="min_ce", level="token")
    assert f.ids[0].tolist() == [2, 8] and f.probs[0].tolist() == pytest.approx([0.9, 0.1])
    assert f.ids[1].tolist() == [3, 9] and f.probs[1].tolist() == pytest.approx([0.2, 0.1])
    assert f.weights.tolist() == pytest.approx(
        [0.5, 0.5]
    )  # mean over the two positions with a next token


def test_fuse_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        fuse([], TARGET_IDS)
    target = _cand([[2]], [[1.0]], nll=1, n=2, nbytes=2)
    with pytest.raises(ValueError):
        fuse([target], np.array([1]), temperature=0)
    with pytest.raises(ValueError, match="rows"):
        fuse([target], np.array([1, 2]))
