"""Arrow schemas of every Parquet artifact, checked on write and on read."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from fusion_etl import storage
from fusion_etl.errors import InputDataError, UserError

__all__ = [
    "PREPARE",
    "VOCAB_MAP",
    "align_fuse_schema",
    "check_schema",
    "extract_schema",
    "footer_metadata",
    "list_rows",
    "open_parquet",
    "parquet_bytes",
    "write_parquet",
]

PREPARE = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("text", pa.large_string(), nullable=False),
    ]
)


def check_schema(schema: pa.Schema, expected: pa.Schema, *, where: str) -> None:
    """Raise `InputDataError` naming the first missing or mistyped column."""
    for f in expected:
        idx = schema.get_field_index(f.name)
        if idx < 0:
            raise InputDataError(f"{where}: column {f.name!r} is missing (expected {f.type})")
        got = schema.field(idx).type
        if got != f.type:
            raise InputDataError(f"{where}: column {f.name!r} has type {got}, expected {f.type}")


def parquet_bytes(table: pa.Table, *, metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise a table to Parquet bytes, deterministically (same table, same bytes)."""
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_statistics=True)
    return buf.getvalue()


def write_parquet(
    path: str,
    schema: pa.Schema,
    batches: Iterable[pa.Table],
    metadata: Callable[[], Mapping[str, str]],
) -> int:
    """Write `batches` to a local Parquet file, each batch its own row group, so that only one
    batch is ever in memory; `metadata()` is asked once every batch is written (it may hold
    what the batches produced) and goes into the footer. Returns the rows written.

    Readers take the metadata from the footer (`footer_metadata`), not from the Arrow schema.
    """
    rows = 0
    with pq.ParquetWriter(path, schema, compression="zstd", write_statistics=True) as writer:
        for table in batches:
            if table.schema != schema:
                table = table.cast(schema)
            writer.write_table(table, row_group_size=max(table.num_rows, 1))
            rows += table.num_rows
        extra = metadata()
        if extra:
            writer.add_key_value_metadata(dict(extra))
    return rows


def open_parquet(url: str) -> pq.ParquetFile:
    """A Parquet file to read in runs of rows (object stores: ranged reads, no full download);
    close it when done."""
    try:
        return pq.ParquetFile(storage.open_file(url))
    except UserError as exc:
        if "does not exist" in str(exc):
            raise InputDataError(str(exc)) from None
        raise


def footer_metadata(parquet_file: pq.ParquetFile) -> dict[str, str]:
    """The key-value metadata in a Parquet file's footer (`fusion_etl.*` and the rest)."""
    raw = parquet_file.metadata.metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if k != b"ARROW:schema"}


def extract_schema(k: int, logprob_dtype: str) -> pa.Schema:
    """`extract/<model>/part-NNNNN.parquet`: sparse top-k per position, real lengths only."""
    lp = pa.float16() if logprob_dtype == "float16" else pa.float32()
    return pa.schema(
        [
            pa.field("doc_id", pa.string(), nullable=False),
            pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("topk_ids", pa.list_(pa.list_(pa.int32(), k)), nullable=False),
            pa.field("topk_logprobs", pa.list_(pa.list_(lp, k)), nullable=False),
            pa.field("token_logprobs", pa.list_(pa.float32()), nullable=False),
            pa.field("nll", pa.float64(), nullable=False),
            pa.field("num_tokens", pa.int32(), nullable=False),
            pa.field("num_bytes", pa.int32(), nullable=False),
        ]
    )


def align_fuse_schema(k: int) -> pa.Schema:
    """`align_fuse/part-NNNNN.parquet`: fused top-k in the target vocabulary per target token."""
    return pa.schema(
        [
            pa.field("doc_id", pa.string(), nullable=False),
            pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("fused_ids", pa.list_(pa.list_(pa.int32(), k)), nullable=False),
            pa.field("fused_probs", pa.list_(pa.list_(pa.float32(), k)), nullable=False),
            pa.field("source_weights", pa.list_(pa.float32()), nullable=False),
            pa.field("matched_fraction", pa.list_(pa.float32()), nullable=False),
        ]
    )


VOCAB_MAP = pa.schema(
    [
        pa.field("source_id", pa.int32(), nullable=False),
        pa.field("target_id", pa.int32(), nullable=False),
        pa.field("distance", pa.int32(), nullable=False),
        pa.field("how", pa.string(), nullable=False),
    ]
)


def list_rows(column: pa.ChunkedArray | pa.Array, k: int | None = None) -> list[npt.NDArray[Any]]:
    """Per document numpy views of a list (of fixed-size list) column, without a loop per entry."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy()
    values = arr.values
    if k is not None:
        values = values.flatten()
    flat = values.to_numpy(zero_copy_only=False)
    if k is not None:
        flat = flat.reshape(-1, k)
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(arr))]
