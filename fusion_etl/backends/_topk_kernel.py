"""Top-k of each row of a float32 matrix, compiled with numba, for CPU extraction.

Why: on a CPU, `torch.topk` over a vocabulary-wide row costs about as much as the LM head's
matrix product for that row on a small model (it was the largest part of the extraction
overhead over a bare forward pass). Scanning a row once against the current k-th value, and
inserting the rare larger one into a sorted array of k, does the same in one cheap pass. (Why
numba: see `fusion_etl.align._dtw_kernel`; the same explicit-signature, on-disk-cached
compilation, so a Ray actor loads it instead of compiling it.)

Order: descending value; among equal values the lower index comes first. NaN never enters the
top-k (it compares false), unlike in `torch.topk`; log-softmax outputs of finite logits have
none.

Pure functions: no I/O, no Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt
from numba import njit

__all__ = ["row_topk"]

F = TypeVar("F", bound=Callable[..., Any])


def _compiled(signature: str) -> Callable[[F], F]:
    return cast(Callable[[F], F], njit(signature, cache=True, nogil=True, boundscheck=False))


@_compiled("void(float32[:, ::1], float32[:, ::1], int32[:, ::1], int64[::1], float32[::1])")
def _row_topk(
    x: npt.NDArray[np.float32],
    values: npt.NDArray[np.float32],
    ids: npt.NDArray[np.int32],
    targets: npt.NDArray[np.int64],
    picked: npt.NDArray[np.float32],
) -> None:
    rows, width = x.shape
    k = values.shape[1]
    for i in range(rows):
        row = x[i]
        if targets.shape[0]:
            picked[i] = row[targets[i]]
        top = values[i]
        top_ids = ids[i]
        # The first k, insertion-sorted; strict comparisons keep equal values in index order.
        for j in range(k):
            value = row[j]
            p = j
            while p > 0 and top[p - 1] < value:
                top[p] = top[p - 1]
                top_ids[p] = top_ids[p - 1]
                p -= 1
            top[p] = value
            top_ids[p] = j
        threshold = top[k - 1]
        for j in range(k, width):
            value = row[j]
            if value > threshold:
                p = k - 1
                while p > 0 and top[p - 1] < value:
                    top[p] = top[p - 1]
                    top_ids[p] = top_ids[p - 1]
                    p -= 1
                top[p] = value
                top_ids[p] = j
                threshold = top[k - 1]


def row_topk(
    x: npt.NDArray[np.float32],
    k: int,
    *,
    values: npt.NDArray[np.float32] | None = None,
    ids: npt.NDArray[np.int32] | None = None,
    targets: npt.NDArray[np.int64] | None = None,
    picked: npt.NDArray[np.float32] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
    """The k largest values of each row of `x` and their column indices, in descending order;
    with `targets`, also ``x[i, targets[i]]`` into `picked` (in the same pass over the rows).

    Args:
        x: ``(rows, width)`` float32, C-contiguous.
        k: Entries per row, ``1 <= k <= width``.
        values: Optional ``(rows, k)`` float32 C-contiguous array to write the values into.
        ids: Optional ``(rows, k)`` int32 C-contiguous array to write the indices into.
        targets: Optional ``(rows,)`` column per row, each in ``[0, width)``.
        picked: ``(rows,)`` float32 array for the targets' values (required with `targets`).

    Returns:
        ``(values, ids)``.

    Raises:
        ValueError: k outside ``[1, width]``, outputs of the wrong shape, or targets outside
            the row (the compiled loop does not check bounds).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, width = x.shape
    if not 1 <= k <= width:
        raise ValueError(f"k must be in [1, {width}], got {k}")
    values = np.empty((rows, k), np.float32) if values is None else values
    ids = np.empty((rows, k), np.int32) if ids is None else ids
    if values.shape != (rows, k) or ids.shape != (rows, k):
        raise ValueError(f"outputs must have shape {(rows, k)}")
    if targets is None:
        targets, picked = np.zeros(0, np.int64), np.zeros(0, np.float32)
    else:
        targets = np.ascontiguousarray(targets, dtype=np.int64)
        if picked is None or targets.shape != (rows,) or picked.shape != (rows,):
            raise ValueError(f"targets and picked must both have shape {(rows,)}")
        if rows and (targets.min() < 0 or targets.max() >= width):
            raise ValueError(f"targets must be columns in [0, {width})")
    assert picked is not None
    _row_topk(x, values, ids, targets, picked)
    return values, ids
