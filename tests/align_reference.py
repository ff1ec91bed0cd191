"""The FuseLLM token-alignment DTW written plainly: the golden reference for the fast one.

Nested Python loops, float infinities and a two-row Levenshtein, following the reference's
recurrence and backtrace step by step. Deliberately slow and simple; only the handling of
tokens that are empty after marker stripping differs (the reference breaks on them, here their
distance is the other token's length).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["levenshtein", "reference_dtw"]

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
