"""The DTW recurrence and backtrace, compiled with numba (imported only where DTW runs).

Why compiled: the recurrence ``M[i, j] = c[i, j] + min(M[i-1, j-1], M[i-1, j], M[i, j-1])``
has a left-to-right dependency within each row, so numpy needs several calls per row and passes
over every cell several times (about 16-20 ns a cell here). A compiled loop does one pass at
about 2 ns a cell. Why numba rather than a C extension: it installs as a wheel from PyPI on
every platform the project supports (no compiler or Python headers on the nodes), and both
vLLM builds that the project pins already require exactly this numba version.

First-call cost: the functions carry explicit signatures, so they compile once when this module
is first imported (about 1-2 s) and ``cache=True`` writes the machine code next to this file
(``__pycache__``); every later process on the machine, Ray workers included, loads it in well
under a second instead of compiling again.

Pure functions: no I/O, no Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt
from numba import njit

__all__ = ["DIAG", "LEFT", "UP", "dtw_path_indices", "dtw_steps"]

# The backtrace's moves out of a cell, in its tie-breaking order.
DIAG, UP, LEFT = 0, 1, 2

F = TypeVar("F", bound=Callable[..., Any])


def _compiled(signature: str) -> Callable[[F], F]:
    """numba's `njit` with one explicit signature (compiled at import, cached on disk), typed
    for mypy as returning the function it wraps."""
    return cast(Callable[[F], F], njit(signature, cache=True, nogil=True, boundscheck=False))


@_compiled("uint8[:, ::1](int32[:, ::1], intp[::1], intp[::1])")
def dtw_steps(
    distinct: npt.NDArray[np.int32], rows: npt.NDArray[np.intp], cols: npt.NDArray[np.intp]
) -> npt.NDArray[np.uint8]:
    """The backtrace's move out of every cell of the reference's accumulated-cost table.

    The cell costs are ``c[i, j] = distinct[rows[i], cols[j]]``: the cost of distinct string
    pairs, gathered on the fly, so the full ``(n, m)`` cost table never exists. The reference
    walks back from the last cell comparing ``diag = M[i-1, j-1]``, ``up = M[i-1, j]`` and
    ``left = M[i, j-1]`` and takes the first minimum in that order; those are exactly the three
    values the forward recurrence takes the minimum of, so the move is decided here, once, and
    stored as one byte per cell instead of the table itself (four or eight bytes per cell).

    Only two rows of ``M`` are kept. They are int64: every value is at most
    ``(n + m) * max cost``, so no real input can overflow it and equal sums compare equal,
    as in the reference's float64 table (exact for integers below 2**53).
    """
    n = rows.shape[0]
    m = cols.shape[0]
    steps = np.empty((n, m), np.uint8)
    prev = np.empty(m, np.int64)
    cur = np.empty(m, np.int64)
    # Row 0: the reference's +inf border leaves only the move to the left (cell (0, 0) is the
    # end of the walk; its entry is never read).
    cost_row = distinct[rows[0]]
    total = np.int64(0)
    for j in range(m):
        total += cost_row[cols[j]]
        prev[j] = total
        steps[0, j] = LEFT
    for i in range(1, n):
        cost_row = distinct[rows[i]]
        step_row = steps[i]
        # Column 0: only the move up.
        left = prev[0] + cost_row[cols[0]]
        cur[0] = left
        step_row[0] = UP
        for j in range(1, m):
            diag = prev[j - 1]
            up = prev[j]
            # The first minimum of (diag, up, left), as np.argmin picks it.
            if diag <= up:
                best, move = diag, DIAG
            else:
                best, move = up, UP
            if left < best:
                best, move = left, LEFT
            left = best + cost_row[cols[j]]
            cur[j] = left
            step_row[j] = move
        prev, cur = cur, prev
    return steps


@_compiled("int64[:, ::1](uint8[:, ::1])")
def _walk_back(steps: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
    """The path from (0, 0) to (n-1, m-1) as ``(len, 2)`` indices, following `steps` back."""
    n, m = steps.shape
    path = np.empty((n + m - 1, 2), np.int64)
    i, j = n - 1, m - 1
    k = n + m - 2
    # The walk is filled from the end so that the result needs no reversal; it has at most
    # n + m - 1 cells (one fewer per diagonal move), so it ends somewhere at or after index 0.
    while i > 0 or j > 0:
        path[k, 0] = i
        path[k, 1] = j
        k -= 1
        move = steps[i, j]
        if move == DIAG:
            i -= 1
            j -= 1
        elif move == UP:
            i -= 1
        else:
            j -= 1
    path[k, 0] = 0
    path[k, 1] = 0
    return path[k:].copy()


def dtw_path_indices(
    distinct: npt.NDArray[np.int32], rows: npt.NDArray[np.intp], cols: npt.NDArray[np.intp]
) -> npt.NDArray[np.int64]:
    """The reference DTW path for the costs ``distinct[rows[i], cols[j]]``.

    Args:
        distinct: ``(u, v)`` costs of the distinct source and target strings.
        rows: For each of the n source tokens, its row in `distinct`.
        cols: For each of the m target tokens, its column in `distinct`.

    Returns:
        ``(len, 2)`` int64 ``(source_index, target_index)`` pairs from ``(0, 0)`` to
        ``(n - 1, m - 1)``.

    Raises:
        ValueError: An empty side, or an index outside `distinct` (the compiled loop does not
            check bounds, so they are checked here, once).
    """
    distinct = np.ascontiguousarray(distinct, dtype=np.int32)
    rows = np.ascontiguousarray(rows, dtype=np.intp)
    cols = np.ascontiguousarray(cols, dtype=np.intp)
    if len(rows) == 0 or len(cols) == 0:
        raise ValueError("DTW needs at least one token on each side")
    u, v = distinct.shape
    if rows.min() < 0 or rows.max() >= u or cols.min() < 0 or cols.max() >= v:
        raise ValueError(f"token indices outside the ({u}, {v}) distinct cost table")
    path: npt.NDArray[np.int64] = _walk_back(dtw_steps(distinct, rows, cols))
    return path
