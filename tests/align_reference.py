"""The FuseLLM token-alignment DTW written plainly: the golden references for the fast one.

* `reference_dtw`: nested Python loops, float infinities and a two-row Levenshtein, following
  the reference's recurrence and backtrace step by step, with nothing but the standard library.
* `editdistance_dtw`: the reference code's own shape (FuseLLM's ``dtw`` with its
  ``editdistance``-based ``norm_func``): a float64 numpy table filled in Python loops with one
  C ``editdistance.eval`` per cell, then the backtrace with ``np.argmin``. The baseline of
  ``fusion-etl bench align``.

Deliberately slow and simple. Both strip both word-start markers from every token, as
`fusion_etl.align.strip_markers` does (the reference strips each model's own marker, which is
the same on real tokenizations), and a token that is empty after stripping costs the other
token's length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import editdistance
import numpy as np

__all__ = ["editdistance_dtw", "levenshtein", "reference_dtw"]

_MARKERS = ("Ġ", "▁")


def _strip(token: str) -> str:
    for marker in _MARKERS:
        token = token.replace(marker, "")
    return token


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute, each cost 1) with a two-row DP."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i] + [0] * len(b)
        for j, cb in enumerate(b, start=1):
            current[j] = min(
                previous[j] + 1,  # delete ca
                current[j - 1] + 1,  # insert cb
                previous[j - 1] + (ca != cb),  # substitute (or keep)
            )
        previous = current
    return previous[len(b)]


def reference_dtw(
    source_tokens: Sequence[str], target_tokens: Sequence[str]
) -> list[tuple[int, int]]:
    """The reference DTW path as (source_index, target_index) pairs; [] if either is empty."""
    n, m = len(source_tokens), len(target_tokens)
    if n == 0 or m == 0:
        return []
    src = [_strip(t) for t in source_tokens]
    tgt = [_strip(t) for t in target_tokens]

    # D has a border row and column of +inf, except D[0][0] = 0.
    inf = math.inf
    d = [[inf] * (m + 1) for _ in range(n + 1)]
    d[0][0] = 0.0
    for i in range(n):
        for j in range(m):
            cost = levenshtein(src[i], tgt[j])
            d[i + 1][j + 1] = cost + min(d[i][j + 1], d[i + 1][j], d[i][j])
    acc = [row[1:] for row in d[1:]]

    i, j = n - 1, m - 1
    path: list[tuple[int, int]] = []
    while i > 0 or j > 0:
        path.append((i, j))
        diag = acc[i - 1][j - 1] if i > 0 and j > 0 else inf
        up = acc[i - 1][j] if i > 0 else inf
        left = acc[i][j - 1] if j > 0 else inf
        candidates = [diag, up, left]
        move = candidates.index(min(candidates))  # the first minimum, like np.argmin
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    path.append((0, 0))
    path.reverse()
    return path


def editdistance_dtw(
    source_tokens: Sequence[str], target_tokens: Sequence[str]
) -> list[tuple[int, int]]:
    """The reference's shape: numpy table, Python loops, ``editdistance.eval`` per cell.

    The reference strips markers inside its per-cell distance function; here every token is
    stripped once up front, which only makes this baseline faster than the reference.
    """
    n, m = len(source_tokens), len(target_tokens)
    if n == 0 or m == 0:
        return []
    src = [_strip(t) for t in source_tokens]
    tgt = [_strip(t) for t in target_tokens]
    distance = editdistance.eval
    matrix = np.zeros((n + 1, m + 1))
    matrix[0, :] = np.inf
    matrix[:, 0] = np.inf
    matrix[0, 0] = 0
    for i, a in enumerate(src):
        for j, b in enumerate(tgt):
            cost = distance(a, b)
            matrix[i + 1, j + 1] = cost + min(matrix[i, j + 1], matrix[i + 1, j], matrix[i, j])
    matrix = matrix[1:, 1:]
    i, j = n - 1, m - 1
    path: list[tuple[int, int]] = []
    while i > 0 or j > 0:
        path.append((i, j))
        option_diag = matrix[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        option_up = matrix[i - 1, j] if i > 0 else np.inf
        option_left = matrix[i, j - 1] if j > 0 else np.inf
        move = np.argmin([option_diag, option_up, option_left])
        if move == 0:
            i -= 1
            j -= 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    path.append((0, 0))
    path.reverse()
    return path
