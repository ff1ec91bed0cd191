"""Packing documents with their fused targets into fixed-size training blocks.

Documents are concatenated in manifest order and cut into `block_size` blocks (the reference's
group-texts packing). Position i of a block is labelled with token i+1 of the same block; the
last position has no label. The fused distribution at position i predicts the same token, so it
travels with the token. The last, partial block is padded and masked, or dropped.
Pure numpy: no I/O, no Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fusion_etl.train.loss import IGNORE

__all__ = ["Block", "count_blocks", "pack_blocks"]


@dataclass(frozen=True)
class Block:
    input_ids: npt.NDArray[np.int64]
    """[L]; 0 where padded."""
    labels: npt.NDArray[np.int64]
    """[L]; IGNORE where there is no next token in the block."""
    fused_ids: npt.NDArray[np.int32]
    """[L, k]; -1 where empty."""
    fused_probs: npt.NDArray[np.float32]
    """[L, k]."""


def count_blocks(total_tokens: int, block_size: int, keep_remainder: bool) -> int:
    full, rest = divmod(total_tokens, block_size)
    return full + (1 if keep_remainder and rest > 1 else 0)


def _block(
    ids: npt.NDArray[np.int64],
    f_ids: npt.NDArray[np.int32],
    f_probs: npt.NDArray[np.float32],
    size: int,
) -> Block:
    n = len(ids)
    k = f_ids.shape[1]
    input_ids = np.zeros(size, dtype=np.int64)
    labels = np.full(size, IGNORE, dtype=np.int64)
    fused_ids = np.full((size, k), -1, dtype=np.int32)
    fused_probs = np.zeros((size, k), dtype=np.float32)
    input_ids[:n] = ids
    labels[: n - 1] = ids[1:]
    fused_ids[:n] = f_ids
    fused_probs[:n] = f_probs
    return Block(input_ids, labels, fused_ids, fused_probs)


def pack_blocks(
    docs: Iterable[
        tuple[npt.NDArray[np.integer], npt.NDArray[np.integer], npt.NDArray[np.floating]]
    ],
    block_size: int,
    *,
    keep_remainder: bool = True,
) -> Iterator[Block]:
    """Blocks from (input_ids [n], fused_ids [n, k], fused_probs [n, k]) per document, in order."""
    ids_buf: list[npt.NDArray[np.int64]] = []
    fid_buf: list[npt.NDArray[np.int32]] = []
    fp_buf: list[npt.NDArray[np.float32]] = []
    buffered = 0
    for ids, f_ids, f_probs in docs:
        ids_buf.append(np.asarray(ids, dtype=np.int64))
        fid_buf.append(np.asarray(f_ids, dtype=np.int32))
        fp_buf.append(np.asarray(f_probs, dtype=np.float32))
        buffered += len(ids)
        if buffered < block_size:
            continue
        all_ids = np.concatenate(ids_buf)
        all_fid = np.concatenate(fid_buf)
        all_fp = np.concatenate(fp_buf)
        start = 0
        while buffered - start >= block_size:
            end = start + block_size
            yield _block(all_ids[start:end], all_fid[start:end], all_fp[start:end], block_size)
            start = end
        ids_buf, fid_buf, fp_buf = [all_ids[start:]], [all_fid[start:]], [all_fp[start:]]
        buffered -= start
    if keep_remainder and buffered > 1:
        yield _block(
            np.concatenate(ids_buf), np.concatenate(fid_buf), np.concatenate(fp_buf), block_size
        )
