"""`prepare`: raw corpus files -> `prepare/part-NNNNN.parquet` with `doc_id` and `text`.

**Sized shards.** The corpus is one stream of documents: the input files in sorted order, each
read front to back. The plan cuts that stream into shards of at most `prepare.shard_docs`
documents and at most about `prepare.shard_bytes` bytes of input (a single larger document
gets a shard of its own), so a large file is split over several shards and many small files
share one. `part-NNNNN` numbers the shards in stream order; the same files and settings always
give the same cuts, so names, contents and bytes are the same on every run.

The defaults aim at minutes, not hours, of GPU work per shard at 7B: 4 MiB of text is about
1.2M tokens at about 3.5 UTF-8 bytes per Llama token (MiniPile: about 6 GB, 1.8B tokens); at
an assumed 3,000 tokens/s for one 7B model on one A10G-class GPU (vLLM prefill with prompt
log-probs, bf16) that is about 7 minutes of work per model and shard, about 2 on an A100.
MiniPile then makes about 1,400 shards: hundreds of extract actors can share them, and a
preempted actor loses minutes. 4,096 documents cap corpora of short documents, whose cost is
per document rather than per token.

**Planning reads little.** Parquet: only each file's footer (rows and bytes per row group);
a row group is split between shards by rows when it must be. Plain text: the file size (one
document per file). jsonl: one streaming pass per file that only measures lines (never a
whole file in memory): byte ranges alone could not give the line number of a range's first
line, which every doc_id holds, without counting every newline before it, and a compressed
stream cannot be entered in the middle at all. The pass records, for each shard, the first
line's number and (uncompressed files) its byte offset, so a shard's worker seeks straight to
its lines; in a compressed file it decompresses and skips the lines before them. The plan is
kept in `_plan.json` next to `_stage.json`, so a rerun or a resumed run does not scan again.

**Bounded memory.** A shard is read, cut and written in runs of `ROW_GROUP_DOCS` input
documents, each run its own Parquet row group.

Documents that are empty or only white space are dropped and counted. A document longer than
`block_size - margin` tokens under *any* configured tokenizer is cut, at line breaks or spaces
where possible, into pieces that fit all of them; the pieces concatenate back to the document
exactly, and get ids `<doc_id>#<k>`.

doc_id is `<file path relative to the input>:<line>` for jsonl (1-based line of the file),
`:<row>` for Parquet (0-based row of the file) and the relative path for plain text (one
document per file): stable across reruns, unique within the corpus, and the same however the
corpus is cut into shards.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from fusion_etl import manifest, storage
from fusion_etl.config import PipelineConfig, fingerprint, fingerprint_fields
from fusion_etl.errors import ConfigError, InputDataError, UserError
from fusion_etl.runner import ActorPool, ShardOutput, StagePlan, WorkItem, make_plan
from fusion_etl.schema import PREPARE
from fusion_etl.tokenization import load_tokenizer, offsets_encoder, tokenizer_fingerprint

__all__ = ["Piece", "PrepareStage", "ShardPacker", "split_to_fit"]

# Bump when the output for the same input and config changes.
VERSION = 2
ROW_GROUP_DOCS = 1024
"""Input documents per run (and per Parquet row group of a prepared shard)."""
PLAN_FILE = "_plan.json"
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


@dataclass(frozen=True)
class Piece:
    """Consecutive documents of one input file inside one shard."""

    file: int
    """Index of the file in the plan's sorted file list."""
    start: int
    """First document: 0-based line (jsonl) or row (Parquet) of the file; 0 for text."""
    count: int
    offset: int = -1
    """Byte offset of the first line in an uncompressed jsonl file, else -1."""


class ShardPacker:
    """Cuts a stream of documents, fed file by file in order, into shards of at most
    `max_docs` documents and at most `max_bytes` bytes (a document larger than that alone).

    Pure bookkeeping (no I/O): `add` takes a run of documents with their total size, and
    splits it by rows, the bytes spread evenly, when it does not fit.
    """

    def __init__(self, max_docs: int, max_bytes: int) -> None:
        if max_docs < 1 or max_bytes < 1:
            raise ValueError("max_docs and max_bytes must be at least 1")
        self.max_docs = max_docs
        self.max_bytes = max_bytes
        self.shards: list[list[Piece]] = []
        self._current: list[Piece] = []
        self._docs = 0
        self._bytes = 0

    def add(self, file: int, start: int, count: int, nbytes: int, offset: int = -1) -> None:
        """`count` consecutive documents of `file` from `start`, `nbytes` bytes in all.
        `offset` (the byte offset of the first) is only known for a single document."""
        assert count == 1 or offset < 0, "a byte offset belongs to a single document"
        while count > 0:
            fit = (self.max_bytes - self._bytes) * count // nbytes if nbytes > 0 else count
            take = min(count, self.max_docs - self._docs, fit)
            if take < 1:
                if self._docs == 0:
                    take = 1  # larger than the byte budget on its own: a shard of its own
                else:
                    self._cut()
                    continue
            part = nbytes * take // count
            last = self._current[-1] if self._current else None
            if last is not None and last.file == file and last.start + last.count == start:
                self._current[-1] = Piece(file, last.start, last.count + take, last.offset)
            else:
                self._current.append(Piece(file, start, take, offset))
            self._docs += take
            self._bytes += part
            start, count, nbytes, offset = start + take, count - take, nbytes - part, -1
            if self._docs >= self.max_docs or self._bytes >= self.max_bytes:
                self._cut()

    def _cut(self) -> None:
        if self._current:
            self.shards.append(self._current)
        self._current, self._docs, self._bytes = [], 0, 0

    def finish(self) -> list[list[Piece]]:
        """Every shard, the last partial one included."""
        self._cut()
        return self.shards


def _is_compressed(url: str) -> bool:
    return url.lower().endswith(_COMPRESSIONS)


def _scan_jsonl(url: str, file: int, packer: ShardPacker) -> None:
    """One streaming pass over the file's lines: their byte sizes (and offsets) only."""
    compressed = _is_compressed(url)
    offset = 0
    with storage.open_read(url) as fh:
        for index, raw in enumerate(fh):
            packer.add(file, index, 1, len(raw), -1 if compressed else offset)
            offset += len(raw)


def _text_column_check(pf: Any, url: str, field: str) -> None:
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


def _open_parquet_file(fh: Any, url: str) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(fh)
    except pa.ArrowInvalid as exc:
        raise InputDataError(f"{url}: not a Parquet file ({exc})") from None


def _scan_parquet(url: str, file: int, field: str, packer: ShardPacker) -> None:
    """Rows and text bytes per row group, from the footer alone."""
    with storage.open_read(url, compression=None) as fh:
        pf = _open_parquet_file(fh, url)
        _text_column_check(pf, url, field)
        meta = pf.metadata
        row = 0
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            nbytes = sum(
                group.column(c).total_uncompressed_size
                for c in range(group.num_columns)
                if group.column(c).path_in_schema == field
            )
            if group.num_rows:
                packer.add(file, row, group.num_rows, nbytes)
            row += group.num_rows


def _decode_line(raw: bytes, url: str, line_no: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputDataError(
            f"{url} line {line_no}: invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
        ) from None


def _changed(url: str) -> InputDataError:
    return InputDataError(
        f"{url} has fewer documents than when prepare planned it: the input changed during the run; "
        "rerun prepare with --overwrite"
    )


def _read_jsonl(
    url: str, piece: Piece, field: str, skip_invalid: bool, counts: Counter[str]
) -> Iterator[tuple[str, str]]:
    with storage.open_read(url) as fh:
        if piece.offset >= 0:
            fh.seek(piece.offset)
            lines: Iterator[bytes] = itertools.islice(fh, piece.count)
        else:
            # A compressed stream cannot be entered in the middle: decompress and skip.
            lines = itertools.islice(fh, piece.start, piece.start + piece.count)
        seen = 0
        for line_no, raw in enumerate(lines, start=piece.start + 1):
            seen += 1
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
        if seen < piece.count:
            raise _changed(url)


def _read_parquet(
    url: str, piece: Piece, field: str, skip_invalid: bool, counts: Counter[str]
) -> Iterator[tuple[str, str]]:
    end = piece.start + piece.count
    with storage.open_read(url, compression=None) as fh:
        pf = _open_parquet_file(fh, url)
        _text_column_check(pf, url, field)
        meta = pf.metadata
        # Only the row groups that hold the piece's rows are read.
        groups, first, row = [], -1, 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if row < end and row + n > piece.start:
                groups.append(g)
                first = row if first < 0 else first
            row += n
        if row < end:
            raise _changed(url)
        row = first
        for batch in pf.iter_batches(row_groups=groups, columns=[field], batch_size=ROW_GROUP_DOCS):
            lo, hi = max(piece.start - row, 0), min(end - row, batch.num_rows)
            for i, value in enumerate(batch.column(0).slice(lo, max(hi - lo, 0)).to_pylist()):
                if isinstance(value, bytes):
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError:
                        if not skip_invalid:
                            raise InputDataError(
                                f"{url} row {row + lo + i}: invalid UTF-8 in column {field!r}"
                            ) from None
                        counts["invalid_utf8_skipped"] += 1
                        continue
                yield str(row + lo + i), value or ""
            row += batch.num_rows


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


def _fit_run(
    run: list[tuple[str, str]],
    tokenizers: Sequence[Any],
    encoders: Sequence[Encoder],
    limit: int,
    counts: Counter[str],
) -> pa.Table:
    """One run of kept documents as a table, documents too long for any tokenizer cut."""
    texts = [text for _, text in run]
    too_long = [False] * len(texts)
    for tok in tokenizers:
        for i, enc in enumerate(tok.encode_batch(texts, add_special_tokens=False)):
            too_long[i] = too_long[i] or len(enc.ids) > limit
    out_ids: list[str] = []
    out_texts: list[str] = []
    for (doc_id, text), long in zip(run, too_long, strict=True):
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
    counts["documents_out"] += len(out_ids)
    return pa.table(
        {
            "doc_id": pa.array(out_ids, pa.string()),
            "text": pa.array(out_texts, pa.large_string()),
        },
        schema=PREPARE,
    )


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
        """Keep the plan (after `_stage.json` claimed the folder): reruns need no new scan."""
        url = storage.join(plan.output, PLAN_FILE)
        if storage.exists(url) and storage.read_json(url).get("fingerprint") == plan.fingerprint:
            return
        storage.write_json(
            url,
            {
                "fingerprint": plan.fingerprint,
                "items": [
                    {"shard": it.shard, "inputs": list(it.inputs), "payload": dict(it.payload)}
                    for it in plan.items
                ],
            },
        )

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
        relative = [storage.relative_name(base, f) for f in files]
        sizes = [storage.size(f) for f in files]
        identity: dict[str, Any] = {
            "stage": self.name,
            "version": VERSION,
            "prepare": fingerprint_fields(cfg.prepare),
            "tokenizers": sorted(tokenizer_fingerprint(m.tokenizer_path) for m in cfg.models),
            "input_files": [[rel, size] for rel, size in zip(relative, sizes, strict=True)],
        }
        out = cfg.stage_url(self.name)
        items = _kept_plan(out, fingerprint(identity))
        if items is None:
            items = self._cut(cfg, files, relative, sizes)
        return [make_plan(self.name, cfg, output=out, identity=identity, inputs={}, items=items)]

    def _cut(
        self, cfg: PipelineConfig, files: list[str], relative: list[str], sizes: list[int]
    ) -> tuple[WorkItem, ...]:
        """Scan the inputs (see the module docstring) and cut the stream into shards."""
        pc = cfg.prepare
        packer = ShardPacker(pc.shard_docs, pc.shard_bytes)
        formats = []
        for i, url in enumerate(files):
            fmt = pc.format if pc.format != "auto" else _format_of(url)
            formats.append(fmt)
            if fmt == "jsonl":
                _scan_jsonl(url, i, packer)
            elif fmt == "parquet":
                _scan_parquet(url, i, pc.text_field, packer)
            else:
                packer.add(i, 0, 1, sizes[i])
        return tuple(
            WorkItem(
                shard=f"part-{k:05d}.parquet",
                inputs=tuple(dict.fromkeys(files[p.file] for p in pieces)),
                payload={
                    "pieces": [
                        {
                            "url": files[p.file],
                            "relative": relative[p.file],
                            "format": formats[p.file],
                            **{key: v for key, v in asdict(p).items() if key != "file"},
                        }
                        for p in pieces
                    ]
                },
            )
            for k, pieces in enumerate(packer.finish())
        )

    def process(self, cfg: PipelineConfig, item: WorkItem) -> ShardOutput:
        pc = cfg.prepare
        skip = pc.on_invalid_utf8 == "skip"
        counts: Counter[str] = Counter(documents_in=0, documents_out=0)
        tokenizers = [load_tokenizer(m.tokenizer_path) for m in cfg.models]
        encoders = [offsets_encoder(tok) for tok in tokenizers]

        def documents() -> Iterator[tuple[str, str]]:
            for p in item.payload["pieces"]:
                url, rel, fmt = str(p["url"]), str(p["relative"]), p["format"]
                piece = Piece(-1, int(p["start"]), int(p["count"]), int(p["offset"]))
                if fmt == "jsonl":
                    docs = _read_jsonl(url, piece, pc.text_field, skip, counts)
                elif fmt == "parquet":
                    docs = _read_parquet(url, piece, pc.text_field, skip, counts)
                else:
                    docs = _read_text(url, skip, counts)
                for key, text in docs:
                    yield (f"{rel}:{key}" if key else rel), text

        def batches() -> Iterator[pa.Table]:
            run: list[tuple[str, str]] = []
            for doc_id, text in documents():
                counts["documents_in"] += 1
                if not text.strip():
                    counts["dropped_empty"] += 1
                    continue
                run.append((doc_id, text))
                if len(run) == ROW_GROUP_DOCS:
                    yield _fit_run(run, tokenizers, encoders, pc.max_tokens, counts)
                    run = []
            if run:
                yield _fit_run(run, tokenizers, encoders, pc.max_tokens, counts)

        return ShardOutput(batches=batches(), schema=PREPARE, stats=counts)


def _kept_plan(out: str, fp: str) -> tuple[WorkItem, ...] | None:
    """The items `setup` kept for this fingerprint, if the folder holds its run."""
    state = manifest.stage_state(out)
    url = storage.join(out, PLAN_FILE)
    if state is None or state.get("fingerprint") != fp or not storage.exists(url):
        return None
    data = storage.read_json(url)
    if data.get("fingerprint") != fp:
        return None
    return tuple(
        WorkItem(shard=str(d["shard"]), inputs=tuple(d["inputs"]), payload=d["payload"])
        for d in data["items"]
    )
