"""How prepare cuts the corpus into shards: the packer alone (pure bookkeeping, no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusion_etl.stages.prepare import Piece, ShardPacker


def test_documents_cap_splits_large_files_and_groups_small_ones() -> None:
    packer = ShardPacker(max_docs=4, max_bytes=10**9)
    for line in range(6):  # a large file: 6 lines
        packer.add(0, line, 1, 10, offset=10 * line)
    for f in (1, 2):  # two small files of one line each
        packer.add(f, 0, 1, 10, offset=0)
    assert packer.finish() == [
        [Piece(0, 0, 4, 0)],
        [Piece(0, 4, 2, 40), Piece(1, 0, 1, 0), Piece(2, 0, 1, 0)],
    ]


def test_bytes_cap_and_a_document_larger_than_the_budget() -> None:
    packer = ShardPacker(max_docs=100, max_bytes=25)
    for line, size in enumerate([10, 10, 10, 60, 5]):
        packer.add(0, line, 1, size, offset=line * 100)
    assert packer.finish() == [
        [Piece(0, 0, 2, 0)],  # 20 bytes; a third line would make 30
        [Piece(0, 2, 1, 200)],
        [Piece(0, 3, 1, 300)],  # 60 bytes alone
        [Piece(0, 4, 1, 400)],
    ]


def test_a_row_group_is_split_by_rows_with_its_bytes_spread() -> None:
    packer = ShardPacker(max_docs=10, max_bytes=300)
    packer.add(0, 0, 25, 1000)  # 40 bytes a row: 7 rows fit in 300 bytes
    packer.add(1, 0, 3, 30)
    assert packer.finish() == [
        [Piece(0, 0, 7)],
        [Piece(0, 7, 7)],
        [Piece(0, 14, 7)],
        [Piece(0, 21, 4), Piece(1, 0, 3)],
    ]


def test_bad_budgets() -> None:
    with pytest.raises(ValueError):
        ShardPacker(max_docs=0, max_bytes=1)


@given(
    runs=st.lists(
        st.tuples(st.integers(1, 40), st.integers(0, 5000), st.booleans()), min_size=1, max_size=30
    ),
    max_docs=st.integers(1, 50),
    max_bytes=st.integers(1, 4000),
)
def test_every_document_once_in_order_within_the_caps(
    runs: list[tuple[int, int, bool]], max_docs: int, max_bytes: int
) -> None:
    packer = ShardPacker(max_docs=max_docs, max_bytes=max_bytes)
    expected = []
    for f, (count, nbytes, lines) in enumerate(runs):
        if lines:  # a jsonl file: single documents with offsets
            for i in range(count):
                packer.add(f, i, 1, nbytes, offset=i * nbytes)
        else:  # a Parquet row group of `count` rows
            packer.add(f, 0, count, nbytes)
        expected += [(f, i) for i in range(count)]
    shards = packer.finish()
    got = [(p.file, p.start + i) for shard in shards for p in shard for i in range(p.count)]
    assert got == expected
    for shard in shards:
        assert 1 <= sum(p.count for p in shard) <= max_docs


@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=60),
    max_docs=st.integers(1, 20),
    max_bytes=st.integers(1, 1000),
)
def test_lines_are_packed_greedily_within_both_caps(
    sizes: list[int], max_docs: int, max_bytes: int
) -> None:
    packer = ShardPacker(max_docs=max_docs, max_bytes=max_bytes)
    for i, size in enumerate(sizes):
        packer.add(0, i, 1, size, offset=sum(sizes[:i]))
    shards = packer.finish()
    lines = [[p.start + i for p in shard for i in range(p.count)] for shard in shards]
    assert [i for shard in lines for i in shard] == list(range(len(sizes)))
    for k, shard in enumerate(lines):
        total = sum(sizes[i] for i in shard)
        assert len(shard) <= max_docs and (total <= max_bytes or len(shard) == 1)
        if k + 1 < len(lines):  # a shard ends only when the next line would not fit
            assert (
                len(shard) == max_docs
                or total >= max_bytes
                or (total + sizes[lines[k + 1][0]] > max_bytes)
            )
        assert shards[k][0].offset == sum(sizes[: shard[0]])
