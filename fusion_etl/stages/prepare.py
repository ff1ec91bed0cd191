"""`prepare`: raw corpus files -> `prepare/part-NNNNN.parquet` with `doc_id` and `text`.

One input file is one work item and one output shard (`part-NNNNN` numbers the sorted input
files). Documents that are empty or only white space are dropped and counted. A document longer
than `block_size - margin` tokens under *any* configured tokenizer is cut, at line breaks or
spaces where possible, into pieces that fit all of them; the pieces concatenate back to the
document exactly, and get ids `<doc_id>#<k>`.

doc_id is `<file path relative to the input>:<line>` for jsonl (1-based line), `:<row>` for
Parquet (0-based row) and the relative path for plain text (one document per file): stable
across reruns and unique within the corpus.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyarrow as pa

from fusion_etl import storage
from fusion_etl.config import PipelineConfig, fingerprint_fields
from fusion_etl.errors import ConfigError, InputDataError, UserError
from fusion_etl.runner import ActorPool, ShardOutput, StagePlan, WorkItem, make_plan
from fusion_etl.schema import PREPARE
from fusion_etl.tokenization import load_tokenizer, offsets_encoder, tokenizer_fingerprint

__all__ = ["PrepareStage", "split_to_fit"]

# Bump when the output for the same input and config changes.
VERSION = 1
_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")

# A tokenizer as the splitter needs it: text -> character (start, end) of each token.
Encoder = Callable[[str], Sequence[tuple[int, int]]]


def _format_of(url: str) -> str | None:
    name = url.lower()
    for comp in _COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
    for suffix, fmt in _FORMATS.items():
        if name.endswith(suffix):
            return fmt
    return None


def _nice_cut(text: str, cut: int) -> int:
    """A cut at most `cut`, moved back to just after a line break or before a space if one is
    in the second half of the window; never 0."""
    cut = max(1, min(cut, len(text)))
    if cut == len(text):
        return cut
    half = cut // 2
    nl = text.rfind("\n", half, cut)
    if nl >= 0:
        return nl + 1
    sp = text.rfind(" ", half, cut)
    if sp > 0:
        return sp
    return cut


def split_to_fit(text: str, encoders: Sequence[Encoder], limit: int) -> list[str]:
    """Cut `text` into consecutive pieces of at most `limit` tokens under every encoder.

    The pieces concatenate to `text` exactly. Cuts go after a line break or before a space
    when one is near, else between characters.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    pieces: list[str] = []
    start = 0
    while start < len(text):
        rest = text[start:]
        # Look at a window only: `limit` tokens rarely span more than 16 characters each.
        window = min(len(rest), max(64, limit * 16))
        cut = len(rest)
        while True:
            head = rest[:window]
            cut = window
            for enc in encoders:
                offsets = enc(head)
                if len(offsets) > limit:
                    cut = min(cut, offsets[limit][0])
            if cut < window or window == len(rest):
                break
            window = min(len(rest), window * 2)
        if cut >= len(rest):
            pieces.append(rest)
            break
        cut = _nice_cut(rest, cut)
        # Tokens at the cut can merge differently once the text ends there: verify, shrink.
        while cut > 1 and any(len(enc(rest[:cut])) > limit for enc in encoders):
            cut = _nice_cut(rest, cut - max(1, cut // 20))
        pieces.append(rest[:cut])
        start += cut
    return pieces


def _decode_line(raw: bytes, url: str, line_no: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputDataError(
            f"{url} line {line_no}: invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
        ) from None


def _read_jsonl(
    url: str, field: str, skip_invalid: bool, counts: Counter[str]
) -> Iterator[tuple[str, str]]:
    with storage.open_read(url) as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                line = _decode_line(raw, url, line_no)
            except InputDataError:
                if skip_invalid:
                    counts["invalid_utf8_skipped"] += 1
                    continue
                raise
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputDataError(f"{url} line {line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or field not in obj:
                raise InputDataError(
                    f"{url} line {line_no}: no {field!r} field (set prepare.text_field to the field that holds the text)"
                )
            value = obj[field]
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise InputDataError(
                    f"{url} line {line_no}: field {field!r} is {type(value).__name__}, not text"
                )
            yield str(line_no), value


def _read_parquet(
    url: str, field: str, skip_invalid: bool, counts: Counter[str]
) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    with storage.open_read(url, compression=None) as fh:
        try:
            pf = pq.ParquetFile(fh)
        except pa.ArrowInvalid as exc:
            raise InputDataError(f"{url}: not a Parquet file ({exc})") from None
        if field not in pf.schema_arrow.names:
            raise InputDataError(
                f"{url}: no column {field!r} (columns: {', '.join(pf.schema_arrow.names)}); set prepare.text_field"
            )
        col_type = pf.schema_arrow.field(field).type
        if not (
            pa.types.is_string(col_type)
            or pa.types.is_large_string(col_type)
            or pa.types.is_binary(col_type)
            or pa.types.is_large_binary(col_type)
        ):
            raise InputDataError(f"{url}: column {field!r} has type {col_type}, expected text")
        row = 0
        for batch in pf.iter_batches(columns=[field]):
            for value in batch.column(0).to_pylist():
                if isinstance(value, bytes):
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError:
                        if not skip_invalid:
                            raise InputDataError(
                                f"{url} row {row}: invalid UTF-8 in column {field!r}"
                            ) from None
                        counts["invalid_utf8_skipped"] += 1
                        row += 1
                        continue
                yield str(row), value or ""
                row += 1


def _read_text(url: str, skip_invalid: bool, counts: Counter[str]) -> Iterator[tuple[str, str]]:
    with storage.open_read(url) as fh:
        data = fh.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if skip_invalid:
            counts["invalid_utf8_skipped"] += 1
            return
        line_no = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InputDataError(
            f"{url} line {line_no}: invalid UTF-8 (byte 0x{data[exc.start]:02x} at column {column})"
        ) from None
    yield "", text


class PrepareStage:
    """The `prepare` stage (see the module docstring)."""

    name = "prepare"

    def _inputs(self, cfg: PipelineConfig) -> list[str]:
        src = cfg.prepare.input
        if not src:
            raise ConfigError(
                "prepare.input: set it to the corpus URL (a file, a folder or a glob)"
            )
        files = storage.glob(src) if any(c in src for c in "*?[") else storage.list_files(src)
        if cfg.prepare.format == "auto":
            usable = [f for f in files if _format_of(f) is not None]
        else:
            usable = [f for f in files if not f.rsplit("/", 1)[-1].startswith((".", "_"))]
        if not usable:
            raise UserError(
                f"prepare.input: no corpus files at {src} "
                f"(looked for {', '.join(sorted(_FORMATS))}, optionally compressed)"
            )
        return usable

    def setup(self, cfg: PipelineConfig, plan: StagePlan) -> None:
        return None

    def actor_pool(self, cfg: PipelineConfig, plan: StagePlan) -> ActorPool | None:
        return None

    def _check_context(self, cfg: PipelineConfig) -> None:
        """Documents cut to block_size - margin tokens (+ EOS) must fit every model."""
        for model in cfg.models:
            url = storage.join(model.path, "config.json")
            if not storage.exists(url):
                continue
            config = json.loads(storage.read_bytes(url))
            context = config.get("max_position_embeddings") or config.get("n_positions")
            if context and cfg.prepare.max_tokens + 1 > int(context):
                raise ConfigError(
                    f"prepare.block_size: documents of up to {cfg.prepare.max_tokens} tokens (block_size - margin) "
                    f"plus EOS do not fit model {model.name!r}, whose context is {context} tokens; "
                    f"set prepare.block_size to at most {int(context) - 1 + cfg.prepare.margin}"
                )

    def plan(self, cfg: PipelineConfig) -> list[StagePlan]:
        self._check_context(cfg)
        files = self._inputs(cfg)
        base = cfg.prepare.input
        identity: dict[str, Any] = {
            "stage": self.name,
            "version": VERSION,
            "prepare": fingerprint_fields(cfg.prepare),
            "tokenizers": sorted(tokenizer_fingerprint(m.tokenizer_path) for m in cfg.models),
            "input_files": [[storage.relative_name(base, f), storage.size(f)] for f in files],
        }
        items = tuple(
            WorkItem(
                shard=f"part-{i:05d}.parquet",
                inputs=(f,),
                payload={"url": f, "relative": storage.relative_name(base, f)},
            )
            for i, f in enumerate(files)
        )
        return [
            make_plan(
                self.name,
                cfg,
                output=cfg.stage_url(self.name),
                identity=identity,
                inputs={},
                items=items,
            )
        ]

    def process(self, cfg: PipelineConfig, item: WorkItem) -> ShardOutput:
        pc = cfg.prepare
        url, rel = str(item.payload["url"]), str(item.payload["relative"])
        fmt = pc.format if pc.format != "auto" else _format_of(url)
        skip = pc.on_invalid_utf8 == "skip"
        counts: Counter[str] = Counter()
        if fmt == "jsonl":
            docs = _read_jsonl(url, pc.text_field, skip, counts)
        elif fmt == "parquet":
            docs = _read_parquet(url, pc.text_field, skip, counts)
        else:
            docs = _read_text(url, skip, counts)

        ids: list[str] = []
        texts: list[str] = []
        for key, text in docs:
            counts["documents_in"] += 1
            if not text.strip():
                counts["dropped_empty"] += 1
                continue
            ids.append(f"{rel}:{key}" if key else rel)
            texts.append(text)

        tokenizers = [load_tokenizer(m.tokenizer_path) for m in cfg.models]
        limit = pc.max_tokens
        too_long = [False] * len(texts)
        for tok in tokenizers:
            for i, enc in enumerate(tok.encode_batch(texts, add_special_tokens=False)):
                too_long[i] = too_long[i] or len(enc.ids) > limit
        encoders = [offsets_encoder(tok) for tok in tokenizers]
        out_ids: list[str] = []
        out_texts: list[str] = []
        for doc_id, text, long in zip(ids, texts, too_long, strict=True):
            if not long:
                out_ids.append(doc_id)
                out_texts.append(text)
                continue
            counts["split_documents"] += 1
            k = 0
            for piece in split_to_fit(text, encoders, limit):
                if not piece.strip():
                    counts["dropped_empty_pieces"] += 1
                    continue
                out_ids.append(f"{doc_id}#{k}")
                out_texts.append(piece)
                k += 1
        counts["documents_out"] = len(out_ids)
        table = pa.table(
            {
                "doc_id": pa.array(out_ids, pa.string()),
                "text": pa.array(out_texts, pa.large_string()),
            },
            schema=PREPARE,
        )
        return ShardOutput(table=table, stats=dict(counts))
