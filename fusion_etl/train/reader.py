"""Reading the fused shards for training: the unit table from the footers, units on demand.

Why not Ray Data. Each worker must read only its own part of the data (about 1/world of the
bytes), in an order fixed by the seed, and restart at an exact block after a resume. Ray
Data's `streaming_split` hands blocks to whichever worker asks first, so which worker trains a
document depends on timing (no exact resume, no bit-identical rerun); `split(equal=True)` and
`random_shuffle` materialise the dataset; and neither can start reading in the middle of a
worker's stream. The order is therefore planned here (`fusion_etl.train.data`, pure) over the
row groups of the fused shards, and every worker reads its row groups directly through the
project's storage layer (local paths and `s3://` alike, ranged reads of the columns it needs).
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import pyarrow.parquet as pq

from fusion_etl import storage
from fusion_etl.errors import InputDataError
from fusion_etl.schema import footer_metadata, list_rows
from fusion_etl.train.data import Doc, Unit

__all__ = ["COLUMNS", "UnitReader", "unit_table"]

COLUMNS = ["input_ids", "fused_ids", "fused_probs"]
ROW_GROUP_TOKENS = "fusion_etl.row_group_tokens"


def unit_table(shard_urls: Sequence[str]) -> list[Unit]:
    """Every row group of every fused shard with its documents and tokens (footers only)."""
    units = []
    for i, url in enumerate(shard_urls):
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            tokens = json.loads(footer_metadata(pf).get(ROW_GROUP_TOKENS, "null"))
            if not isinstance(tokens, list) or len(tokens) != pf.metadata.num_row_groups:
                raise InputDataError(
                    f"{url} has no per-row-group token counts ({ROW_GROUP_TOKENS}); it was written by "
                    "an older align_fuse: rerun align_fuse with --overwrite"
                )
            for rg, n in enumerate(tokens):
                units.append(Unit(i, rg, pf.metadata.row_group(rg).num_rows, int(n)))
    return units


class _CountingFile(io.RawIOBase):
    """A read-only file that counts the bytes read through it."""

    def __init__(self, raw: Any, counter: list[int]) -> None:
        self._raw = raw
        self._counter = counter

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return int(self._raw.seek(offset, whence))

    def tell(self) -> int:
        return int(self._raw.tell())

    def read(self, size: int | None = -1) -> bytes:
        data = bytes(self._raw.read(-1 if size is None else size))
        self._counter[0] += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _footer(fh: _CountingFile) -> pq.FileMetaData:
    """The file's metadata, reading exactly its footer (pyarrow would read the last 64 KiB,
    more than many small shards hold)."""
    size = fh.seek(0, io.SEEK_END)
    fh.seek(size - 8)
    tail = fh.read(8)
    if tail[4:] != b"PAR1":
        raise InputDataError("not a Parquet file (no PAR1 magic at its end)")
    length = int.from_bytes(tail[:4], "little")
    fh.seek(size - 8 - length)
    # read_metadata only needs the footer: the offsets in it keep pointing into the real file.
    footer = b"PAR1" + fh.read(length) + tail
    return pq.read_metadata(io.BytesIO(footer))


class UnitReader:
    """Reads units of the fused shards; counts the bytes it read."""

    def __init__(self, shard_urls: Sequence[str], *, open_files: int = 4) -> None:
        self.urls = list(shard_urls)
        self.bytes_read = [0]
        self._open: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._max_open = open_files

    def _file(self, index: int) -> pq.ParquetFile:
        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        fs, path = storage.filesystem(self.urls[index])
        fh = _CountingFile(fs.open(path, "rb"), self.bytes_read)
        pf = pq.ParquetFile(fh, metadata=_footer(fh))
        self._open[index] = pf
        while len(self._open) > self._max_open:
            _, old = self._open.popitem(last=False)
            old.close()
        return pf

    def __call__(self, unit: Unit) -> list[Doc]:
        table = self._file(unit.file).read_row_group(unit.row_group, columns=COLUMNS)
        k = table.schema.field("fused_ids").type.value_type.list_size
        return list(
            zip(
                list_rows(table.column("input_ids")),
                list_rows(table.column("fused_ids"), k),
                list_rows(table.column("fused_probs"), k),
                strict=True,
            )
        )

    def close(self) -> None:
        for pf in self._open.values():
            pf.close()
        self._open.clear()
