"""The order training reads its data in: units, a seeded shuffle, per-worker streams, packing.

Pure numpy: no I/O, no Ray. The reader (`fusion_etl.train.reader`) supplies a function that
reads one unit; everything here only decides *which* data each worker trains on, in which
order, and how it is cut into blocks.

- A **unit** is one Parquet row group of the fused shards (`align_fuse.row_group_docs`
  documents, its token count recorded in the shard's footer), the smallest piece a worker reads.
- Each **epoch** permutes all units with a generator seeded by (seed, epoch) and deals them,
  in that order, to the worker with the fewest tokens so far: every worker reads only its own
  units (about 1/world of the bytes), and the workers' token counts differ by at most a unit.
- A worker reads its units in **windows** of `shuffle_window` units and permutes the documents
  of a window together (seeded by seed, epoch, rank, window): a document can land anywhere in
  the dataset's order at the unit level, and next to any document of nearby units.
- The documents of a worker are concatenated in that order and cut into `block_size` blocks
  (the reference's group-texts packing): position i of a block is labelled with token i+1 of
  the same block, the last position has none; the fused distribution at position i predicts
  the same token, so it travels with the token.
- **Exact resume**: block b of a worker is the token range [b * L, (b + 1) * L) of its stream.
  Window sizes in tokens are known from the unit table, so a worker restarting at block b reads
  only from the window that holds token b * L and drops the tokens before it: the blocks it then
  yields are bit for bit the blocks an uninterrupted run would have trained.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fusion_etl.train.loss import IGNORE

__all__ = [
    "Block",
    "Doc",
    "EpochPlan",
    "Unit",
    "count_blocks",
    "pack_blocks",
    "plan_epochs",
    "worker_blocks",
]

Doc = tuple[npt.NDArray[np.integer], npt.NDArray[np.integer], npt.NDArray[np.floating]]
"""(input_ids [n], fused_ids [n, k], fused_probs [n, k]) of one document."""


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


@dataclass(frozen=True)
class Unit:
    """One row group of one fused shard."""

    file: int
    """Index into the list of shard URLs."""
    row_group: int
    docs: int
    tokens: int


@dataclass(frozen=True)
class EpochPlan:
    """What every worker trains in one epoch."""

    epoch: int
    units: tuple[tuple[int, ...], ...]
    """Per worker: indices into the unit table, in reading order."""
    tokens: tuple[int, ...]
    """Per worker: tokens in its units."""
    blocks: tuple[int, ...]
    """Per worker: blocks its tokens make."""
    steps: int
    """Optimizer steps: every worker has blocks for each (the fewest blocks decide)."""
    unused_blocks: int
    """Blocks of all workers together that do not fill a step (not trained, reported)."""


def count_blocks(total_tokens: int, block_size: int, keep_remainder: bool) -> int:
    full, rest = divmod(total_tokens, block_size)
    return full + (1 if keep_remainder and rest > 1 else 0)


def _generator(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def plan_epochs(
    units: Sequence[Unit],
    *,
    world: int,
    epochs: int,
    seed: int,
    shuffle: bool,
    block_size: int,
    keep_remainder: bool,
    blocks_per_step: int,
) -> list[EpochPlan]:
    """Deal the units to the workers for every epoch (see the module docstring).

    Args:
        units: the unit table (every row group of every fused shard).
        world: training workers.
        epochs: passes over the data.
        seed: `train.seed`; the same seed gives the same order, another seed another one.
        shuffle: permute units (and, in `worker_blocks`, documents); off: manifest order.
        block_size: tokens per block.
        keep_remainder: a worker's last partial block is trained (padded) or dropped.
        blocks_per_step: blocks one worker trains per optimizer step (micro batch x accumulation).
    """
    if world < 1 or blocks_per_step < 1:
        raise ValueError("world and blocks_per_step must be at least 1")
    plans = []
    for epoch in range(epochs):
        order = (
            _generator(seed, epoch).permutation(len(units)) if shuffle else np.arange(len(units))
        )
        loads = [0] * world
        dealt: list[list[int]] = [[] for _ in range(world)]
        for u in order.tolist():
            rank = loads.index(min(loads))  # the least loaded; ties: the lowest rank
            dealt[rank].append(u)
            loads[rank] += units[u].tokens
        blocks = tuple(count_blocks(t, block_size, keep_remainder) for t in loads)
        steps = min(blocks) // blocks_per_step
        plans.append(
            EpochPlan(
                epoch=epoch,
                units=tuple(tuple(d) for d in dealt),
                tokens=tuple(loads),
                blocks=blocks,
                steps=steps,
                unused_blocks=sum(blocks) - steps * blocks_per_step * world,
            )
        )
    return plans


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
    docs: Iterable[Doc], block_size: int, *, keep_remainder: bool = True
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


def _skip_tokens(docs: Iterator[Doc], n: int) -> Iterator[Doc]:
    """The document stream without its first `n` tokens (a document may be cut)."""
    for ids, f_ids, f_probs in docs:
        if n >= len(ids):
            n -= len(ids)
            continue
        if n:
            ids, f_ids, f_probs = ids[n:], f_ids[n:], f_probs[n:]
            n = 0
        yield ids, f_ids, f_probs


def worker_blocks(
    plan: EpochPlan,
    rank: int,
    units: Sequence[Unit],
    read_unit: Callable[[Unit], list[Doc]],
    *,
    seed: int,
    shuffle: bool,
    window: int,
    block_size: int,
    keep_remainder: bool,
    start_block: int = 0,
) -> Iterator[Block]:
    """Worker `rank`'s blocks of one epoch, from block `start_block` on (see the module
    docstring). Reads, through `read_unit`, only the units from the window that holds the
    first token of `start_block`."""
    mine = [units[u] for u in plan.units[rank]]
    windows = [mine[i : i + window] for i in range(0, len(mine), window)]
    skip = start_block * block_size
    first = 0
    while first < len(windows) and skip >= sum(u.tokens for u in windows[first]):
        skip -= sum(u.tokens for u in windows[first])
        first += 1

    def docs() -> Iterator[Doc]:
        for w in range(first, len(windows)):
            batch = [doc for unit in windows[w] for doc in read_unit(unit)]
            if shuffle:
                order = _generator(seed, plan.epoch, rank, w).permutation(len(batch))
                batch = [batch[i] for i in order.tolist()]
            yield from batch

    return pack_blocks(_skip_tokens(docs(), skip), block_size, keep_remainder=keep_remainder)
