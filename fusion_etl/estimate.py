"""`fusion-etl plan --estimate`: what a job will cost, before it runs, without weights or GPUs.

Per stage: documents, tokens per model, shards, work units, stored bytes, and GPU-hours (or
CPU-hours where a stage runs without GPUs). Every figure carries where it comes from:

* ``m`` measured: read from a finished stage's manifest and records, from the input listing,
  or exact from a model's config.json;
* ``s`` sampled: extrapolated from `estimate.sample_bytes` of text read from the corpus (or
  from the prepared shards), tokenized here with every model's tokenizer;
* ``g`` given: a figure of the job's `estimate:` section that stands for something this
  machine cannot read (a corpus's size, a model's parameters, a measured throughput);
* ``a`` assumed: a default of the `estimate:` section (an MFU, a device's peak FLOP/s);
* ``e`` estimated: modelled from the figures above (FLOPs, bytes per token).

Compute follows FLOPs: a forward pass costs 2 x parameters FLOPs per token and a training
step 6 x parameters; a device delivers its peak FLOP/s times an MFU; the pipeline's overhead
over the bare operation comes from the benchmarks (`fusion-etl bench extract`, `bench train`).
A stage that has finished replaces all of that by its recorded shard seconds.

The arithmetic is in pure functions (`forward_seconds`, `train_seconds`,
`extract_bytes_per_token`, `train_steps`); `estimate` gathers the inputs (I/O) and `render`
prints them.
"""

from __future__ import annotations

import bz2
import json
import lzma
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from fusion_etl import manifest, storage
from fusion_etl.config import ModelConfig, PipelineConfig
from fusion_etl.errors import UserError

__all__ = [
    "Estimate",
    "Figure",
    "Row",
    "estimate",
    "extract_bytes_per_token",
    "forward_seconds",
    "render",
    "train_seconds",
    "train_steps",
]

Source = Literal["m", "s", "g", "a", "e"]
_LEGEND = {
    "m": "measured (finished stages' manifests, the input listing, config.json)",
    "s": "sampled (extrapolated from text read and tokenized here)",
    "g": "given (the job's estimate: section)",
    "a": "assumed (a default of the estimate: section)",
    "e": "estimated (modelled from the figures above)",
}
# Provenance of a figure computed from others: the weakest of its inputs.
_ORDER: tuple[Source, ...] = ("m", "g", "s", "a", "e")

# Bytes per stored token of an extract shard after Parquet (zstd) compression, measured by
# `fusion-etl bench extract` on the demo kit: input_ids + token_logprobs + per-document
# columns, then per top-k slot the id and the log-prob.
EXTRACT_FIXED_BYTES = 6.9
EXTRACT_SLOT_BYTES = {"float16": 1.6, "float32": 5.0}


@dataclass(frozen=True)
class Figure:
    """A number and where it comes from."""

    value: float
    source: Source

    def __mul__(self, other: Figure | float) -> Figure:
        if isinstance(other, Figure):
            return Figure(self.value * other.value, _weakest(self.source, other.source))
        return Figure(self.value * other, self.source)

    def __add__(self, other: Figure) -> Figure:
        return Figure(self.value + other.value, _weakest(self.source, other.source))


def _weakest(a: Source, b: Source) -> Source:
    return _ORDER[max(_ORDER.index(a), _ORDER.index(b))]


@dataclass(frozen=True)
class Row:
    """One line of the estimate: a stage, or a stage for one model."""

    stage: str
    model: str = ""
    documents: Figure | None = None
    tokens: Figure | None = None
    shards: Figure | None = None
    work_units: Figure | None = None
    work_unit: str = ""
    stored_bytes: Figure | None = None
    gpu_hours: Figure | None = None
    cpu_hours: Figure | None = None


@dataclass(frozen=True)
class Estimate:
    rows: tuple[Row, ...]
    notes: tuple[str, ...] = ()
    assumptions: tuple[str, ...] = ()
    wall: tuple[str, ...] = ()
    """Wall-clock hours at the configured parallelism."""


# --------------------------------------------------------------------------------------------
# Pure arithmetic.


def forward_seconds(
    tokens: float, parameters: float, *, flops: float, mfu: float, overhead: float
) -> float:
    """Device-seconds to score `tokens` with a model of `parameters` (2 FLOPs per parameter
    per token, at `mfu` of `flops`, times the pipeline's `overhead` over a bare forward)."""
    return tokens * 2.0 * parameters * overhead / (flops * mfu)


def train_seconds(
    tokens: float, parameters: float, *, flops: float, mfu: float, overhead: float
) -> float:
    """Device-seconds to train on `tokens` (6 FLOPs per parameter per token)."""
    return tokens * 6.0 * parameters * overhead / (flops * mfu)


def extract_bytes_per_token(k: int, logprob_dtype: str) -> float:
    """Stored bytes per token of an extract shard at top-k `k` (bench extract's figures)."""
    return EXTRACT_FIXED_BYTES + k * EXTRACT_SLOT_BYTES[logprob_dtype]


def train_steps(
    tokens: float, *, block_size: int, micro_batch: int, grad_accum: int, workers: int, epochs: int
) -> int:
    """Optimizer steps: packed blocks of `block_size` over the global batch, per epoch."""
    blocks = math.ceil(tokens / block_size)
    return epochs * math.ceil(blocks / (micro_batch * grad_accum * workers))


# --------------------------------------------------------------------------------------------
# Reading what can be read.


@dataclass
class _Sample:
    """Documents read from the corpus or the prepared shards."""

    texts: list[str] = field(default_factory=list)
    text_bytes: int = 0
    documents: int = 0  # documents read (empty ones included)
    empty: int = 0


@dataclass(frozen=True)
class _Corpus:
    files: Figure | None
    documents_in: Figure  # non-empty input documents
    records: Figure  # input documents, empty ones included (what prepare's shards are cut by)
    text_bytes: Figure
    sample: _Sample
    notes: tuple[str, ...]


def _finished(url: str, stage: str, notes: list[str]) -> manifest.Manifest | None:
    """The stage's manifest if it has finished; None (with a note) if it cannot be read."""
    try:
        if not storage.exists(storage.join(url, manifest.SUCCESS)):
            return None
        return manifest.read_manifest(url, stage=stage)
    except Exception as exc:  # storage raises many kinds (permissions, credentials, network)
        note = f"{url} cannot be read from here ({type(exc).__name__}: {exc}); taken as not run"
        if note not in notes:
            notes.append(note)
        return None


_COMPRESSED = (".gz", ".bz2", ".xz")


def _decompressor(suffix: str) -> Any:
    if suffix == ".gz":
        return zlib.decompressobj(wbits=31)  # gzip framing
    return bz2.BZ2Decompressor() if suffix == ".bz2" else lzma.LZMADecompressor()


def _sample_lines(url: str, budget: int) -> tuple[list[bytes], bool, float]:
    """Lines from the start of a (possibly compressed) file until `budget` bytes of them:
    (lines, whether the whole file was read, bytes of the file they took).

    Compressed files are fed to the decompressor in small chunks, so that the compressed
    bytes counted are the ones the lines came from (a buffered reader would read ahead).
    """
    suffix = next((s for s in _COMPRESSED if url.lower().endswith(s)), None)
    lines: list[bytes] = []
    taken = fed = 0
    pending = b""
    whole = True
    with storage.open_read(url, compression=None) as raw:
        dec = _decompressor(suffix) if suffix else None
        while True:
            chunk = raw.read(4096 if dec is not None else 65536)
            if not chunk:
                break
            fed += len(chunk)
            if dec is not None and suffix is not None:
                out = []
                while chunk:
                    out.append(dec.decompress(chunk))
                    chunk = dec.unused_data if dec.eof else b""
                    if chunk:  # a file of several members (concatenated gzip streams)
                        dec = _decompressor(suffix)
                chunk = b"".join(out)
            *complete, pending = (pending + chunk).split(b"\n")
            for line in complete:
                lines.append(line + b"\n")
                taken += len(line) + 1
            if taken >= budget:
                whole = False
                break
    if whole and pending:
        lines.append(pending)
        taken += len(pending)
    return lines, whole, float(fed if suffix is not None else taken)


def _survey_input(cfg: PipelineConfig) -> _Corpus:
    """Documents and text bytes of prepare.input, from its listing and a sample."""
    from fusion_etl.stages.prepare import PrepareStage, _format_of

    est = cfg.estimate
    pc = cfg.prepare
    try:
        files = PrepareStage()._inputs(cfg)
    except Exception as exc:  # a missing folder, or storage that refuses (credentials)
        if est.corpus_documents > 0:
            return _Corpus(
                files=Figure(est.corpus_files, "g") if est.corpus_files else None,
                documents_in=Figure(est.corpus_documents, "g"),
                records=Figure(est.corpus_documents, "g"),
                text_bytes=Figure(est.corpus_bytes, "g"),
                sample=_Sample(),
                notes=(
                    f"prepare.input cannot be read from here ({exc}); its size is "
                    "estimate.corpus_documents and estimate.corpus_bytes",
                ),
            )
        raise UserError(
            f"prepare.input cannot be read from here ({exc}); to estimate anyway, set "
            "estimate.corpus_documents and estimate.corpus_bytes"
        ) from None
    sizes = [storage.size(f) for f in files]
    # Up to 8 files, spread over the listing, share the sample.
    picks = sorted({round(i * (len(files) - 1) / 7) for i in range(8)}) if len(files) > 8 else []
    sampled = picks or list(range(len(files)))
    budget = max(1, est.sample_bytes // len(sampled))
    sample = _Sample()
    per_file_docs: dict[int, float] = {}
    per_file_bytes: dict[int, float] = {}
    all_whole = len(sampled) == len(files)
    for i in sampled:
        url = files[i]
        fmt = pc.format if pc.format != "auto" else _format_of(url)
        docs, texts, whole, consumed = _sample_file(url, fmt, pc.text_field, budget)
        got = sum(len(t.encode("utf-8")) for t in texts)
        sample.texts.extend(t for t in texts if t.strip())
        sample.documents += docs
        sample.empty += sum(1 for t in texts if not t.strip())
        sample.text_bytes += got
        if fmt == "parquet":
            # The row count is in the footer; only the text per row is sampled.
            rows = float(_parquet_rows(url))
            whole = whole or docs >= rows
            per_file_docs[i] = rows
            per_file_bytes[i] = got / max(1, docs) * rows
        elif whole:
            per_file_docs[i], per_file_bytes[i] = float(docs), float(got)
        else:
            scale = sizes[i] / max(1.0, consumed)
            per_file_docs[i], per_file_bytes[i] = docs * scale, got * scale
        all_whole = all_whole and whole
    # Files left out of the sample: by their size, at the sampled files' rates.
    sampled_size = sum(sizes[i] for i in sampled) or 1
    docs_per_byte = sum(per_file_docs.values()) / sampled_size
    text_per_byte = sum(per_file_bytes.values()) / sampled_size
    documents = sum(per_file_docs.get(i, docs_per_byte * sizes[i]) for i in range(len(files)))
    text_bytes = sum(per_file_bytes.get(i, text_per_byte * sizes[i]) for i in range(len(files)))
    # prepare drops empty documents.
    non_empty = documents * (1 - sample.empty / max(1, sample.documents))
    source: Source = "m" if all_whole else "s"
    return _Corpus(
        files=Figure(len(files), "m"),
        documents_in=Figure(non_empty, source),
        records=Figure(documents, source),
        text_bytes=Figure(text_bytes, source),
        sample=sample,
        notes=(),
    )


def _parquet_rows(url: str) -> int:
    import pyarrow.parquet as pq

    with storage.open_read(url, compression=None) as fh:
        return int(pq.ParquetFile(fh).metadata.num_rows)


def _sample_file(
    url: str, fmt: str | None, text_field: str, budget: int
) -> tuple[int, list[str], bool, float]:
    """(documents read, their texts, whether the whole file was read, file bytes consumed)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        texts: list[str] = []
        taken = 0
        with storage.open_read(url, compression=None) as fh:
            pf = pq.ParquetFile(fh)
            for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
                for value in batch.column(0).to_pylist():
                    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                    texts.append(text or "")
                    taken += len((text or "").encode("utf-8"))
                if taken >= budget:
                    break
        return len(texts), texts, False, float(taken)
    lines, whole, consumed = _sample_lines(url, budget)
    if fmt == "text":
        text = b"".join(lines).decode("utf-8", "replace")
        return 1, [text], whole, consumed
    texts = []
    for raw in lines:
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # the last line of a sample may be cut; prepare reports real errors
        value = obj.get(text_field) if isinstance(obj, dict) else None
        texts.append(value if isinstance(value, str) else "")
    return len(texts), texts, whole, consumed


def _sample_prepared(prepared: manifest.Manifest, budget: int) -> _Sample:
    import pyarrow.parquet as pq

    sample = _Sample()
    for url in prepared.shard_urls():
        with storage.open_read(url, compression=None) as fh:
            for text in pq.read_table(fh, columns=["text"]).column("text").to_pylist():
                sample.texts.append(text)
                sample.documents += 1
                sample.text_bytes += len(text.encode("utf-8"))
                if sample.text_bytes >= budget:
                    return sample
    return sample


def _parameters(cfg: PipelineConfig, model: ModelConfig) -> Figure | None:
    from fusion_etl.model_shape import parameter_count

    try:
        config = storage.read_json(storage.join(model.path, "config.json"))
        return Figure(parameter_count(config), "m")
    except Exception:  # not readable here (or an unknown architecture): a given figure, if any
        given = cfg.estimate.parameters.get(model.name)
        return Figure(given, "g") if given else None


def _tokenizer(model: ModelConfig) -> Any | None:
    from fusion_etl.tokenization import load_tokenizer

    try:
        return load_tokenizer(model.tokenizer_path)
    except Exception:  # not readable here: bytes_per_token stands in
        return None


# --------------------------------------------------------------------------------------------
# The estimate.


def _extract_on_gpu(cfg: PipelineConfig, model: ModelConfig) -> bool:
    """Whether the model's extract actors reserve GPUs, decided from the config alone (no Ray):
    explicitly (extract.num_gpus), else vLLM reserves its tensor-parallel GPUs."""
    if cfg.extract.num_gpus >= 0:
        return cfg.extract.num_gpus > 0
    backend = model.backend if model.backend != "auto" else cfg.extract.backend
    return backend == "vllm"


def _setting(cfg: PipelineConfig, name: str) -> Figure:
    """An estimate: figure, "g" where the job sets it, "a" where it is the default."""
    from fusion_etl.config import EstimateConfig

    value = float(getattr(cfg.estimate, name))
    return Figure(value, "a" if value == getattr(EstimateConfig(), name) else "g")


def _hours(seconds: Figure | None) -> Figure | None:
    return None if seconds is None else seconds * (1 / 3600)


def _recorded_seconds(done: manifest.Manifest) -> Figure:
    return Figure(sum(s.seconds for s in done.shards), "m")


def estimate(cfg: PipelineConfig) -> Estimate:
    """Everything `render` prints, for the configured job (reads manifests, the input's
    listing and a sample of it, the models' config.json and tokenizers; never weights)."""
    storage.configure(cfg.storage)
    est, pc, ec = cfg.estimate, cfg.prepare, cfg.extract
    notes: list[str] = []
    rows: list[Row] = []

    # --- prepare ------------------------------------------------------------------------
    prepared = _finished(cfg.stage_url("prepare"), "prepare", notes)
    shards: Figure | None
    tokenizers = {m.name: _tokenizer(m) for m in cfg.models}
    if prepared is not None:
        sample = _sample_prepared(prepared, est.sample_bytes)
        documents = Figure(prepared.rows, "m")
        shards = Figure(len(prepared.shards), "m")
        text_bytes = Figure(sample.text_bytes / max(1, sample.documents), "s") * documents
        rows.append(
            Row(
                "prepare",
                documents=documents,
                shards=shards,
                work_units=shards,
                work_unit="tasks",
                stored_bytes=Figure(prepared.bytes, "m"),
                cpu_hours=_hours(_recorded_seconds(prepared)),
            )
        )
    else:
        corpus = _survey_input(cfg)
        notes.extend(corpus.notes)
        sample = corpus.sample
        text_bytes = corpus.text_bytes
        # Pieces per document: prepare cuts a document longer than block_size - margin
        # tokens under any tokenizer into pieces that fit all of them.
        pieces = _pieces_per_document(sample.texts, list(tokenizers.values()), pc.max_tokens)
        documents = corpus.documents_in * pieces
        # prepare cuts the input stream every shard_docs documents or shard_bytes of text,
        # whichever comes first (files are split and grouped; a lone large file still counts).
        by_docs = math.ceil(corpus.records.value / pc.shard_docs)
        by_bytes = math.ceil(text_bytes.value / pc.shard_bytes)
        shards = Figure(
            max(1, by_docs, by_bytes),
            _weakest("e", _weakest(corpus.documents_in.source, text_bytes.source)),
        )
        stored, prepare_seconds = _prepare_cost(sample, list(tokenizers.values()), text_bytes)
        rows.append(
            Row(
                "prepare",
                documents=documents,
                shards=shards,
                work_units=shards,
                work_unit="tasks",
                stored_bytes=stored,
                cpu_hours=_hours(prepare_seconds),
            )
        )

    # --- extract ------------------------------------------------------------------------
    tokens: dict[str, Figure] = {}
    parameters: dict[str, Figure | None] = {}
    extra_tokens = documents * float(int(ec.add_eos) + int(ec.add_bos))
    for model in cfg.models:
        parameters[model.name] = params = _parameters(cfg, model)
        done = _finished(storage.join(cfg.stage_url("extract"), model.name), "extract", notes)
        tok = tokenizers[model.name]
        if done is not None:
            tokens[model.name] = Figure(sum(s.stats.get("tokens", 0) for s in done.shards), "m")
        elif tok is not None and sample.texts:
            counted = sum(
                len(e.ids) for e in tok.encode_batch(sample.texts, add_special_tokens=False)
            )
            per_byte = Figure(counted / max(1, sample.text_bytes), "s")
            tokens[model.name] = text_bytes * per_byte + extra_tokens
        else:
            bpt = _setting(cfg, "bytes_per_token")
            if tok is None:
                notes.append(
                    f"{model.name}: tokenizer not readable here; estimate.bytes_per_token "
                    f"{est.bytes_per_token} ({'given' if bpt.source == 'g' else 'assumed'})"
                )
            tokens[model.name] = text_bytes * Figure(1 / bpt.value, bpt.source) + extra_tokens
        on_gpu = _extract_on_gpu(cfg, model)
        seconds: Figure | None
        if done is not None:
            seconds = _recorded_seconds(done)
        elif model.name in est.tokens_per_s:
            seconds = tokens[model.name] * Figure(1 / est.tokens_per_s[model.name], "g")
        elif params is None:
            seconds = None
            notes.append(
                f"{model.name}: no readable config.json of a supported architecture here; set "
                f"estimate.parameters.{model.name}"
            )
        else:
            flops = (est.extract_gpu_flops or est.gpu_flops) if on_gpu else est.cpu_flops
            mfu = est.extract_mfu if on_gpu else 1.0
            seconds = Figure(
                forward_seconds(
                    tokens[model.name].value,
                    params.value,
                    flops=flops,
                    mfu=mfu,
                    overhead=est.extract_overhead,
                ),
                "e",
            )
        gpus_per_actor = _extract_gpus(cfg, model) if on_gpu else 0.0
        hours = _hours(seconds)
        stored = (
            Figure(done.bytes, "m")
            if done is not None
            else tokens[model.name]
            * Figure(extract_bytes_per_token(ec.top_k, ec.logprob_dtype), "e")
        )
        rows.append(
            Row(
                "extract",
                model=model.name,
                documents=documents,
                tokens=tokens[model.name],
                shards=shards,
                work_units=shards,
                work_unit="actor calls",
                stored_bytes=stored,
                gpu_hours=hours * gpus_per_actor if hours is not None and on_gpu else None,
                cpu_hours=hours if not on_gpu else None,
            )
        )

    # --- align_fuse ---------------------------------------------------------------------
    target_tokens = tokens[cfg.target.name]
    fused = _finished(cfg.stage_url("align_fuse"), "align_fuse", notes)
    k_out = cfg.align_fuse.top_k or ec.top_k
    if fused is not None:
        fused_bytes = Figure(fused.bytes, "m")
        fused_seconds = _recorded_seconds(fused)
        target_tokens = Figure(sum(s.stats.get("tokens", 0) for s in fused.shards), "m")
    else:
        per_token = est.align_fuse_bytes_per_token or _fused_bytes_per_token(k_out)
        fused_bytes = target_tokens * Figure(per_token, "e")
        fused_seconds = target_tokens * Figure(
            max(1, len(cfg.sources)) / est.align_fuse_tokens_per_cpu_s, "e"
        )
    rows.append(
        Row(
            "align_fuse",
            documents=documents,
            tokens=target_tokens,
            shards=shards,
            work_units=shards,
            work_unit="tasks",
            stored_bytes=fused_bytes,
            cpu_hours=_hours(fused_seconds),
        )
    )

    # --- train --------------------------------------------------------------------------
    tc = cfg.train
    train_tokens = target_tokens * float(tc.epochs)
    steps = train_steps(
        target_tokens.value,
        block_size=tc.block_size,
        micro_batch=tc.micro_batch,
        grad_accum=tc.grad_accum,
        workers=tc.num_workers,
        epochs=tc.epochs,
    )
    target_params = parameters[cfg.target.name]
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and tc.use_gpu)
    train_hours: Figure | None = None
    if target_params is not None:
        flops = est.gpu_flops if tc.use_gpu else est.cpu_flops
        mfu = est.train_mfu if tc.use_gpu else 1.0
        train_hours = Figure(
            train_seconds(
                train_tokens.value,
                target_params.value,
                flops=flops,
                mfu=mfu,
                overhead=est.train_overhead,
            )
            / 3600,
            "e",
        )
    rows.append(
        Row(
            "train",
            model=cfg.target.name,
            tokens=train_tokens,
            work_units=Figure(steps, _weakest(target_tokens.source, "m")),
            work_unit="optimizer steps",
            stored_bytes=None
            if target_params is None
            else target_params * Figure(2.0 if bf16 else 4.0, "e"),
            gpu_hours=train_hours if tc.use_gpu else None,
            cpu_hours=train_hours if not tc.use_gpu else None,
        )
    )

    wall: list[str] = []
    extract_hours: list[float] = []
    for r in rows:
        if r.stage != "extract":
            continue
        if r.gpu_hours is not None:
            per_replica = max(1.0, _extract_gpus(cfg, cfg.target))
            extract_hours.append(r.gpu_hours.value / per_replica / ec.actors)
        elif r.cpu_hours is not None:
            extract_hours.append(r.cpu_hours.value / ec.actors)
    if extract_hours:
        wall.append(
            f"extract: {max(extract_hours):.3g} h with {ec.actors} replica(s) per model if every "
            f"model's replicas run at once, {sum(extract_hours):.3g} h one model after another"
        )
    if train_hours is not None:
        workers = tc.num_workers
        wall.append(f"train: {train_hours.value / workers:.3g} h on {workers} workers")
    extract_flops = est.extract_gpu_flops or est.gpu_flops
    assumptions = (
        f"extract: tokens x 2 x parameters x {est.extract_overhead} (overhead over a bare "
        f"forward) / ({extract_flops / 1e12:.0f} TFLOP/s x MFU {est.extract_mfu}) on GPUs, "
        f"/ {est.cpu_flops / 1e9:.0f} GFLOP/s per CPU actor",
        f"train: tokens x 6 x parameters x {est.train_overhead} (fusion over CLM-only) / "
        f"({est.gpu_flops / 1e12:.0f} TFLOP/s x MFU {est.train_mfu}); final model "
        f"{'bf16' if bf16 else 'fp32'}",
        f"align_fuse: {est.align_fuse_tokens_per_cpu_s:.0f} target tokens per CPU-second per "
        "source; stored bytes from the fused top-k",
        f"extract stored: {EXTRACT_FIXED_BYTES} + k x "
        f"{EXTRACT_SLOT_BYTES[ec.logprob_dtype]} bytes per token ({ec.logprob_dtype} log-probs)",
    )
    return Estimate(rows=tuple(rows), notes=tuple(notes), assumptions=assumptions, wall=tuple(wall))


def _extract_gpus(cfg: PipelineConfig, model: ModelConfig) -> float:
    if cfg.extract.num_gpus >= 0:
        return cfg.extract.num_gpus
    return float(cfg.extract.vllm.tensor_parallel_size)


# Fused shards: per target token the input id and k (id, probability) pairs, float32; the
# demo kit's align_fuse output (19.3 bytes per target token at k=10) compresses to this share.
FUSED_COMPRESSION = 0.23


def _fused_bytes_per_token(k: int) -> float:
    return (4 + 8 * k) * FUSED_COMPRESSION


def _pieces_per_document(texts: Sequence[str], tokenizers: Sequence[Any], limit: int) -> Figure:
    """Prepared documents per input document, from cutting the sample exactly as prepare
    does (a document over `limit` tokens under any tokenizer is cut into pieces that fit all
    of them, at line breaks or spaces where it can: more pieces than tokens / limit)."""
    from fusion_etl.stages.prepare import split_to_fit
    from fusion_etl.tokenization import offsets_encoder

    encoders = [offsets_encoder(tok) for tok in tokenizers if tok is not None]
    if not texts or not encoders:
        return Figure(1.0, "a")
    pieces = sum(max(1, len(split_to_fit(t, encoders, limit))) for t in texts)
    return Figure(pieces / len(texts), "s")


def _prepare_cost(
    sample: _Sample, tokenizers: Sequence[Any], text_bytes: Figure
) -> tuple[Figure | None, Figure | None]:
    """Stored bytes and CPU-seconds of prepare, from doing its work on the sample here: every
    tokenizer over the text, and the Parquet shard of it."""
    if not sample.texts:
        return None, None
    import pyarrow as pa

    from fusion_etl.schema import PREPARE, parquet_bytes

    started = time.perf_counter()
    for tok in tokenizers:
        if tok is not None:
            tok.encode_batch(sample.texts, add_special_tokens=False)
    table = pa.table(
        {
            "doc_id": pa.array([f"d{i}" for i in range(len(sample.texts))], pa.string()),
            "text": pa.array(sample.texts, pa.large_string()),
        },
        schema=PREPARE,
    )
    stored = len(parquet_bytes(table))
    seconds = time.perf_counter() - started
    sample_bytes = max(1, sum(len(t.encode("utf-8")) for t in sample.texts))
    return (
        text_bytes * Figure(stored / sample_bytes, "s"),
        text_bytes * Figure(seconds / sample_bytes, "s"),
    )


# --------------------------------------------------------------------------------------------
# Printing.


def _count(f: Figure | None, unit: str = "") -> str:
    if f is None:
        return "-"
    v = f.value
    unit = f" {unit}" if unit else ""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:.2f}{suffix}{unit} {f.source}"
    return f"{v:.0f}{unit} {f.source}"


def _bytes(f: Figure | None) -> str:
    if f is None:
        return "-"
    n = f.value
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            text = f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
            return f"{text} {f.source}"
        n /= 1024
    raise AssertionError("unreachable")


def _hours_text(f: Figure | None) -> str:
    if f is None:
        return "-"
    if f.value < 0.01:  # a small job: seconds read better than 0.00072 hours
        return f"({f.value * 3600:.1f} s) {f.source}"
    return f"{f.value:.3g} {f.source}" if f.value < 1000 else f"{f.value:,.0f} {f.source}"


def render(result: Estimate, *, title: str) -> str:
    """The estimate as an aligned table, its totals, notes and the legend of sources."""
    header = (
        "stage",
        "model",
        "documents",
        "tokens",
        "shards",
        "work units",
        "stored",
        "GPU-hours",
        "CPU-hours",
    )
    lines = [
        (
            r.stage,
            r.model or "-",
            _count(r.documents),
            _count(r.tokens),
            _count(r.shards),
            _count(r.work_units, r.work_unit),
            _bytes(r.stored_bytes),
            _hours_text(r.gpu_hours),
            _hours_text(r.cpu_hours),
        )
        for r in result.rows
    ]

    def total(attr: str) -> Figure | None:
        figures: list[Figure] = [
            getattr(r, attr) for r in result.rows if getattr(r, attr) is not None
        ]
        if not figures:
            return None
        out = figures[0]
        for f in figures[1:]:
            out = out + f
        return out

    lines.append(
        (
            "total",
            "",
            "",
            "",
            "",
            "",
            _bytes(total("stored_bytes")),
            _hours_text(total("gpu_hours")),
            _hours_text(total("cpu_hours")),
        )
    )
    widths = [max(len(row[c]) for row in [header, *lines]) for c in range(len(header))]
    out = [title, ""]
    for row in [header, *lines]:
        out.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    out.append("")
    out.extend(f"wall clock: {w}" for w in result.wall)
    out.extend(f"note: {n}" for n in result.notes)
    out.extend(f"model: {a}" for a in result.assumptions)
    out.append("sources: " + "; ".join(f"{k} {v}" for k, v in _LEGEND.items()))
    return "\n".join(out)
