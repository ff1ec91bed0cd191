"""The training data order: seeded shuffle, per-worker units, packing and exact resume (no Ray)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_etl.train.data import (
    Block,
    Doc,
    EpochPlan,
    Unit,
    count_blocks,
    plan_epochs,
    worker_blocks,
)


def _dataset(
    seed: int, n_units: int, k: int = 3
) -> tuple[list[Unit], dict[tuple[int, int], list[Doc]]]:
    """Units of random documents whose token ids say where they come from."""
    rng = np.random.default_rng(seed)
    units: list[Unit] = []
    docs: dict[tuple[int, int], list[Doc]] = {}
    for u in range(n_units):
        rows: list[Doc] = []
        for d in range(int(rng.integers(1, 6))):
            n = int(rng.integers(1, 40))
            ids = np.full(n, u * 1000 + d, dtype=np.int32)
            rows.append((ids, np.tile(ids[:, None], (1, k)), np.full((n, k), 0.5, np.float32)))
        docs[(u % 3, u)] = rows
        units.append(
            Unit(file=u % 3, row_group=u, docs=len(rows), tokens=sum(len(r[0]) for r in rows))
        )
    return units, docs


def _plans(
    units: list[Unit], *, world: int, seed: int, shuffle: bool = True, epochs: int = 2
) -> list[EpochPlan]:
    return plan_epochs(
        units,
        world=world,
        epochs=epochs,
        seed=seed,
        shuffle=shuffle,
        block_size=16,
        keep_remainder=True,
        blocks_per_step=2,
    )


def _blocks(
    plan: EpochPlan,
    rank: int,
    units: list[Unit],
    docs: dict[tuple[int, int], list[Doc]],
    *,
    seed: int,
    shuffle: bool = True,
    window: int = 2,
    start: int = 0,
) -> list[Block]:
    return list(
        worker_blocks(
            plan,
            rank,
            units,
            lambda u: docs[(u.file, u.row_group)],
            seed=seed,
            shuffle=shuffle,
            window=window,
            block_size=16,
            keep_remainder=True,
            start_block=start,
        )
    )


def _same(a: list[Block], b: list[Block]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x.input_ids, y.input_ids)
        and np.array_equal(x.labels, y.labels)
        and np.array_equal(x.fused_ids, y.fused_ids)
        and np.array_equal(x.fused_probs, y.fused_probs)
        for x, y in zip(a, b, strict=True)
    )


def test_every_unit_goes_to_exactly_one_worker_per_epoch_and_loads_balance() -> None:
    units, _ = _dataset(0, 23)
    for plan in _plans(units, world=3, seed=5):
        dealt = [u for worker in plan.units for u in worker]
        assert sorted(dealt) == list(range(len(units)))
        assert plan.tokens == tuple(sum(units[u].tokens for u in w) for w in plan.units)
        # Dealt to the least loaded: loads differ by at most the largest unit.
        assert max(plan.tokens) - min(plan.tokens) <= max(u.tokens for u in units)
        assert plan.steps == min(plan.blocks) // 2
        assert plan.unused_blocks == sum(plan.blocks) - plan.steps * 2 * 3


def test_a_seed_fixes_the_order_and_another_seed_changes_it() -> None:
    units, docs = _dataset(1, 20)
    a = _plans(units, world=2, seed=0)
    assert a == _plans(units, world=2, seed=0)
    b = _plans(units, world=2, seed=1)
    assert [p.units for p in a] != [p.units for p in b]
    assert a[0].units != a[1].units, "each epoch has its own order"
    blocks_a = _blocks(a[0], 0, units, docs, seed=0)
    assert _same(blocks_a, _blocks(a[0], 0, units, docs, seed=0))
    assert not _same(blocks_a, _blocks(a[0], 0, units, docs, seed=1))


def test_without_shuffle_units_keep_manifest_order() -> None:
    units, docs = _dataset(2, 9)
    plan = _plans(units, world=1, seed=3, shuffle=False)[0]
    assert plan.units == (tuple(range(9)),)
    blocks = _blocks(plan, 0, units, docs, seed=3, shuffle=False)
    stream = np.concatenate([d[0] for u in units for d in docs[(u.file, u.row_group)]])
    got = np.concatenate([b.input_ids[b.input_ids > 0] for b in blocks])
    # Token ids are positive except unit 0 doc 0 (id 0): compare the non-zero ids in order.
    assert np.array_equal(got, stream[stream > 0])


def test_blocks_carry_every_token_of_the_worker_once_in_a_shuffled_order() -> None:
    units, docs = _dataset(3, 12)
    plan = _plans(units, world=2, seed=7)[0]
    for rank in (0, 1):
        blocks = _blocks(plan, rank, units, docs, seed=7, window=3)
        assert len(blocks) == plan.blocks[rank] == count_blocks(plan.tokens[rank], 16, True)
        mine = Counter(
            int(t)
            for u in plan.units[rank]
            for d in docs[(units[u].file, units[u].row_group)]
            for t in d[0]
        )
        got = Counter(int(t) for b in blocks[:-1] for t in b.input_ids)
        last = blocks[-1]
        got.update(int(t) for t in last.input_ids[: int((last.labels != -100).sum()) + 1])
        assert got == mine
        for b in blocks:
            # Labels are the next token within the block; fused ids travel with their token.
            n = int((b.labels != -100).sum())
            assert np.array_equal(b.labels[:n], b.input_ids[1 : n + 1])
            assert np.array_equal(b.fused_ids[: n + 1, 0], b.input_ids[: n + 1])


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_units=st.integers(1, 14),
    world=st.integers(1, 3),
    window=st.integers(1, 4),
    shuffle=st.booleans(),
    data=st.data(),
)
def test_resuming_at_any_block_yields_exactly_the_rest_of_the_stream(
    seed: int, n_units: int, world: int, window: int, shuffle: bool, data: st.DataObject
) -> None:
    units, docs = _dataset(seed, n_units)
    plan = _plans(units, world=world, seed=seed, shuffle=shuffle, epochs=1)[0]
    rank = data.draw(st.integers(0, world - 1))
    full = _blocks(plan, rank, units, docs, seed=seed, shuffle=shuffle, window=window)
    start = data.draw(st.integers(0, len(full)))
    read: list[Unit] = []

    def reader(u: Unit) -> list[Doc]:
        read.append(u)
        return docs[(u.file, u.row_group)]

    rest = list(
        worker_blocks(
            plan,
            rank,
            units,
            reader,
            seed=seed,
            shuffle=shuffle,
            window=window,
            block_size=16,
            keep_remainder=True,
            start_block=start,
        )
    )
    assert _same(rest, full[start:])
    # Only the window holding the first needed token and those after it are read.
    mine = [units[u] for u in plan.units[rank]]
    assert set(read) <= set(mine)
    if start * 16 >= plan.tokens[rank]:
        assert read == []


def test_no_unit_table_means_no_steps() -> None:
    with pytest.raises(ValueError):
        plan_epochs(
            [],
            world=0,
            epochs=1,
            seed=0,
            shuffle=True,
            block_size=4,
            keep_remainder=True,
            blocks_per_step=1,
        )
    plan = plan_epochs(
        [],
        world=2,
        epochs=1,
        seed=0,
        shuffle=True,
        block_size=4,
        keep_remainder=True,
        blocks_per_step=1,
    )
    assert plan[0].steps == 0
