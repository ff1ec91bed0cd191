"""Arrow schemas of every Parquet artifact, checked on write and on read."""

from __future__ import annotations

import io
from collections.abc import Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from fusion_etl.errors import InputDataError

__all__ = ["PREPARE", "check_schema", "parquet_bytes"]

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
