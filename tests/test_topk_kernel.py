"""The compiled per-row top-k of CPU extraction (fusion_etl.backends._topk_kernel), against
numpy's stable sort and against torch.topk inside the real scorer."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fusion_etl.backends._topk_kernel import row_topk


@pytest.mark.parametrize("k", [1, 3, 10, 40])
def test_row_topk_equals_a_stable_sort(k: int) -> None:
    rng = np.random.default_rng(k)
    x = rng.normal(size=(64, 40)).astype(np.float32)
    # Ties within rows, also across the k-th place: a coarse grid of values.
    x[::3] = np.round(x[::3] * 2) / 2
    values, ids = row_topk(x, k)
    expected = np.argsort(-x, axis=1, kind="stable")[:, :k]  # lower index first among equals
    assert (ids == expected).all()
    assert (values == np.take_along_axis(x, expected, axis=1)).all()


def test_row_topk_writes_into_given_outputs_and_checks_arguments() -> None:
    x = np.array([[0.5, -1.0, 2.0, 2.0]], np.float32)
    values = np.zeros((1, 2), np.float32)
    ids = np.zeros((1, 2), np.int32)
    row_topk(x, 2, values=values, ids=ids)
    assert ids.tolist() == [[2, 3]] and values.tolist() == [[2.0, 2.0]]
    picked = np.zeros(1, np.float32)
    row_topk(x, 1, targets=np.array([1]), picked=picked)
    assert picked.tolist() == [-1.0]
    with pytest.raises(ValueError, match=r"targets must be columns in \[0, 4\)"):
        row_topk(x, 1, targets=np.array([4]), picked=picked)
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        row_topk(x, 5)
    with pytest.raises(ValueError, match="outputs must have shape"):
        row_topk(x, 3, values=values, ids=ids)


@pytest.mark.slow
def test_scorer_gives_the_same_columns_with_either_top_k(test_kit: Any) -> None:
    from fusion_etl.backends.transformers_backend import TransformersScorer
    from fusion_etl.tokenization import load_tokenizer

    tok = load_tokenizer(str(test_kit.target.path))
    texts = [p.read_text(encoding="utf-8")[:3000] for p in sorted(test_kit.corpus_dir.glob("*"))]
    docs = [np.asarray(e.ids[:200], np.int32) for e in tok.encode_batch(texts) if len(e.ids) > 8]
    scorer = TransformersScorer(str(test_kit.target.path), top_k=10, dtype="float32")
    scorer.chunk_rows = 64  # several chunks per batch
    compiled = scorer.score(docs)
    scorer.topk_kernel = False
    reference = scorer.score(docs)
    assert (compiled.lengths == reference.lengths).all()
    np.testing.assert_array_equal(compiled.topk_logprobs, reference.topk_logprobs)
    np.testing.assert_array_equal(compiled.token_logprobs, reference.token_logprobs)
    # Ids agree wherever the value is not tied with a neighbour (torch orders ties its own way).
    lp = reference.topk_logprobs
    tied = np.zeros_like(lp, dtype=bool)
    tied[:, 1:] |= lp[:, 1:] == lp[:, :-1]
    tied[:, :-1] |= lp[:, :-1] == lp[:, 1:]
    assert (compiled.topk_ids[~tied] == reference.topk_ids[~tied]).all()
